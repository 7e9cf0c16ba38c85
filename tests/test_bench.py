"""benchmarks/bench.py's comparisons run end to end (on a tiny model, tiny sizes) and its options parse."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from conftest import REPO, SHARP, make_tiny_lm

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "bench.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_icl_shots_parse_and_refuse(bench):
    assert bench.icl_shots("0,16, 32,128") == [0, 16, 32, 128]
    for bad in ("16,x", "-4"):
        with pytest.raises(SystemExit, match="--icl-shots"):
            bench.icl_shots(bad)


def test_icl_comparison_runs_and_checks_against_the_full_prompt(bench, tokenizer):
    """Every path of every shot count is timed, the cost ratios are positive, and the fp32 check against the full
    prompt holds for the shared-prefix and prefix-cache paths (real MNLI demonstrations, tiny Llama)."""
    lm = make_tiny_lm(tokenizer, **SHARP)
    out = bench.icl_bench(lm, tokenizer, CPU, ["fp32"], [0, 2, 4], n=4, reps=1, peaks={"fp32": 100.0}, check_n=2)
    rows = out["fp32"]
    assert set(rows) == {"0-shot none", "2-shot shared-prefix", "2-shot prefix-cache", "4-shot shared-prefix", "4-shot prefix-cache"}
    assert all(r["cost_vs_zero_shot"] > 0 and r["examples_per_s"] > 0 for r in rows.values())
    assert out["prefix_tokens"][4] > out["prefix_tokens"][2] > 0
    assert [c["shots"] for c in out["fp32_check"]] == [2, 4]
    for c in out["fp32_check"]:
        for name in ("shared-prefix", "prefix-cache"):
            assert c[f"{name}_vs_full_prompt"]["max_logit_diff"] <= 1e-4
            assert c[f"{name}_vs_full_prompt"]["same_predictions"]


def test_peak_check_says_when_the_peak_moved(bench, capsys, monkeypatch):
    monkeypatch.setattr(bench, "matmul_peak", lambda dtype, seconds=1.0: 50.0 if dtype == torch.float32 else 400.0)
    out = {"matmul_peak_gflops": {"fp32": 100.0, "bf16": 410.0}}
    bench.check_peak(out)
    said = capsys.readouterr().out
    assert out["matmul_peak_gflops_at_end"] == {"fp32": 50.0, "bf16": 400.0}
    assert "fp32 100 -> 50" in said and "bf16" not in said


def test_device_check_runs_on_cpu_with_a_tiny_model(tmp_path, capsys):
    """benchmarks/device_check.py, the one-command GPU check, end to end on CPU with a tiny model of the bundled
    vocabulary: every figure is there and positive; the token budget scores in batches larger than 16."""
    import json
    spec = importlib.util.spec_from_file_location("device_check", REPO / "benchmarks" / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["device"] == "cpu" and report["model"]["params"] < 5e6
    assert all(v > 0 for v in report["matmul_peak_gflops"].values())
    budget = next(v for k, v in report["scoring"].items() if k.startswith("token budget"))
    assert report["scoring"]["batch 16"]["max_batch"] == 16 and budget["max_batch"] > 16
    assert all(r["ms_per_step"] > 0 for r in report["training"])
    assert "scoring, batch 16" in capsys.readouterr().out


def test_matmul_peak_allocates_on_the_device_it_measures(bench, monkeypatch):
    seen = []
    real = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **kw: seen.append(kw.get("device")) or real(*a, **kw))
    assert bench.matmul_peak(torch.float32, n=64, seconds=0.05, device="cpu") > 0
    assert seen and all(str(d) == "cpu" for d in seen)


def test_scoring_batch_comparison_runs_and_keeps_the_predictions(bench, tokenizer):
    """Every batch shape is timed on real MNLI + HANS queries, and a tiny Llama's predictions are the same at each."""
    lm = make_tiny_lm(tokenizer, **SHARP)
    out = bench.scoring_batches_bench(lm, tokenizer, CPU, "fp32", n=40, reps=1)
    assert out["n"] == 40 and set(out["examples_per_s"]) == {"16 rows", "64 rows", "256 rows", "4,096 tokens",
                                                             "16,384 tokens"}
    assert all(v > 0 for v in out["examples_per_s"].values())
    assert all(out["same_predictions"].values()) and max(out["max_logit_diff"].values()) < 1e-4


GRID_FAKE = '''
import os, time
def run(cfg, progress=False):
    acc = 0.5 + (int(cfg.hash()[:4], 16) % 40) / 100
    return {"schema": 1, "config": cfg.to_dict(), "config_hash": cfg.hash(), "wall_seconds": 0.25,
            "evals": {"in_domain_dev": {"role": "in_domain", "n": 2, "accuracy": acc}}, "cost": {"train_seconds": 0.1}}
'''


def test_grid_throughput_runs_every_variant_and_compares_predictions(tmp_path, monkeypatch):
    """benchmarks/grid_throughput.py on a 2-cell mini-grid with a fake runner: fresh, warm, fresh×2 and warm×2 each
    run every cell, and the summary has the cells' own seconds and the prediction check for each."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import grid_throughput
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    (tmp_path / "grid_fake.py").write_text(GRID_FAKE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("FEWTUNE_GRID_RUNNER", "grid_fake:run")
    monkeypatch.setitem(grid_throughput.MINI, "methods", [{"method": "icl"}, {"method": "pbft"}])
    lines = []
    out = grid_throughput.measure(mini=True, reps=1, workers=2, echo=lines.append)
    assert out["cells"] == 2 and set(out["seconds"]) == {"fresh", "warm", "fresh×2", "warm×2"}
    assert out["cells_runner_seconds"] == {v: [0.5] for v in out["seconds"]}  # 2 cells x 0.25 s, every variant
    assert all(out["identical_predictions"].values())
    assert any("cells' own seconds 0 (1.00x fresh)" in line for line in lines if line.strip().startswith("warm×2"))


def test_ood_methods_benchmark_runs_each_method_in_its_own_process(toy, tiny_model_dir, tmp_path, capsys):
    """benchmarks/ood_methods.py: one fresh `fewtune run` per method, the cost columns read from its result."""
    import json
    spec = importlib.util.spec_from_file_location("ood_methods", REPO / "benchmarks" / "ood_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "ood.json"
    assert module.main(["--methods", "probe", "--task", str(toy.task_file), "--data-root", str(toy.root), "--model",
                        str(tiny_model_dir), "--shots", "4", "--eval-limit", "4", "--threads", "1",
                        "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["cpu"] and doc["load_before"] and [r["method"] for r in doc["rows"]] == ["probe"]
    row = doc["rows"][0]
    assert row["trainable_params"] == 32 * 2 and row["shipped_bytes"] == 4 * 32 * 2  # the tiny model's head
    assert row["process_cpu_seconds"] > 0 and row["train_seconds"] >= 0
    assert "CPU:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        module.main(["--methods", "prob"])
