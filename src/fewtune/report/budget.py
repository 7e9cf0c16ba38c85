""""Which method for which budget": the table read the way the study's conclusion reads it, on the task's own
metric and with paired intervals.

For a budget (peak memory, training time, labelled examples used) the candidates are the options that fit in it;
the best is the highest mean of the task's primary metric over seeds. Every other candidate is compared with it
*paired* (same seeds, same evaluation examples; fewtune.stats): it is "worse" only when the 95% interval of the
difference excludes 0, otherwise "not distinguishable". Budget levels are the costs of the Pareto-optimal options:
below the first level nothing measured fits; each next level is where a better option becomes affordable.
"""

from __future__ import annotations

import math

from .data import METRIC_NAMES, majority_class, mib, paired, seconds, signed, versus_majority, with_interval

BUDGETS = (  # group field, heading, how a level prints
    ("peak_memory_mib", "Memory limit (peak MiB)", lambda v: f"≤ {mib(v)} MiB"),
    ("train_seconds", "Training-time limit (s)", lambda v: f"≤ {seconds(v)} s"),
    ("examples_used", "Labelled examples", lambda v: f"≤ {int(v)} examples"),
)


def finite(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def mean_of(g: dict, prefix: str) -> float:
    est = g.get(f"{prefix}_primary")
    return est.value if est is not None else math.nan


def pareto_front(groups: list[dict], cost: str, prefix: str) -> list[dict]:
    """Options that no other option beats on both: lower-or-equal cost and a higher primary-metric mean
    (ascending cost)."""
    usable = [g for g in groups if finite(g.get(cost)) and finite(mean_of(g, prefix))]
    usable.sort(key=lambda g: (g[cost], -mean_of(g, prefix)))
    front, best = [], -math.inf
    for g in usable:
        if mean_of(g, prefix) > best:
            front.append(g)
            best = mean_of(g, prefix)
    return front


def compare_to_best(fits: list[dict], prefix: str) -> dict:
    """{best, worse: [(g, diff)], tied: [(g, diff)], unpaired: [g]} among `fits` (diff = best − g, paired)."""
    best = max(fits, key=lambda g: mean_of(g, prefix))
    out = {"best": best, "worse": [], "tied": [], "unpaired": []}
    for g in fits:
        if g is best:
            continue
        d = paired(best, g, prefix, best["primary_metric"])
        if d is None or math.isnan(d.lo):
            out["unpaired"].append(g)
        elif d.lo > 0:
            out["worse"].append((g, d))
        else:
            out["tied"].append((g, d))
    return out


def best_under(groups: list[dict], cost: str, level: float, prefix: str) -> dict | None:
    fits = [g for g in groups if finite(g.get(cost)) and g[cost] <= level and finite(mean_of(g, prefix))]
    return compare_to_best(fits, prefix) if fits else None


def name(g: dict) -> str:
    used = g.get("examples_used")
    shots = f"{g['shots']} shots" if used is None or used == g["shots"] else f"{g['shots']} shots, {used} used"
    return f"{g['label']} ({shots})"


def describe(c: dict | None, prefix: str) -> list[str]:
    if c is None:
        return ["–", "–", "–"]
    best, metric = c["best"], c["best"]["primary_metric"]
    ties = [f"{name(g)} {signed(d, metric)}" for g, d in c["tied"]] + [f"{name(g)} (not paired)" for g in c["unpaired"]]
    return [name(best), with_interval(best[f"{prefix}_primary"], metric),
            "; ".join(ties) if ties else ("none: every other option is worse" if c["worse"] else "no other option")]


def budget_tables(groups: list[dict], prefixes: tuple[str, ...], volume: float | None = None
                  ) -> list[tuple[str, list[str], list[list[str]]]]:
    """For one task × model: per budget kind, a table with one row per budget level. With a prediction `volume`,
    also the compute for training plus that many predictions (report.use.with_volume sets `use_seconds`)."""
    metric = METRIC_NAMES[groups[0]["primary_metric"]]
    tables = []
    kinds = list(BUDGETS)
    if volume:
        kinds.append(("use_seconds", f"Compute for training + {volume:,.0f} predictions (s)", lambda v: f"≤ {seconds(v)} s"))
    for cost, heading, fmt in kinds:
        levels = sorted({g[cost] for prefix in prefixes for g in pareto_front(groups, cost, prefix)})
        rows = []
        for level in levels:
            row = [fmt(level)]
            for prefix in prefixes:
                row += describe(best_under(groups, cost, level, prefix), prefix)
            rows.append(row)
        if rows:
            headers = ["budget"]
            for prefix in prefixes:
                where = "ID" if prefix == "id" else "OOD"
                headers += [f"best {where}", f"{where} {metric} [95% CI]", f"not distinguishable ({where}): best − it"]
            tables.append((heading, headers, rows))
    return tables


def conclusion(groups: list[dict], task: str, model: str, prefixes: tuple[str, ...]) -> list[str]:
    """Sentences that follow from the paired intervals: the best option, what it beats, what it cannot be told
    apart from (and the cheapest of those), and whether anything beats the majority-class baseline."""
    lines = []
    for prefix in prefixes:
        fits = [g for g in groups if finite(mean_of(g, prefix))]
        if not fits:
            continue
        c = compare_to_best(fits, prefix)
        best, metric = c["best"], c["best"]["primary_metric"]
        where = "in-domain" if prefix == "id" else "out-of-domain"
        split = best[f"{prefix}_split"]
        text = (f"{task} / {model}, {where} ({split}, {METRIC_NAMES[metric]}): the best mean is {name(best)} at "
                f"{with_interval(best[f'{prefix}_primary'], metric)}")
        if c["worse"]:
            text += (f"; it is better than {len(c['worse'])} option(s) (paired 95% intervals of the difference "
                     f"exclude 0: {', '.join(name(g) for g, _ in c['worse'])})")
        if c["tied"]:
            cheap = min([best] + [g for g, _ in c["tied"]],
                        key=lambda g: (g["peak_memory_mib"] if finite(g["peak_memory_mib"]) else math.inf,
                                       g["train_seconds"] if finite(g["train_seconds"]) else math.inf))
            text += (f"; it cannot be told apart from {', '.join(f'{name(g)} ({signed(d, metric)})' for g, d in c['tied'])}")
            if cheap is not best:
                text += (f", of which the cheapest is {name(cheap)} ({mib(cheap['peak_memory_mib'])} MiB peak, "
                         f"{seconds(cheap['train_seconds'])} s training)")
        if c["unpaired"]:
            text += f"; not compared (no common seed or no stored predictions): {', '.join(name(g) for g in c['unpaired'])}"
        if not c["worse"] and not c["tied"] and not c["unpaired"]:
            text += "; it is the only option"
        vs = versus_majority(best, prefix, metric)
        beaters = [g for g in fits if (m := versus_majority(g, prefix, metric)) is not None and m.lo > 0]
        if vs is not None and not beaters:
            text += (f". No option beats the majority-class baseline here (best − majority: {signed(vs, metric)}): "
                     f"at this budget, predicting '{_majority_label(best, prefix)}' for everything is as good")
        elif vs is not None and vs.lo <= 0:
            text += f". It does not beat the majority-class baseline ({signed(vs, metric)})"
        if any(g[f"{prefix}_primary"].eval_noise_only for g in fits if g.get(f"{prefix}_primary") is not None):
            text += (". † With one seed an interval covers the evaluation-sample noise only, not training "
                     "instability: run more seeds before acting on a ranking")
        lines.append(text + ".")
    return lines


def _majority_label(g: dict, prefix: str) -> str:
    """The majority class's name, as stored with the run's baselines (else from its predictions)."""
    if g.get(f"{prefix}_majority_label"):
        return g[f"{prefix}_majority_label"]
    k = majority_class(g["preds"][prefix])
    return g["labels"][k] if k < len(g.get("labels") or []) else str(k)
