"""The method interface and the context a run hands to its method."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..engine import engine
from ..engine.engine import class_logits
from ..engine.models import DEFAULT_MAX_POSITIONS
from ..errors import FewtuneError, did_you_mean

if TYPE_CHECKING:  # types only: the config and the task sit above the methods (README's Layout)
    from transformers import PreTrainedTokenizerBase

    from ..config import RunConfig
    from ..tasks import Pattern, Task


@dataclass
class RunContext:
    """What the run hands a method: its inputs (read-only by convention) and `info`, where the method writes what
    goes into the result's `method_info`. A method keeps its own state (icl's demonstrations, adaptive's cache,
    cd's teacher) on itself, not here: `info` is only written by methods and only read by the runner."""
    config: RunConfig
    task: Task
    pattern: Pattern
    tokenizer: PreTrainedTokenizerBase
    label_ids: list | None    # verbalizer token ids, in label order (None for a classification head)
    train_examples: list      # the few-shot sample, in its seeded order
    device: torch.device
    dtype: str                # "fp32" | "bf16" (autocast)
    lr: float | None = None   # the run's base learning rate (method defaults < preset < config); None: no training
    max_positions: int = DEFAULT_MAX_POSITIONS  # the loaded model's positions: the longest prompt it can take
    info: dict = field(default_factory=dict)    # -> result["method_info"]


def input_text(task, pattern, example, objective: str) -> str:
    """The text a method reads for an example: through the pattern for the LM head ('lm'), the raw fields for a new
    classification head ('head', ft). One rule for training, scoring and `fewtune predict` (saving.py)."""
    return task.format(pattern, example) if objective == "lm" else task.raw_text(example)


@dataclass(frozen=True)
class Flag:
    """The command-line flag that sets one method option (`fewtune run --lora-r 8`)."""
    flag: str                   # e.g. "--lora-r"; several methods may share one (their options then have one type)
    help: str                   # what it does, shown after the method's name in `fewtune run --help`
    kind: type = str            # the value's type (argparse's type=)
    split: str | None = None    # a list option given as one string: the separator (--lora-targets q_proj,v_proj)
    key_value: bool = False     # repeatable KEY=VALUE (a TOML value), each setting the option KEY (--peft-option)


def option(default=dataclasses.MISSING, *, flag: str | None = None, help: str = "", kind: type | None = None,
           default_factory=dataclasses.MISSING, split: str | None = None, key_value: bool = False):
    """A field of a method's Options with the CLI flag that sets it: the one place the flag is declared (the CLI
    builds the flag, its help and its "applies to" check from the method registry). `kind`: the value's type
    (default: the default's). Without `flag`, the option is set only through method_options in a config file."""
    metadata = {}
    if flag:
        if kind is None:
            kind = str if default in (dataclasses.MISSING, None) else default.__class__
        metadata["flag"] = Flag(flag, help, kind, split, key_value)
    return field(default=default, default_factory=default_factory, metadata=metadata)


@dataclass
class Options:
    """Base of each method's options: unknown keys and bad values are errors that name the field."""

    @classmethod
    def parse(cls, raw: dict, method: str):
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in known:
                raise FewtuneError(f"Method '{method}' has no option '{key}'.{did_you_mean(key, list(known))} "
                                   f"Options: {', '.join(known) or 'none'}.")
        return cls(**raw)


# The objective option's words (the method each names) -> what scores the labels: the LM head over the verbalizer
# words ('lm'), or a new classification head ('head'). One vocabulary for every method that offers the choice.
OBJECTIVES = {"pbft": "lm", "ft": "head"}


@dataclass
class ObjectiveOptions(Options):
    """Options of a method that trains with either objective: pbft (the verbalizer words over the LM head) or ft
    (a new classification head). Declared once here: a method offers the choice by deriving its Options from this."""
    objective: str = option("pbft", flag="--objective", help="pbft or ft")

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise FewtuneError(f"objective must be {' or '.join(OBJECTIVES)}, got {self.objective!r}.")


