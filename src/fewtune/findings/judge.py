"""Verdicts on a findings file's claims: supported, contradicted or not settled, with the family-wise error over
every claim × setting of the file controlled (docs/findings.md).

For a claim and a setting (model × task × shots present in the results) the estimate is the contrast
mean(A) − mean(B) of the claim's options at those shots, from fewtune.stats.compare.Fit over *every* option of that
(model, task) on the claim's split, so seeds are paired through the fit's seed effects and the seed variance is
pooled over all options. Each row brings two one-sided hypotheses, "the claim holds" (S) and "its opposite holds"
(C):

    better        S: d > 0                    C: d < 0
    worse         S: d < 0                    C: d > 0
    noninferior   S: d > −m                   C: d < −m        (A worse than B by more than the margin)
    equivalent    S: −m < d < m (TOST)        C: |d| > m       (either side; Bonferroni over the two sides)

A one-sided p-value is the smallest α at which the bound d ∓ half(α) clears the null, with
half(α)² = t(1−α, df)²·seed_var + z(1−α)²·example_var: the same construction as every interval of the report
(each variance part widened by the quantile of its own degrees of freedom), inverted. The claims are judged at
every look the data can have had (fewtune.stats.sequential.Plan: each option's first 4, 5, … N runs in the spec's
seed order, N the grid's seeds), as everywhere in the report: at the look with n seeds each p-value is weighted by
that look's share of α (p · α / share(n)), Holm's step-down runs over all of the file's hypotheses (S and C of every
row) at α = 5%, and a verdict reached at a look stands (the union of the looks is within α, a union bound). The
claims were fixed before the data, so the looks and the claims are the only multiplicity there is. Holm is a few lines here (statsmodels is not
a dependency and is not needed for it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import special as _special

from ..stats import claims as _claims
from ..stats import compare, sequential
from ..stats.fmt import METRIC_NAMES, scale_for
from ..stats.metrics import METRICS
from ..stats.options import model_order
from . import Claim, Findings, check_margin_for, matches

SUPPORTED, CONTRADICTED, NOT_SETTLED = "supported", "contradicted", "not settled"
NO_RUNS, NOT_JUDGED = "no runs", "not judged"  # a claim naming no option here; one that cannot be judged as written
MAX_SEEDS = 50  # what-it-takes searches up to this many seeds per option


@dataclass
class Row:
    """One claim on one setting: the verdict and the numbers behind it (JSON-ready through to_dict)."""
    claim: Claim
    task: str
    model: str
    shots: int | None
    split: str | None                 # the evaluation split's name (cola: out_of_domain_dev)
    metric: str
    verdict: str = NO_RUNS
    estimate: float = math.nan        # mean(A) − mean(B) in the metric's units
    lo: float = math.nan              # the interval behind the verdict, at `level`
    hi: float = math.nan
    level: float = math.nan           # two-sided coverage of [lo, hi]: 1 − 2·(the one-sided level Holm tested at)
    p_support: float = math.nan       # Holm-adjusted
    p_contra: float = math.nan
    options_a: tuple[str, ...] = ()
    options_b: tuple[str, ...] = ()
    min_seeds: int = 0
    reason: str = ""                  # why there is no verdict (no runs, one seed, ...)
    needs: str = ""                   # what it would take to settle it
    # internals for the tests and the step-down; not printed
    contrast: compare.Contrast | None = field(default=None, repr=False)
    looks: float = 1.0               # the p-value weight of the look the verdict comes from: α / its share
    look: int = 0                     # the seeds of that look (0: no look yet)
    population: int | None = None
    n_examples: int = 0

    @property
    def judged(self) -> bool:
        return self.contrast is not None and not self.reason

    def sentence(self) -> str:
        return sentence(self)

    def to_dict(self) -> dict:
        nan = lambda x: None if isinstance(x, float) and math.isnan(x) else x  # noqa: E731  JSON has no NaN
        c = self.claim
        return {"claim": c.id, "relation": c.relation, "a": list(c.a), "b": list(c.b), "split_role": c.split,
                "margin": c.margin, "task": self.task, "model": self.model, "shots": self.shots, "split": self.split,
                "metric": self.metric, "verdict": self.verdict, "estimate": nan(self.estimate), "lo": nan(self.lo),
                "hi": nan(self.hi), "level": nan(self.level), "p_support_holm": nan(self.p_support),
                "p_contradict_holm": nan(self.p_contra), "options_a": list(self.options_a),
                "options_b": list(self.options_b), "min_seeds": self.min_seeds, "reason": self.reason,
                "needs": self.needs, "sentence": self.sentence()}


@dataclass
class Judgement:
    """Every row of one findings file on one set of results, and the procedure's terms."""
    findings: Findings
    rows: list[Row]
    alpha: float
    hypotheses: int                   # how many Holm ran over (2 per judged row)

    def to_dict(self) -> dict:
        return {"source": self.findings.source, "title": self.findings.title, "alpha": self.alpha,
                "procedure": "Holm over every claim x setting (support and contradiction each a one-sided test; "
                             "equivalence by two one-sided tests), each look weighted by its share of α, a verdict reached at a look stands (docs/findings.md)",
                "hypotheses": self.hypotheses, "rows": [r.to_dict() for r in self.rows]}


