"""Invariants of every method, on the tiny random Llama and the synthetic task (see conftest.py).

A new method (or option set) is tested by adding one line to CASES; its expected trainable parameters
are one predicate in TRAINABLE.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_DEPTH, Case

from fewtune import saving
from fewtune.data import load_split
from fewtune.engine import batching, engine
from fewtune.errors import FewtuneError
from fewtune.methods import REGISTRY, get_method
from fewtune.tasks import load_task

TOP = 2  # adaptive's train_layers in these cases


def _block(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def everything(name):
    return True


def top_blocks_and_norm(name):
    block = _block(name)
    return (block is not None and block >= TINY_DEPTH - TOP) or name.endswith("model.norm.weight")


def top_blocks_norm_and_head(name):
    return top_blocks_and_norm(name) or name.startswith("score.")


def lora_only(name):
    return "lora_" in name


def lora_and_head(name):
    return "lora_" in name or ".score.modules_to_save." in name


PEFT_TAGS = ("ia3_l", "hada_", "vera_lambda", "prompt_encoder.")  # IA3, LoHa, VeRA, prompt/prefix tuning


def peft_only(name):
    return any(tag in name for tag in PEFT_TAGS)


def peft_and_head(name):
    return peft_only(name) or ".score.modules_to_save." in name


CASES = [
    # id             method      options                                              trainable
    (Case("icl", "icl", {}), None),
    (Case("ft", "ft", {}), everything),
    (Case("pbft", "pbft", {}), everything),
    (Case("adaptive", "adaptive", {"train_layers": TOP}), top_blocks_and_norm),
    (Case("adaptive-ft", "adaptive", {"train_layers": TOP, "objective": "ft"}), top_blocks_norm_and_head),
    (Case("lora", "lora", {}, lr=1e-2), lora_only),
    (Case("lora-ft", "lora", {"objective": "ft"}, lr=1e-2), lora_and_head),
    (Case("cd", "cd", {}), everything),
    (Case("cd-fewshot", "cd", {"context": "few-shot", "context_shots": 4}), everything),
    (Case("cd-lora", "cd", {"student": "lora"}, lr=1e-2), lora_only),
    (Case("peft-ia3", "peft", {"peft_type": "IA3"}, lr=1e-1), peft_only),
    (Case("peft-ia3-ft", "peft", {"peft_type": "IA3", "objective": "ft"}, lr=1e-1), peft_and_head),
    (Case("peft-loha", "peft", {"peft_type": "LOHA"}, lr=1e-2), peft_only),
    (Case("peft-vera", "peft", {"peft_type": "VERA", "r": 16}, lr=3e-2), peft_only),
    (Case("peft-prompt", "peft", {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 16}, lr=3e-1), peft_only),
    (Case("peft-prefix", "peft", {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}, lr=3e-1), peft_only),
]
TRAINABLE = {case.id: pred for case, pred in CASES}
ALL = [case for case, _ in CASES]
TRAINED = [case for case in ALL if case.method != "icl"]
FULL = [case for case in TRAINED if TRAINABLE[case.id] is everything]
ADAPTER = [case for case in TRAINED if TRAINABLE[case.id] in (lora_only, lora_and_head, peft_only, peft_and_head)]


def ids(cases):
    return [c.id for c in cases]


def test_every_registered_method_has_a_case():
    assert set(REGISTRY) == {c.method for c in ALL}


@pytest.mark.parametrize("case", TRAINED, ids=ids(TRAINED))
def test_trainable_parameters(recorded, case):
    run = recorded(case)
    trainable = {n for n, t in run.trainable.items() if t}
    expected = {n for n in run.trainable if TRAINABLE[case.id](n)}
    assert trainable, "nothing trained"
    assert trainable == expected, f"unexpected: {sorted(trainable - expected)[:5]}; missing: {sorted(expected - trainable)[:5]}"
    assert run.result["cost"]["trainable_params"] == sum(run.before[n].numel() for n in trainable)
    heads = {n for n in trainable if "score." in n}
    assert bool(heads) == (run.method.objective == "head")  # objective ft: a new head, and it trains
    assert run.result["cost"]["total_params"] >= run.result["cost"]["trainable_params"]


@pytest.mark.parametrize("case", [c for c in TRAINED if c.method == "adaptive"], ids=lambda c: c.id)
def test_adaptive_freezes_embeddings_and_lower_blocks(recorded, case):
    run = recorded(case)
    for name, trains in run.trainable.items():
        if "embed_tokens" in name or (_block(name) is not None and _block(name) < TINY_DEPTH - TOP):
            assert not trains, name
            assert torch.equal(run.before[name], run.after[name]), f"frozen {name} changed"
    if run.method.opts.objective == "ft":
        assert any(n.startswith("score.") and t for n, t in run.trainable.items())


@pytest.mark.parametrize("case", [c for c in TRAINED if c.method == "adaptive"], ids=lambda c: c.id)
def test_adaptive_layerwise_learning_rates(recorded, case):
    run = recorded(case)
    base_lr, decay = run.result["hyperparameters"]["lr"], run.method.opts.lr_decay
    assert decay < 1
    seen = set()
    for lr, names in run.group_lrs:
        for name in names:
            block = _block(name)
            distance = TINY_DEPTH - 1 - block if block is not None else 0  # norm and head: the top's lr
            assert lr == pytest.approx(base_lr * decay ** distance), name
            seen.add(name)
    assert seen == {n for n, t in run.trainable.items() if t}
    assert len({lr for lr, _ in run.group_lrs}) == TOP


@pytest.mark.parametrize("case", FULL, ids=ids(FULL))
def test_every_trainable_weight_changes(recorded, case):
    run = recorded(case)
    unchanged = [n for n, t in run.trainable.items() if t and torch.equal(run.before[n], run.after[n])]
    assert not unchanged


@pytest.mark.parametrize("case", ADAPTER, ids=ids(ADAPTER))
def test_adapters_train_and_base_weights_do_not(recorded, case):
    run = recorded(case)
    adapters = [n for n in run.trainable if "lora_" in n or peft_only(n)]
    unchanged = [n for n in adapters if torch.equal(run.before[n], run.after[n])]
    assert adapters and not unchanged, unchanged
    base = [n for n, t in run.trainable.items() if not t]
    assert base and all(torch.equal(run.before[n], run.after[n]) for n in base)


@pytest.mark.parametrize("case", TRAINED, ids=ids(TRAINED))
def test_loss_falls_when_overfitting_8_examples(recorded, case):
    training = recorded(case).result["training"]
    losses = training["epoch_losses"]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert training["final_loss"] == losses[-1]
    # Prompt tuning only adds 16 input vectors: on a random 4-block width-32 model they have little leverage
    # over the answer (its loss falls by ~1% in 30 epochs); every other method overfits by > 10%.
    assert losses[-1] < losses[0] * (0.995 if case.id == "peft-prompt" else 0.9), losses
    assert 0.0 <= training["train_accuracy"] <= 1.0


@pytest.mark.parametrize("case", TRAINED, ids=ids(TRAINED))
def test_trained_model_is_scored_without_gradients_in_eval_mode(recorded, case):
    run = recorded(case)
    assert not run.model.training
    assert True in run.grad_enabled and False in run.grad_enabled  # trained with, scored without


PACKED = {"ft", "pbft", "lora", "lora-ft", "cd", "cd-fewshot", "cd-lora", "peft-ia3", "peft-ia3-ft", "peft-loha",
          "peft-vera"}


@pytest.mark.parametrize("case", TRAINED, ids=ids(TRAINED))
def test_training_packs_batches_where_the_method_allows(recorded, case):
    """Every method's batches are packed on the tiny Llama, except adaptive's (its frozen-block cache is laid
    out as the padded batch) and peft's prompt learning (virtual tokens go before each row)."""
    run = recorded(case)
    assert run.result["training"]["packed_batches"] is (case.id in PACKED)


