"""The report's content: which tables, figures and sentences, in which order, from the database rows and the
stored per-example predictions."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..findings import companions, resolve as resolve_findings
from ..findings.judge import judge
from ..stats import claims
from ..tasks import check_margin
from . import answer, budget, figures, use
from . import findings as findings_section
from .data import (METRIC_NAMES, flat_row, group_runs, measured_alike, mib, model_order, num, params, pct, scale_for,
                   seconds, signed, size, with_interval)
from .render import Doc


def prefixes_of(gs: list[dict]) -> tuple[str, ...]:
    """'id', plus 'ood' when the task has an out-of-domain split with results."""
    return ("id", "ood") if any(g.get("ood_split") for g in gs) else ("id",)


def shots_text(g: dict) -> str:
    used = g.get("examples_used")
    return str(g["shots"]) if used is None or used == g["shots"] else f"{g['shots']} ({used} used)"


def family_views(gs: list[dict], prefixes, margin: float | None = None, cache: dict | None = None) -> dict:
    """prefix -> the family's verdict (fewtune.stats.claims.view): one per (model, task, split), shared by every table
    and sentence of the report, so every claim in it belongs to one family-wise procedure. With `cache` (one per
    report), each family is fitted once however many sections read it."""
    key = (gs[0]["task"], gs[0]["model"], tuple(prefixes), margin, tuple(sorted(g["label"] for g in gs)))
    if cache is not None and key in cache:
        return cache[key]
    out = {}
    if margin is not None:  # --equivalence-margin: at most the width of this family's metric range
        check_margin(margin, gs[0]["primary_metric"], "--equivalence-margin")
    for p in prefixes:
        fv = claims.view(gs, p, margin if margin is not None else gs[0].get("equivalence_margin"))
        if fv is not None:
            out[p] = fv
    if cache is not None:
        cache[key] = out
    return out


def verdict_cell(fv, g: dict) -> str:
    """What the family's verdict says about one option."""
    n = claims.name(g)
    v = fv.verdict
    if n not in fv.by_name:
        return "not compared"
    if v.reason:
        return "best estimate" if n == v.best else "not judged"
    if n == v.best:
        return "best" if v.resolved else "highest estimate"
    if n in v.worse:
        return f"worse than {v.worse[n]}"
    if n in v.equivalent_to_best:
        return "equivalent to best"
    return "not shown different"


def floor_cell(fv, g: dict) -> str:
    e = fv.floor.get(claims.name(g)) if fv else None
    if e is None or math.isnan(e.lo):
        return "–"
    return "yes" if e.lo > 0 else ("no (worse)" if e.hi < 0 else "not shown")


def score_table(gs: list[dict], prefixes, views: dict) -> tuple[list[str], list[list[str]]]:
    """Per option, the columns a reader needs first: per split, what the family's verdict says, the primary metric
    with its own interval, against the highest estimate the simultaneous interval of the difference, whether it is
    shown to beat the majority-class baseline; then seeds and the task's other metrics (means over seeds)."""
    metric = gs[0]["primary_metric"]
    mname = METRIC_NAMES[metric]
    others = [m for m in gs[0]["metrics"] if m != metric]
    headers = ["method", "shots"]
    for p in prefixes:
        w = "ID" if p == "id" else "OOD"
        headers += [f"{w} verdict", f"{w} {mname} [95% CI]", f"{w} best − it [simultaneous]", f"{w} > majority?"]
    headers += ["seeds"] + [f"{'ID' if p == 'id' else 'OOD'} {METRIC_NAMES[m]}" for p in prefixes for m in others]
    rows = []
    for g in gs:
        row = [g["label"], shots_text(g)]
        for p in prefixes:
            fv = views.get(p)
            n = claims.name(g)
            c = fv.verdict.vs_best.get(n) if fv else None
            row += [verdict_cell(fv, g) if fv else "–", with_interval(g.get(f"{p}_primary"), metric),
                    "best" if fv and n == fv.verdict.best else (signed(c.diff, metric) if c else "–"),
                    floor_cell(fv, g)]
        row.append(str(g["n_runs"]))
        row += [scale_for(m)(g[f"{p}_{m}"].value) if g.get(f"{p}_{m}") is not None else "–"
                for p in prefixes for m in others]
        rows.append(row)
    return headers, rows


