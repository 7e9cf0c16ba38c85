""""Which method for which budget": the table read the way the study's conclusion reads it.

For a budget (peak memory, training time, labelled examples) the candidates are the method x sample
size groups that fit in it; the best is the highest mean accuracy over seeds, and every candidate
whose 95% interval overlaps the best one's is "not distinguishable" from it. Budget levels are the
costs of the Pareto-optimal groups: below the first level nothing measured fits; each next level is
where a better option becomes affordable.
"""

from __future__ import annotations

import math

from .data import interval, mean_pm_sd, mib, seconds

BUDGETS = (  # key, heading, group field, how a level prints
    ("peak_memory_mib", "Memory limit (peak MiB)", lambda v: f"≤ {mib(v)} MiB"),
    ("train_seconds", "Training-time limit (s)", lambda v: f"≤ {seconds(v)} s"),
    ("shots", "Labelled examples", lambda v: f"≤ {int(v)} examples"),
)


def overlaps(a: dict, b: dict) -> bool | None:
    """Whether two 95% intervals overlap; None when either is missing (a single seed)."""
    if any(math.isnan(x) for x in (a["lo"], a["hi"], b["lo"], b["hi"])):
        return None
    return a["lo"] <= b["hi"] and b["lo"] <= a["hi"]


def pareto_front(groups: list[dict], cost: str, metric: str) -> list[dict]:
    """Groups that no other group beats on both: lower-or-equal cost and higher accuracy (ascending cost)."""
    usable = [g for g in groups if g.get(cost) is not None and not math.isnan(g[cost])
              and not math.isnan(g[metric]["mean"])]
    usable.sort(key=lambda g: (g[cost], -g[metric]["mean"]))
    front, best = [], -math.inf
    for g in usable:
        if g[metric]["mean"] > best:
            front.append(g)
            best = g[metric]["mean"]
    return front


def best_under(groups: list[dict], cost: str, level: float, metric: str) -> tuple[dict | None, list[dict], bool]:
    """(best group within the budget, groups not distinguishable from it, whether intervals existed)."""
    fits = [g for g in groups if g.get(cost) is not None and not math.isnan(g[cost]) and g[cost] <= level
            and not math.isnan(g[metric]["mean"])]
    if not fits:
        return None, [], False
    best = max(fits, key=lambda g: g[metric]["mean"])
    same, known = [], overlaps(best[metric], best[metric]) is not None
    for g in fits:
        if g is best:
            continue
        o = overlaps(best[metric], g[metric])
        known = known and o is not None
        if o:
            same.append(g)
    return best, same, known


def name(g: dict) -> str:
    return f"{g['label']} ({g['shots']} shots)"


def describe(best, same, known, metric) -> list[str]:
    if best is None:
        return ["–", "–", "–"]
    if not known:
        tie = "unknown: some have one seed, no interval"
    elif same:
        tie = ", ".join(sorted({name(g) for g in same}))
    else:
        tie = "none: better than every other option"
    return [name(best), f"{mean_pm_sd(best[metric])} {interval(best[metric])}", tie]


def budget_tables(groups: list[dict]) -> list[tuple[str, list[str], list[list[str]]]]:
    """For one task x model: per budget kind, a table with one row per budget level."""
    tables = []
    for cost, heading, fmt in BUDGETS:
        levels = sorted({g[cost] for metric in ("id_accuracy", "ood_accuracy")
                         for g in pareto_front(groups, cost, metric)})
        rows = []
        for level in levels:
            row = [fmt(level)]
            for metric in ("id_accuracy", "ood_accuracy"):
                row += describe(*best_under(groups, cost, level, metric), metric)
            rows.append(row)
        if rows:
            tables.append((heading, ["budget", "best in-domain", "ID acc % (mean ± sd [95% CI])",
                                     "not distinguishable (ID)", "best out-of-domain",
                                     "OOD acc % (mean ± sd [95% CI])", "not distinguishable (OOD)"], rows))
    return tables


def conclusion(groups: list[dict], task: str, model: str) -> list[str]:
    """Sentences: the best option overall, and the cheapest option that cannot be told apart from it."""
    lines = []
    for metric, where in (("id_accuracy", "in-domain"), ("ood_accuracy", "out-of-domain")):
        best, same, known = best_under(groups, "shots", math.inf, metric)
        if best is None:
            continue
        text = (f"{task} / {model}, {where}: the best option is {name(best)} at "
                f"{mean_pm_sd(best[metric])} % {interval(best[metric])}")
        if not known:
            text += "; with a single seed no interval exists, so the ranking is indicative only."
        elif not same:
            text += ", distinguishable from every other option (95% intervals do not overlap)."
        else:
            cheap = min(same + [best], key=lambda g: (g["peak_memory_mib"] if g["peak_memory_mib"] is not None else math.inf,
                                                      g["train_seconds"] if g["train_seconds"] is not None else math.inf))
            text += f"; not distinguishable from {len(same)} other option(s)"
            if cheap is not best:
                text += (f", of which the cheapest is {name(cheap)} ({mib(cheap['peak_memory_mib'])} MiB peak, "
                         f"{seconds(cheap['train_seconds'])} s training, {mean_pm_sd(cheap[metric])} %)")
            text += "."
        lines.append(text)
    return lines
