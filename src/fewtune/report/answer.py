"""The report's first screen: for every family (model × task × split) a box with the verdict, and the interval plot
the verdict rests on. Formatting only: every claim is the family's verdict (fewtune.stats.claims.view, fitted once
per report). Of the Verdict this module reads best, candidates, worse, equivalent_to_best, margin, level, reason and
vs_best (option -> its Comparison with the best, whose diff is best − option with the simultaneous interval the
verdict uses), and where present constants, collapsed, claimed_at (and options, effects, fit, min_seeds before
anything is judged); `plotted` turns them into one row per option, which the box's sentences and the plot read."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..stats import claims, compare
from ..stats.stats import Estimate
from . import figures
from .data import METRIC_NAMES, model_order, scale_for, with_interval
from .findings import label as findings_label
from .render import Doc

NO_RESULTS = "No successful runs yet: run `fewtune grid SPEC` first."
FINDING_WORDS = {"no runs": "without runs here", "not judged": "not judged as written"}  # the judge's verdicts


@dataclass(frozen=True)
class Plotted:
    """One option as the box and the interval plot show it."""
    name: str
    kind: str                                       # best, highest, worse, equivalent, open, not judged
    vs_best: tuple[float, float, float] | None      # option − best: value, lo, hi (the best: 0s; None: not judged)
    own: Estimate | None                            # the option's own value and 95% interval
    seeds: tuple[float, ...]                        # its per-seed values, as stored
    floor: str                                      # against the majority class: beats, worse, not shown, not judged


def resolved(v) -> bool:
    """The best is known: every candidate for it is the best or shown equivalent to it."""
    return not v.reason and v.best is not None and all(o == v.best or o in v.equivalent_to_best for o in v.candidates)


def plotted(fv: claims.FamilyView, per_seed: dict[str, dict]) -> list[Plotted]:
    """The family's options, highest estimate first. Reads only the Verdict's best, candidates, worse,
    equivalent_to_best, reason and vs_best (option -> Comparison whose diff is best − option with the simultaneous
    interval the verdict uses). `per_seed`: config hash -> the run's flat row (its stored metric values)."""
    v = fv.verdict
    rows = []
    for n, g in fv.by_name.items():
        c = v.vs_best.get(n)
        if n == v.best:
            kind, diff = ("best" if resolved(v) else "highest"), (0.0, 0.0, 0.0)
        else:
            diff = None if c is None or v.reason else (-c.diff.value, -c.diff.hi, -c.diff.lo)
            kind = ("not judged" if diff is None else "worse" if n in v.worse else
                    "equivalent" if n in v.equivalent_to_best else "open")
        own = g.get(f"{fv.prefix}_primary")
        seeds = tuple(x for x in (per_seed[h].get(f"{fv.prefix}_primary") for h in g["runs"] if h in per_seed)
                      if x is not None and not math.isnan(x))
        e = fv.floor.get(n)
        floor = ("not judged" if e is None or math.isnan(e.lo) else
                 "beats" if e.lo > 0 else "worse" if e.hi < 0 else "not shown")
        rows.append(Plotted(n, kind, diff, own, seeds, floor))

    def rank(r: Plotted):  # the verdict's differences first; options it did not judge by their own estimate
        own = r.own.value if r.own is not None and not math.isnan(r.own.value) else -math.inf
        return (r.vs_best is None, -(r.vs_best[0] if r.vs_best else own))
    return sorted(rows, key=rank)