# ----------------------------------------------------------------------------- p-values and Holm
def half_width(alpha, seed_var, example_var, df):
    """One-sided bound's distance from the estimate at level α (arrays broadcast): each variance part widened by
    the quantile of its own degrees of freedom, as compare.Contrast.with_interval does."""
    alpha, df = np.asarray(alpha, dtype=float), np.asarray(df, dtype=float)
    # the ufuncs behind scipy.stats' t and norm quantiles (stdtrit(inf, ·) is the normal's): ~100x faster per call
    t = _special.stdtrit(np.maximum(df, 1e-9), 1 - alpha)
    z = _special.ndtri(1 - alpha)
    return np.sqrt(t ** 2 * np.asarray(seed_var) + z ** 2 * np.asarray(example_var))


def one_sided_p(dist, seed_var, example_var, df, iterations: int = 32):
    """The smallest α at which the one-sided bound clears a null `dist` away in the claimed direction (dist ≤ 0:
    p = 1). Vectorised bisection on log α over [1e-15, 0.5]: half(α) falls as α grows, so the set is an interval."""
    dist = np.asarray(dist, dtype=float)
    shape = np.broadcast(dist, seed_var, example_var, df).shape
    dist, sv, ev, dfs = (np.broadcast_to(np.asarray(x, dtype=float), shape) for x in (dist, seed_var, example_var, df))
    lo, hi = np.full(shape, -15.0), np.full(shape, math.log10(0.5))
    for _ in range(iterations):
        mid = (lo + hi) / 2
        ok = half_width(10 ** mid, sv, ev, dfs) < dist  # cleared at α = 10^mid: p is at most that
        hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid)
    p = np.where(half_width(0.5, sv, ev, dfs) < dist, 10 ** hi, 1.0)
    return np.where((dist > 0) & np.isfinite(sv) & (dfs > 0), p, 1.0)


def holm(p) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down over p-values: (adjusted p-values, the one-sided level each hypothesis was tested at).
    The i-th smallest is tested at α/(M − i + 1) while all before it were rejected; from the first that is not,
    every later one is held to that same level (so an interval at it never clears: consistent with the verdict)."""
    p = np.asarray(p, dtype=float)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    divisor = np.empty(m)
    divisor[order] = m - np.arange(m)
    return adjusted, divisor


def _tests(rows: list[Row]) -> tuple[np.ndarray, np.ndarray]:
    """Raw one-sided p-values (S, C) of each judged row, times its looks."""
    d = np.array([r.contrast.value for r in rows])
    sv = np.array([r.contrast.seed_var for r in rows])
    ev = np.array([r.contrast.example_var for r in rows])
    df = np.array([r.contrast.df for r in rows])
    m = np.array([r.claim.margin or 0.0 for r in rows])
    rel = np.array([r.claim.relation for r in rows])
    # every bound each row could need, in one vectorised bisection: d > 0, d < 0, d > −m, d < −m, d < m, d > m
    p = one_sided_p(np.stack([d, -d, d + m, -(d + m), m - d, d - m, -m - d]), sv, ev, df)
    up, down, ni_s, ni_c = p[0], p[1], p[2], p[3]
    eq_s = np.maximum(p[4], p[2])                       # TOST: shown inside on both sides
    eq_c = np.minimum(1.0, 2 * np.minimum(p[5], p[6]))  # shown outside, either side (Bonferroni over the two)
    ps = np.select([rel == "better", rel == "worse", rel == "noninferior"], [up, down, ni_s], eq_s)
    pc = np.select([rel == "better", rel == "worse", rel == "noninferior"], [down, up, ni_c], eq_c)
    looks = np.array([r.looks for r in rows], dtype=float)
    return np.minimum(1.0, ps * looks), np.minimum(1.0, pc * looks)


def holm_levels(p, alpha: float = compare.ALPHA) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(adjusted p-values, rejected, the divisor each hypothesis is held to): a rejected one its own step's, every
    kept one the step at which the step-down stopped, the largest divisor among those kept (Holm tests in order of
    p and stops at the first it keeps; p = [.001, .03, .04, .045] gives 4, 3, 3, 3)."""
    adjusted, divisor = holm(p)
    rejected = adjusted <= alpha
    kept = [divisor[i] for i in range(len(p)) if not rejected[i]]
    stop = max(kept) if kept else None
    level = np.where(rejected | (stop is None), divisor, np.maximum(divisor, stop if stop is not None else 0))
    return adjusted, rejected, level