def test_icl_computes_its_demonstrations_once_for_all_evaluation_splits(toy, tiny_model_dir, monkeypatch):
    """The toy task has two evaluation splits: one PrefixCache for the run, the prefix counted once in its tokens."""
    from conftest import record_run, tiny_run_config
    built = []
    real = engine.PrefixCache
    monkeypatch.setattr(engine, "PrefixCache", lambda *a: built.append(len(a[1])) or real(*a))
    run = record_run(tiny_run_config(Case("icl", "icl", {}), toy, tiny_model_dir))
    assert len(run.result["evals"]) == 2 and len(built) == 1
    prefix = built[0]
    assert run.result["cost"]["predict_context_tokens"] == prefix
    queries = run.result["cost"]["eval_tokens"] - prefix  # the prefix once, then only the queries' own tokens
    assert 0 < queries < prefix * 2


def test_icl_computes_no_gradients(recorded):
    run = recorded(Case("icl", "icl", {}))
    assert run.grad_enabled and not any(run.grad_enabled)
    assert all(p.grad is None for p in run.model.parameters())
    assert not run.model.training
    assert run.result["cost"]["trainable_params"] == 0
    assert run.result["training"] is None and run.result["hyperparameters"] == {}
    assert run.result["method_info"]["demonstrations_used"] == 8
    assert run.result["method_info"]["prefix_path"] == "shared-prefix"  # the tiny Llama takes the cascade attention


