""""Which method for which budget": the family's verdict (fewtune.stats.claims) read at each budget level.

For a budget (peak memory, training time, labelled examples used) the candidates are the options that fit in it,
each at its median cost over its runs (fewtune.stats.options.MEDIAN_KEYS); the one with the highest estimate is
named, with the options that fit and are not shown different from it. Every
pair is read from the family's simultaneous intervals (one family-wise procedure per model × task × split): a budget
table makes no claim of its own. Budget levels are the costs of the Pareto-optimal options; costs that differ by less
than the run-to-run variation measured for that cost are the same level (process peak memory that differs by 1 %
between two options is measurement noise, not a reason to prefer one). Measured costs (time, memory) compare only
between options measured alike (fewtune.stats.options.measured_as: the same processor, precision, threads, company and
scoring batch): a family whose options were measured differently gets one table per set of conditions.
"""

from __future__ import annotations

import math

from ..stats.claims import name, sentences
from .data import COST_KIND, METRIC_NAMES, alike, measured_alike, mib, seconds, signed, with_interval

BUDGETS = (  # group field, heading, how a level prints
    ("peak_memory_mib", "Memory limit (peak MiB)", lambda v: f"≤ {mib(v)} MiB"),
    ("train_seconds", "Training-time limit (s)", lambda v: f"≤ {seconds(v)} s"),
    ("examples_used", "Labelled examples", lambda v: f"≤ {int(v)} examples"),
)
UNMEASURED_TOLERANCE = 0.05  # when no option has 2 runs, its run-to-run variation is unknown: 5 % (peak memory and
#                            training time of one option were seen to vary by 1-10 % between seeds on a shared CPU)


