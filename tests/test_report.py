"""The report: built from a database of synthetic results with per-example predictions, its numbers must be the
database's numbers, its statistics those of fewtune.stats.stats on the stored predictions, and its sentences must follow
from the intervals."""

import math
import os
import re
import warnings

import numpy as np
import pytest
from conftest import TOY_TASK

from fewtune.cli import main
from fewtune.config import RunConfig
from fewtune.report import data as report_data
from fewtune.report import write_report
from fewtune.report.budget import pareto_front
from fewtune.stats import compare, metrics, stats
from fewtune.store import Store

LABELS = {  # label -> (method, options, base accuracy, peak MiB, train s per shot)
    "icl": ("icl", {}, 0.60, 500.0, 0.0),
    "pbft": ("pbft", {}, 0.86, 2000.0, 5.0),
    "cd-fewshot": ("cd", {"context": "few-shot", "context_shots": 2}, 0.70, 2100.0, 6.0),
    "lora": ("lora", {}, 0.845, 900.0, 3.0),
}
SPLITS = {"cola": ("in_domain_dev", "out_of_domain_dev"), "mnli": ("dev_matched", "hans")}
PRIMARY = {"cola": "mcc", "mnli": "accuracy"}
MODELS = ("tiny-a", "tiny-b")
SHOTS = (4, 8)
SEEDS = (0, 1, 2, 3)
N = 200
HEURISTICS = ("constituent", "lexical_overlap", "subsequence")
HANS_KEYS = [f"{h}/{lab}" for h in HEURISTICS for lab in ("entailment", "non-entailment")]


def gold_of(task: str, split: str) -> np.ndarray:
    rng = np.random.default_rng(len(task) * 31 + len(split))
    positive = 0.69 if task == "cola" else 0.5
    return (rng.random(N) < positive).astype(int)


def synthetic_result(cfg: RunConfig, label: str, rng, spec: tuple | None = None) -> dict:
    """A result as the runner writes it, from synthetic predictions: per example, right with the option's accuracy
    (examples share a difficulty, so options are paired), confidence from a logit. `spec`: a LABELS entry for a
    label that is not in LABELS."""
    method, _, base, mem, per_shot = spec or LABELS[label]
    task_labels = ["unacceptable", "acceptable"] if cfg.task == "cola" else ["entailment", "non-entailment"]
    evals, predictions = {}, {}
    for role, split in zip(("in_domain", "out_of_domain"), SPLITS[cfg.task]):
        gold = gold_of(cfg.task, split)
        ease = np.random.default_rng(len(split)).normal(0, 1.0, N)
        acc = (base + 0.02 * (SHOTS.index(cfg.shots) if cfg.shots in SHOTS else 0)
               - (0.1 if role == "out_of_domain" else 0) + rng.normal(0, 0.01))
        p = 1 / (1 + np.exp(-(np.log(acc / (1 - acc)) + 1.2 * ease)))
        correct = rng.random(N) < p
        pred = np.where(correct, gold, 1 - gold)
        conf = np.clip(0.5 + 0.4 * rng.random(N), 0.5, 0.99)
        probs = np.where(np.arange(2)[None, :] == pred[:, None], conf[:, None], 1 - conf[:, None])
        logprobs = np.log(probs)
        groups = [{"heuristic": HEURISTICS[i % 3]} for i in range(N)] if split == "hans" else None
        evals[split] = {"role": role, **metrics.evaluation(gold.tolist(), pred.tolist(), logprobs, task_labels,
                                                          ("accuracy", "mcc", "macro_f1"), groups)}
        predictions[split] = {"idx": list(range(0, 2 * N, 2)), "gold": gold.tolist(), "pred": pred.tolist(),
                              "logprobs": logprobs.tolist(), "groups": groups}
    return {"schema": 2, "config": cfg.to_dict(), "config_hash": cfg.hash(), "identity": cfg.identity(),
            "task": {"name": cfg.task, "primary_metric": PRIMARY[cfg.task], "labels": task_labels,
                     "metrics": ["accuracy", "mcc", "macro_f1"]},
            "evals": evals, "predictions": predictions, "examples_used": cfg.shots,
            "cost": {"train_seconds": round(per_shot * cfg.shots + rng.uniform(0, 1), 3) if per_shot else 0.0,
                     "eval_seconds": round(float(rng.uniform(5, 6)), 3), "peak_memory_mib": mem + cfg.shots,
                     "trainable_params": 0 if method == "icl" else (421_000 if method == "lora" else 134_515_008),
                     "total_params": 134_515_008},
            "versions": {"fewtune": "test"}}


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "r.db"
    rng = np.random.default_rng(7)
    with Store(path) as store:
        for seed in SEEDS:
            for model in MODELS:
                for task in SPLITS:
                    for shots in SHOTS:
                        for label, (method, options, *_rest) in LABELS.items():
                            cfg = RunConfig(task=task, model=model, method=method, method_options=options,
                                            shots=shots, seed=seed, eval_limit=N)
                            store.claim(cfg, label=label, grid="synthetic")
                            assert store.finish(cfg.hash(), synthetic_result(cfg, label, rng))
        broken = RunConfig(task="cola", model="tiny-a", method="ft", shots=4, seed=0)
        store.claim(broken, label="ft", grid="synthetic")
        store.fail(broken.hash(), "FewtuneError: synthetic failure")
    return path


