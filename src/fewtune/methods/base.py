"""The method interface and the context a run hands to its method."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..errors import FewtuneError, did_you_mean


@dataclass
class RunContext:
    """What a method may use: the task and its chosen pattern, the tokenizer, the sampled training
    examples, the run's config, and where/how to compute."""
    config: object            # RunConfig
    task: object              # Task
    pattern: object           # Pattern
    tokenizer: object
    label_ids: list           # verbalizer token ids, in label order
    train_examples: list      # the few-shot sample, in its seeded order
    device: torch.device
    dtype: str                # "fp32" | "bf16" (autocast)
    extra: dict = field(default_factory=dict)  # what a method reports into the result (e.g. demonstrations used)


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


class Method:
    """A few-shot adaptation method. Subclasses set `name`, `trains`, `Options`, and override what they need."""

    name = "method"
    trains = True
    Options = Options
    # the study's GPU budgets (docs/methods.md); RunConfig fields and presets override them
    defaults = dict(epochs=40, batch_size=32, lr=1e-5, weight_decay=0.0, warmup_ratio=0.5)

    def __init__(self, options: dict):
        self.opts = self.Options.parse(options, self.name)

    @property
    def objective(self) -> str:
        """'lm': score the verbalizer words with the LM head; 'head': a new classification head."""
        return "lm"

    def uses_pattern(self) -> bool:
        return self.objective == "lm"

    # --- the model
    def prepare(self, ctx: RunContext, model):
        """Freeze, wrap or extend the loaded model; return the model to train and score."""
        return model

    def param_groups(self, ctx: RunContext, model):
        return None  # all trainable parameters at the base learning rate

    # --- the data
    def text(self, ctx: RunContext, example) -> str:
        return ctx.task.format(ctx.pattern, example) if self.uses_pattern() else ctx.task.raw_text(example)

    def train_items(self, ctx: RunContext, model, seqs: list, examples: list) -> list[dict]:
        return [{"ids": s, "label": ex.label} for s, ex in zip(seqs, examples)]

    def packs(self, ctx: RunContext) -> bool:
        """Whether the training loop may pack this method's batches (batching.collate_packed): its loss reads the
        batch only through engine.class_logits."""
        return True

    def eval_prefix(self, ctx: RunContext) -> str | None:
        """Text scored before every evaluation query (icl's demonstrations); None for trained methods."""
        return None

    # --- the loss
    def loss(self, ctx: RunContext):
        label_ids = ctx.label_ids if self.objective == "lm" else None
        from ..engine import class_logits

        def loss_fn(model, chunk, batch):
            logits = class_logits(model, batch, label_ids)
            labels = torch.tensor([it["label"] for it in chunk], device=logits.device)
            return torch.nn.functional.cross_entropy(logits.float(), labels), logits
        return loss_fn

    def after_train(self, ctx: RunContext) -> None:
        """Checks after training (cd: the distillation term must not have been zero)."""