def cost_table(gs: list[dict], prefixes) -> tuple[list[str], list[list[str]]]:
    """Calibration and costs per option; with a 'measured' column (letters of budget.measured_note's legend) when
    the options' costs were not all measured alike."""
    marks = {kind: budget.letters(gs, kind) for kind in ("time", "memory")}
    differ = not measured_alike(gs)
    headers = ["method", "shots", "seeds"]
    for p in prefixes:
        w = "ID" if p == "id" else "OOD"
        headers += [f"{w} ECE %", f"{w} Brier"]
    headers += ["train s", "peak MiB", "trainable params", "s / 1k predictions", "tokens / 1k predictions",
                "predict MiB", "shipped", "retention Δ nats"] + (["measured"] if differ else [])
    rows = []
    for g in gs:
        row = [g["label"], shots_text(g), str(g["n_runs"])]
        for p in prefixes:
            row += [pct(g.get(f"{p}_ece")), num(g.get(f"{p}_brier"), 3)]
        tokens = g.get("predict_tokens_per_1k")
        row += [seconds(g["train_seconds"]), mib(g["peak_memory_mib"]), params(g["trainable_params"]),
                seconds(g.get("predict_seconds_per_1k")),
                "–" if tokens is None or tokens != tokens else f"{tokens:,.0f}",
                mib(g.get("predict_peak_memory_mib")), size(g.get("shipped_bytes")), _delta(g.get("retention_delta"))]
        if differ:
            row.append(budget.measured_cell(g, marks))
        rows.append(row)
    return headers, rows


COST_WORDS = {"train_seconds": ("training", "s"), "eval_seconds": ("evaluation", "s"),
              "predict_seconds_per_1k": ("prediction", "s / 1k predictions")}


def cost_outlier_notes(gs: list[dict]) -> list[str]:
    """One line per run whose time is far from its option's median (stats.options.cost_outliers): what it took, the
    median, and that the option's costs (tables, budgets, break-evens) read the median, not it."""
    lines = []
    for g in gs:
        for o in g.get("cost_outliers") or ():
            costs = dict(o["costs"])
            if "eval_seconds" in costs:  # the time per prediction is the evaluation's, divided: said once
                costs.pop("predict_seconds_per_1k", None)
            said = ", ".join(f"{COST_WORDS[k][0]} {seconds(v)} {COST_WORDS[k][1]} against a median of "
                             f"{seconds(m)} {COST_WORDS[k][1]}" for k, (v, m) in costs.items())
            lines.append(f"{g['label']} ({shots_text(g)} shots), seed {o['seed']}: {said} over {o['n_runs']} runs "
                         "— disturbed? the option's costs use the median")
    return lines


def n_text(gs: list[dict], prefix: str) -> str:
    """The evaluation size of a table's options: one n, or the range when options were scored on different sets."""
    ns = sorted({g[f"{prefix}_n"] for g in gs if g.get(f"{prefix}_n") is not None})
    if not ns:
        return "n unknown"
    return f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}–{ns[-1]}, differing between options"


def _delta(x) -> str:
    return "–" if x is None or x != x else f"{x:+.3f}"


def floor_text(gs: list[dict], prefixes) -> str:
    """The baselines on the same evaluation examples, read from the stored results."""
    metric = gs[0]["primary_metric"]
    f, mname = scale_for(metric), METRIC_NAMES[metric]
    parts = []
    for p in prefixes:
        g = next((g for g in gs if g.get(f"{p}_majority") is not None), None)
        if g is None:
            continue
        text = f"{g[f'{p}_split']}: majority class {mname} {f(g[f'{p}_majority'])}"
        if metric != "accuracy" and g.get(f"{p}_majority_accuracy") is not None:
            text += f" (accuracy {pct(g[f'{p}_majority_accuracy'])} %)"
        if g.get(f"{p}_uniform") is not None:
            text += f", uniform guessing {mname} {f(g[f'{p}_uniform'])}"
        parts.append(text)
    return "; ".join(parts) or "not recorded (runs from before fewtune stored baselines)"


