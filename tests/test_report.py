"""The report: built from a database of synthetic results, its numbers must be the database's numbers."""

import math
import re

import numpy as np
import pytest

from fewtune.cli import main
from fewtune.config import RunConfig
from fewtune.report import write_report
from fewtune.report.budget import best_under, overlaps, pareto_front
from fewtune.report.data import bootstrap_ci, mean_sd
from fewtune.store import Store

LABELS = {  # label -> (method, options, base accuracy, peak MiB, train s per shot)
    "icl": ("icl", {}, 0.60, 500.0, 0.0),
    "pbft": ("pbft", {}, 0.80, 2000.0, 5.0),
    "cd-fewshot": ("cd", {"context": "few-shot", "context_shots": 2}, 0.70, 2100.0, 6.0),
    "lora": ("lora", {}, 0.78, 900.0, 3.0),
}
SPLITS = {"cola": ("in_domain_dev", "out_of_domain_dev"), "mnli": ("dev_matched", "hans")}
MODELS = ("tiny-a", "tiny-b")
SHOTS = (4, 8)
SEEDS = (0, 1, 2)
HANS_KEYS = [f"{h}/{lab}" for h in ("constituent", "lexical_overlap", "subsequence")
             for lab in ("entailment", "non-entailment")]


def synthetic_result(cfg: RunConfig, label: str, rng) -> dict:
    method, _, base, mem, per_shot = LABELS[label]
    ind, ood = SPLITS[cfg.task]
    acc = float(np.clip(base + 0.02 * SHOTS.index(cfg.shots) + rng.normal(0, 0.02), 0, 1))
    acc = round(acc * 200) / 200  # a whole number of the 200 examples
    ood_acc = round((acc - 0.1 + rng.normal(0, 0.01)) * 200) / 200
    evals = {ind: {"role": "in_domain", "n": 200, "accuracy": acc, "mcc": round(2 * acc - 1, 4), "macro_f1": acc},
             ood: {"role": "out_of_domain", "n": 200, "accuracy": ood_acc, "mcc": round(2 * ood_acc - 1, 4),
                   "macro_f1": ood_acc}}
    if ood == "hans":
        evals[ood]["by_heuristic"] = {k: {"n": 20, "accuracy": round(float(rng.uniform(0.3, 0.9)), 2)} for k in HANS_KEYS}
    return {"schema": 1, "config": cfg.to_dict(), "config_hash": cfg.hash(), "evals": evals,
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
                                            shots=shots, seed=seed, eval_limit=200)
                            store.claim(cfg, label=label, grid="synthetic")
                            store.finish(cfg.hash(), synthetic_result(cfg, label, rng))
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


def fmt(values, scale=100.0, digits=1) -> str:
    mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
    return f"{scale * mean:.{digits}f} ± {scale * sd:.{digits}f}"


def test_files_exist_and_html_is_self_contained(report):
    out, md, html = report
    figures = sorted(p.name for p in (out / "figures").iterdir())
    for model in MODELS:
        for task in SPLITS:
            for kind in ("acc-vs-shots", "acc-vs-train-seconds", "acc-vs-peak-memory-mib"):
                assert f"{kind}-{task}-{model}.png" in figures and f"{kind}-{task}-{model}.svg" in figures
        assert f"hans-{model}.png" in figures
    assert "id-vs-ood-cola.svg" in figures and "id-vs-ood-mnli.svg" in figures
    assert all((out / "figures" / f).stat().st_size > 1000 for f in figures)
    linked = re.findall(r"\]\(figures/([^)]+)\.png\)", md)
    assert len(linked) == len(figures) // 2
    assert html.count('src="data:image/svg+xml;base64,') == len(linked)
    assert not re.search(r'(src|href)="(?!data:)', html)  # no external file, script, font or stylesheet
    assert "<script" not in html and "<link" not in html