def decide(rows: list[Row], alpha: float = compare.ALPHA) -> int:
    """Fill each judged row's verdict, adjusted p-values and interval (Holm over all rows' S and C); returns the
    number of hypotheses."""
    judged = [r for r in rows if r.judged]
    if not judged:
        return 0
    ps, pc = _tests(judged)
    adjusted, rejected, level = holm_levels(np.concatenate([ps, pc]), alpha)
    n = len(judged)
    for i, r in enumerate(judged):
        r.p_support, r.p_contra = float(adjusted[i]), float(adjusted[n + i])
        r.verdict = SUPPORTED if rejected[i] else (CONTRADICTED if rejected[n + i] else NOT_SETTLED)
        # the interval behind the verdict: at the level Holm tested C at when contradicted (equivalence: each side
        # at half of it), else at S's (for one not rejected: the level at which the step-down stopped)
        k = n + i if r.verdict == CONTRADICTED else i
        a_one = alpha / level[k] / r.looks / (2 if k == n + i and r.claim.relation == "equivalent" else 1)
        half = float(half_width(a_one, r.contrast.seed_var, r.contrast.example_var, r.contrast.df))
        r.lo, r.hi, r.level = r.estimate - half, r.estimate + half, 1 - 2 * a_one
        if r.verdict == NOT_SETTLED:
            r.needs = what_it_takes(r, a_one)
    return 2 * n


# ----------------------------------------------------------------------------- rows from option groups
def judge(findings: Findings, groups: list[dict], alpha: float = compare.ALPHA) -> Judgement:
    """Every claim of `findings` on every (model, task, shots) of `groups` (options.group_runs) that it applies
    to, at every look (see the module docstring); a claim naming no option there gets a row that says so."""
    pairs = model_order(groups)
    plans, most = {}, {}
    for task, model in pairs:
        gs = [g for g in groups if g["task"] == task and g["model"] == model]
        counts = [max((len(p["seeds"]) for p in (g.get("preds") or {}).values() if p), default=g.get("n_runs", 0))
                  for g in gs if not _claims.is_constant(g)]
        most[(task, model)] = max(counts, default=0)
        plans[(task, model)] = sequential.plan_for(_claims.plan_of(gs), most[(task, model)])
    looks = sorted({n for k in pairs for n in plans[k].looks if n <= most[k]})
    final: list[Row] | None = None
    decided: dict[int, Row] = {}
    hypotheses = 0
    for n in looks or [None]:
        rows = _rows(findings, groups, pairs, n, plans, most, alpha)
        hypotheses = max(hypotheses, decide([r for r in rows if r.look == n or n is None], alpha))
        if final is None:
            final = rows
        for i, r in enumerate(rows):
            if n is not None and r.look != n:
                continue  # its family has no look at n: its last look stands
            final[i] = r
            if r.verdict in (SUPPORTED, CONTRADICTED) and i not in decided:
                decided[i] = r
    rows = [decided.get(i, r) for i, r in enumerate(final or [])]
    return Judgement(findings, rows, alpha, hypotheses)


def _rows(findings, groups, pairs, n, plans, most, alpha) -> list[Row]:
    rows: list[Row] = []
    for task, model in pairs:
        gs = [g for g in groups if g["task"] == task and g["model"] == model]
        plan = plans[(task, model)]
        own = [k for k in plan.looks if k <= most[(task, model)]]
        if not own:  # no look yet (fewer than 4 seeds): its rows say so at every look
            at, share, look = None, plan.share(compare.MIN_SEEDS) or alpha, n
        elif n is not None and n in own:
            at, share, look = n, plan.share(n), n
        else:  # its last look was earlier: that one stands
            at, share, look = max(own), plan.share(max(own)), -1
        families: dict[str, _Family | None] = {}
        for c in findings.claims:
            if not c.applies_to(task, model):
                continue
            if c.prefix not in families:
                families[c.prefix] = _family(gs, c.prefix, at)
            for r in _rows_for(c, task, model, gs, families[c.prefix]):
                r.look = look
                r.looks = alpha / share
                rows.append(r)
    return rows


