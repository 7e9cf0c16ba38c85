"""Shared fixtures: the real bundled tokenizer, tiny random Llama models built from a config around it,
a small synthetic task written to a temporary folder, and recorded runs of every method on them.

Nothing here replaces fewtune's code: `record_run` runs `fewtune.runner.run` for real and only *watches*
(wraps `engine.train`, `engine.score`, `models.load_model` and the method's `prepare`/`after_train` to keep
references and snapshots of what passed through them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO.parent / "shared" / "data").resolve()   # the checkout's ../shared/data, fewtune's own fallback

# The tiny model: 4 blocks of width 32 over the real 49,152-token vocabulary (1.6M parameters, tied head).
TINY_DEPTH = 4


@pytest.fixture(autouse=True)
def _data_root_env(monkeypatch):
    """Point fewtune at the real data explicitly, whatever the current directory is."""
    monkeypatch.setenv("FEWTUNE_DATA", str(DATA))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert (DATA / "mnli" / "train.tsv").is_file(), f"the real data is expected in {DATA} (the checkout's ../shared/data)"
    return DATA


# ----------------------------------------------------------------------------- tokenizer and tiny models
@pytest.fixture(scope="session")
def tokenizer():
    """The bundled model's real tokenizer (first use converts the GGUF into the cache, ~25 s)."""
    from fewtune.engine import models
    return models.load_tokenizer("smollm2-135m")


def tiny_config(tokenizer, **overrides):
    from transformers import LlamaConfig
    kw = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=TINY_DEPTH,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
              eos_token_id=tokenizer.eos_token_id)
    kw.update(overrides)
    return LlamaConfig(**kw)


def gpt2_config(tokenizer, **overrides):
    """GPT-2 learns absolute positions: wrong position ids with left padding change its outputs (RoPE hides them)."""
    from transformers import GPT2Config
    kw = dict(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=1024,
              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    kw.update(overrides)
    return GPT2Config(**kw)


def make_tiny_lm(tokenizer, seed: int = 0, arch: str = "llama", **overrides):
    from transformers import GPT2LMHeadModel, LlamaForCausalLM
    torch.manual_seed(seed)
    if arch == "gpt2":
        return GPT2LMHeadModel(gpt2_config(tokenizer, **overrides)).eval()
    return LlamaForCausalLM(tiny_config(tokenizer, **overrides)).eval()


def make_tiny_classifier(tokenizer, seed: int = 0, arch: str = "llama", **overrides):
    from transformers import GPT2ForSequenceClassification, LlamaForSequenceClassification
    torch.manual_seed(seed)
    if arch == "gpt2":
        return GPT2ForSequenceClassification(gpt2_config(tokenizer, num_labels=2, **overrides)).eval()
    return LlamaForSequenceClassification(tiny_config(tokenizer, num_labels=2, **overrides)).eval()


# Scoring tests use weights 10x the usual init scale: attention is then sharp enough that a wrong position or a
# wrong cached prefix changes the logits by ~1 (at the default 0.02 it changes them by ~1e-4, below tolerance).
SHARP = dict(initializer_range=0.2)


@pytest.fixture(scope="session")
def tiny_lm(tokenizer):
    """A tiny causal LM with sharp attention, shared read-only (tests that train build their own)."""
    return make_tiny_lm(tokenizer, **SHARP)


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory) -> Path:
    """A Hugging Face model folder (config, safetensors, tokenizer) holding a tiny random Llama: `--model DIR`."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_lm(tokenizer).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- a synthetic task
TOY_TASK = """\
name = "toy"
version = 1
description = "synthetic reviews: positive or negative"
labels = ["negative", "positive"]
fields = ["text"]
metrics = ["accuracy", "mcc", "macro_f1"]
instruction = "Decide whether each review is positive."
train = "train"
in_domain = "dev"
out_of_domain = ["ood"]

[[patterns]]
template = "{text}\\nQuestion: Is this review positive? Answer:"
verbalizer = [" No", " Yes"]

[[patterns]]
template = "{text} ?"
verbalizer = [" No", " Yes"]

[splits.train]
local = { path = "toy/train.tsv", format = "tsv", header = true }
columns = { text = "text", label = "label" }
label_map = { "0" = "negative", "1" = "positive" }

[splits.dev]
local = { path = "toy/dev.tsv", format = "tsv", header = true }
columns = { text = "text", label = "label" }
label_map = { "0" = "negative", "1" = "positive" }

