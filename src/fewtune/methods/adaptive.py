"""Adaptive fine-tuning: embeddings and lower blocks frozen, the top n blocks train, with layer-wise
learning rates lr x decay^(distance from the top) -- the study's "freezing layers and dynamic learning rates".
Objective: pbft (verbalizer over the frozen LM head) or ft (a new head, which trains at the full lr)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FewtuneError
from . import register
from .base import Method, Options
from .layers import find_blocks, head_names


@dataclass
class AdaptiveOptions(Options):
    train_layers: int = 2      # top blocks that train; more = closer to full FT, slower and more memory
    lr_decay: float = 0.8      # block at distance d from the top trains at lr * lr_decay**d
    objective: str = "pbft"    # pbft | ft

    def __post_init__(self):
        if not isinstance(self.train_layers, int) or isinstance(self.train_layers, bool) or self.train_layers < 1:
            raise FewtuneError(f"adaptive: train_layers must be a positive integer, got {self.train_layers!r}.")
        if not isinstance(self.lr_decay, (int, float)) or not 0 < self.lr_decay <= 1:
            raise FewtuneError(f"adaptive: lr_decay must be in (0, 1], got {self.lr_decay!r}.")
        if self.objective not in ("pbft", "ft"):
            raise FewtuneError(f"adaptive: objective must be pbft or ft, got {self.objective!r}.")


@register
class Adaptive(Method):
    name = "adaptive"
    Options = AdaptiveOptions
    defaults = dict(epochs=40, batch_size=32, lr=1e-5, weight_decay=0.0, warmup_ratio=0.5)

    @property
    def objective(self):
        return "head" if self.opts.objective == "ft" else "lm"

    def prepare(self, ctx, model):
        prefix, blocks = find_blocks(model)
        n = self.opts.train_layers
        if n > len(blocks):
            raise FewtuneError(f"--train-layers {n} is larger than the model's depth ({len(blocks)} blocks).")
        top = {f"{prefix}.{i}." for i in range(len(blocks) - n, len(blocks))}
        heads = head_names(model)
        for name, p in model.named_parameters():
            in_top = any(name.startswith(t) for t in top)
            # the final norm sits after the last block: it trains with the top block
            after_blocks = not name.startswith(prefix + ".") and "norm" in name and "embed" not in name
            p.requires_grad_(in_top or name in heads or after_blocks)
        self._prefix, self._depth = prefix, len(blocks)
        return model

    def param_groups(self, ctx, model):
        lr = ctx.extra["lr"]
        groups = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            distance = 0
            if name.startswith(self._prefix + "."):
                block = int(name[len(self._prefix) + 1:].split(".")[0])
                distance = self._depth - 1 - block
            groups.setdefault(distance, []).append(p)
        return [{"params": ps, "lr": lr * self.opts.lr_decay ** d, "layer_distance": d} for d, ps in sorted(groups.items())]
