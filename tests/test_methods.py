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


def head_only(name):
    return name.startswith("score.")


def norms_only(name):  # the tiny Llama's RMSNorm gains: input_layernorm, post_attention_layernorm, model.norm
    return name.endswith("norm.weight")


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
    (Case("probe", "probe", {}), head_only),
    (Case("probe-mean", "probe", {"pooling": "mean"}), head_only),
    (Case("lpft", "lpft", {}), everything),
    (Case("lpft-mean", "lpft", {"pooling": "mean"}), everything),
    (Case("bitfit-norm", "bitfit", {"params": "norm"}, lr=1e-1), norms_only),  # the tiny Llama has no biases
]
TRAINABLE = {case.id: pred for case, pred in CASES}
ALL = [case for case, _ in CASES]
TRAINED = [case for case in ALL if case.method != "icl"]
FULL = [case for case in TRAINED if TRAINABLE[case.id] is everything]
ADAPTER = [case for case in TRAINED if TRAINABLE[case.id] in (lora_only, lora_and_head, peft_only, peft_and_head)]
SOLVED = [case for case in TRAINED if case.method == "probe"]  # fitted by a solver, not by the training loop
LOOP = [case for case in TRAINED if case not in SOLVED]


def ids(cases):
    return [c.id for c in cases]


def test_every_registered_method_has_a_case():
    assert set(REGISTRY) == {c.method for c in ALL}


@pytest.mark.parametrize("case", ALL, ids=ids(ALL))
def test_only_zero_shot_icl_is_seed_free(case):
    """Seed-free (the grid runs it once, the statistics read it as one constant) is decided from the method and its
    options: icl without demonstrations; anything that trains on the sample, or samples demonstrations, is not."""
    from types import SimpleNamespace

    from fewtune.config import RunConfig
    from fewtune.methods import seed_free
    method = get_method(case.method, case.options)
    for shots in (4, 32):
        cfg = RunConfig(task="cola", model="m", method=case.method, method_options=case.options, shots=shots)
        assert method.seed_free(cfg) is False and seed_free(cfg) is False
    # 0 shots: a config only icl may have (RunConfig refuses it for a method that trains); asked all the same
    zero = SimpleNamespace(task="cola", model="m", method=case.method, method_options=case.options, shots=0, seed=0)
    assert method.seed_free(zero) is (case.method == "icl")


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


@pytest.mark.parametrize("case", LOOP, ids=ids(LOOP))
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
    if case in SOLVED:  # a probe computes no gradient through the model at all: its head is fitted on stored vectors
        assert run.grad_enabled and not any(run.grad_enabled)
    else:
        assert True in run.grad_enabled and False in run.grad_enabled  # trained with, scored without


PACKED = {"ft", "pbft", "lora", "lora-ft", "cd", "cd-fewshot", "cd-lora", "peft-ia3", "peft-ia3-ft", "peft-loha",
          "peft-vera", "lpft", "bitfit-norm"}


@pytest.mark.parametrize("case", TRAINED, ids=ids(TRAINED))
def test_training_packs_batches_where_the_method_allows(recorded, case):
    """Every method's batches are packed on the tiny Llama, except adaptive's (its frozen-block cache is laid
    out as the padded batch), peft's prompt learning (virtual tokens go before each row), mean pooling (the packed
    loss reads each sequence's last token) and the probe (no training loop)."""
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
    assert (manifest["weights"] == "trained") == run.method.ships_trained_only  # probe, bitfit: only what trained
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
    ("probe", {"c": 0}, r"probe: c \(--probe-c"),
    ("probe", {"c": -1.0}, r"probe: c \(--probe-c"),
    ("probe", {"c": float("nan")}, r"probe: c \(--probe-c"),
    ("probe", {"pooling": "max"}, r"probe: pooling \(--pooling\) must be last or mean"),
    ("probe", {"max_iter": 0}, r"probe: max_iter \(--probe-max-iter"),
    ("lpft", {"max_iter": 0}, r"lpft: max_iter \(--probe-max-iter"),
    ("lpft", {"c": 0}, r"lpft: c \(--probe-c"),
    ("lpft", {"pooling": "cls"}, r"lpft: pooling"),
    ("bitfit", {"params": "weights"}, r"bitfit: params \(--bitfit-params\)"),
    ("bitfit", {"objective": "lm"}, "objective"),
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
        options = {"peft_type": "IA3"} if name == "peft" else {}  # peft's rate depends on the type
        method = get_method(name, options)
        if cls.trains and "lr" in method.budget(dict(method.defaults)):  # probe: a solver, no learning rate
            for preset in PRESETS:
                assert "lr" in method.preset(preset), (name, preset)
    assert for_run(RunConfig(method="probe", preset="quick"), get_method("probe"))["solver"].startswith("scikit")
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