@pytest.mark.parametrize("case", [c for c in TRAINED if c.method == "cd"], ids=lambda c: c.id)
def test_cd_teacher_once_per_example_and_distillation_nonzero(recorded, case):
    run = recorded(case)
    shots = run.result["config"]["shots"]
    assert run.method.teacher_calls == shots
    assert run.result["method_info"]["teacher_examples"] == shots
    assert run.result["method_info"]["distill_loss_sum"] > 0
    assert run.result["method_info"]["teacher_prefix_path"] == "shared-prefix"  # also through a LoRA student's wrapper
    # The teacher (with its context) disagrees with the student (without it) before the first update: the
    # distillation term is non-zero from the start, not only once training has moved the student.
    teacher = torch.stack([it["teacher"] for it in run.items]).float()
    assert teacher.shape == run.start_logits.shape == (shots, 2)
    assert (teacher - run.start_logits).abs().max() > 1e-3
    if case.options.get("context") == "few-shot":
        demos = run.result["method_info"]["context_demonstration_indices"]
        assert len(demos) == case.options["context_shots"] and set(demos) <= set(run.result["train_indices"])


@pytest.mark.parametrize("case", TRAINED, ids=ids(TRAINED))
def test_saved_model_reloads_with_identical_predictions(recorded, toy, case):
    """`--save-model DIR` then `saving.load` / `saving.predict` gives the in-memory model's logits."""
    run = recorded(case)
    model, tokenizer, manifest = saving.load(run.saved, "cpu")
    assert manifest["adapter"] == (case in ADAPTER)
    task = load_task(str(toy.task_file))
    examples = load_split(task, "dev", toy.root)[:12]
    pattern = task.patterns[0]
    lm = manifest["objective"] == "lm"
    texts = [task.format(pattern, ex) if lm else task.raw_text(ex) for ex in examples]
    seqs, _ = batching.encode(tokenizer, texts, manifest["max_length"])
    label_ids = [tokenizer(w, add_special_tokens=False).input_ids[0] for w in pattern.verbalizer] if lm else None
    device = torch.device("cpu")
    reloaded = engine.score(model, tokenizer, seqs, label_ids, device, "fp32", 4).logits
    original = engine.score(run.model, tokenizer, seqs, label_ids, device, "fp32", 4).logits
    assert np.abs(reloaded - original).max() <= 1e-5
    assert np.abs(original).max() > 0

    preds = saving.predict(run.saved, [ex.fields for ex in examples], "cpu")
    probs = torch.softmax(torch.tensor(original), -1).numpy()
    assert [p["label"] for p in preds] == [task.labels[i] for i in original.argmax(-1)]
    got = np.array([[p["probabilities"][label] for label in task.labels] for p in preds])
    assert np.abs(got - probs).max() <= 1e-5


def test_training_is_deterministic(recorded, toy, tiny_model_dir):
    """The same config twice: the same losses, the same weights, the same metrics."""
    from conftest import record_run, tiny_run_config
    case = Case("pbft", "pbft", {})
    first = recorded(case)
    again = record_run(tiny_run_config(case, toy, tiny_model_dir, epochs=3))
    short = record_run(tiny_run_config(case, toy, tiny_model_dir, epochs=3))
    assert again.result["training"]["epoch_losses"] == short.result["training"]["epoch_losses"]
    assert all(torch.equal(again.after[n], short.after[n]) for n in again.after)
    strip = lambda evals: {k: {m: v for m, v in e.items() if m != "seconds"} for k, e in evals.items()}  # noqa: E731
    assert strip(again.result["evals"]) == strip(short.result["evals"])
    assert first.result["train_indices"] == again.result["train_indices"]


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("method, options, words", [
    ("adaptive", {"train_layers": 0}, "train_layers"),
    ("adaptive", {"lr_decay": 1.5}, "lr_decay"),
    ("adaptive", {"objective": "mlm"}, "objective"),
    ("lora", {"r": 0}, "r must"),
    ("lora", {"dropout": 1.0}, "dropout"),
    ("lora", {"rank": 8}, "no option 'rank'"),
    ("cd", {"context": "instruction", "context_shots": 2}, "--context-shots"),
    ("cd", {"alpha": 2}, "alpha"),
    ("cd", {"student": "adapter"}, "student"),
    ("icl", {"seperator": "\n"}, "Did you mean: separator"),
])
def test_bad_method_options_name_the_field(method, options, words):
    with pytest.raises(FewtuneError, match=words):
        get_method(method, options)


def test_method_registry_names_are_lower_case():
    assert all(name == name.lower() and name.isidentifier() for name in REGISTRY)
    from fewtune.config import REGISTRY as METHODS  # config validates against the methods registry itself
    assert set(METHODS) == set(REGISTRY)


