"""Claims that survive selection: which options are worse, which are shown equivalent, for one family.

A *family* is every option of one (model, task) scored on one evaluation split (in-domain or out-of-domain) by the
task's primary metric. The report and `--until-resolved` both ask this module, and only this module, what may be
claimed about a family: "X has the best estimate", "Y is worse than X", "Z is shown equivalent to X within the
task's margin", "nothing is shown different". docs/statistics.md explains the procedure; in short:

1. **One model for all options** (seeds random, options fixed; `Fit`): the per-seed metric M[k, s] of option k
   under data seed s is fitted by least squares with an option effect and a seed effect (the seed's sample helps or
   hurts every method alike: that is what pairing removes). The residual variance σ² — training instability and the
   per-seed evaluation noise — is *pooled over the options that vary between seeds*, so its degrees of freedom are
   (cells − options − seeds + 1), (K−1)(n−1) for K options × n seeds, not n − 1 for one pair. Options whose
   predictions are identical under every seed (zero-shot) are constants, kept out of the pool. The fit uses every
   run, so options with different numbers of seeds (after `--until-resolved`) are compared on all they have.
2. **Evaluation sampling**, which more seeds never shrink, is added per contrast: the contrast's per-example
   values (jackknife pseudo-values of the metric, exact for accuracy, so MCC and macro-F1 work the same way) vary
   over the N examples; their variance, less the per-seed noise the seed part already holds, over N.
3. **Simultaneous intervals** (Tukey–Kramer): every pairwise difference gets an interval with the studentized
   range quantile q(1 − α'; K, df)/√2 for the seed part and q(1 − α'; K, ∞)/√2 for the example part, so that all
   K(K−1)/2 intervals hold together with probability ≥ 1 − α'. Because they hold together, picking the best from
   the same data and then comparing it with the rest is covered: every "worse" claim holds after the selection.
   α' = α / looks: α is spent equally over the looks a family can have had (`looks_for`).
4. **Claims**: an option is *worse* when some option's interval against it lies above 0; the *candidates* for
   best are the options shown worse than none. Two options are *shown equivalent* only when their interval lies
   inside ±margin, a margin fixed before the run (the task file's `equivalence_margin`, or
   `--equivalence-margin`); this is two one-sided tests at level α'/2 each. Without it the words are "not shown
   different", never "equivalent". Nothing is claimed before every option has 2 seeds (σ² cannot be estimated;
   the interval would cover evaluation noise only).
5. **The floor**: each option against the majority-class baseline, paired by example, Bonferroni over the K
   options (the baseline has no seed variance, so it is not in the fit).

Checked by simulation in tests/test_compare.py: with every option equal, at most 5% of families get any false
claim, including with the allocator of `--until-resolved` deciding where seeds go.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as _scipy_stats

from . import stats

ALPHA = 0.05


@dataclass(frozen=True)
class OptionRuns:
    """One option's stored predictions on a family's evaluation examples: row r under data seed `seeds[r]`."""
    name: str
    seeds: tuple
    pred: np.ndarray  # [n_seeds, N] predicted class ids


@dataclass(frozen=True)
class Contrast:
    """Σ_k c_k θ_k for option weights c, from the pooled fit; lo/hi are filled by the procedure that uses it."""
    value: float
    seed_var: float      # the pooled residual variance's share of Var(value)
    example_var: float   # evaluation sampling's share
    df: float            # of the seed part
    lo: float = math.nan
    hi: float = math.nan

    @property
    def se(self) -> float:
        return math.sqrt(self.seed_var + self.example_var)

    def with_interval(self, crit_seed: float, crit_examples: float) -> "Contrast":
        """Half-width sqrt(crit_seed² · seed_var + crit_examples² · example_var): each part widened by the quantile
        of its own degrees of freedom (a pooled Satterthwaite quantile under-covers at few seeds: stats.py)."""
        half = math.sqrt(crit_seed ** 2 * self.seed_var + crit_examples ** 2 * self.example_var)
        return Contrast(self.value, self.seed_var, self.example_var, self.df, self.value - half, self.value + half)


class Fit:
    """The model of a family's per-seed metric (docs/statistics.md, "One model for all options").

    Options that vary between seeds ("stochastic": everything trained, icl with sampled demonstrations) follow
    M[k, s] = θ_k + β_s + e[k, s]: β_s is what seed s's sample does to every method alike (pairing removes it),
    e the option × seed residual (training instability and per-seed evaluation noise) with one variance σ² pooled
    over the stochastic options, (cells − options − seeds + 1) degrees of freedom. Options whose predictions are
    identical under every seed ("deterministic": zero-shot, which never sees the sample) have no seed variance at
    all; pooling their zero residuals with the others would shrink σ² and make every interval too narrow (measured in
    tests/test_compare.py: 9% false claims at a nominal 5%), so they are kept out of the fit and enter contrasts as
    known constants. A contrast that involves an option's level rather than a difference of stochastic options
    (a deterministic option against a stochastic one) uses the within-option variance of the stochastic options'
    per-seed values, pooled (Σ(n_k − 1) degrees of freedom), which includes the seed effect β.
    """

    def __init__(self, gold, options: list[OptionRuns], n_classes: int, metric: str):
        self.gold = np.asarray(gold, dtype=np.int64)
        self.options = list(options)
        self.metric, self.n_classes = metric, n_classes
        self.names = [o.name for o in self.options]
        seeds = sorted({s for o in self.options for s in o.seeds}, key=lambda s: (str(type(s)), s))
        seed_ids = {s: j for j, s in enumerate(seeds)}
        self.per_seed, self.pv, self.eps, self.n, self.deterministic = [], [], [], [], []
        for o in self.options:
            pred = np.atleast_2d(np.asarray(o.pred, dtype=np.int64))
            self.per_seed.append(np.array([stats.metric_value(self.gold, p, n_classes, metric) for p in pred]))
            pv = stats.pseudo_values(self.gold, pred, n_classes, metric)  # [n_k, N]
            self.pv.append(pv)
            self.eps.append(_cell_noise(pv))
            self.n.append(len(pred))
            self.deterministic.append(len(pred) >= 2 and bool((pred == pred[0]).all()))
        self.stochastic = [k for k in range(len(self.options)) if not self.deterministic[k]]
        # the two-way fit over the stochastic options' runs
        cells = [(k, seed_ids[s], r) for k in self.stochastic for r, s in enumerate(self.options[k].seeds)]
        self.cells = cells
        self.m = np.asarray([self.per_seed[k][r] for k, _, r in cells], dtype=np.float64)
        self.cell_pv = (np.asarray([self.pv[k][r] for k, _, r in cells], dtype=np.float64).reshape(len(cells), -1)
                        if cells else np.zeros((0, len(self.gold))))
        self.cell_eps = np.asarray([self.eps[k] for k, _, _ in cells], dtype=np.float64)
        self.col = {k: i for i, k in enumerate(self.stochastic)}
        n_opt, n_s = len(self.stochastic), len(seeds)
        x = np.zeros((len(cells), n_opt + max(n_s - 1, 0)))
        for c, (k, j, _) in enumerate(cells):
            x[c, self.col[k]] = 1.0
            if j > 0:
                x[c, n_opt + j - 1] = 1.0
        self.x = x
        self.xtx_pinv = np.linalg.pinv(x.T @ x) if len(cells) else np.zeros((0, 0))
        self.coef = self.xtx_pinv @ x.T @ self.m if len(cells) else np.zeros(0)
        rank = int(np.linalg.matrix_rank(x)) if len(cells) else 0
        self.df = float(len(cells) - rank)
        resid = self.m - x @ self.coef if len(cells) else np.zeros(0)
        self.sigma2 = float(resid @ resid / self.df) if self.df > 0 else math.nan
        # within-option variance of the stochastic options' per-seed values (includes the seed effect)
        ss = sum(float(((self.per_seed[k] - self.per_seed[k].mean()) ** 2).sum()) for k in self.stochastic)
        self.df_within = float(sum(self.n[k] - 1 for k in self.stochastic))
        self.within2 = ss / self.df_within if self.df_within > 0 else math.nan
        # an option's level on the scale of an average seed: θ_k + mean of the seed effects (with every option on
        # the same seeds, exactly its mean); deterministic options: their constant value
        seed_mean = np.zeros(x.shape[1])
        if n_s > 1:
            seed_mean[n_opt:] = 1.0 / n_s
        self.level_rows = {}
        for k in range(len(self.options)):
            if self.deterministic[k]:
                continue
            c = seed_mean.copy()
            c[self.col[k]] = 1.0
            self.level_rows[k] = c

    @property
    def n_examples(self) -> int:
        return len(self.gold)

    def effects(self) -> dict[str, float]:
        """Each option's level: its mean under an average seed (seed effects adjusted; with every option on the
        same seeds, exactly its mean over seeds). Differences of levels are the contrasts below."""
        out = {}
        for k, n in enumerate(self.names):
            if self.deterministic[k]:
                out[n] = float(self.per_seed[k][0])
            else:
                out[n] = float(self._run_weights(self.level_rows[k]) @ self.m) if self._estimable(self.level_rows[k]) \
                    else float(self.per_seed[k].mean())
        return out

    def _estimable(self, c: np.ndarray) -> bool:
        return bool(np.allclose(self.x.T @ self.x @ self.xtx_pinv @ c, c, atol=1e-8))

    def _run_weights(self, c: np.ndarray) -> np.ndarray:
        return self.x @ self.xtx_pinv @ c  # value = w · M: the weight of every stochastic run in the estimate

    def contrast(self, weights: dict[str, float]) -> Contrast | None:
        """The contrast Σ c_k θ_k (weights summing to 0) with its two variance parts; None when the runs do not
        connect the options it names (no seed in common, directly or through other options)."""
        if abs(sum(weights.values())) > 1e-9:
            raise ValueError("a contrast's weights must sum to 0")
        c = np.zeros(self.x.shape[1])
        const, z_const = 0.0, np.zeros(self.n_examples)
        stoch_sum = 0.0
        for name, wt in weights.items():
            k = self.names.index(name)
            if self.deterministic[k]:
                const += wt * float(self.per_seed[k][0])
                z_const += wt * self.pv[k][0]
            else:
                c += wt * self.level_rows[k]
                stoch_sum += wt
        paired = abs(stoch_sum) < 1e-9  # a difference of stochastic options: the seed effects cancel
        if c.any() and not self._estimable(c):
            return None
        w = self._run_weights(c) if c.any() else np.zeros(len(self.cells))
        value = float(w @ self.m) + const
        if not w.any():
            seed_var, df = 0.0, math.inf
        elif paired:
            seed_var, df = (self.sigma2 * float(w @ w), self.df) if self.df > 0 else (math.nan, 0.0)
        else:
            seed_var, df = ((self.within2 * float(w @ w), self.df_within) if self.df_within > 0
                            else (math.nan, 0.0))
        z = w @ self.cell_pv + z_const  # per example: the contrast's example values
        example_var = 0.0
        if self.n_examples > 1:
            # Var_i(z) holds each run's own per-seed example noise once more: the seed part already counts it
            example_var = max(0.0, float(z.var(ddof=1)) - float((w ** 2 * self.cell_eps).sum())) / self.n_examples
        return Contrast(value, seed_var, example_var, float(df))

    def pair(self, a: str, b: str) -> Contrast | None:
        return self.contrast({a: 1.0, b: -1.0})


def _cell_noise(pv: np.ndarray) -> float:
    """An option's per-seed example noise: the residual mean square of its seeds × examples table of pseudo-values
    (what varies between its seeds example by example); 0 with one seed (cannot be told: nothing is subtracted,
    which errs wide)."""
    n, big_n = pv.shape
    if n < 2 or big_n < 2:
        return 0.0
    resid = pv - pv.mean(1, keepdims=True) - pv.mean(0, keepdims=True) + pv.mean()
    return float((resid ** 2).sum() / ((n - 1) * (big_n - 1)))


def tukey_critical(k: int, df: float, alpha: float = ALPHA) -> float:
    """q(1 − α; k, df)/√2: the simultaneous quantile for all pairwise differences of k options (scipy's
    studentized range). df is rounded down to a quarter (wider, never narrower; and the quantile is cached)."""
    if df > 1e4 or math.isinf(df):
        return _tukey(k, math.inf, alpha)
    return _tukey(k, max(math.floor(df * 4) / 4, 0.25), alpha)


@functools.lru_cache(maxsize=4096)
def _tukey(k: int, df: float, alpha: float) -> float:
    if k < 2:
        return float(_scipy_stats.norm.ppf(1 - alpha / 2))
    return float(_scipy_stats.studentized_range.ppf(1 - alpha, k, df)) / math.sqrt(2)


@dataclass(frozen=True)
class Comparison:
    """One pair in a family: `better` − `worse` by their fitted effects, with the simultaneous interval."""
    better: str
    worse: str
    diff: Contrast
    shown: bool                # the interval excludes 0: `worse` is worse
    equivalent: bool           # the interval lies inside ±margin


@dataclass
class Verdict:
    """What may be said about one family. `best` is the option with the highest fitted effect; it is a claim only
    when every other option is `worse` (or shown equivalent to it)."""
    metric: str
    options: list[str]
    effects: dict[str, float]
    best: str | None
    worse: dict[str, str]                 # option -> an option it is shown worse than (the best such)
    candidates: list[str]                 # options shown worse than none: each may be the best
    equivalent_to_best: list[str]         # candidates shown equivalent to the best within `margin`
    vs_best: dict[str, Comparison]        # every other option against the best
    margin: float | None
    level: float                          # of the simultaneous intervals: 1 − α / looks
    looks: int                            # α is spent equally over this many looks (see looks_for)
    min_seeds: int
    n_examples: int
    df: float
    reason: str = ""                      # why nothing is claimed ("one seed", "one option")
    pairs: dict = field(default_factory=dict)  # (a, b) -> Comparison for every pair

    @property
    def resolved(self) -> bool:
        """The best is known: every other option is shown worse or shown equivalent to it."""
        return (self.best is not None and not self.reason
                and all(o in self.worse or o in self.equivalent_to_best for o in self.options if o != self.best))

    @property
    def undecided(self) -> list[str]:
        """Candidates not shown equivalent to the best: where more data could still change the answer (none while
        nothing is judged: `reason` says why)."""
        if self.reason:
            return []
        return [o for o in self.candidates if o != self.best and o not in self.equivalent_to_best]


MIN_SEEDS = 2  # no option is judged before it has 2 seeds: with one, training instability is not in the interval


def looks_for(max_seeds: int) -> int:
    """How many times a family's claims may have been looked at: once per seed count from 2 (the first at which
    anything is judged) to the most seeds any option has. `--until-resolved` looks after every round, and a user
    may run `fewtune report` after every seed of a grid; each look is another chance to be wrong, so the family-wise
    α is spent equally over them (Bonferroni over looks)."""
    return max(1, int(max_seeds) - 1)


def family(gold, options: list[OptionRuns], n_classes: int, metric: str, margin: float | None = None,
           alpha: float = ALPHA, looks: int | None = None) -> Verdict:
    """The claims for one family (see the module docstring): simultaneous intervals at level 1 − α/looks
    (`looks` defaults to looks_for(the most seeds of any option))."""
    names = [o.name for o in options]
    looks = looks if looks is not None else looks_for(max((len(o.seeds) for o in options), default=1))
    alpha = alpha / looks
    fit = Fit(gold, options, n_classes, metric) if options else None
    effects = fit.effects() if fit else {}
    best = max(names, key=lambda n: effects[n]) if names else None
    min_seeds = min((len(o.seeds) for o in options), default=0)
    base = dict(metric=metric, options=names, effects=effects, best=best, margin=margin, level=1 - alpha,
                looks=looks, min_seeds=min_seeds, n_examples=len(gold), df=fit.df if fit else 0.0)
    if len(options) < 2:
        return Verdict(**base, worse={}, candidates=names, equivalent_to_best=[], vs_best={},
                       reason="only one option: there is nothing to compare")
    if min_seeds < MIN_SEEDS or (fit.stochastic and not (fit.df > 0 or fit.df_within > 0)):
        why = ("an option has one seed: training instability is unknown, so no option is judged before every one "
               "has 2 seeds") if min_seeds < MIN_SEEDS else "no degrees of freedom left for the seed variance"
        return Verdict(**base, worse={}, candidates=names, equivalent_to_best=[], vs_best={}, reason=why)
    crit_ex = tukey_critical(len(names), math.inf, alpha)
    pairs = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            hi_, lo_ = (a, b) if effects[a] >= effects[b] else (b, a)
            d = fit.pair(hi_, lo_)
            if d is None:
                continue
            d = d.with_interval(tukey_critical(len(names), d.df, alpha), crit_ex)
            equiv = margin is not None and -margin < d.lo and d.hi < margin
            pairs[(hi_, lo_)] = Comparison(hi_, lo_, d, shown=d.lo > 0, equivalent=equiv)
    worse = {}
    for (hi_, lo_), c in sorted(pairs.items(), key=lambda kv: -effects[kv[0][0]]):
        if c.shown and lo_ not in worse:
            worse[lo_] = hi_
    candidates = [n for n in names if n not in worse]
    vs_best = {n: pairs[(best, n)] for n in names if (best, n) in pairs}
    equivalent = [n for n in candidates if n != best and n in vs_best and vs_best[n].equivalent]
    return Verdict(**base, worse=worse, candidates=candidates, equivalent_to_best=equivalent, vs_best=vs_best,
                   pairs=pairs)


def versus_floor(gold, option: OptionRuns, n_classes: int, metric: str, n_options: int,
                 alpha: float = ALPHA) -> stats.Estimate:
    """The option minus the majority-class baseline (the evaluation set's most frequent class everywhere), paired
    by example, at level 1 − α/n_options (Bonferroni over the family's options)."""
    gold = np.asarray(gold, dtype=np.int64)
    pred = np.atleast_2d(np.asarray(option.pred, dtype=np.int64))
    majority = int(np.bincount(gold, minlength=n_classes).argmax())
    return stats.estimate(gold, pred, np.full_like(pred, majority), n_classes, metric,
                          confidence=1 - alpha / max(n_options, 1))