def breakdowns(rows: list[dict]) -> list[tuple[str, str]]:
    """(split, key) of every per-group breakdown stored with successful runs: the task's `group_by` columns (HANS:
    heuristic), read from the results, not from a split's name."""
    found = []
    for r in rows:
        if r["status"] != "success":
            continue
        for split, e in (r.get("metrics") or {}).items():
            for k, v in (e.items() if isinstance(e, dict) else ()):
                if k.startswith("by_") and k != "by_label" and isinstance(v, dict) and (split, k[3:]) not in found:
                    found.append((split, k[3:]))
    return found


def group_table(runs: list[dict], split: str, key: str) -> tuple[list[str], list[list[str]]]:
    keys = sorted({k for r in runs for k in r["metrics"][split][f"by_{key}"] if "/" in k})
    groups: dict[tuple, list[dict]] = {}
    for r in runs:  # one row per option: runs of another identity (variant) are never pooled
        groups.setdefault((r["model"], r["label"], r["shots"]), []).append(r)
    rows = []
    for (model, label, shots), sel in sorted(groups.items()):
        row = [model, label, str(shots), str(len(sel))]
        for k in keys:
            vals = [r["metrics"][split][f"by_{key}"].get(k, {}).get("accuracy") for r in sel]
            vals = [v for v in vals if v is not None]
            row.append(pct(sum(vals) / len(vals)) if vals else "–")
        rows.append(row)
    return ["model", "method", "shots", "seeds"] + keys, rows


@dataclass(frozen=True)
class ReportOptions:
    """What `fewtune report`'s options change: a number of predictions in a "training + use" budget; options slower
    per prediction, or whose general-text LM loss rose by more (nats/token) or was not measured, left out of "which
    method"; the equivalence margin instead of each task's; the findings file whose claims open the report ('auto':
    the shipped study on the tasks it covers, 'none': no such section)."""
    volume: float | None = None
    max_latency_ms: float | None = None
    max_retention_loss: float | None = None
    margin: float | None = None
    findings: object = "auto"


def build(rows: list[dict], db_path: Path, fig_dir: Path, predictions, volume: float | None = None,
          max_latency_ms: float | None = None, max_retention_loss: float | None = None,
          margin: float | None = None, findings="auto", seed_plans: dict | None = None) -> Doc:
    """The report, section by section (ReportOptions says what the options change)."""
    opts = ReportOptions(volume, max_latency_ms, max_retention_loss, margin, findings)
    flat = [flat_row(r) for r in rows]
    groups = group_runs(flat, rows, predictions)
    claims.attach_plans(groups, flat, seed_plans)  # the looks follow each grid's seeds (stats.sequential)
    use.with_volume(groups, volume)
    color = figures.colors([f["label"] for f in flat] + [g["label"] for g in groups])
    label_of = {h: g["label"] for g in groups for h in g["runs"]}
    doc = Doc()
    header(doc, rows, db_path)
    judged, default = judge_findings(groups, opts.findings)
    views = {}  # each family's verdict, fitted once for every section that reads it
    answer.section(doc, groups, judged, {f["config_hash"]: f for f in flat}, fig_dir,
                   lambda gs: family_views(gs, prefixes_of(gs), opts.margin, views))
    method_notes(doc)
    if judged is not None:
        findings_section.section(doc, judged, default)
    companion_findings(doc, groups, opts.findings)
    task_sections(doc, groups, fig_dir, color, opts.margin, views)
    breakdown_sections(doc, rows, flat, label_of, fig_dir, color)
    if groups:
        which_method(doc, groups, judged, opts, views)
    failures_and_appendix(doc, rows, flat, label_of)
    return doc


def header(doc: Doc, rows: list[dict], db_path: Path) -> None:
    status = Counter(r["status"] for r in rows)
    doc.heading(1, "fewtune report")
    doc.para(f"Database {db_path} · generated {time.strftime('%Y-%m-%d %H:%M')} · {len(rows)} runs: "
             + ", ".join(f"{n} {s}" for s, n in sorted(status.items())) + ".")


