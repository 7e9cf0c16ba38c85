"""Per-example predictions: stored with every run, exported one row per run x example, and the metrics recomputed
from the export equal the stored ones. Runs a real (tiny-model) grid in process."""

from __future__ import annotations

import csv
import json
import sqlite3

import numpy as np
import pytest

from fewtune.cli import main
from fewtune.stats import metrics
from fewtune.store import Store


@pytest.fixture(scope="module")
def grid_db(toy, tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pred")
    spec = folder / "grid.toml"
    spec.write_text(f"""
name = "predictions"
models = ["{tiny_model_dir}"]
tasks = ["{toy.task_file}"]
data_root = "{toy.root}"
shots = [4]
seeds = [0, 1]
eval_limit = 10
epochs = 2
batch_size = 4
dtype = "fp32"
device = "cpu"
max_length = 64

[[methods]]
method = "icl"

[[methods]]
method = "pbft"
lr = 1e-3

[[methods]]
method = "ft"
lr = 1e-3
""")
    db = folder / "p.db"
    assert main(["grid", str(spec), "--db", str(db), "--in-process", "-q"]) == 0
    return db


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_export_recomputes_the_stored_metrics(grid_db, tmp_path, fmt, capsys):
    out = tmp_path / f"p.{fmt}"
    assert main(["results", "--db", str(grid_db), "--predictions", "--format", fmt, "-o", str(out)]) == 0
    if fmt == "jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    elif fmt == "csv":
        rows = list(csv.DictReader(out.open()))
        for r in rows:
            for k in ("gold", "pred", "idx", "shots", "seed"):
                r[k] = int(r[k])
    else:
        import pandas as pd
        rows = pd.read_parquet(out).to_dict("records")
    with Store(grid_db, readonly=True) as store:
        runs = store.rows(["success"])
    assert len(runs) == 6
    n_examples = 0
    for run in runs:
        for split, stored in run["metrics"].items():
            sel = [r for r in rows if r["config_hash"] == run["config_hash"] and r["split"] == split]
            assert len(sel) == stored["n"] == 10  # one row per run x evaluation example
            n_examples += len(sel)
            gold, pred = [r["gold"] for r in sel], [r["pred"] for r in sel]
            assert metrics.accuracy(gold, pred) == stored["accuracy"]
            assert metrics.mcc(gold, pred, 2) == stored["mcc"]
            assert metrics.macro_f1(gold, pred, 2) == stored["macro_f1"]
            logprobs = np.array([[float(r["logprob_negative"]), float(r["logprob_positive"])] for r in sel])
            assert metrics.calibration(gold, logprobs)["ece"] == pytest.approx(stored["ece"], abs=1e-6)
            assert np.allclose(np.exp(logprobs).sum(1), 1, atol=1e-5)
            assert {r["method"] for r in sel} == {run["method"]} and {r["seed"] for r in sel} == {run["seed"]}
            assert sorted(r["idx"] for r in sel) == [r["idx"] for r in sel]  # the split's data order
    assert len(rows) == n_examples


def test_paired_runs_score_the_same_examples(grid_db):
    with Store(grid_db, readonly=True) as store:
        runs = store.rows(["success"])
        preds = [store.predictions(r["config_hash"]) for r in runs]
    for split in ("dev", "ood"):
        first = preds[0][split]
        for p in preds[1:]:
            assert np.array_equal(p[split]["idx"], first["idx"]) and np.array_equal(p[split]["gold"], first["gold"])


def test_results_record_identity_baselines_and_calibration(grid_db):
    with Store(grid_db, readonly=True) as store:
        runs = store.rows(["success"])
    for run in runs:
        r = run["result"]
        assert "predictions" not in r  # kept in their own table, not in the JSON
        assert r["identity"]["task"]["name"] == "toy" and r["identity"]["data"]["train"]["sha256"]
        assert r["task"]["primary_metric"] == "accuracy"
        dev = run["metrics"]["dev"]
        assert 0 <= dev["ece"] <= 1 and 0 <= dev["brier"] <= 2
        assert dev["baselines"]["majority"]["mcc"] == 0.0 and dev["baselines"]["majority"]["accuracy"] >= 0.5
        assert r["examples_used"] == 4
        cost = run["cost"]
        assert cost["predict_seconds_per_1k"] > 0 and cost["predict_tokens_per_1k"] > 0
        if run["method"] == "icl":  # ships its demonstrations as text; every prediction attends to them
            assert cost["shipped_bytes"] == cost["shipped_text_bytes"] > 0 and cost["predict_context_tokens"] > 0
            assert cost["predict_tokens_per_1k"] >= cost["predict_context_tokens"]
        else:  # ships what it trained, 4 bytes a parameter
            assert cost["shipped_bytes"] == 4 * cost["trainable_params"] and cost["predict_context_tokens"] == 0


def test_database_without_predictions_says_so(tmp_path, capsys):
    """A database written before predictions were stored (schema 1): a one-line message, never a crash; opening it
    for writing upgrades it in place and keeps its runs."""
    path = tmp_path / "old.db"
    with Store(path) as store:
        from fewtune.config import RunConfig
        cfg = RunConfig(task="cola", method="icl", shots=0, eval_limit=4)
        store.claim(cfg, label="icl")
        store.finish(cfg.hash(), {"evals": {"in_domain_dev": {"role": "in_domain", "n": 4, "accuracy": 0.5}}})
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE predictions")
    conn.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    rc = main(["results", "--db", str(path), "--predictions", "-o", str(tmp_path / "p.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "recorded before fewtune stored them" in err[0]
    assert main(["results", "--db", str(path)]) == 0
    assert main(["report", "--db", str(path), "--out", str(tmp_path / "rep")]) == 0
    with Store(path) as store:  # a writer upgrades the file; the old run is still there
        assert store.meta()["schema_version"] == "2" and len(store.rows()) == 1


def test_damaged_predictions_are_named(grid_db, tmp_path, capsys):
    import shutil
    path = tmp_path / "damaged.db"
    shutil.copy(grid_db, path)
    conn = sqlite3.connect(path)
    key = conn.execute("SELECT config_hash FROM predictions LIMIT 1").fetchone()[0]
    conn.execute("UPDATE predictions SET data = x'00ff' WHERE config_hash = ?", (key,))
    conn.commit()
    conn.close()
    assert main(["results", "--db", str(path), "--predictions", "-o", str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err
    assert key in err and "damaged" in err and "Traceback" not in err