@dataclass
class _Family:
    fit: compare.Fit
    by_name: dict[str, dict]
    split: str
    metric: str
    population: int | None
    seeds: dict[str, int]             # runs per option at this look (a seed-free option: 1)
    constant: set[str]


def _family(gs: list[dict], prefix: str, n: int | None = None) -> _Family | None:
    """The fit of every option of one (model, task) scored on the split's common examples (as fewtune.stats.claims
    pairs them), each option's first n runs in the spec's seed order (all with n None); None when no option has
    predictions there."""
    have = [g for g in gs if (g.get("preds") or {}).get(prefix) is not None]
    ref = _claims._reference_examples(have, prefix)
    if ref is None:
        return None
    paired = [g for g in have if np.array_equal(g["preds"][prefix]["idx"], ref)]
    by_name = {_claims.name(g): g for g in paired}
    order = _claims.seed_order_of(paired)
    runs = [_claims.option_runs(name, g, prefix, order) for name, g in by_name.items()]
    if n is not None:
        runs = sequential.first(runs, n)
    p0 = paired[0]["preds"][prefix]
    pops = [g.get(f"{prefix}_population") for g in paired if g.get(f"{prefix}_population")]
    metric = paired[0]["primary_metric"]
    return _Family(compare.Fit(p0["gold"], runs, p0["n_classes"], metric), by_name,
                   paired[0].get(f"{prefix}_split") or prefix, metric, max(pops) if pops else None,
                   {o.name: (1 if o.constant else len(np.atleast_2d(o.pred))) for o in runs},
                   {o.name for o in runs if o.constant})


def _rows_for(c: Claim, task: str, model: str, gs: list[dict], fam: _Family | None) -> list[Row]:
    metric = gs[0]["primary_metric"]
    named = [g for g in gs if any(matches(p, g["label"]) for p in (*c.a, *c.b))]
    shots = list(c.shots) if c.shots is not None else sorted({g["shots"] for g in named})
    split = next((g.get(f"{c.prefix}_split") for g in gs if g.get(f"{c.prefix}_split")), None)
    base = dict(claim=c, task=task, model=model, split=split, metric=metric)
    if split is None:
        where = "in-domain" if c.prefix == "id" else "out-of-domain"
        return [Row(**base, shots=None, reason=f"no {where} results for {task}")]
    if not shots:
        return [Row(**base, shots=None, reason=f"no runs for {', '.join((*c.a, *c.b))}")]
    return [_row(c, Row(**base, shots=s), [g for g in gs if g["shots"] == s], fam) for s in shots]


def _row(c: Claim, row: Row, gs: list[dict], fam: _Family | None) -> Row:
    side = {}
    for key, patterns in (("a", c.a), ("b", c.b)):
        side[key] = [g for g in gs if any(matches(p, g["label"]) for p in patterns)]
    missing = [p for p in (*c.a, *c.b) if not any(matches(p, g["label"]) for g in gs)]
    if missing:
        row.reason = f"no runs for {', '.join(missing)} at {row.shots} shots"
        return row
    names = {k: [_claims.name(g) for g in v] for k, v in side.items()}
    row.options_a, row.options_b = tuple(names["a"]), tuple(names["b"])
    both = set(names["a"]) & set(names["b"])
    if both:
        row.reason = f"{', '.join(sorted(both))} matches both groups"
        row.verdict = NOT_JUDGED
        return row
    why = check_margin_for(c, row.metric)
    if why:
        row.reason = why
        row.verdict = NOT_JUDGED
        return row
    outside = [n for n in (*names["a"], *names["b"]) if fam is None or n not in fam.by_name]
    if outside:
        row.reason = (f"no stored predictions on the split's common examples for {', '.join(outside)}")
        row.verdict = NOT_JUDGED
        return row
    trained = [n for n in (*names["a"], *names["b"]) if n not in fam.constant]
    row.min_seeds = min((fam.seeds[n] for n in trained), default=compare.MIN_SEEDS)
    row.population, row.n_examples = fam.population, fam.fit.n_examples
    weights = {n: 1.0 / len(names["a"]) for n in names["a"]}
    weights.update({n: -1.0 / len(names["b"]) for n in names["b"]})
    d = fam.fit.contrast(weights)
    if d is None:
        row.reason = "the two groups share no seed (directly or through other options): they cannot be paired"
        row.verdict = NOT_JUDGED
        return row
    row.contrast, row.estimate = d, d.value
    if row.min_seeds < compare.MIN_SEEDS:
        few = [n for n in trained if fam.seeds[n] < compare.MIN_SEEDS]
        row.reason = (f"fewer than {compare.MIN_SEEDS} seeds of {', '.join(few)}: "
                      f"{'its' if len(few) == 1 else 'their'} training instability cannot be estimated")
        row.verdict, row.needs = NOT_SETTLED, f"at least {compare.MIN_SEEDS} seeds of {', '.join(few)}"
    elif not (d.df > 0 and math.isfinite(d.seed_var)):
        row.reason = "no degrees of freedom left for the seed variance"
        row.verdict, row.needs = NOT_SETTLED, "more seeds"
    return row