def method_notes(doc: Doc) -> None:
    """How every number was made: below the answer, collapsed in HTML."""
    doc.details(
        "How to read this report (method notes)",
        "Every number is read from the database (each run's stored result and per-example predictions), never "
        "recomputed from a model. Options are ranked by each task's own primary metric (its task file's "
        "primary_metric: MCC for CoLA, accuracy for MNLI). Values are means over data seeds; [95% CI] is an "
        "option's own paired, seed-aware interval (docs/statistics.md): it covers both training instability "
        "(between seeds) and evaluation sampling (which examples were scored). † one seed: evaluation noise only. "
        "Claims are made per family (one model, task and split) by one procedure: a closed test of 'these options "
        "are all bests' (critical values from Tukey's, all options equal, to Hsu's MCB, one left), on a model with "
        "option and seed effects where each option has its own seed variance (never below the family's pooled "
        "one), so the best can be chosen from the same data and a strict 'worse' still holds. The family-wise 5% is "
        "spent over looks at 4, 5, … seeds by a plan fixed by the grid's seeds (a claim made at a look stands); "
        "nothing is judged before every trained option has 4 seeds, and a seed-free option (zero-shot) runs once "
        "and is a constant for every seed. 'best − it' is the interval behind the claims against the highest "
        "estimate; 'verdict': worse (than the named option), equivalent to the best (only when the best is within "
        "the task's equivalence margin of it, fixed before the run), or not shown different. '> majority?': "
        "shown to beat predicting the evaluation set's most frequent class everywhere (for MCC: MCC > 0, which "
        "that constant answer scores), paired by example, Bonferroni over the family's options. ECE (15 bins) and "
        "Brier score from the stored class probabilities. Measured costs are medians over an option's runs, so that "
        "one run slowed by other work on the machine moves neither the cost table, the budgets nor the break-evens "
        "(a run whose time is at least twice or at most half its option's median, over 3 or more runs, is named "
        "below the cost table): train s (including a teacher's forward passes), eval s (all evaluation splits), "
        "s / 1k predictions, peak MiB (process RSS on CPU, max allocated on GPU); trainable parameters, tokens and "
        "shipped bytes are counted. Measured costs (time, memory) are compared only between options measured "
        "alike: the same processor, precision, threads, scoring batch and company (alone or beside other cells); "
        "where a family's options were not, the cost table says which were and the budgets compare only those.")


def companion_findings(doc: Doc, groups: list[dict], findings) -> None:
    """After the findings section: every other shipped findings file these results can answer (lpft.toml where lpft
    and ft have runs), each a section and a Holm family of its own; none beside a user's own file or with 'none'."""
    chosen, default = resolve_findings(findings)
    if not groups or (chosen is None and not default):
        return
    for extra in companions(chosen, {g["label"] for g in groups}):
        judged = judge(extra, groups)
        if judged.rows:
            findings_section.section(doc, judged, False)


def judge_findings(groups: list[dict], findings):
    """(the claims of the findings file judged on these results, None where the report has no findings section;
    whether they are the shipped study's by default)."""
    chosen, default = resolve_findings(findings)
    judged = judge(chosen, groups) if chosen is not None and groups else None
    if judged is not None and not judged.rows and default:  # the default study is silent on tasks it does not cover
        judged = None
    return judged, default