def finite(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def mean_of(g: dict, prefix: str) -> float:
    est = g.get(f"{prefix}_primary")
    return est.value if est is not None else math.nan


def tolerance(groups: list[dict], cost: str) -> float:
    """The relative run-to-run variation of a cost: the largest (max − min) / median over the runs of one option,
    among options with 2+ runs (UNMEASURED_TOLERANCE when none has), a run flagged as far from its option's median
    left out (stats.options.cost_outliers: one disturbed run would make every level equal); 0 for labelled examples,
    which are counted."""
    if cost == "examples_used":
        return 0.0
    spreads = []
    for g in groups:
        lo, hi = (g.get("cost_range") or {}).get(cost, (None, None))
        if finite(lo) and finite(hi) and finite(g.get(cost)) and g[cost] > 0:
            spreads.append((hi - lo) / g[cost])
    return max(spreads) if spreads else UNMEASURED_TOLERANCE


def pareto_front(groups: list[dict], cost: str, prefix: str, tol: float = 0.0) -> list[dict]:
    """Options that no other option beats on both: a cost that is lower or within `tol` (relative) and a higher
    primary-metric mean (ascending cost)."""
    usable = [g for g in groups if finite(g.get(cost)) and finite(mean_of(g, prefix))]
    usable.sort(key=lambda g: (g[cost], -mean_of(g, prefix)))
    front = []
    for g in usable:
        rivals = [h for h in usable if h is not g and h[cost] <= g[cost] * (1 + tol)]
        if all(mean_of(h, prefix) < mean_of(g, prefix) for h in rivals):
            front.append(g)
    return front


def best_under(fv, groups: list[dict], cost: str, level: float, tol: float, prefix: str):
    """(option with the highest estimate among those within the budget, [(option, its comparison or None)] of the
    others that fit and are not shown worse than it) from the family's verdict; None when nothing fits."""
    fits = [g for g in groups if finite(g.get(cost)) and g[cost] <= level * (1 + tol) and finite(mean_of(g, prefix))]
    if not fits:
        return None
    v = fv.verdict if fv else None
    effects = v.effects if v else {}
    best = max(fits, key=lambda g: effects.get(name(g), -math.inf) if effects else mean_of(g, prefix))
    ties, worse = [], 0
    for g in fits:
        if g is best:
            continue
        pair = v.pairs.get((name(best), name(g))) if v else None
        if pair is not None and pair.shown:
            worse += 1
        else:
            ties.append((g, pair))
    return best, ties, worse


def describe(found, prefix: str, metric: str) -> list[str]:
    if found is None:
        return ["–", "–", "–"]
    best, ties, worse = found
    text = "; ".join(f"{name(g)} {signed(p.diff, metric)}" if p else f"{name(g)} (not judged)" for g, p in ties)
    return [name(best), with_interval(best[f"{prefix}_primary"], metric),
            text or ("none: every other option is shown worse" if worse else "no other option")]


def letters(gs: list[dict], kind: str) -> dict[str, str]:
    """Each set of conditions under which the family's `kind` of cost was measured, lettered A, B, ... (most options
    first); one entry when all were measured alike."""
    parts, mixed = alike(gs, kind)
    found = [c for c, _ in parts] + sorted({c for g in mixed for c in g["measured"][kind]} - {c for c, _ in parts})
    return {c: chr(ord("A") + i) for i, c in enumerate(found)}


def measured_cell(g: dict, marks: dict) -> str:
    """'time A · memory B' for an option (A+B: its runs were measured differently, so its mean mixes them)."""
    return " · ".join(f"{kind} {'+'.join(marks[kind][c] for c in g['measured'][kind])}" for kind in ("time", "memory"))


def measured_note(gs: list[dict]) -> str | None:
    """The legend of the conditions, when the family's options were not all measured alike; None when they were."""
    if measured_alike(gs):
        return None
    parts = []
    for kind in ("time", "memory"):
        marks = letters(gs, kind)
        parts.append(f"{kind}: " + "; ".join(f"{m} = {c}" for c, m in marks.items()))
    return ("Costs were not all measured alike (" + " — ".join(parts) + "). Times and memory compare only between "
            "options with the same letter: the break-even and budget tables below compare only those; an option "
            "marked A+B averages runs measured differently and is compared with none.")


def budget_tables(groups: list[dict], prefixes: tuple[str, ...], views: dict, volume: float | None = None
                  ) -> list[tuple[str, list[str], list[list[str]]]]:
    """For one task × model: per budget kind, a table with one row per budget level (one table per set of measuring
    conditions when the options' costs were not measured alike). With a prediction `volume`, also the compute for
    training plus that many predictions (report.use.with_volume sets `use_seconds`)."""
    tables = []
    kinds = list(BUDGETS)
    if volume:
        kinds.append(("use_seconds", f"Compute for training + {volume:,.0f} predictions (s)", lambda v: f"≤ {seconds(v)} s"))
    for cost, heading, fmt in kinds:
        kind = COST_KIND.get(cost)
        parts, mixed = alike(groups, kind) if kind else ([(None, groups)], [])
        marks = letters(groups, kind) if kind else {}
        for conditions, members in parts:
            title = heading
            if len(marks) > 1:
                left = [name(g) for g in groups if g not in members]
                title += (f", options measured alike as {marks[conditions]} ({conditions})"
                          + (f"; not compared here: {', '.join(left)}" if left else ""))
            tables += _budget_table(members, prefixes, views, cost, title, fmt)
    return tables


def _budget_table(groups: list[dict], prefixes: tuple[str, ...], views: dict, cost: str, heading: str, fmt
                  ) -> list[tuple[str, list[str], list[list[str]]]]:
    """One budget table over `groups` (options measured alike): [] when no level exists."""
    metric_key = groups[0]["primary_metric"]
    metric = METRIC_NAMES[metric_key]
    tol = tolerance(groups, cost)
    levels = []
    for level in sorted({g[cost] for prefix in prefixes for g in pareto_front(groups, cost, prefix, tol)}):
        if not levels or level > levels[-1] * (1 + tol):  # within the measured variation: the same level
            levels.append(level)
    rows = []
    for level in levels:
        row = [fmt(level)]
        for prefix in prefixes:
            row += describe(best_under(views.get(prefix), groups, cost, level, tol, prefix), prefix, metric_key)
        rows.append(row)
    if not rows:
        return []
    # costs within the measured run-to-run variation of that cost count as equal
    headers = [f"budget (±{100 * tol:.0f} % = equal)" if tol else "budget"]
    for prefix in prefixes:
        where = "ID" if prefix == "id" else "OOD"
        headers += [f"highest {where}", f"{where} {metric} [95% CI]",
                    f"not shown different ({where}): highest − it [simultaneous]"]
    return [(heading, headers, rows)]


def conclusion(views: dict, task: str, model: str) -> list[str]:
    """The family's verdict in plain words, per split (fewtune.stats.claims.sentences)."""
    lines = []
    for prefix in ("id", "ood"):
        if prefix in views:
            lines += sentences(views[prefix], task, model)
    return lines