def test_accuracy_tables_equal_the_database(db, report):
    _, md, _ = report
    with Store(db, readonly=True) as store:
        rows = store.rows(["success"])
    checked = 0
    for task, (ind, ood) in SPLITS.items():
        for model in MODELS:
            table, mcc = md_tables_after(md, f"### {task} / {model}")[:2]
            assert table[0][:5] == ["method", "shots", "seeds", "ID acc % mean ± sd", "ID 95% CI"]
            assert len(table) == 2 + len(LABELS) * len(SHOTS)
            for line in table[2:]:
                label, shots = line[0], int(line[1])
                runs = [r for r in rows if (r["task"], r["model"], r["label"], r["shots"]) == (task, model, label, shots)]
                assert len(runs) == len(SEEDS) and line[2] == str(len(SEEDS))
                id_acc = [r["metrics"][ind]["accuracy"] for r in runs]
                ood_acc = [r["metrics"][ood]["accuracy"] for r in runs]
                assert line[3] == fmt(id_acc)
                assert line[5] == fmt(ood_acc)
                lo, hi = (float(x) for x in line[4].strip("[]").split(", "))
                assert 100 * min(id_acc) - 0.05 <= lo <= 100 * np.mean(id_acc) <= hi <= 100 * max(id_acc) + 0.05
                train = np.mean([r["cost"]["train_seconds"] for r in runs])
                assert line[7] == (f"{train:.1f}" if train < 100 else f"{train:.0f}")
                assert line[9] == f"{np.mean([r['cost']['peak_memory_mib'] for r in runs]):.0f}"
                checked += 1
            mcc_line = next(line for line in mcc[2:] if line[0] == "pbft" and line[1] == "8")
            runs = [r for r in rows if (r["task"], r["model"], r["label"], r["shots"]) == (task, model, "pbft", 8)]
            assert mcc_line[3] == fmt([r["metrics"][ind]["mcc"] for r in runs], scale=1.0, digits=3)
    assert checked == len(SPLITS) * len(MODELS) * len(LABELS) * len(SHOTS)


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
        assert line[6] == f"{100 * r['metrics'][ind]['accuracy']:.2f}"
        assert line[7] == f"{100 * r['metrics'][ood]['accuracy']:.2f}"
        assert line[8] == f"{r['metrics'][ind]['mcc']:.4f}"
        assert r["config_hash"] in html
    assert len(by_hash) == sum(r["status"] == "success" for r in rows)
    assert "synthetic failure" in md and "## Runs without a result" in md


def test_hans_table_equals_the_database(db, report):
    _, md, _ = report
    (table,) = md_tables_after(md, "## HANS: accuracy per heuristic and gold label")
    assert table[0][4:] == HANS_KEYS
    with Store(db, readonly=True) as store:
        rows = [r for r in store.rows(["success"]) if r["task"] == "mnli"]
    line = next(x for x in table[2:] if x[:3] == ["tiny-b", "lora", "4"])
    runs = [r for r in rows if (r["model"], r["label"], r["shots"]) == ("tiny-b", "lora", 4)]
    for key, cell in zip(HANS_KEYS, line[4:]):
        assert cell == f"{100 * np.mean([r['metrics']['hans']['by_heuristic'][key]['accuracy'] for r in runs]):.1f}"


def test_budget_section_reads_the_front(report):
    _, md, _ = report
    section = md[md.index("## Which method for which budget"):]
    assert "cola / tiny-a, in-domain: the best option is pbft (8 shots)" in section
    memory = next(t for t in md_tables_after(section, "### cola / tiny-a") if t[2][0].endswith("MiB"))
    # the lowest memory level is icl's (500 MiB + shots in the synthetic data), and only icl fits in it
    assert memory[2][:2] == ["≤ 504 MiB", "icl (4 shots)"]
    assert memory[2][3] == "none: better than every other option"
    assert memory[-1][1] == "pbft (8 shots)" and "lora (4 shots)" in memory[-1][3]


def test_budget_logic_on_hand_made_groups():
    def g(label, acc, lo, hi, mem, shots=8, t=1.0):
        s = {"mean": acc, "sd": 0.01, "lo": lo, "hi": hi, "n": 3}
        return {"label": label, "shots": shots, "id_accuracy": s, "ood_accuracy": s, "peak_memory_mib": mem,
                "train_seconds": t}
    a, b, c = g("a", 0.60, 0.58, 0.62, 100), g("b", 0.80, 0.78, 0.82, 1000), g("c", 0.79, 0.77, 0.81, 3000)
    assert [x["label"] for x in pareto_front([c, b, a], "peak_memory_mib", "id_accuracy")] == ["a", "b"]
    best, same, known = best_under([a, b, c], "peak_memory_mib", 500, "id_accuracy")
    assert best is a and same == [] and known
    best, same, known = best_under([a, b, c], "peak_memory_mib", 5000, "id_accuracy")
    assert best is b and same == [c] and known
    single = g("d", 0.9, math.nan, math.nan, 50)
    assert overlaps(single["id_accuracy"], a["id_accuracy"]) is None
    best, same, known = best_under([a, single], "peak_memory_mib", 5000, "id_accuracy")
    assert best is single and not known


def test_statistics():
    assert mean_sd([0.5, 0.7]) == pytest.approx((0.6, math.sqrt(0.02)))
    assert math.isnan(mean_sd([0.5])[1])
    assert all(math.isnan(x) for x in bootstrap_ci([0.5]))
    lo, hi = bootstrap_ci([0.5, 0.6, 0.7, 0.8])
    assert 0.5 <= lo < 0.65 < hi <= 0.8
    assert bootstrap_ci([0.5, 0.6, 0.7, 0.8]) == (lo, hi)  # fixed seed: the same report twice


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