class Method:
    """A few-shot adaptation method. Subclasses set `trains`, `Options`, their budgets, and override what they need;
    `name` is the file's (methods/__init__.py)."""

    name = "method"
    trains = True
    Options = Options
    # What --save-model writes: False, every weight of the model (or the adapter, for peft wrappers); True, only the
    # parameters the method trained, over the base model named by reference (probe: its head; bitfit: its biases)
    ships_trained_only = False
    # the study's GPU budgets (docs/methods.md); RunConfig fields and presets override them
    defaults = dict(epochs=40, batch_size=32, lr=1e-5, weight_decay=0.0, warmup_ratio=0.5)
    # this method's own values under each preset (hyperparameters.PRESETS holds what every method shares): a method
    # that trains names its learning rate for each preset, or the preset is refused for it
    presets: dict = {}

    def __init__(self, options: dict):
        self.opts = self.Options.parse(options, self.name)

    @classmethod
    def listing(cls) -> list[str]:
        """Lines under the method's own in `fewtune ls methods` (peft: the types the installed peft offers)."""
        return []

    def preset(self, name: str) -> dict:
        """This method's own values under the preset `name` (its learning rate), as configured."""
        return dict(self.presets.get(name, {}))

    def seed_free(self, config: RunConfig) -> bool:
        """Whether this run's predictions cannot depend on its data seed (nor on the training seed it defaults to):
        True only when nothing the method does with these options and this config reads a seed — no training sample,
        no sampled or shuffled demonstrations, no initialisation, no dropout, no shuffled batches. Decided from the
        method and its options, never from runs that happened to agree. A grid runs such an option once, at its first
        seed, and the statistics treat it as a constant for every seed (docs/grid.md). Default: False."""
        return False

    @property
    def objective(self) -> str:
        """'lm': score the verbalizer words with the LM head; 'head': a new classification head (the option's
        words, pbft or ft, for methods whose Options derive from ObjectiveOptions)."""
        return OBJECTIVES[getattr(self.opts, "objective", "pbft")]

    # --- the model
    def prepare(self, ctx: RunContext, model):
        """Freeze, wrap or extend the loaded model; return the model to train and score."""
        return model

    def param_groups(self, ctx: RunContext, model):
        return None  # all trainable parameters at the base learning rate

    # --- the data
    def text(self, ctx: RunContext, example) -> str:
        return input_text(ctx.task, ctx.pattern, example, self.objective)

    def train_items(self, ctx: RunContext, model, seqs: list, examples: list) -> list[dict]:
        return [{"ids": s, "label": ex.label} for s, ex in zip(seqs, examples)]

    def packs(self, ctx: RunContext) -> bool:
        """Whether the training loop may pack this method's batches (batching.collate_packed): its loss reads the
        batch only through engine.class_logits."""
        return True

    def eval_prefix(self, ctx: RunContext) -> str | None:
        """Text scored before every evaluation query (icl's demonstrations); None for trained methods."""
        return None

    def fit_eval_prefix(self, ctx: RunContext, eval_sets: dict) -> None:
        """Called once before evaluation with {split: examples}: make `eval_prefix` and the longest query fit in
        `ctx.max_positions` (icl drops demonstrations). Nothing to fit without a prefix."""

    def examples_used(self, ctx: RunContext) -> int:
        """Labelled examples the run used (the report's "labelled examples" budget): the whole sample, unless the
        method left some out (icl's demonstrations dropped to fit the context)."""
        return len(ctx.train_examples)

    # --- the loss
    def loss(self, ctx: RunContext):
        label_ids = ctx.label_ids if self.objective == "lm" else None

        def loss_fn(model, chunk, batch):
            logits = class_logits(model, batch, label_ids)
            labels = torch.tensor([it["label"] for it in chunk], device=logits.device)
            return torch.nn.functional.cross_entropy(logits.float(), labels), logits
        return loss_fn

    def after_train(self, ctx: RunContext) -> None:
        """Checks after training (cd: the distillation term must not have been zero)."""

    # --- training and its record
    def budget(self, hp: dict) -> dict:
        """The run's training budget as recorded (result["hyperparameters"]) from the loop's hyperparameters
        (method defaults < preset < config): the loop's own for every method that trains through it."""
        return hp

    def fit(self, ctx: RunContext, model, items: list, hp: dict, seed: int, progress: bool = True) -> engine.TrainResult:
        """Train the prepared model on the training items: the one training loop (engine.train), for every method
        but one whose training is a convex problem solved exactly (probe's logistic regression)."""
        settings = engine.TrainSettings(epochs=hp["epochs"], batch_size=hp["batch_size"], lr=hp["lr"],
                                        weight_decay=hp["weight_decay"], warmup_ratio=hp["warmup_ratio"],
                                        micro_batch_size=hp.get("micro_batch_size"),
                                        max_grad_norm=ctx.config.max_grad_norm, seed=seed, dtype=ctx.dtype)
        return engine.train(model, items, self.loss(ctx), settings, ctx.device, self.param_groups(ctx, model),
                            pad_id=ctx.tokenizer.pad_token_id, progress=progress, pack=self.packs(ctx))

    # --- a saved model
    def reloaded(self, model):
        """The model `fewtune predict` loaded from a save of this method, made to score as the run did (probe's
        mean pooling). The method is built from the saved run's options."""
        return model
