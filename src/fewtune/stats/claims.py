"""What may be said about the options of one family, from fewtune.stats.compare, and the same words for the report and
`--until-resolved`: the verdict of a (model, task, split), the floor (the majority-class baseline), what it would
take to settle what is open (never more evaluation examples than the split holds), and the sentences."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import compare, stats
from .fmt import METRIC_NAMES, scale_for, signed, with_interval
from .metrics import METRICS
from .options import measured_alike


def name(g: dict) -> str:
    """An option as the report and the allocator call it: 'label (32 shots)' (+ the examples icl used)."""
    used = g.get("examples_used")
    shots = f"{g['shots']} shots" if used is None or used == g["shots"] else f"{g['shots']} shots, {used} used"
    return f"{g['label']} ({shots})"


@dataclass
class FamilyView:
    """One (model, task, split): the verdict over the options that can be paired, and the floor."""
    prefix: str                       # "id" | "ood"
    metric: str
    verdict: compare.Verdict
    by_name: dict[str, dict]          # option name -> its group (options.group_runs)
    not_compared: list[dict]          # options without stored predictions, or scored on other examples
    floor: dict[str, stats.Estimate] = field(default_factory=dict)  # name -> option − majority (Bonferroni)
    population: int | None = None     # examples in the evaluation split (None: not recorded)

    @property
    def best(self) -> dict | None:
        return self.by_name.get(self.verdict.best) if self.verdict.best else None

    def group(self, option: str) -> dict:
        return self.by_name[option]


def view(groups: list[dict], prefix: str, margin: float | None = None, looks: int | None = None,
         alpha: float = compare.ALPHA) -> FamilyView | None:
    """The family of `groups` (one task × model) on split `prefix`; None when no option has a value there."""
    have = [g for g in groups if g.get(f"{prefix}_primary") is not None and not math.isnan(g[f"{prefix}_primary"].value)]
    if not have:
        return None
    metric = have[0]["primary_metric"]
    with_preds = [g for g in have if g["preds"].get(prefix) is not None]
    ref = _reference_examples(with_preds, prefix)
    paired = [g for g in with_preds if np.array_equal(g["preds"][prefix]["idx"], ref)] if ref is not None else []
    by_name = {name(g): g for g in paired}
    runs = [compare.OptionRuns(n, tuple(g["preds"][prefix]["seeds"]), g["preds"][prefix]["pred"])
            for n, g in by_name.items()]
    p0 = paired[0]["preds"][prefix] if paired else None
    gold = p0["gold"] if p0 else np.zeros(0, dtype=np.int64)
    n_classes = p0["n_classes"] if p0 else 2
    verdict = compare.family(gold, runs, n_classes, metric, margin=margin, alpha=alpha, looks=looks)
    floor = {o.name: (compare.versus_floor(gold, o, n_classes, metric, len(runs), alpha / verdict.looks)
                      if len(o.seeds) >= compare.MIN_SEEDS else stats.NAN_ESTIMATE) for o in runs}
    pops = [g.get(f"{prefix}_population") for g in paired if g.get(f"{prefix}_population")]
    return FamilyView(prefix, metric, verdict, by_name, [g for g in have if g not in paired], floor,
                      max(pops) if pops else None)


def restrict(fv: FamilyView, keep: list[dict]) -> FamilyView:
    """The family's verdict read over a subset of its options (those within a latency or retention limit): the
    same simultaneous intervals, so no new claim is made, only fewer options are read."""
    names = [name(g) for g in keep if name(g) in fv.by_name]
    v = fv.verdict
    effects = {n: v.effects[n] for n in names}
    best = max(names, key=lambda n: effects[n]) if names else None
    pairs = {k: c for k, c in v.pairs.items() if k[0] in names and k[1] in names}
    worse = {}
    for (hi_, lo_), c in sorted(pairs.items(), key=lambda kv: -effects[kv[0][0]]):
        if c.shown and lo_ not in worse:
            worse[lo_] = hi_
    vs_best = {n: pairs[(best, n)] for n in names if (best, n) in pairs}
    candidates = [n for n in names if n not in worse]
    sub = compare.Verdict(metric=v.metric, options=names, effects=effects, best=best, worse=worse,
                          candidates=candidates, vs_best=vs_best, margin=v.margin, level=v.level, looks=v.looks,
                          equivalent_to_best=[n for n in candidates if n in vs_best and vs_best[n].equivalent],
                          min_seeds=v.min_seeds, n_examples=v.n_examples, df=v.df, reason=v.reason, pairs=pairs)
    return FamilyView(fv.prefix, fv.metric, sub, {n: fv.by_name[n] for n in names},
                      [g for g in fv.not_compared if g in keep], {n: fv.floor[n] for n in names}, fv.population)


def _reference_examples(groups: list[dict], prefix: str):
    """The evaluation examples most options were scored on (options scored on others are not compared)."""
    counts: dict[bytes, list] = {}
    for g in groups:
        idx = np.asarray(g["preds"][prefix]["idx"])
        counts.setdefault(idx.tobytes(), [0, idx])[0] += 1
    return max(counts.values(), key=lambda c: c[0])[1] if counts else None


# ----------------------------------------------------------------------------- words
def where_text(prefix: str) -> str:
    return "in-domain" if prefix == "id" else "out-of-domain"


def level_text(v: compare.Verdict) -> str:
    looks = "" if v.looks == 1 else f", family-wise 95% spent over {v.looks} looks"
    return f"simultaneous {100 * v.level:.1f}% intervals{looks}"


def sentences(fv: FamilyView, task: str, model: str) -> list[str]:
    """The verdict in plain words: the highest estimate, what is shown worse, what is not shown different, what is
    shown equivalent (and only then the cheapest), and the floor."""
    v, metric = fv.verdict, fv.metric
    best = fv.best
    split = (best or next(iter(fv.by_name.values()), {})).get(f"{fv.prefix}_split", fv.prefix)
    head = f"{task} / {model}, {where_text(fv.prefix)} ({split}, {METRIC_NAMES[metric]})"
    out = []
    if best is None:
        return [f"{head}: no option has stored predictions on common examples; nothing can be compared."]
    text = (f"{head}: the highest estimate is {v.best} at {with_interval(best[f'{fv.prefix}_primary'], metric)}")
    if v.reason:
        text += f"; nothing is claimed: {v.reason}"
    else:
        text += f" ({level_text(v)}, {v.min_seeds}+ seeds per option)"
        if v.worse:
            text += "; shown worse: " + ", ".join(
                f"{o} (than {w}: {signed(v.pairs[(w, o)].diff, metric)})" for o, w in v.worse.items())
        if v.equivalent_to_best:
            text += (f"; shown equivalent to it within ±{_margin(v.margin, metric)}: "
                     + ", ".join(f"{o} ({signed(v.vs_best[o].diff, metric)})" for o in v.equivalent_to_best))
            cheap = cheapest([best] + [fv.group(o) for o in v.equivalent_to_best])
            if cheap is None:
                text += " (their costs were not measured alike, so none is named the cheapest)"
            elif cheap is not best:
                text += f", of which the cheapest to train is {name(cheap)}"
        if v.undecided:
            text += ("; not shown different from it (either may be the better): "
                     + ", ".join(f"{o} ({signed(v.vs_best[o].diff, metric)})" if o in v.vs_best else o
                                 for o in v.undecided))
        if v.resolved:
            text += ". The best option is settled" + (" up to equivalence" if v.equivalent_to_best else "")
    if fv.not_compared:
        text += "; not compared (no stored predictions, or other evaluation examples): " + ", ".join(
            name(g) for g in fv.not_compared)
    out.append(text + ".")
    out.append(floor_sentence(fv))
    if v.min_seeds < 2:
        out.append("† With one seed an interval covers the evaluation-sample noise only, not training instability: "
                   "nothing is judged before every option has 2 seeds.")
    return out


def floor_sentence(fv: FamilyView) -> str:
    metric = fv.metric
    best = fv.best
    label = majority_label(best, fv.prefix) if best else "?"
    constant = METRICS[metric].constant if metric in METRICS else None
    what = (f"{METRICS[metric].display} > {constant:g}, which predicting '{label}' (the evaluation set's most frequent "
            f"class) for everything scores {constant:g}" if constant is not None
            else f"predicting '{label}' (the evaluation set's most frequent class) everywhere")
    beaters = [n for n, e in fv.floor.items() if e.lo > 0]
    judged = [n for n, e in fv.floor.items() if not math.isnan(e.lo)]
    basis = (f"paired by example, each option at {100 * (1 - compare.ALPHA / fv.verdict.looks / max(len(fv.floor), 1)):.2f}% "
             f"(Bonferroni over the {len(fv.floor)} options)")
    if not judged:
        return f"The floor ({what}) cannot be judged yet: an interval needs 2 seeds per option."
    if beaters:
        return f"Shown to beat the floor ({what}; {basis}): {', '.join(beaters)}."
    return (f"No option is shown to beat the floor ({what}; {basis}): at this budget a constant answer may be "
            "as good as any method here.")


def majority_label(g: dict, prefix: str) -> str:
    """The majority class's name, as stored with the run's baselines (else from its predictions)."""
    if g.get(f"{prefix}_majority_label"):
        return g[f"{prefix}_majority_label"]
    p = g["preds"][prefix]
    k = int(np.bincount(p["gold"], minlength=p["n_classes"]).argmax())
    return g["labels"][k] if k < len(g.get("labels") or []) else str(k)


def _margin(margin: float | None, metric: str) -> str:
    return "–" if margin is None else scale_for(metric)(margin) + (METRICS[metric].unit if metric in METRICS else "")


def cheapest(gs: list[dict]) -> dict | None:
    """The cheapest of options shown equivalent: least training time, then least peak memory (unknown = dearest);
    None when their time or memory was not measured alike (options.measured_as): nothing is named then."""
    if not measured_alike(gs):
        return None

    def key(g):
        return tuple(g.get(k) if g.get(k) is not None and not math.isnan(g[k]) else math.inf
                     for k in ("train_seconds", "peak_memory_mib"))
    return min(gs, key=key)


def what_it_takes(fv: FamilyView, option: str, max_seeds: int = 50) -> str:
    """How many seeds, or how many evaluation examples, would let the interval of (best − option) exclude 0 if
    the difference and the variances stay as measured; never more examples than the split holds."""
    v = fv.verdict
    c = v.vs_best.get(option)
    if c is None:
        return "They cannot be compared (no seed in common)."
    d = c.diff
    effect = abs(d.value)
    n = v.min_seeds
    margin_hint = ("" if v.margin is not None else
                   " Set an equivalence margin (the task file's equivalence_margin) before the run to be able to show "
                   "them equivalent.")
    if effect < 1e-12:
        return "The measured difference is 0: no amount of data will separate them." + margin_hint
    k = len(v.options)
    crit_ex = compare.tukey_critical(k, math.inf, compare.ALPHA / compare.looks_for(n))
    big_n = v.n_examples
    if crit_ex * math.sqrt(d.example_var) >= effect:  # seeds cannot help: the example part alone is too wide
        need = math.ceil(big_n * (crit_ex * math.sqrt(d.example_var) / effect) ** 2 * 1.1)
        if fv.population is not None and need > fv.population:
            return (f"This cannot be settled on this data: the difference measured ({_fmt(effect, fv.metric)}) is "
                    f"inside the evaluation noise; about {need:,} evaluation examples would be needed and the split "
                    f"has {fv.population:,}." + margin_hint)
        have = f" (the split has {fv.population:,})" if fv.population is not None else ""
        return (f"Evaluation sampling limits it: about {need:,} evaluation examples{have} would be needed (now "
                f"{big_n:,}; raise eval_limit); more seeds would not do it.")
    for n2 in range(n + 1, max_seeds + 1):
        df2 = d.df * (n2 - 1) / max(n - 1, 1)
        a = compare.ALPHA / compare.looks_for(n2)
        half = math.sqrt(compare.tukey_critical(k, df2, a) ** 2 * d.seed_var * n / n2
                         + compare.tukey_critical(k, math.inf, a) ** 2 * d.example_var)
        if half < effect:
            return f"About {n2} seeds per option (now {n}) would settle it if the difference holds."
    return f"More than {max_seeds} seeds per option would be needed: in practice they cannot be told apart here." \
        + margin_hint


def _fmt(x: float, metric: str) -> str:
    return scale_for(metric)(x)