def verdict_lines(fv: claims.FamilyView, rows: list[Plotted], findings: Counter | None, what: str) -> list[str]:
    """The box's sentences: the best or the candidates, what is worse, what beats the floor, what is equivalent,
    what it would take, and the findings' verdict counts for this family."""
    v, metric = fv.verdict, fv.metric
    mname = METRIC_NAMES[metric]
    best = f"{v.best}, {mname} {with_interval(fv.best[f'{fv.prefix}_primary'], metric)}"
    of = lambda kind: [r.name for r in rows if r.kind == kind]  # noqa: E731
    if v.reason:
        out = [f"Nothing is judged yet: {v.reason}.", f"Highest estimate: {best}."]
        others = [o for o in getattr(v, "options", []) if o != v.best]
        if getattr(v, "fit", None) is not None and others and v.min_seeds >= compare.ASSESS_SEEDS:
            runner = max(others, key=lambda o: v.effects[o])
            out.append(f"To settle {v.best} vs {runner} (the next estimate): {claims.what_it_takes(fv, runner)}")
    elif resolved(v):
        out = [f"Best: {best}" + (" (up to equivalence)." if v.equivalent_to_best else ".")]
    else:
        others = [r.name for r in rows if r.name in v.candidates and r.name != v.best]
        out = [f"{len(v.candidates)} options may be the best: {best} (highest estimate); "
               + ", ".join(others) + "."]
    if not v.reason:
        than: dict[str, list[str]] = {}
        for o in of("worse"):
            than.setdefault(v.worse[o], []).append(o)
        out.append("; ".join(f"Shown worse than {b}: {', '.join(os_)}" for b, os_ in than.items()) + "."
                   if than else "Shown worse: none.")
    floor_what = ("MCC > 0" if metric == "mcc" else f"predicting '{claims.majority_label(fv.best, fv.prefix)}' "
                  "for everything")
    beats = [r.name for r in rows if r.floor == "beats"]
    if all(r.floor == "not judged" for r in rows):
        out.append(f"The majority-class floor ({floor_what}) cannot be judged yet: {compare.MIN_SEEDS} seeds per "
                   "trained option needed.")
    else:
        out.append(f"Shown to beat the majority-class floor ({floor_what}): {', '.join(beats)}." if beats else
                   f"No option is shown to beat the majority-class floor ({floor_what}).")
    if not v.reason:
        if v.margin is None:
            out.append("Equivalence: no margin was fixed before the run, so nothing can be shown equivalent.")
        else:
            margin = scale_for(metric)(v.margin)
            out.append(f"Equivalent to the best within ±{margin}: " + (", ".join(of("equivalent")) or "none") + ".")
        undecided = of("open")
        if undecided:
            more = f" ({len(undecided) - 1} more open: see the plot)" if len(undecided) > 1 else ""
            out.append(f"To settle {v.best} vs {undecided[0]}{more}: {claims.what_it_takes(fv, undecided[0])}")
    # optional fields (a verdict without them plugs in): seed-free options, collapsed ones, claims of earlier looks
    if getattr(v, "constants", None):
        out.append("Seed-free, run once (one run stands for every seed): " + ", ".join(v.constants) + ".")
    for o in getattr(v, "collapsed", []):
        out.append(f"⚠ {o}: all {fv.group(o)['n_runs']} seeds collapsed to one class (a single label for every "
                   "example); its seed variance is floored at the family's pooled one, never 0.")
    if getattr(v, "claimed_at", None) and not v.reason:
        early = {o: n for o, n in v.claimed_at.items() if n < v.min_seeds}
        if early:
            out.append("Claimed at an earlier look (it stands): " + ", ".join(f"{o} at {n} seeds"
                                                                              for o, n in early.items()) + ".")
    if findings:
        out.append(f"{what} on this family: " + ", ".join(f"{n} {FINDING_WORDS.get(verdict, verdict)}"
                                                         for verdict, n in findings.most_common()) + " (table below).")
    if fv.not_compared:
        out.append("Not compared (no stored predictions, or other evaluation examples): "
                   + ", ".join(claims.name(g) for g in fv.not_compared) + ".")
    return out


def figure(rows: list[Plotted], fv: claims.FamilyView, task: str, model: str, fig_dir: Path) -> tuple | None:
    """(name, caption, alt) of the family's interval plot."""
    v, mname = fv.verdict, METRIC_NAMES[fv.metric]
    floor = next((g.get(f"{fv.prefix}_majority") for g in fv.by_name.values()
                  if g.get(f"{fv.prefix}_majority") is not None), None)
    where = f"{task} / {model}, {claims.where_text(fv.prefix)}"
    name = figures.interval_plot(rows, fv.metric, floor, v.margin, v.level, fig_dir,
                                 f"intervals-{figures.slug(task)}-{figures.slug(model)}-{fv.prefix}")
    if name is None:
        return None
    judged = any(r.vs_best is not None and r.name != v.best for r in rows)
    margin = "no equivalence margin" if v.margin is None else f"the ±{scale_for(fv.metric)(v.margin)} equivalence band"
    alt = (f"Interval plot, {where}: {len(rows)} options ordered by estimate, {v.best} on top. Left: each option's "
           f"{mname} per seed (circles), its mean and 95% interval, and the majority-class floor (dashed)."
           + (f" Right: each option's difference to {v.best} with its simultaneous {100 * v.level:.1f}% interval, "
              f"a line at 0 and {margin}." if judged else ""))
    caption = (f"{where}: " + ("an interval wholly left of 0 is an option shown worse than the best; one inside the "
                               "shaded band is shown equivalent to it; one that crosses 0 is still open. "
                               if judged else "no simultaneous intervals: nothing is judged yet (the box says why). ")
               + ("Left: " if judged else "The plot: ") + "the spread over seeds and where the majority-class floor "
               "lies.")
    return name, caption, alt


def section(doc: Doc, groups: list[dict], judged, per_seed: dict[str, dict], fig_dir: Path, views) -> None:
    """One box per family, in the report's order of tasks and models; `views(gs)`: the verdicts of one task × model's
    options by split (the report's family_views: each family fitted once)."""
    if not groups:
        doc.box("NO RESULTS", "nothing to compare", [NO_RESULTS])
        return
    what = findings_label(judged.findings) if judged else ""
    for task, model in model_order(groups):
        gs = [g for g in groups if g["task"] == task and g["model"] == model]
        for prefix, fv in views(gs).items():
            rows = plotted(fv, per_seed)
            title = f"{task} / {model} · {claims.where_text(prefix)}"
            if not rows:
                doc.box("OPEN", title, ["No option has stored predictions on common examples: nothing is compared."])
                continue
            role = "in_domain" if prefix == "id" else "out_of_domain"
            counts = Counter(r.verdict for r in (judged.rows if judged else [])
                             if r.task == task and r.model == model and r.claim.split == role)
            split = fv.best.get(f"{prefix}_split") or prefix
            status = "RESOLVED" if resolved(fv.verdict) else "OPEN"
            doc.box(status, f"{title} ({split}, {METRIC_NAMES[fv.metric]})",
                    verdict_lines(fv, rows, counts, what), figure(rows, fv, task, model, fig_dir))