# ----------------------------------------------------------------------------- what it would take, in words
def _distance(r: Row) -> float:
    """How far the estimate is from the nearer boundary it would have to clear (support or contradiction)."""
    d, m = r.estimate, r.claim.margin or 0.0
    if r.claim.relation in ("better", "worse"):
        return abs(d)
    if r.claim.relation == "noninferior":
        return abs(d + m)
    return abs(m - abs(d))


def what_it_takes(r: Row, alpha_one: float) -> str:
    """Seeds per option, or evaluation examples (never more than the split holds), that would let the bound clear
    at the level it was tested at, if the estimate and the variances stay as measured."""
    d = r.contrast
    dist = _distance(r)
    if dist < 1e-12:
        return "the estimate sits on the claim's boundary: more data would not settle it"
    z_ex = float(half_width(alpha_one, 0.0, d.example_var, math.inf))
    if z_ex >= dist:  # the example part alone is too wide: seeds cannot help
        need = math.ceil(r.n_examples * (z_ex / dist) ** 2 * 1.1)
        if r.population is not None and need > r.population:
            return (f"cannot be settled on this split: about {need:,} evaluation examples would be needed and it "
                    f"has {r.population:,}")
        have = f" of the split's {r.population:,}" if r.population is not None else ""
        return f"about {need:,} evaluation examples{have} (now {r.n_examples:,}; raise eval_limit)"
    n = max(r.min_seeds, compare.MIN_SEEDS)
    n2 = np.arange(n + 1, MAX_SEEDS + 1)
    df2 = d.df * (n2 - 1) / max(n - 1, 1)  # the residual degrees of freedom grow with the seeds
    # the level it was tested at, moved to the last look of a plan with n2 seeds
    a2 = alpha_one * r.looks * np.array([sequential.Plan(int(k)).share(int(k)) for k in n2]) / compare.ALPHA
    enough = half_width(a2, d.seed_var * n / n2, d.example_var, df2) < dist
    if enough.any():
        return f"about {int(n2[enough.argmax()])} seeds per option (now {r.min_seeds}) if the difference holds"
    return f"more than {MAX_SEEDS} seeds per option: in practice not on this data"


def _fmt(x: float, metric: str) -> str:
    f = scale_for(metric)
    return ("+" if x >= 0 else "") + f(x)


def relation_text(c: Claim, metric: str) -> str:
    a, b = "{" + ", ".join(c.a) + "}", "{" + ", ".join(c.b) + "}"
    unit = METRICS[metric].unit if metric in METRICS else ""
    m = scale_for(metric)(c.margin) + unit if c.margin is not None else ""
    return {"better": f"{a} better than {b}", "worse": f"{a} worse than {b}",
            "equivalent": f"{a} within ±{m} of {b}", "noninferior": f"{a} not worse than {b} by more than {m}"}[
        c.relation]


def sentence(r: Row) -> str:
    """One sentence per row: the verdict and what it rests on, or why there is none and what would settle it."""
    c = r.claim
    what = relation_text(c, r.metric)
    name = METRIC_NAMES.get(r.metric, r.metric)
    if r.verdict in (NO_RUNS, NOT_JUDGED):
        return f"Not judged: {r.reason}."
    if r.contrast is None or (r.verdict == NOT_SETTLED and r.reason):
        text = f"Not settled: {r.reason}"
        return text + (f"; it needs {r.needs}." if r.needs else ".")
    est = f"mean(A) − mean(B) = {_fmt(r.estimate, r.metric)} {name} [{_fmt(r.lo, r.metric)}, {_fmt(r.hi, r.metric)}]"
    if r.verdict == SUPPORTED:
        return f"Supported: {what} ({est}; Holm-adjusted p = {r.p_support:.3g})."
    if r.verdict == CONTRADICTED:
        opposite = {"better": "A is worse", "worse": "A is better",
                    "noninferior": "A is worse by more than the margin",
                    "equivalent": "the difference lies outside the margin"}[c.relation]
        return f"Contradicted: {opposite} ({est}; Holm-adjusted p = {r.p_contra:.3g})."
    return f"Not settled: {what} is neither shown nor refuted ({est}); it would take {r.needs}."