# ----------------------------------------------------------------------------- adaptive's frozen-block cache
def test_adaptive_frozen_block_cache_trains_like_the_full_forward(recorded, toy, tiny_model_dir):
    """Training the top blocks on cached lower-block states gives the same run as the full forward pass."""
    from conftest import record_run, tiny_run_config
    case = Case("adaptive", "adaptive", {"train_layers": TOP})
    cached = recorded(case)
    assert cached.result["method_info"]["frozen_cache"] is True
    assert cached.result["method_info"]["frozen_cache_check_max_diff"] <= 1e-3
    full = record_run(tiny_run_config(Case("adaptive-nocache", "adaptive", {"train_layers": TOP, "frozen_cache": False}),
                                      toy, tiny_model_dir))
    assert full.result["method_info"]["frozen_cache"] is False
    np.testing.assert_allclose(cached.result["training"]["epoch_losses"], full.result["training"]["epoch_losses"], rtol=1e-4)
    assert max(float((cached.after[n] - full.after[n]).abs().max()) for n in full.after) <= 1e-4
    # the lower blocks are back in place after training (the saved model holds them)
    from fewtune.methods.adaptive import PassThrough
    assert not any(isinstance(m, PassThrough) for m in cached.model.modules())


def test_a_copy_of_ft_py_is_a_working_method_like_ft(toy, tiny_model_dir, tmp_path):
    """A method is one file: methods/ft.py copied as methods/ft_copy.py, no other file touched, is a method of its
    own that takes ft's learning rate under --preset quick and gives ft's predictions for the same seed."""
    import json
    import shutil
    import subprocess
    import sys

    import fewtune
    package = tmp_path / "src" / "fewtune"
    shutil.copytree(Path(fewtune.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(package / "methods" / "ft.py", package / "methods" / "ft_copy.py")
    script = f"""
import json
from fewtune.config import RunConfig
from fewtune.methods import REGISTRY
from fewtune.runner import run
out = {{"listed": list(REGISTRY)}}
for method in ("ft", "ft_copy"):
    cfg = RunConfig(task={str(toy.task_file)!r}, data_root={str(toy.root)!r}, model={str(tiny_model_dir)!r},
                    method=method, shots=8, seed=0, preset="quick", epochs=2, eval_limit=8, max_length=64,
                    dtype="fp32", device="cpu", retention="off")
    r = run(cfg, progress=False)
    out[method] = {{"lr": r["hyperparameters"]["lr"], "predictions": r["predictions"], "evals": r["evals"],
                    "losses": r["training"]["epoch_losses"], "method": r["config"]["method"]}}
print(json.dumps(out, default=str))
"""
    env = {**os.environ, "PYTHONPATH": str(package.parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert "ft_copy" in out["listed"] and out["ft_copy"]["method"] == "ft_copy"
    assert out["ft_copy"]["lr"] == out["ft"]["lr"] == 2e-5  # ft's quick-preset rate, from the copied file
    assert out["ft_copy"]["predictions"] == out["ft"]["predictions"]
    assert out["ft_copy"]["losses"] == out["ft"]["losses"]
    strip = lambda evals: {k: {m: v for m, v in e.items() if m != "seconds"} for k, e in evals.items()}  # noqa: E731
    assert strip(out["ft_copy"]["evals"]) == strip(out["ft"]["evals"])


def test_every_method_that_trains_names_its_quick_learning_rate():
    """Without one a method would keep its study budget's rate under the preset's few steps: refused, not silent."""
    from fewtune.config import RunConfig
    from fewtune.hyperparameters import PRESETS, for_run
    for name, cls in REGISTRY.items():
        if cls.trains:
            for preset in PRESETS:
                options = {"peft_type": "IA3"} if name == "peft" else {}  # peft's rate depends on the type
                assert "lr" in get_method(name, options).preset(preset), (name, preset)
    bare = get_method("pbft")
    bare.presets = {}
    cfg = RunConfig(method="pbft", preset="quick")
    with pytest.raises(FewtuneError, match="names no learning rate for --preset quick"):
        for_run(cfg, bare)
    assert for_run(RunConfig(method="pbft", preset="quick", lr=3e-5), bare)["lr"] == 3e-5


def test_cd_loss_reads_nothing_back_from_the_device_per_micro_batch(recorded, monkeypatch):
    """cd's loss keeps its distillation sum on the device: a float() or .item() per micro-batch makes the host wait
    for the GPU at every step. Read once, after training (the sum is then checked non-zero)."""
    from fewtune.engine.batching import collate
    run = recorded(Case("cd", "cd", {}))
    loss_fn = run.method.loss(run.ctx)
    chunk = run.items[:4]
    batch = collate([it["ids"] for it in chunk], run.ctx.tokenizer.pad_token_id)
    reads = []
    for name in ("__float__", "item", "tolist"):  # (a __bool__ in the shared scorer is not the loss's own)
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _n=name: reads.append(_n) or _real(self, *a))
    loss, _ = loss_fn(run.model, chunk, batch)
    monkeypatch.undo()
    assert reads == [] and loss.requires_grad