# ----------------------------------------------------------------------------- probe, lpft, bitfit
NEW = [case for case in TRAINED if case.method in ("probe", "lpft", "bitfit")]


@pytest.mark.parametrize("case", NEW, ids=ids(NEW))
def test_exactly_what_the_method_trains_changes(recorded, case):
    """Counted on the weights themselves: every parameter the method says it trains changed, and no other did."""
    run = recorded(case)
    changed = {n for n in run.before if not torch.equal(run.before[n], run.after[n])}
    expected = {n for n in run.before if TRAINABLE[case.id](n)}
    assert changed == expected, f"changed but not expected: {sorted(changed - expected)[:5]}; " \
                                f"expected but unchanged: {sorted(expected - changed)[:5]}"
    assert run.result["cost"]["trainable_params"] == sum(run.before[n].numel() for n in expected)
    assert run.result["cost"]["shipped_bytes"] == 4 * run.result["cost"]["trainable_params"]


@pytest.mark.parametrize("case", SOLVED, ids=ids(SOLVED))
def test_probe_computes_each_representation_once_without_gradients(recorded, case):
    run = recorded(case)
    shots = run.result["config"]["shots"]
    assert run.method.representation_calls == shots == run.result["method_info"]["representation_examples"]
    # one forward pass per batch of training examples (no epochs), then the evaluation; none with gradients
    assert not any(run.grad_enabled)
    assert run.result["method_info"]["converged"] is True and run.result["method_info"]["iterations"] >= 1
    hidden = run.result["method_info"]["representation_dim"]
    assert run.result["cost"]["trainable_params"] == hidden * 2  # hidden x classes: what a probe ships
    hp = run.result["hyperparameters"]
    assert hp["solver"].startswith("scikit-learn") and hp["c"] == 1.0 and "epochs" not in hp and "lr" not in hp
    assert run.result["training"]["train_accuracy"] == run.result["method_info"]["train_accuracy"]


def test_probe_head_is_the_logistic_regression_optimum(recorded):
    """At the optimum of C·Σ CE + ½|w|² (features scaled by s) the gradient is zero: checked on the head the probe
    put in the model, with representations computed here through the model's own head input."""
    from fewtune.methods.probe import head_module, representations
    run = recorded(Case("probe", "probe", {}))
    ctx = run.ctx
    seqs, _ = batching.encode(ctx.tokenizer, [run.method.text(ctx, ex) for ex in ctx.train_examples], 64)
    x = representations(run.model, ctx.tokenizer, seqs, "last", ctx.device, "fp32", 4).double()
    y = torch.tensor([ex.label for ex in ctx.train_examples])
    W = head_module(run.model).weight.detach().double()
    s = run.result["method_info"]["feature_scale"]
    w = (W[1] - W[0]) * s  # scikit-learn's vector, in the scaled features' units
    p = torch.sigmoid((x / s) @ w)
    grad = run.method.opts.c * ((p - y.double())[:, None] * (x / s)).sum(0) + w
    assert float(grad.abs().max()) < 1e-3 * max(1.0, float(w.abs().max()))
    assert torch.allclose(W[0], -W[1])  # two logits from scikit-learn's one vector, symmetric


