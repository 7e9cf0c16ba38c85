"""Retention: the LM loss on a held-out general text before and after adaptation (fewtune/retention.py)."""

from __future__ import annotations

import math

import pytest

from conftest import Case, record_run, tiny_run_config

from fewtune import retention
from fewtune.cli import main
from fewtune.config import RunConfig
from fewtune.data import eval_subsample, load_split
from fewtune.errors import FewtuneError
from fewtune.tasks import load_task


def _check_record(r: dict):
    assert r["text"] == "mnli-premises" and r["n_sentences"] == retention.N_SENTENCES and r["n_tokens"] > 1000
    assert len(r["sha256"]) == 64 and math.isfinite(r["loss_before"]) and r["loss_before"] > 0
    assert r["delta"] == pytest.approx(r["loss_after"] - r["loss_before"])


def test_unchanged_when_the_method_changes_nothing(toy, tiny_model_dir):
    """pbft at a learning rate below float resolution (lr 0 is refused) trains, and the text is scored twice for
    real, but no weight changes: the same loss."""
    import torch
    run = record_run(tiny_run_config(Case("pbft-lr-tiny", "pbft", {}, lr=1e-30), toy, tiny_model_dir, epochs=2))
    assert all(torch.equal(run.before[n], run.after[n]) for n in run.before)
    r = run.result["retention"]
    _check_record(r)
    assert abs(r["delta"]) <= 1e-5, r
    assert run.result["cost"]["retention_seconds"] > 0


def test_icl_is_unchanged_by_definition(recorded):
    r = recorded(Case("icl", "icl", {})).result["retention"]
    _check_record(r)
    assert r["delta"] == 0.0


def test_larger_after_damaging_training(toy, tiny_model_dir):
    """pbft at a learning rate 100x too high: the general LM loss rises (by ~0.12 nats/token here: 10^4 times the
    tolerance of the unchanged case; the tiny random model starts near the uniform loss, ln 49152 = 10.8)."""
    run = record_run(tiny_run_config(Case("pbft-hot", "pbft", {}, lr=1e-1), toy, tiny_model_dir, epochs=10))
    r = run.result["retention"]
    _check_record(r)
    assert r["delta"] > 0.05, r


def test_methods_with_a_new_head_have_no_retention(recorded):
    assert "retention" not in recorded(Case("ft", "ft", {})).result
    assert "retention" in recorded(Case("peft-ia3", "peft", {"peft_type": "IA3"}, lr=1e-1)).result


def test_default_text_is_fixed_and_never_an_example_of_the_run(data_dir):
    texts, meta = retention.sentences("mnli-premises", None, set())
    again, meta2 = retention.sentences("mnli-premises", str(data_dir), set())
    assert texts == again and meta["sha256"] == meta2["sha256"] and len(set(texts)) == len(texts) == retention.N_SENTENCES
    assert meta["source"].endswith("dev_matched.tsv")
    # an MNLI run evaluating on dev_matched: none of its premises may be in the text
    task = load_task("mnli")
    evals = eval_subsample(load_split(task, "dev_matched", data_dir), 400)
    seen = retention.example_texts(evals)
    kept, meta3 = retention.sentences("mnli-premises", None, seen)
    assert not set(kept) & seen and len(kept) == retention.N_SENTENCES
    assert meta3["excluded_sentences"] >= len(set(texts) & seen) > 0  # the sample would have overlapped
    bigger, _ = retention.sentences("mnli-premises:250", None, set())
    assert bigger[:retention.N_SENTENCES] == texts and len(bigger) == 250


def test_a_text_file_leaves_out_the_runs_examples(toy, tiny_model_dir, tmp_path):
    from conftest import toy_rows
    general = ["A quiet river runs through the old town.", "She bought bread on Tuesday."]
    text = tmp_path / "general.txt"
    text.write_text("\n".join([general[0], ""] + [t for t, _ in toy_rows(40)] + [general[1]]) + "\n")
    run = record_run(tiny_run_config(Case("icl", "icl", {}), toy, tiny_model_dir, shots=40, retention=str(text)))
    r = run.result["retention"]  # 40 shots of a 40-row pool: every training row is an example of the run
    assert r["text"] == str(text) and r["n_sentences"] == 2 and r["excluded_sentences"] == 40
    assert r["sha256"] == __import__("hashlib").sha256("\n".join(general).encode()).hexdigest()


def test_retention_changes_the_run_identity_only_when_not_default(tmp_path):
    base = RunConfig(task="cola", method="pbft")
    assert RunConfig(task="cola", method="pbft", retention="mnli-premises").hash() == base.hash()
    assert RunConfig(task="cola", method="pbft", retention="off").hash() != base.hash()
    assert RunConfig(task="cola", method="pbft", retention=str(tmp_path / "t.txt")).hash() != base.hash()


def test_off_measures_nothing(toy, tiny_model_dir):
    run = record_run(tiny_run_config(Case("icl", "icl", {}), toy, tiny_model_dir, retention="off"))
    assert "retention" not in run.result


@pytest.mark.parametrize("content, words", [
    (None, "does not exist"),
    ("", "is empty"),
    ("\n  \n", "is empty"),
    (b"\xff\xfe bad", "not UTF-8"),
])
def test_missing_or_empty_text_is_a_one_line_error(toy, tiny_model_dir, tmp_path, capsys, content, words):
    path = tmp_path / "text.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(FewtuneError, match=words):
        retention.sentences(str(path), None, set())
    rc = main(["run", "--method", "icl", "--task", str(toy.task_file), "--data-root", str(toy.root), "--model",
               str(tiny_model_dir), "--shots", "2", "--eval-limit", "4", "--retention-text", str(path), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and words in err


def test_only_the_runs_own_examples_is_an_error(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("one\ntwo\n")
    with pytest.raises(FewtuneError, match="only training or evaluation examples"):
        retention.sentences(str(path), None, {"one", "two"})
    with pytest.raises(FewtuneError, match="mnli-premises:N"):
        retention.sentences("mnli-premises:0", None, set())


def test_bad_config_value():
    with pytest.raises(FewtuneError, match="retention"):
        RunConfig(retention="")