@pytest.fixture(scope="module")
def report(db, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "rep"
    paths = write_report(db, out)
    return out, paths["markdown"].read_text(), paths["html"].read_text()


def md_tables_after(md: str, heading: str) -> list[list[list[str]]]:
    """The Markdown tables between `heading` and the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    start = md.index(heading + "\n")
    rest = md[start + len(heading) + 1:]
    end = re.search(rf"^#{{1,{len(level)}}} ", rest, flags=re.M)
    section = rest[:end.start()] if end else rest
    tables, current = [], []
    for line in section.splitlines():
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip("|").split(" | ")])
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def stored(db, task, model, label, shots, split):
    """(gold, preds [seeds, N]) from the database for one option."""
    with Store(db, readonly=True) as store:
        runs = sorted((r for r in store.rows(["success"])
                       if (r["task"], r["model"], r["label"], r["shots"]) == (task, model, label, shots)),
                      key=lambda r: r["seed"])
        preds = [store.predictions(r["config_hash"])[split] for r in runs]
    return preds[0]["gold"], np.stack([p["pred"] for p in preds])


def fmt(est, metric):
    f = (lambda x: f"{100 * x:.1f}") if metric == "accuracy" else (lambda x: f"{x:.3f}")
    return f"{f(est.value)} [{f(est.lo)}, {f(est.hi)}]"


def test_files_exist_and_html_is_self_contained(report):
    out, md, html = report
    figures = sorted(p.name for p in (out / "figures").iterdir())
    for model in MODELS:
        for task, metric in (("cola", "mcc"), ("mnli", "accuracy")):
            for kind in ("vs-shots", "vs-train-seconds", "vs-peak-memory-mib"):
                name = f"{metric}-{kind}-{task}-{model}"
                assert f"{name}.png" in figures and f"{name}.svg" in figures, (name, figures)
        assert f"hans-heuristic-{model}.png" in figures
        for task in SPLITS:
            for split in ("id", "ood"):
                assert f"intervals-{task}-{model}-{split}.svg" in figures  # the verdict box's plot, per family
    assert "id-vs-ood-cola.svg" in figures and "id-vs-ood-mnli.svg" in figures
    assert all((out / "figures" / f).stat().st_size > 1000 for f in figures)
    linked = re.findall(r"\]\(figures/([^)]+)\.png\)", md)
    assert len(linked) == len(figures) // 2
    assert html.count('src="data:image/svg+xml;base64,') == len(linked)
    assert not re.search(r'(src|href)="(?!data:)', html)  # no external file, script, font or stylesheet
    assert html.count("<script") == 1 and "<script>" in html and "<link" not in html  # the inline sort, nothing else
    assert not re.search(r"fetch\(|XMLHttpRequest|import\(|https?:", html.split("<script>")[1])


def test_score_tables_are_the_paired_statistics_of_the_stored_predictions(db, report):
    _, md, _ = report
    checked = 0
    for task, (ind, ood) in SPLITS.items():
        metric = PRIMARY[task]
        name = "MCC" if metric == "mcc" else "accuracy"
        for model in MODELS:
            section = md[md.index(f"### {task} / {model}\n"):]
            assert f"Ranked by {name}, {task}'s primary metric" in section.split("\n\n")[1]
            table = md_tables_after(md, f"### {task} / {model}")[0]
            # the columns a reader needs first: the option, then per split the verdict, the estimate, the difference
            assert table[0][:6] == ["method", "shots", "ID verdict", f"ID {name} [95% CI]",
                                    "ID best − it [simultaneous]", "ID > majority?"]
            col = {h: i for i, h in enumerate(table[0])}
            assert len(table) == 2 + len(LABELS) * len(SHOTS)
            best_line = next(line for line in table[2:] if line[col["ID best − it [simultaneous]"]] == "best")
            best = (best_line[0], int(best_line[1]))
            for line in table[2:]:
                label, shots = line[0], int(line[1])
                assert line[col["seeds"]] == str(len(SEEDS))
                gold, preds = stored(db, task, model, label, shots, ind)
                assert line[col[f"ID {name} [95% CI]"]] == fmt(stats.estimate(gold, preds, None, 2, metric), metric)
                # the family's verdict, recomputed here from the stored predictions of every option
                fam = compare.family(gold, [compare.OptionRuns(f"{lab} ({sh} shots)", tuple(SEEDS),
                                                               stored(db, task, model, lab, sh, ind)[1])
                                            for lab in sorted(LABELS) for sh in SHOTS], 2, metric)  # the report's order
                me = f"{label} ({shots} shots)"
                assert fam.best == f"{best[0]} ({best[1]} shots)"
                if (label, shots) != best:
                    d = fam.vs_best[me].diff
                    assert d.value >= 0
                    assert line[col["ID best − it [simultaneous]"]] == report_data.signed(d, metric)
                    expected = (f"worse than {fam.worse[me]}" if me in fam.worse else
                                "equivalent to best" if me in fam.equivalent_to_best else "not shown different")
                    assert line[col["ID verdict"]] == expected
                majority = np.full_like(preds, np.bincount(gold).argmax())
                vm = stats.estimate(gold, preds, majority, 2, metric, confidence=1 - (1 - fam.level) / len(fam.options))
                assert line[col["ID > majority?"]] == ("yes" if vm.lo > 0 else
                                                       "no (worse)" if vm.hi < 0 else "not shown")
                ogold, opreds = stored(db, task, model, label, shots, ood)
                assert line[col[f"OOD {name} [95% CI]"]] == fmt(stats.estimate(ogold, opreds, None, 2, metric), metric)
                checked += 1
    assert checked == len(SPLITS) * len(MODELS) * len(LABELS) * len(SHOTS)


def test_floor_and_calibration_come_from_the_database(db, report):
    _, md, _ = report
    section = md[md.index("### cola / tiny-a\n"):]
    gold = gold_of("cola", "in_domain_dev")
    share = np.bincount(gold).max() / len(gold)
    assert f"in_domain_dev: majority class MCC 0.000 (accuracy {100 * share:.1f} %)" in section
    costs = md_tables_after(md, "### cola / tiny-a")[1]
    assert costs[0][3:5] == ["ID ECE %", "ID Brier"]
    with Store(db, readonly=True) as store:
        runs = [r for r in store.rows(["success"]) if (r["task"], r["model"], r["label"], r["shots"]) == ("cola", "tiny-a", "pbft", 8)]
    line = next(x for x in costs[2:] if x[:2] == ["pbft", "8"])
    assert line[3] == f"{100 * np.mean([r['metrics']['in_domain_dev']['ece'] for r in runs]):.1f}"
    assert line[4] == f"{np.mean([r['metrics']['in_domain_dev']['brier'] for r in runs]):.3f}"


def test_appendix_lists_every_run_with_its_stored_numbers(db, report):
    _, md, html = report
    (appendix,) = md_tables_after(md, "## Appendix: every successful run")
    by_hash = {line[0]: line for line in appendix[2:]}
    with Store(db, readonly=True) as store:
        rows = store.rows()
    for r in rows:
        if r["status"] != "success":
            continue
        line = by_hash[r["config_hash"]]
        ind, ood = SPLITS[r["task"]]
        assert line[6] == ("MCC" if r["task"] == "cola" else "accuracy")
        assert line[9] == f"{100 * r['metrics'][ind]['accuracy']:.2f}"
        assert line[10] == f"{100 * r['metrics'][ood]['accuracy']:.2f}"
        if r["task"] == "cola":
            assert line[7] == f"{r['metrics'][ind]['mcc']:.3f}"
        assert r["config_hash"] in html
    assert len(by_hash) == sum(r["status"] == "success" for r in rows)
    assert "synthetic failure" in md and "## Runs without a result" in md


def test_hans_table_equals_the_database(db, report):
    _, md, _ = report
    (table,) = md_tables_after(md, "## hans: accuracy per heuristic and gold label")
    assert table[0][4:] == HANS_KEYS
    with Store(db, readonly=True) as store:
        rows = [r for r in store.rows(["success"]) if r["task"] == "mnli"]
    line = next(x for x in table[2:] if x[:3] == ["tiny-b", "lora", "4"])
    runs = [r for r in rows if (r["model"], r["label"], r["shots"]) == ("tiny-b", "lora", 4)]
    for key, cell in zip(HANS_KEYS, line[4:]):
        assert cell == f"{100 * np.mean([r['metrics']['hans']['by_heuristic'][key]['accuracy'] for r in runs]):.1f}"


def test_budget_section_follows_the_paired_intervals(report):
    _, md, _ = report
    section = md[md.index("## Which method for which budget"):]
    line = next(x for x in section.splitlines() if x.startswith("- mnli / tiny-a, in-domain"))
    # pbft (86%) and lora (84.5%) are too close to tell apart at 4 seeds x 200 examples; icl (60%) is clearly worse
    assert "the highest estimate is pbft (8 shots)" in line
    assert "not shown different from it" in line and "lora (8 shots)" in line.split("not shown different from it")[1]
    assert "icl (4 shots) (" in line.split("shown worse than the best:")[1].split(";")[0]
    memory = next(t for t in md_tables_after(section, "### mnli / tiny-a") if t[2][0].endswith("MiB"))
    # the lowest memory level is icl's (500 MiB + shots in the synthetic data), and only icl fits in it
    assert memory[2][:2] == ["≤ 504 MiB", "icl (4 shots)"]
    assert memory[2][3] == "no other option"


def test_no_option_beating_the_majority_is_the_answer(tmp_path):
    """CoLA at a tiny budget: every option at chance. The conclusion says the majority baseline is as good."""
    path = tmp_path / "floor.db"
    rng = np.random.default_rng(1)

    def near_majority(label, gold):  # 90 % of the examples get the majority class
        return np.where(rng.random(N) < 0.9, np.bincount(gold).argmax(), 1 - np.bincount(gold).argmax())
    store_cola_in_domain(path, ("icl", "pbft"), rng, near_majority)
    paths = write_report(path, tmp_path / "rep")
    md = paths["markdown"].read_text()
    lines = md.splitlines()
    at = next(i for i, x in enumerate(lines) if x.startswith("- cola / m, in-domain"))
    floor = lines[at + 1]  # the floor: its own sentence after the family's verdict
    assert "No option is shown to beat the floor" in floor and "'acceptable'" in floor and "MCC > 0" in floor


USER_TASK = TOY_TASK.replace('name = "toy"', 'name = "sst2-like"').split("[splits.ood]")[0].replace(
    'out_of_domain = ["ood"]\n', "")


def test_user_task_without_ood_split(tmp_path, toy):
    """A user's task file (no out-of-domain split, given by path): headings carry the task's name, no 'None',
    one panel per figure with its legend, and no matplotlib warning about a legend without artists."""
    task_file = tmp_path / "tasks" / "sst2.toml"
    task_file.parent.mkdir()
    task_file.write_text(USER_TASK)
    path = tmp_path / "user.db"
    rng = np.random.default_rng(2)
    with Store(path) as store:
        for seed in (0, 1):
            for label in ("icl", "lora"):
                cfg = RunConfig(task=str(task_file), data_root=str(toy.root), model="m", method=label, shots=4,
                                seed=seed, eval_limit=8)
                gold = np.array([0, 1] * 4)
                pred = np.where(rng.random(8) < (0.6 if label == "icl" else 0.9), gold, 1 - gold)
                logprobs = np.log(np.full((8, 2), 0.5))
                r = {"config": cfg.to_dict(), "identity": cfg.identity(), "examples_used": 4,
                     "task": {"name": "sst2-like", "primary_metric": "accuracy", "labels": ["negative", "positive"]},
                     "evals": {"dev": {"role": "in_domain", **metrics.evaluation(
                         gold.tolist(), pred.tolist(), logprobs, ["negative", "positive"], ("accuracy", "mcc", "macro_f1"))}},
                     "predictions": {"dev": {"idx": list(range(8)), "gold": gold.tolist(), "pred": pred.tolist(),
                                             "logprobs": logprobs.tolist()}},
                     "cost": {"train_seconds": 1.0, "peak_memory_mib": 100.0}}
                store.claim(cfg, label=label)
                store.finish(cfg.hash(), r)
        assert {r["task"] for r in store.rows()} == {"sst2-like"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "No artists with labels found to put in legend" would fail here
        paths = write_report(path, tmp_path / "rep")
    md = paths["markdown"].read_text()
    assert "None" not in md and str(task_file) not in md
    assert "### sst2-like / m" in md and "no out-of-domain split" in md
    table = md_tables_after(md, "### sst2-like / m")[0]
    assert not any(h.startswith("OOD") for h in table[0])
    assert "macro-F1" in " ".join(table[0])  # the task lists it: it is shown


def test_runs_of_another_identity_are_not_pooled(tmp_path, toy):
    """The same label and shots on an edited task file (another pattern) is another option, never averaged in."""
    task_file = tmp_path / "t.toml"
    path = tmp_path / "id.db"
    with Store(path) as store:
        for version, template in enumerate(("{text} ?", "{text} !")):
            task_file.write_text(TOY_TASK.replace('"{text} ?"', f'"{template}"'))
            cfg = RunConfig(task=str(task_file), data_root=str(toy.root), model="m", method="icl", shots=4, seed=0)
            gold = [0, 1, 0, 1]
            r = {"config": cfg.to_dict(), "identity": cfg.identity(),
                 "task": {"name": "toy", "primary_metric": "accuracy", "labels": ["negative", "positive"]},
                 "evals": {"dev": {"role": "in_domain", **metrics.evaluation(gold, gold, np.log(np.full((4, 2), .5)),
                                                                            ["negative", "positive"], ("accuracy",))}},
                 "predictions": {"dev": {"idx": [0, 1, 2, 3], "gold": gold, "pred": gold,
                                         "logprobs": np.log(np.full((4, 2), .5)).tolist()}}, "cost": {}}
            assert store.claim(cfg, label="icl") == "claimed"  # an edited task file is a new cell
            store.finish(cfg.hash(), r)
    md = write_report(path, tmp_path / "rep")["markdown"].read_text()
    table = md_tables_after(md, "### toy / m")[0]
    assert len(table) == 4 and all(re.match(r"icl \[[0-9a-f]{8}\]", line[0]) for line in table[2:])


@pytest.mark.parametrize("resolved", [("bf16", "fp32"), ("bf16", "bf16")])
def test_dtype_auto_pools_only_runs_of_one_resolved_precision(tmp_path, toy, resolved):
    """Seeds of one dtype="auto" cell that ran in bf16 on one machine and in fp32 on another are two options;
    in the same precision, one option with both seeds."""
    path = tmp_path / "auto.db"
    with Store(path) as store:
        for seed, dtype in enumerate(resolved):
            cfg = RunConfig(task=str(toy.task_file), data_root=str(toy.root), model="m", method="icl", shots=4,
                            seed=seed, dtype="auto")
            gold = [0, 1, 0, 1]
            r = {"config": cfg.to_dict(), "identity": cfg.identity(), "dtype": dtype,
                 "task": {"name": "toy", "primary_metric": "accuracy", "labels": ["negative", "positive"]},
                 "evals": {"dev": {"role": "in_domain", **metrics.evaluation(gold, gold, np.log(np.full((4, 2), .5)),
                                                                            ["negative", "positive"], ("accuracy",))}},
                 "predictions": {"dev": {"idx": [0, 1, 2, 3], "gold": gold, "pred": gold,
                                         "logprobs": np.log(np.full((4, 2), .5)).tolist()}}, "cost": {}}
            assert store.claim(cfg, label="icl") == "claimed"
            store.finish(cfg.hash(), r)
    md = write_report(path, tmp_path / "rep")["markdown"].read_text()
    table = md_tables_after(md, "### toy / m")[0]
    if resolved[0] != resolved[1]:
        assert len(table) == 4 and all(re.match(r"icl \[[0-9a-f]{8}\]", line[0]) for line in table[2:])
    else:
        assert len(table) == 3 and table[2][0] == "icl"


def test_figures_are_drawn_where_they_show_something(report, tmp_path):
    """MCC vs sample size needs a method at two sample sizes; Pareto labels of near options are moved apart; every
    figure has a caption and its own alt text."""
    from fewtune.report import figures
    def g(label, cost, v, shots=32):
        return {"task": "cola", "model": "m", "label": label, "shots": shots, "train_seconds": cost,
                "primary_metric": "mcc", "id_primary": stats.Estimate(v, v - .1, v + .1, .05, 1, 2, 100, 0, 0),
                "id_split": "dev", "id_majority": 0.0}
    gs = [g("pbft", 10.0, 0.30), g("cd-instruction", 10.4, 0.305), g("icl", 1.0, 0.1), g("zero-shot", 0, 0.0, 0)]
    color = figures.colors([x["label"] for x in gs])
    assert figures.metric_vs_shots(gs, "cola", "m", tmp_path, color, ("id",)) is None  # one size per method
    assert figures.metric_vs_shots(gs + [g("icl", 1.0, 0.2, 8)], "cola", "m", tmp_path, color, ("id",))
    name = figures.metric_vs_cost(gs, "cola", "m", "train_seconds", "training time (s)", tmp_path, color, ("id",))
    svg = (tmp_path / f"{name}.svg").read_text()
    ys = {t: float(y) for y, t in re.findall(r'<text [^>]*y="([0-9.]+)"[^>]*>([a-z-]+ \(32\))</text>', svg)}
    assert {"pbft (32)", "cd-instruction (32)"} <= set(ys)  # the front's labels, as text
    assert abs(ys["pbft (32)"] - ys["cd-instruction (32)"]) >= figures.LABEL_PT  # 0.005 MCC apart: moved apart
    assert figures.spread([5.0, 5.0, 30.0], 8.0) == pytest.approx([5.0 - 8 / 3, 5.0 + 8 - 8 / 3, 30.0 - 8 / 3])
    _, md, html = report
    alts = re.findall(r"!\[([^\]]+)\]\(figures/[^)]+\.png\)\n\n\*([^*]+)\*", md)
    assert len(alts) == len(re.findall(r"<img ", html)) and all(a and c and a != c for a, c in alts)
    assert html.count("<figcaption>") == len(alts)


def test_pareto_front_on_hand_made_options():
    def g(label, value, mem):
        return {"label": label, "id_primary": stats.Estimate(value, value, value, 0, 2, 3, 100, 0, 0),
                "peak_memory_mib": mem}
    a, b, c = g("a", 0.60, 100), g("b", 0.80, 1000), g("c", 0.79, 3000)
    assert [x["label"] for x in pareto_front([c, b, a], "peak_memory_mib", "id")] == ["a", "b"]


def test_report_cli_and_empty_database(tmp_path, capsys):
    path = tmp_path / "r.db"
    with Store(path) as store:
        cfg = RunConfig(task="cola", method="icl", shots=2)
        store.claim(cfg)
        store.fail(cfg.hash(), "RuntimeError: nothing worked")
    assert main(["report", "--db", str(path), "--out", str(tmp_path / "rep")]) == 0
    assert "report written to" in capsys.readouterr().out
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "No successful runs yet" in md and "nothing worked" in md
    assert main(["report", "--db", str(tmp_path / "missing.db"), "--out", str(tmp_path / "rep2")]) == 2
    assert "No results database" in capsys.readouterr().err


def store_options(path, labels, seeds, task="mnli"):
    """A database of synthetic runs: every label under every seed, 8 shots."""
    rng = np.random.default_rng(4)
    with Store(path) as store:
        for seed in seeds:
            for label in labels:
                cfg = RunConfig(task=task, model="m", method=LABELS[label][0], method_options=LABELS[label][1],
                                shots=8, seed=seed, eval_limit=N)
                store.claim(cfg, label=label)
                store.finish(cfg.hash(), synthetic_result(cfg, label, rng))
    return path


def first_box(md: str) -> tuple[str, list[str]]:
    """The first verdict box of report.md: its heading and its lines."""
    block = md[md.index("\n### ") + 1:].split("\n\n")
    return block[0][4:], [x[2:] for x in block[1].splitlines() if x.startswith("- ")]


@pytest.mark.parametrize("case, status, says", [
    ("no successful run", "NO RESULTS", "No successful runs yet: run `fewtune grid SPEC` first."),
    ("one option", "OPEN", "Nothing is judged yet: only one option: there is nothing to compare."),
    ("one seed", "OPEN", "Nothing is judged yet: a trained option has 1 seed: nothing is judged before every one has 4"),
])
def test_the_first_box_says_what_is_missing_in_one_line(tmp_path, capsys, case, status, says):
    """Bad input still renders (exit 0) and the first box says in its first line why there is no answer."""
    path = tmp_path / "bad.db"
    if case == "no successful run":
        with Store(path) as store:
            cfg = RunConfig(task="cola", method="icl", shots=2)
            store.claim(cfg)
            store.fail(cfg.hash(), "RuntimeError: nothing worked")
    else:
        one_option = case == "one option"
        store_options(path, ["pbft"] if one_option else ["icl", "pbft"], (0, 1) if one_option else (0,))
    assert main(["report", "--db", str(path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    html = (tmp_path / "rep" / "report.html").read_text()
    heading, lines = first_box(md)
    assert heading.startswith(status + " · ") and lines[0].startswith(says)
    assert md.index(says) < md.index("How to read this report")  # above the method notes
    assert html.index('<section class="answer') < html.index("<details>")
    if case != "no successful run":  # the box still has its plot: each option's value, nothing judged
        assert re.search(r"!\[Interval plot, mnli / m, in-domain: \d options", md)


@pytest.mark.parametrize("blocker", ["figures is a file", "report.html is a folder", "read-only folder"])
def test_a_report_folder_that_cannot_be_written_is_one_line(tmp_path, capsys, blocker):
    path = store_options(tmp_path / "ok.db", ["icl", "pbft"], (0, 1))
    out = tmp_path / "rep"
    out.mkdir()
    if blocker == "figures is a file":
        (out / "figures").write_text("not a folder")
    elif blocker == "report.html is a folder":
        (out / "report.html").mkdir()
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder")
        out.chmod(0o500)
    assert main(["report", "--db", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fewtune: error: cannot write the report in {out}: ") and "\n" not in err


def test_one_seed_is_flagged(tmp_path):
    path = tmp_path / "one.db"
    rng = np.random.default_rng(3)
    with Store(path) as store:
        for label in ("icl", "pbft"):
            cfg = RunConfig(task="mnli", model="m", method=label, shots=8, seed=0, eval_limit=N)
            store.claim(cfg, label=label)
            store.finish(cfg.hash(), synthetic_result(cfg, label, rng))
    md = write_report(path, tmp_path / "rep")["markdown"].read_text()
    assert "†" in md_tables_after(md, "### mnli / m")[0][2][3]
    line = next(x for x in md.splitlines() if x.startswith("- mnli / m, in-domain"))
    assert "nothing is claimed" in line and "shown worse" not in line and "not shown different" not in line
    assert "Nothing is judged before every trained option has 4 seeds" in md
    assert not math.isnan(0.0)


def test_break_even_and_use_budget_follow_the_stored_costs(tmp_path):
    """Break-even against icl = train s / (icl s per prediction − its s per prediction), from the stored costs; the
    use budget adds the predictions' time; a latency limit leaves slow options out."""
    from fewtune.report.use import break_even, count
    path = tmp_path / "use.db"
    costs = {"icl": (0.0, 80.0), "pbft": (40.0, 20.0), "lora": (30.0, 90.0)}  # label -> (train s, s per 1k predictions)
    rng = np.random.default_rng(5)
    with Store(path) as store:
        for seed in (0, 1):
            for label, (train, per_1k) in costs.items():
                cfg = RunConfig(task="mnli", model="m", method=LABELS[label][0], shots=8, seed=seed, eval_limit=N)
                r = synthetic_result(cfg, label, rng)
                r["cost"].update(train_seconds=train, predict_seconds_per_1k=per_1k)
                store.claim(cfg, label=label)
                store.finish(cfg.hash(), r)
    md = write_report(path, tmp_path / "rep", volume=10_000, max_latency_ms=50)["markdown"].read_text()
    table = next(t for t in md_tables_after(md, "### mnli / m") if t[0][0] == "method" and t[0][-1].startswith("vs icl"))
    line = next(x for x in table[2:] if x[0] == "pbft")
    assert line[-1] == count(40.0 / (0.080 - 0.020)) == "667"  # 40 s / 60 ms saved per prediction
    assert next(x for x in table[2:] if x[0] == "lora")[-1] == "never"  # dearer per prediction than icl
    assert break_even({"train_seconds": 5.0, "predict_seconds_per_1k": 1.0},
                      {"train_seconds": 0.0, "predict_seconds_per_1k": 2.0}) == pytest.approx(5000)
    section = md[md.index("## Which method for which budget"):]
    assert "Over the latency limit: icl (8 shots), lora (8 shots)" in section
    assert "**Compute for training + 10,000 predictions (s)**" in section
    use = next(t for t in md_tables_after(section, "### mnli / m") if t[2][0].endswith(" s") and t[2][0] != "≤ 40.0 s")
    assert use[2][0] == f"≤ {40 + 10_000 * 0.020:.0f} s"  # training + 10,000 predictions for pbft: 240 s


def test_retention_column_and_budget(tmp_path):
    """The report shows each option's retention delta (mean over seeds) and leaves options over the limit, or
    without a measurement, out of "which method"."""
    path = tmp_path / "ret.db"
    deltas = {"pbft": 0.20, "lora": 0.01, "icl": 0.0}
    rng = np.random.default_rng(6)
    with Store(path) as store:
        for seed in (0, 1):
            for label, delta in deltas.items():
                cfg = RunConfig(task="mnli", model="m", method=LABELS[label][0], shots=8, seed=seed, eval_limit=N)
                r = synthetic_result(cfg, label, rng)
                r["retention"] = {"delta": delta + 0.01 * seed}
                store.claim(cfg, label=label)
                store.finish(cfg.hash(), r)
    md = write_report(path, tmp_path / "rep", max_retention_loss=0.05)["markdown"].read_text()
    costs = md_tables_after(md, "### mnli / m")[1]
    column = costs[0].index("retention Δ nats")
    assert next(x for x in costs[2:] if x[0] == "pbft")[column] == "+0.205"
    section = md[md.index("## Which method for which budget"):]
    assert "Over the retention limit or not measured: pbft (8 shots)" in section
    assert "pbft (8 shots)" not in section.split("Over the retention limit")[1].split("\n\n", 1)[1]


def test_costs_compare_only_between_runs_measured_alike(tmp_path):
    """pbft's runs were timed in a warm worker beside another cell with 1 thread, icl's and lora's alone in fresh
    processes with 2: the cost table letters them, break-even and the budgets never compare pbft with the others,
    and claims.cheapest names none of them."""
    from fewtune.stats import claims, options
    path = tmp_path / "alike.db"
    rng = np.random.default_rng(8)
    alone = {"backend": "process", "workers": 1, "shared_with": 0, "torch_threads": 2, "eval_batch_size": 16,
             "eval_batching": "rows"}
    shared = dict(alone, backend="warm", workers=2, shared_with=1, torch_threads=1)
    with Store(path) as store:
        for seed in (0, 1):
            for label, (train, per_1k) in {"icl": (0.0, 80.0), "pbft": (40.0, 20.0), "lora": (30.0, 10.0)}.items():
                cfg = RunConfig(task="mnli", model="m", method=LABELS[label][0], shots=8, seed=seed, eval_limit=N)
                r = synthetic_result(cfg, label, rng)
                r.update(device="cpu", dtype="float32", machine={"cpu": "Test CPU", "torch_threads": 2})
                r["cost"].update(shared if label == "pbft" else alone, train_seconds=train, predict_seconds_per_1k=per_1k)
                store.claim(cfg, label=label)
                store.finish(cfg.hash(), r)
        rows = store.rows(["success"])
    flat = [options.flat_row(r) for r in rows]
    pbft = next(f for f in flat if f["label"] == "pbft")
    assert pbft["measured_time"] == "Test CPU, float32, 1 threads, beside 1 other cell, scoring batches of 16 rows"
    assert pbft["measured_memory"].endswith("a warm worker's RSS")
    assert next(f for f in flat if f["label"] == "icl")["measured_time"].endswith("2 threads, alone, scoring batches of 16 rows")

    md = write_report(path, tmp_path / "rep")["markdown"].read_text()
    costs = md_tables_after(md, "### mnli / m")[1]
    measured = {x[0]: x[-1] for x in costs[2:]}
    assert costs[0][-1] == "measured" and measured == {"icl": "time A · memory A", "lora": "time A · memory A",
                                                       "pbft": "time B · memory B"}
    assert "Costs were not all measured alike (time: A = Test CPU, float32, 2 threads, alone" in md
    table = next(t for t in md_tables_after(md, "### mnli / m") if t[0][0] == "method" and t[0][-1].startswith("vs icl"))
    assert next(x for x in table[2:] if x[0] == "pbft")[-1] == "not timed alike"
    assert next(x for x in table[2:] if x[0] == "lora")[-1] == "429"  # timed alike: 30 s / 70 ms saved per prediction
    section = md[md.index("## Which method for which budget"):]
    assert ("**Training-time limit (s), options measured alike as A (Test CPU, float32, 2 threads, alone, scoring "
            "batches of 16 rows); not compared here: pbft (8 shots)**") in section
    assert "**Training-time limit (s), options measured alike as B" in section
    assert "**Labelled examples**" in section  # counted, not measured: one table over every option

    groups = options.group_runs(flat, rows, options.predictions_reader(Store(path, readonly=True)))
    assert claims.cheapest(groups) is None
    assert claims.cheapest([g for g in groups if g["label"] != "pbft"])["label"] == "icl"


def test_results_csv_has_every_rows_columns(tmp_path, capsys):
    """`fewtune results --format csv` when rows differ in their columns (icl's demonstrations_dropped): every column
    any row has, blank where a row has none; and how each run's costs were measured."""
    import csv
    import io
    path = tmp_path / "csv.db"
    rng = np.random.default_rng(9)
    with Store(path) as store:
        for label in ("pbft", "icl"):
            cfg = RunConfig(task="mnli", model="m", method=LABELS[label][0], shots=8, seed=0, eval_limit=N)
            r = synthetic_result(cfg, label, rng)
            if label == "icl":
                r["method_info"] = {"demonstrations_dropped": 3}
            store.claim(cfg, label=label)
            store.finish(cfg.hash(), r)
    assert main(["results", "--db", str(path), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["label"]: r["demonstrations_dropped"] for r in rows} == {"pbft": "", "icl": "3"}
    assert all(r["measured_time"] and r["measured_memory"] for r in rows)


def test_first_screen_reads_only_the_verdicts_named_fields(tmp_path, monkeypatch):
    """The box and the interval plot read of a Verdict only best, candidates, worse, equivalent_to_best, margin,
    level, reason and vs_best[o].diff (value, lo, hi: best − o): a verdict with nothing else plugs in."""
    from types import SimpleNamespace as NS
    from fewtune.stats import claims
    from fewtune.report import answer
    diff = lambda v, lo, hi: NS(diff=NS(value=v, lo=lo, hi=hi))  # noqa: E731
    verdict = NS(best="a", candidates=["a", "b", "c"], worse={"d": "a"}, equivalent_to_best=["c"], margin=0.05,
                 level=0.99, reason="", vs_best={"b": diff(0.10, -0.02, 0.22), "c": diff(0.01, -0.03, 0.04),
                                                 "d": diff(0.30, 0.12, 0.48)})
    est = lambda v: stats.Estimate(v, v - 0.1, v + 0.1, 0.05, 2, 3, 200, 0, 0)  # noqa: E731
    groups = {n: {"label": n, "shots": 8, "runs": [], "id_primary": est(v), "id_split": "dev", "id_majority": 0.0,
                  "id_majority_label": "acceptable"} for n, v in (("d", 0.1), ("b", 0.3), ("a", 0.4), ("c", 0.39))}
    floor = {n: stats.Estimate(0, lo, lo + 0.2, 0, 2, 3, 200, 0, 0) for n, lo in (("a", 0.1), ("b", -0.1), ("c", 0.05),
                                                                                 ("d", -0.3))}
    fv = claims.FamilyView("id", "mcc", verdict, groups, [], floor, 527)
    monkeypatch.setattr(claims, "what_it_takes", lambda fv, o: f"(what it takes for {o})")
    rows = answer.plotted(fv, {})
    assert [(r.name, r.kind) for r in rows] == [("a", "highest"), ("c", "equivalent"), ("b", "open"), ("d", "worse")]
    assert rows[2].vs_best == (-0.10, -0.22, 0.02) and rows[0].vs_best == (0.0, 0.0, 0.0)
    assert [r.floor for r in rows] == ["beats", "beats", "not shown", "worse"]  # d: [-0.3, -0.1]
    lines = answer.verdict_lines(fv, rows, None, "")
    assert lines == ["3 options may be the best: a, MCC 0.400 [0.300, 0.500] (highest estimate); c, b.",
                     "Shown worse than a: d.", "Shown to beat the majority-class floor (MCC > 0): a, c.",
                     "Equivalent to the best within ±0.050: c.", "To settle a vs b: (what it takes for b)"]
    name, caption, alt = answer.figure(rows, fv, "cola", "m", tmp_path)
    assert (tmp_path / f"{name}.svg").is_file() and "99.0% interval" in alt and "still open" in caption


def test_one_disturbed_run_moves_no_cost_and_is_named(tmp_path):
    """An option's times and memory are medians over its runs: a run slowed by other work on the machine (evaluation
    135 s against 15.0 and 16.8 s, as in a make demo) is named under the cost table and moves neither the option's time
    per prediction nor a break-even against it."""
    from fewtune.report.use import count
    from fewtune.stats import options
    path = tmp_path / "disturbed.db"
    rng = np.random.default_rng(11)
    evals = {0: 135.0, 1: 15.0, 2: 16.8}  # icl's evaluation seconds per seed; N = 200 predictions
    with Store(path) as store:
        for seed in evals:
            for label in ("icl", "pbft"):
                cfg = RunConfig(task="mnli", model="m", method=label, shots=8, seed=seed, eval_limit=N)
                r = synthetic_result(cfg, label, rng)
                if label == "icl":
                    r["cost"].update(eval_seconds=evals[seed], predict_seconds_per_1k=evals[seed] / N * 1000)
                else:
                    r["cost"].update(train_seconds=40.0, eval_seconds=4.0, predict_seconds_per_1k=20.0)
                store.claim(cfg, label=label)
                store.finish(cfg.hash(), r)
        rows = store.rows()
    groups = {g["label"]: g for g in options.group_runs([options.flat_row(r) for r in rows], rows, lambda key: {})}
    icl = groups["icl"]
    assert icl["eval_seconds"] == 16.8 and icl["predict_seconds_per_1k"] == pytest.approx(84.0)  # not 278 (mean)
    assert [(o["seed"], o["costs"]["eval_seconds"], o["n_runs"]) for o in icl["cost_outliers"]] == [(0, (135.0, 16.8), 3)]
    assert icl["cost_range"]["eval_seconds"] == (15.0, 16.8)  # the disturbed run does not widen budget levels either
    assert groups["pbft"]["cost_outliers"] == []

    paths = write_report(path, tmp_path / "rep")
    md, html = paths["markdown"].read_text(), paths["html"].read_text()
    note = ("icl (8 shots), seed 0: evaluation 135 s against a median of 16.8 s over 3 runs — disturbed? the option's "
            "costs use the median")
    assert note in md and note.replace("'", "&#x27;") in html
    table = next(t for t in md_tables_after(md, "### mnli / m") if t[0][0] == "method" and t[0][-1].startswith("vs icl"))
    assert "84.0 ms" in table[0][-1]  # icl's time per prediction in the heading: the median
    assert next(x for x in table[2:] if x[0] == "pbft")[-1] == count(40.0 / (0.084 - 0.020)) == "625"


def test_seed_free_is_read_from_the_result_or_from_icl_with_no_shots():
    """flat_row's seed_free: the recorded field; a row recorded before it: icl with 0 shots (zero-shot)."""
    from fewtune.stats.options import flat_row

    def row(method, shots, recorded=None):
        result = {} if recorded is None else {"seed_free": recorded}
        return {"config_hash": "h", "status": "success", "method": method, "shots": shots, "seed": 0,
                "config": {"method": method, "shots": shots}, "result": result}
    assert flat_row(row("icl", 0))["seed_free"] is True
    assert flat_row(row("icl", 32))["seed_free"] is False
    assert flat_row(row("ft", 32))["seed_free"] is False
    assert flat_row(row("icl", 0, recorded=False))["seed_free"] is False  # recorded wins (a method of its own)
    assert flat_row(row("peft", 0, recorded=True))["seed_free"] is True


def test_a_collapsed_option_is_a_warning_not_a_constant(tmp_path):
    """Every run of a trained option predicts the majority class for every example: the report warns that all its
    seeds collapsed, and it is not treated as seed-free (its variance is the family's pooled one)."""
    path = tmp_path / "collapse.db"
    rng = np.random.default_rng(2)
    store_cola_in_domain(path, ("icl", "pbft", "lora"), rng,
                         lambda label, gold: np.full_like(gold, np.bincount(gold).argmax()) if label == "lora" else None)
    md = write_report(path, tmp_path / "rep")["markdown"].read_text()
    assert f"lora (8 shots): all {len(SEEDS)} seeds collapsed to one class" in md
    assert "Seed-free" not in md


def store_cola_in_domain(path, labels, rng, predict):
    """Synthetic cola runs of `labels` under SEEDS whose in-domain predictions are `predict(label, gold)` (None: the
    synthetic ones), with the metrics recomputed from them."""
    with Store(path) as store:
        for seed in SEEDS:
            for label in labels:
                cfg = RunConfig(task="cola", model="m", method=label, shots=8, seed=seed, eval_limit=N)
                r = synthetic_result(cfg, label, rng)
                split = "in_domain_dev"
                gold = np.asarray(r["predictions"][split]["gold"])
                pred = predict(label, gold)
                if pred is not None:
                    r["predictions"][split]["pred"] = pred.tolist()
                    r["evals"][split] = {"role": "in_domain", **metrics.evaluation(
                        gold.tolist(), pred.tolist(), np.log(np.full((N, 2), 0.5)), ["unacceptable", "acceptable"],
                        ("accuracy", "mcc", "macro_f1"))}
                store.claim(cfg, label=label)
                store.finish(cfg.hash(), r)