def test_lpft_starts_fine_tuning_from_the_probes_head(recorded):
    probe, lpft = recorded(Case("probe", "probe", {})), recorded(Case("lpft", "lpft", {}))
    assert torch.allclose(lpft.method.lp_head, probe.after["score.weight"], atol=1e-6)
    assert not torch.allclose(lpft.after["score.weight"], probe.after["score.weight"], atol=1e-6)  # then it trained
    hp = lpft.result["hyperparameters"]  # both stages' budgets, recorded
    assert hp["epochs"] == 30 and hp["lr"] == 1e-3 and hp["lp"]["max_iter"] == 1000 and hp["lp"]["c"] == 1.0
    info = lpft.result["method_info"]
    assert info["lp_converged"] is True and info["representation_examples"] == 8
    assert info["ft_steps"] == lpft.result["training"]["steps"] == 30
    assert info["lp_seconds"] >= 0 and info["ft_seconds"] > 0


@pytest.mark.parametrize("case_id", ["probe-mean", "lpft-mean"])
def test_mean_pooling_scores_the_mean_of_the_final_states(recorded, case_id):
    run = recorded(next(c for c in ALL if c.id == case_id))
    ctx = run.ctx
    seqs, _ = batching.encode(ctx.tokenizer, [run.method.text(ctx, ex) for ex in ctx.train_examples[:4]], 64)
    batch = batching.collate(seqs, ctx.tokenizer.pad_token_id)
    with torch.no_grad():
        got = engine.class_logits(run.model, batch, None)
        states = run.model.model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        want = run.model.score((states * mask).sum(1) / mask.sum(1))
    assert torch.allclose(got, want, atol=1e-5)
    assert run.result["training"]["packed_batches"] is False


@pytest.fixture(scope="session")
def biased_model_dir(tokenizer, tmp_path_factory):
    """The tiny Llama with bias terms in its attention and MLP projections (OPT-like), for BitFit as published."""
    from conftest import make_tiny_lm
    folder = tmp_path_factory.mktemp("tiny-llama-biased")
    make_tiny_lm(tokenizer, attention_bias=True, mlp_bias=True).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("objective", ["pbft", "ft"])
def test_bitfit_trains_the_bias_terms_and_nothing_else(toy, biased_model_dir, tmp_path, objective):
    from conftest import record_run, tiny_run_config
    case = Case(f"bitfit-bias-{objective}", "bitfit", {"objective": objective}, lr=1e-1)
    run = record_run(tiny_run_config(case, toy, biased_model_dir), save_model=tmp_path / "saved")
    biases = {n for n in run.before if n.endswith(".bias")}
    expected = biases | ({"score.weight"} if objective == "ft" else set())
    assert len(biases) == TINY_DEPTH * 7  # q, k, v, o, gate, up, down in every block
    assert {n for n, t in run.trainable.items() if t} == expected
    assert {n for n in run.before if not torch.equal(run.before[n], run.after[n])} == expected
    # the save ships only those vectors (and the head), over the base model named by reference
    manifest = __import__("json").loads((tmp_path / "saved" / "fewtune.json").read_text())
    assert manifest["weights"] == "trained" and manifest["base_model"] == str(biased_model_dir)
    assert not (tmp_path / "saved" / "model.safetensors").exists()


def test_bitfit_on_a_model_without_biases_names_the_option(toy, tiny_model_dir):
    from conftest import record_run, tiny_run_config
    with pytest.raises(FewtuneError, match=r"bitfit: LlamaForCausalLM has no bias terms.*--bitfit-params norm"):
        record_run(tiny_run_config(Case("bitfit", "bitfit", {}), toy, tiny_model_dir))
