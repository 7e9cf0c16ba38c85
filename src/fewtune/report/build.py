"""The report's content: which tables, figures and sentences, in which order, from the database rows."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from . import budget, figures
from .data import (BOOTSTRAP_SAMPLES, CONFIDENCE, flat_row, group_runs, interval, mean_pm_sd, mib, model_order, num,
                   params, pct, seconds)
from .render import Doc

RESULT_HEADERS = ["method", "shots", "seeds", "ID acc % mean ± sd", "ID 95% CI", "OOD acc % mean ± sd", "OOD 95% CI",
                  "train s", "eval s", "peak MiB", "trainable params"]


def accuracy_table(gs: list[dict]) -> list[list[str]]:
    return [[g["label"], str(g["shots"]), str(g["n_runs"]), mean_pm_sd(g["id_accuracy"]), interval(g["id_accuracy"]),
             mean_pm_sd(g["ood_accuracy"]), interval(g["ood_accuracy"]), seconds(g["train_seconds"]),
             seconds(g["eval_seconds"]), mib(g["peak_memory_mib"]), params(g["trainable_params"])] for g in gs]


def mcc_table(gs: list[dict]) -> list[list[str]]:
    def three(x):
        return num(x, 3)
    return [[g["label"], str(g["shots"]), str(g["n_runs"]), mean_pm_sd(g["id_mcc"], three), interval(g["id_mcc"], three),
             mean_pm_sd(g["ood_mcc"], three), interval(g["ood_mcc"], three)] for g in gs]


def hans_table(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    keys = sorted({k for r in runs for k in r["metrics"]["hans"]["by_heuristic"] if "/" in k})
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["label"], r["shots"]), []).append(r)
    rows = []
    for (model, label, shots), sel in sorted(groups.items()):
        row = [model, label, str(shots), str(len(sel))]
        for k in keys:
            vals = [r["metrics"]["hans"]["by_heuristic"].get(k, {}).get("accuracy") for r in sel]
            vals = [v for v in vals if v is not None]
            row.append(pct(sum(vals) / len(vals)) if vals else "–")
        rows.append(row)
    return ["model", "method", "shots", "seeds"] + keys, rows


def build(rows: list[dict], db_path: Path, fig_dir: Path) -> Doc:
    flat = [flat_row(r) for r in rows]
    groups = group_runs(flat)
    status = Counter(r["status"] for r in rows)
    color = figures.colors([f["label"] for f in flat] + [g["label"] for g in groups])
    doc = Doc()
    doc.heading(1, "fewtune report")
    doc.para(f"Database {db_path} · generated {time.strftime('%Y-%m-%d %H:%M')} · {len(rows)} runs: "
             + ", ".join(f"{n} {s}" for s, n in sorted(status.items())) + ".")
    doc.para(f"Every number is read from the database (the stored result of each run), never recomputed from a "
             f"model. Accuracy in %. mean ± sd over seeds (sample sd); {int(CONFIDENCE * 100)}% CI: percentile "
             f"bootstrap of the mean over seeds ({BOOTSTRAP_SAMPLES:,} resamples, fixed seed); with 3-5 seeds it "
             f"understates the uncertainty, and with one seed there is none ('–'). Costs are means over seeds: "
             f"train s (training, including a teacher's forward passes), eval s (all evaluation splits), "
             f"peak MiB (process RSS on CPU, max allocated on GPU), trainable parameters.", note=True)
    if not groups:
        doc.para("No successful runs yet: run `fewtune grid SPEC` first.")

    for task in dict.fromkeys(g["task"] for g in groups):
        doc.heading(2, f"Task {task}")
        task_groups = [g for g in groups if g["task"] == task]
        for _, model in model_order(task_groups):
            gs = [g for g in task_groups if g["model"] == model]
            doc.heading(3, f"{task} / {model}")
            doc.table(RESULT_HEADERS, accuracy_table(gs),
                      caption=f"Accuracy: in-domain = {gs[0]['id_split']} (n={gs[0]['id_n']}), "
                              f"out-of-domain = {gs[0]['ood_split']} (n={gs[0]['ood_n']})")
            doc.table(["method", "shots", "seeds", "ID MCC mean ± sd", "ID 95% CI", "OOD MCC mean ± sd", "OOD 95% CI"],
                      mcc_table(gs), caption="Matthews correlation (CoLA's official metric)")
            doc.figure(figures.accuracy_vs_shots(groups, task, model, fig_dir, color),
                       f"{task} / {model}: accuracy vs sample size, in-domain and out-of-domain")
            doc.figure(figures.accuracy_vs_cost(groups, task, model, "train_seconds", "training time (s)", fig_dir, color),
                       f"{task} / {model}: accuracy vs training time, Pareto front ringed")
            doc.figure(figures.accuracy_vs_cost(groups, task, model, "peak_memory_mib", "peak memory (MiB)", fig_dir, color),
                       f"{task} / {model}: accuracy vs peak memory, Pareto front ringed")
        doc.figure(figures.id_vs_ood(groups, task, fig_dir, color), f"{task}: in-domain vs out-of-domain accuracy")

    hans = [dict(f, metrics=r["metrics"]) for f, r in zip(flat, rows)
            if r["status"] == "success" and ((r.get("metrics") or {}).get("hans") or {}).get("by_heuristic")]
    if hans:
        doc.heading(2, "HANS: accuracy per heuristic and gold label")
        doc.para("Accuracy % on the HANS subsets, mean over seeds. 'non-entailment' subsets are where a model that "
                 "relies on word overlap fails; 50 % is chance.", note=True)
        headers, table_rows = hans_table(hans)
        doc.table(headers, table_rows)
        for model in dict.fromkeys(r["model"] for r in hans):
            doc.figure(figures.hans_bars(hans, model, fig_dir, color), f"HANS / {model}: accuracy per heuristic and label")

    if groups:
        doc.heading(2, "Which method for which budget")
        doc.para("For each budget, the best option is the method × sample size with the highest mean accuracy among "
                 "those that fit; options whose 95% intervals overlap the best one's are not distinguishable from it "
                 "at these seeds. Budget levels are the costs at which a better option becomes affordable "
                 "(the Pareto front).", note=True)
        for task, model in model_order(groups):
            gs = [g for g in groups if g["task"] == task and g["model"] == model]
            doc.heading(3, f"{task} / {model}")
            doc.bullets(budget.conclusion(gs, task, model))
            for heading, headers, table_rows in budget.budget_tables(gs):
                doc.table(headers, table_rows, caption=heading)

    bad = [r for r in rows if r["status"] != "success"]
    if bad:
        doc.heading(2, "Runs without a result")
        doc.table(["config hash", "status", "method", "task", "model", "shots", "seed", "error"],
                  [[r["config_hash"], r["status"], r.get("label") or r.get("method"), r["task"], r["model"],
                    str(r["shots"]), str(r["seed"]), r.get("error") or ""] for r in bad])

    doc.heading(2, "Appendix: every successful run")
    doc.table(["config hash", "task", "model", "method", "shots", "seed", "ID acc %", "OOD acc %", "ID MCC", "OOD MCC",
               "train s", "eval s", "peak MiB", "trainable params"],
              [[f["config_hash"], f["task"], f["model"], f["label"], str(f["shots"]), str(f["seed"]),
                pct(f["id_accuracy"], 2), pct(f["ood_accuracy"], 2), num(f["id_mcc"], 4), num(f["ood_mcc"], 4),
                seconds(f["train_seconds"]), seconds(f["eval_seconds"]), mib(f["peak_memory_mib"]),
                params(f["trainable_params"])] for f in flat if f["status"] == "success"])
    return doc