def task_sections(doc: Doc, groups: list[dict], fig_dir: Path, color: dict, margin: float | None,
                  cache: dict | None = None) -> None:
    """Per task and model: the score table with the family's verdict, costs, break-even, figures."""
    for task in dict.fromkeys(g["task"] for g in groups):
        doc.heading(2, f"Task {task}")
        task_groups = [g for g in groups if g["task"] == task]
        for _, model in model_order(task_groups):
            gs = [g for g in task_groups if g["model"] == model]
            pre = prefixes_of(gs)
            metric = METRIC_NAMES[gs[0]["primary_metric"]]
            doc.heading(3, f"{task} / {model}")
            splits = [f"in-domain = {gs[0]['id_split']} ({n_text(gs, 'id')})"]
            if "ood" in pre:
                splits.append(f"out-of-domain = {gs[0]['ood_split']} ({n_text(gs, 'ood')})")
            else:
                splits.append("no out-of-domain split")
            doc.para(f"Ranked by {metric}, {task}'s primary metric. {'; '.join(splits)}. "
                     f"Floor on the same examples: {floor_text(gs, pre)}.")
            views = family_views(gs, pre, margin, cache)
            headers, table_rows = score_table(gs, pre, views)
            level = next((f"{100 * fv.verdict.level:.1f}%" for fv in views.values()), "95%")
            doc.table(headers, table_rows, caption=f"{metric} ({task}'s primary metric): each option's own 95% "
                                                   f"interval; against the highest estimate, {level} simultaneous "
                                                   "intervals and the family's verdict; other metrics: means over seeds")
            headers, table_rows = cost_table(gs, pre)
            doc.table(headers, table_rows, caption="Calibration (means over seeds) and costs: to train, and to use "
                                                   "(measured on the evaluation pass at its batch size; icl's "
                                                   "demonstrations computed once and reused; shipped = what a user "
                                                   "needs besides the base model); times and memory are medians "
                                                   "over the option's runs, so one disturbed run cannot move them")
            for line in cost_outlier_notes(gs):
                doc.para(line, note=True)
            note = budget.measured_note(gs)
            if note:
                doc.para(note, note=True)
            be = use.break_even_table(gs)
            if be:
                doc.table(*be, caption="Break-even against in-context learning: predictions after which training "
                                       "once and predicting cheaply costs less compute than prompting "
                                       "(train s / (ms per icl prediction − ms per prediction), each an option's "
                                       "median over its runs); 'never': not cheaper per prediction")
            panels = " and ".join(("in-domain", "out-of-domain")[:len(pre)])
            doc.figure(figures.metric_vs_shots(groups, task, model, fig_dir, color, pre),
                       f"{task} / {model}: {metric} vs sample size. Read: how each method's {metric} changes with "
                       "more labelled examples, against the majority class (dashed); bars are 95% intervals.",
                       f"Line chart, one line per method, {metric} ({panels}) against the number of training "
                       "examples on a log scale, with 95% interval bars and a dashed majority-class line.")
            for cost, what in (("train_seconds", "training time (s)"), ("peak_memory_mib", "peak memory (MiB)")):
                doc.figure(figures.metric_vs_cost(groups, task, model, cost, what, fig_dir, color, pre),
                           f"{task} / {model}: {metric} vs {what.split(' (')[0]}. Read: the ringed options (the "
                           f"Pareto front) are the best {metric} at each cost; any other option is beaten by one "
                           "that costs no more.",
                           f"Scatter plot ({panels}): each option's mean {metric} against its {what}, the Pareto "
                           "front ringed and joined by a step line, its options labelled with method and shots.")
        if "ood" in prefixes_of(task_groups):
            doc.figure(figures.id_vs_ood(groups, task, fig_dir, color),
                       f"{task}: in-domain vs out-of-domain {metric}. Read: options below the dashed diagonal score "
                       "lower out of domain than in domain; the further right and up, the better on both.",
                       f"Scatter plot: each option's out-of-domain {metric} against its in-domain {metric}, with 95% "
                       "interval bars, the number of shots next to each point and a dashed diagonal of equal scores.")


def breakdown_sections(doc: Doc, rows: list[dict], flat: list[dict], label_of: dict, fig_dir: Path, color: dict) -> None:
    """Per evaluation split with a per-group breakdown (the task's group_by: HANS heuristics): a table and figures."""
    for split, key in breakdowns(rows):
        runs = [dict(f, metrics=r["metrics"], label=label_of.get(f["config_hash"], f["label"]))  # the option's name
                for f, r in zip(flat, rows)
                if r["status"] == "success" and ((r.get("metrics") or {}).get(split) or {}).get(f"by_{key}")]
        doc.heading(2, f"{split}: accuracy per {key} and gold label")
        doc.para(f"Accuracy % on the {split} split per value of its '{key}' column (the task file's group_by) and "
                 "gold label, mean over seeds; chance is 50 % for two classes. On HANS, the non-entailment subsets "
                 "are where a model that relies on word overlap fails.", note=True)
        headers, table_rows = group_table(runs, split, key)
        doc.table(headers, table_rows)
        for model in dict.fromkeys(r["model"] for r in runs):
            doc.figure(figures.group_bars(runs, model, fig_dir, color, split, key),
                       f"{split} / {model}: accuracy per {key} and label. Read: bars under the dashed 50 % line are "
                       "worse than chance on that subset.",
                       f"Grouped bar chart, one panel per sample size: accuracy % of each method per {key} and gold "
                       "label, with a dashed line at 50 %.")