[splits.ood]
local = { path = "toy/ood.tsv", format = "tsv", header = true }
columns = { text = "text", label = "label" }
label_map = { "0" = "negative", "1" = "positive" }
"""

_GOOD = ["good", "great", "lovely", "fine", "superb", "charming"]
_BAD = ["bad", "awful", "boring", "dull", "terrible", "weak"]
_THINGS = ["film", "book", "meal", "show", "song", "hotel", "game", "play"]


def toy_rows(n: int, offset: int = 0) -> list[tuple[str, str]]:
    """n (text, label) rows, alternating labels, deterministic."""
    rows = []
    for i in range(offset, offset + n):
        label = i % 2
        word = (_GOOD if label else _BAD)[(i // 2) % 6]
        thing = _THINGS[(i * 3) % len(_THINGS)]
        rows.append((f"The {thing} was {word} and the ending was {word} too.", str(label)))
    return rows


def write_tsv(path: Path, header, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class ToyTask:
    root: Path        # the data root (holds toy/*.tsv)
    task_file: Path   # the task TOML


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> ToyTask:
    root = tmp_path_factory.mktemp("toy-data")
    write_tsv(root / "toy" / "train.tsv", ("text", "label"), toy_rows(40))
    write_tsv(root / "toy" / "dev.tsv", ("text", "label"), toy_rows(24, offset=100))
    write_tsv(root / "toy" / "ood.tsv", ("text", "label"), toy_rows(24, offset=200))
    task_file = root / "toy.toml"
    task_file.write_text(TOY_TASK, encoding="utf-8")
    return ToyTask(root, task_file)


# ----------------------------------------------------------------------------- recorded runs
@dataclass
class RecordedRun:
    """What one real `runner.run` did, as seen from the outside."""
    result: dict | None = None
    method: object = None              # the method instance the runner used
    model: object = None               # the model as trained and scored (after training)
    trainable: dict = field(default_factory=dict)   # name -> requires_grad after the method prepared the model
    before: dict = field(default_factory=dict)      # name -> weights after the method prepared the model
    after: dict = field(default_factory=dict)       # name -> weights after training (and the method's clean-up)
    group_lrs: list = field(default_factory=list)   # [(lr, [names])] of the param groups handed to the optimizer
    grad_enabled: list = field(default_factory=list)  # torch.is_grad_enabled() at every forward pass
    ctx: object = None                 # the RunContext the method received
    items: list = field(default_factory=list)         # the training items (cd: with the teacher's logits)
    start_logits: torch.Tensor | None = None          # label-word logits of the items before training
    saved: Path | None = None


def record_run(cfg, save_model=None) -> RecordedRun:
    """Run `cfg` through `fewtune.runner.run`, keeping references and weight snapshots."""
    from fewtune import runner
    from fewtune.engine import batching, engine, models

    rec = RecordedRun(saved=Path(save_model) if save_model else None)
    real_train, real_score, real_load, real_get_method = engine.train, engine.score, models.load_model, runner.get_method

    def load_model(*args, **kwargs):
        model = real_load(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, inputs: rec.grad_enabled.append(torch.is_grad_enabled()))
        return model

    def snapshot(model):
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    def get_method(*args, **kwargs):
        method = rec.method = real_get_method(*args, **kwargs)
        prepare, after_train = method.prepare, method.after_train

        def watched_prepare(ctx, model):  # the model as the method hands it over, before any training
            model = prepare(ctx, model)
            rec.model, rec.ctx = model, ctx
            rec.trainable = {n: p.requires_grad for n, p in model.named_parameters()}
            rec.before = snapshot(model)
            return model

        def watched_after_train(ctx):  # after the method's own clean-up (adaptive puts its blocks back)
            after_train(ctx)
            rec.after = snapshot(rec.model)
        method.prepare, method.after_train = watched_prepare, watched_after_train
        return method

    def train(model, items, loss_fn, settings, device, param_groups=None, *args, **kwargs):
        assert model is rec.model
        rec.items = items
        if "teacher" in items[0]:  # cd: the student's label-word logits before its first update
            model.eval()
            with torch.no_grad():
                batch = batching.collate([it["ids"] for it in items], kwargs.get("pad_id", 0), device=device)
                rec.start_logits = engine.class_logits(model, batch, rec.ctx.label_ids).float()
        if param_groups is not None:  # recorded before the scheduler rewrites the lrs in place
            names = {id(p): n for n, p in model.named_parameters()}
            rec.group_lrs = [(g["lr"], [names[id(p)] for p in g["params"]]) for g in param_groups]
        return real_train(model, items, loss_fn, settings, device, param_groups, *args, **kwargs)

    def score(model, *args, **kwargs):
        assert model is rec.model
        return real_score(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "load_model", load_model)
        mp.setattr(runner, "get_method", get_method)
        mp.setattr(engine, "train", train)
        mp.setattr(engine, "score", score)
        rec.result = runner.run(cfg, progress=False, save_model=save_model)
    return rec


@dataclass(frozen=True)
class Case:
    """One method configuration under test."""
    id: str
    method: str
    options: dict
    lr: float = 1e-3


def tiny_run_config(case: Case, toy: ToyTask, model_dir: Path, **overrides):
    """A small run on the tiny model: 8 shots, 30 epochs of one batch each, a high lr (the model overfits)."""
    from fewtune.config import RunConfig
    kw = dict(task=str(toy.task_file), data_root=str(toy.root), model=str(model_dir), method=case.method,
              method_options=dict(case.options), shots=8, seed=0, epochs=30, batch_size=8, lr=case.lr,
              warmup_ratio=0.1, eval_limit=8, max_length=64, dtype="fp32", device="cpu")
    if case.method == "icl":
        for k in ("epochs", "batch_size", "lr", "warmup_ratio"):
            kw.pop(k)
    kw.update(overrides)
    return RunConfig(**kw)


@pytest.fixture(scope="session")
def recorded(toy, tiny_model_dir, tmp_path_factory):
    """`recorded(case)`: the recorded run of `case` on the tiny model (each case runs once per session)."""
    cache = {}

    def get(case: Case) -> RecordedRun:
        if case.id not in cache:
            save = tmp_path_factory.mktemp(f"saved-{case.id}") / "model" if case.method != "icl" else None
            cache[case.id] = record_run(tiny_run_config(case, toy, tiny_model_dir), save_model=save)
        return cache[case.id]
    return get


# One intra-op thread unless $FEWTUNE_TEST_THREADS says otherwise: the tiny models gain nothing from more, and
# on a machine whose cores are busy with other work, 2 spinning threads made a training step 50x slower.
torch.set_num_threads(int(os.environ.get("FEWTUNE_TEST_THREADS", "1")))
