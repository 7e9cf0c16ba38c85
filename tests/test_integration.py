"""End to end on the bundled model (smollm2-135m) and the real data in ../shared/data, with small sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fewtune.cli import main
from fewtune.data import eval_subsample, load_split
from fewtune.engine import batching, engine, models, prefix_attention
from fewtune.tasks import load_task

pytestmark = pytest.mark.integration

HEURISTICS = {"lexical_overlap", "subsequence", "constituent"}


def run_cli(tmp_path, name, *args) -> dict:
    out = tmp_path / f"{name}.json"
    assert main(["run", "--model", "smollm2-135m", "-q", "-o", str(out), *args]) == 0
    return json.loads(out.read_text())


def metrics_only(result):
    return {k: {m: v for m, v in e.items() if m != "seconds"} for k, e in result["evals"].items()}


@pytest.fixture(scope="module")
def mnli_zero_shot(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("mnli")
    args = ["--method", "icl", "--task", "mnli", "--shots", "0", "--eval-limit", "60"]
    return run_cli(tmp, "a", *args), run_cli(tmp, "b", *args)


def test_mnli_zero_shot_reports_dev_matched_and_hans_by_heuristic(mnli_zero_shot):
    r, _ = mnli_zero_shot
    dev, hans = r["evals"]["dev_matched"], r["evals"]["hans"]
    assert dev["role"] == "in_domain" and hans["role"] == "out_of_domain"
    assert dev["n"] == hans["n"] == 60
    assert 0 <= dev["accuracy"] <= 1 and 0 <= hans["accuracy"] <= 1
    heuristics = {k: v for k, v in hans["by_heuristic"].items() if "/" not in k}
    assert set(heuristics) == HEURISTICS and all(v["n"] == 20 for v in heuristics.values())
    cells = {k: v for k, v in hans["by_heuristic"].items() if "/" in k}
    assert len(cells) == 6 and all(v["n"] == 10 for v in cells.values())
    # the per-heuristic accuracies average back to the overall one (equal cell sizes)
    assert np.mean([v["accuracy"] for v in heuristics.values()]) == pytest.approx(hans["accuracy"])
    assert r["cost"]["trainable_params"] == 0 and r["cost"]["total_params"] > 100e6
    assert r["method_info"] == {} and r["train_indices"] == []


def test_the_same_command_twice_gives_identical_metrics(mnli_zero_shot):
    a, b = mnli_zero_shot
    assert metrics_only(a) == metrics_only(b)
    assert a["config_hash"] == b["config_hash"]


def test_cola_icl_reports_accuracy_and_mcc_in_and_out_of_domain(tmp_path):
    r = run_cli(tmp_path, "cola", "--method", "icl", "--task", "cola", "--shots", "4", "--eval-limit", "40")
    assert set(r["evals"]) == {"in_domain_dev", "out_of_domain_dev"}
    for e in r["evals"].values():
        assert e["n"] == 40 and 0 <= e["accuracy"] <= 1 and -1 <= e["mcc"] <= 1
    assert r["method_info"]["demonstrations_used"] == 4 and len(r["train_indices"]) == 4


def test_short_training_run_records_every_cost(tmp_path):
    r = run_cli(tmp_path, "pbft", "--method", "pbft", "--task", "cola", "--shots", "8", "--epochs", "1",
                "--batch-size", "8", "--eval-limit", "20", "--dtype", "fp32")
    cost = r["cost"]
    for key in ("load_seconds", "train_seconds", "eval_seconds", "train_peak_memory_mib", "eval_peak_memory_mib",
                "peak_memory_mib", "trainable_params", "total_params", "train_tokens", "eval_tokens",
                "train_examples_per_s", "eval_examples_per_s"):
        assert cost[key] is not None and cost[key] > 0, key
    assert cost["trainable_params"] == cost["total_params"]
    assert r["training"]["steps"] == 1 and np.isfinite(r["training"]["final_loss"])
    assert r["dtype"] == "fp32" and all(e["n"] == 20 for e in r["evals"].values())


def mnli_icl_inputs(tokenizer, data_dir, queries: int, demonstrations: int):
    """(label ids, demonstration prefix ids, query ids) for MNLI ICL on the real data, as the runner builds them."""
    task = load_task("mnli")
    pattern = task.patterns[0]
    label_ids = models.verbalizer_token_ids(tokenizer, pattern.verbalizer)
    examples = eval_subsample(load_split(task, "dev_matched", data_dir), queries)
    demos = eval_subsample(load_split(task, "train", data_dir), demonstrations)
    prefix = "".join(task.format(pattern, ex) + pattern.verbalizer[ex.label] + "\n\n" for ex in demos)
    prefix_ids = batching.encode(tokenizer, [prefix])[0][0]
    query_ids, _ = batching.encode(tokenizer, [task.format(pattern, ex) for ex in examples], with_bos=False)
    return label_ids, prefix_ids, query_ids


def test_bundled_model_scores_like_a_plain_forward_pass(data_dir):
    """On the real model: padded batches and the cached ICL prefix give the plain forward pass's scores."""
    tokenizer = models.load_tokenizer("smollm2-135m")
    model = models.load_model("smollm2-135m").eval()
    label_ids, prefix_ids, queries = mnli_icl_inputs(tokenizer, data_dir, queries=6, demonstrations=2)
    cpu = torch.device("cpu")
    cached = engine.score(model, tokenizer, queries, label_ids, cpu, "fp32", 6, prefix_ids=prefix_ids).logits
    with torch.no_grad():
        plain = np.stack([model(torch.tensor([prefix_ids + q])).logits[0, -1, label_ids].numpy() for q in queries])
    assert np.abs(cached - plain).max() <= 1e-3
    assert (cached.argmax(-1) == plain.argmax(-1)).all()
    zero = engine.score(model, tokenizer, queries, label_ids, cpu, "fp32", 6).logits
    with torch.no_grad():
        plain_zero = np.stack([model(torch.tensor([q])).logits[0, -1, label_ids].numpy() for q in queries])
    assert np.abs(zero - plain_zero).max() <= 1e-3


def test_bundled_model_shared_prefix_attention_scores_like_the_full_prompt(data_dir):
    """On the real model (9 query heads sharing 3 key/value heads): 8-shot MNLI ICL through the cascade
    attention gives the full prompt's scores in fp32, as closely as the plain prefix cache does."""
    tokenizer = models.load_tokenizer("smollm2-135m")
    model = models.load_model("smollm2-135m").eval()
    assert prefix_attention.shared_prefix_path(model) == "shared-prefix"
    label_ids, prefix_ids, queries = mnli_icl_inputs(tokenizer, data_dir, queries=8, demonstrations=8)
    cpu = torch.device("cpu")
    shared = engine.score(model, tokenizer, queries, label_ids, cpu, "fp32", 8, prefix_ids=prefix_ids)
    cache = engine.score(model, tokenizer, queries, label_ids, cpu, "fp32", 8, prefix_ids=prefix_ids, shared_prefix=False)
    full = engine.score(model, tokenizer, queries, label_ids, cpu, "fp32", 8, prefix_ids=prefix_ids, reuse_prefix=False)
    assert (shared.path, cache.path, full.path) == ("shared-prefix", "prefix-cache", "full-prompt")
    diff = np.abs(shared.logits - full.logits).max()
    assert diff <= max(1e-3, 4 * np.abs(cache.logits - full.logits).max())
    assert (shared.logits.argmax(-1) == full.logits.argmax(-1)).all()