def which_method(doc: Doc, groups: list[dict], judged, opts: ReportOptions, cache: dict | None = None) -> None:
    """The families' verdicts in words and the budget tables, over the options within the use limits."""
    volume, max_latency_ms, max_retention_loss = opts.volume, opts.max_latency_ms, opts.max_retention_loss
    margin = opts.margin
    doc.heading(2, "Which method for which budget")
    doc.details("How the budgets are read",
                "The verdict of each family first (the same claims as the tables above), then, for each budget, the "
                "option with the highest estimate among those that fit, and the options that fit and are not shown "
                "different from it (pairs read from the same family-wise intervals: no new claims). Budget levels are "
                "the costs at which a better option becomes affordable (the Pareto front); costs within the "
                "run-to-run variation measured for that cost count as equal. Labelled examples count what a run "
                "used (icl: the demonstrations that fit the context).")
    if volume or max_latency_ms or max_retention_loss is not None:
        doc.para("Use: " + "; ".join(x for x in (
            f"the budgets include training plus {volume:,.0f} predictions" if volume else "",
            f"options slower than {max_latency_ms:g} ms per prediction (as measured) are left out"
            if max_latency_ms else "",
            f"options whose general-text LM loss rose by more than {max_retention_loss:g} nats/token (or was not "
            "measured) are left out" if max_retention_loss is not None else "") if x) + ".", note=True)
    for task, model in model_order(groups):
        gs = [g for g in groups if g["task"] == task and g["model"] == model]
        gs, too_slow = use.within_latency(gs, max_latency_ms)
        gs, forgot = use.within_retention(gs, max_retention_loss)
        pre = prefixes_of(gs) if gs else ("id",)
        doc.heading(3, f"{task} / {model}")
        if too_slow:
            doc.para(f"Over the latency limit: {', '.join(budget.name(g) for g in too_slow)}.", note=True)
        if forgot:
            doc.para(f"Over the retention limit or not measured: {', '.join(budget.name(g) for g in forgot)}.",
                     note=True)
        if not gs:
            continue
        views = family_views([g for g in groups if g["task"] == task and g["model"] == model], pre, margin, cache)
        if too_slow or forgot:  # the same family-wise intervals, read over the options within the limits
            views = {p: claims.restrict(fv, gs) for p, fv in views.items()}
        doc.bullets(budget.conclusion(views, task, model)
                    + findings_section.closing(judged, task, model))
        for heading, headers, table_rows in budget.budget_tables(gs, pre, views, volume):
            doc.table(headers, table_rows, caption=heading)



def failures_and_appendix(doc: Doc, rows: list[dict], flat: list[dict], label_of: dict) -> None:
    bad = [r for r in rows if r["status"] != "success"]
    if bad:
        doc.heading(2, "Runs without a result")
        doc.table(["config hash", "status", "method", "task", "model", "shots", "seed", "error"],
                  [[r["config_hash"], r["status"], r.get("label") or r.get("method"), r["task"], r["model"],
                    str(r["shots"]), str(r["seed"]), r.get("error") or ""] for r in bad])

    doc.heading(2, "Appendix: every successful run")
    doc.table(["config hash", "task", "model", "method", "shots", "seed", "primary", "ID", "OOD", "ID acc %",
               "OOD acc %", "ID ECE %", "train s", "eval s", "peak MiB", "trainable params"],
              [[f["config_hash"], f["task"], f["model"], label_of.get(f["config_hash"], f["label"]), str(f["shots"]),
                str(f["seed"]), METRIC_NAMES[f["primary_metric"]], scale_for(f["primary_metric"])(f["id_primary"]),
                scale_for(f["primary_metric"])(f["ood_primary"]), pct(f["id_accuracy"], 2), pct(f["ood_accuracy"], 2),
                pct(f["id_ece"]), seconds(f["train_seconds"]), seconds(f["eval_seconds"]), mib(f["peak_memory_mib"]),
                params(f["trainable_params"])] for f in flat if f["status"] == "success"])
