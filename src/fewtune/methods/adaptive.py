"""Adaptive fine-tuning: embeddings and lower blocks frozen, the top n blocks train, with layer-wise
learning rates lr x decay^(distance from the top) -- the study's "freezing layers and dynamic learning rates".
Objective: pbft (verbalizer over the frozen LM head) or ft (a new head, which trains at the full lr)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..engine.batching import collate
from ..engine.devices import autocast, speedups_enabled
from ..engine.engine import class_logits
from ..engine.models import text_config
from ..errors import FewtuneError
from .base import Method, ObjectiveOptions, option
from .layers import find_blocks, head_names, params_after_blocks


@dataclass
class AdaptiveOptions(ObjectiveOptions):
    # top blocks that train; more = closer to full FT, slower and more memory
    train_layers: int = option(2, flag="--train-layers", help="top blocks that train")
    # block at distance d from the top trains at lr * lr_decay**d
    lr_decay: float = option(0.8, flag="--lr-decay", help="per-block learning-rate decay from the top")
    frozen_cache: bool = True  # compute the frozen part once and train the top blocks on its output (3-6x faster per epoch)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.train_layers, int) or isinstance(self.train_layers, bool) or self.train_layers < 1:
            raise FewtuneError(f"adaptive: train_layers must be a positive integer, got {self.train_layers!r}.")
        if not isinstance(self.lr_decay, (int, float)) or not 0 < self.lr_decay <= 1:
            raise FewtuneError(f"adaptive: lr_decay must be in (0, 1], got {self.lr_decay!r}.")


log = logging.getLogger("fewtune")


class PassThrough(torch.nn.Module):
    """Stands in for a frozen block whose output is already cached: returns its input unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def has_dropout(model) -> bool:
    cfg = text_config(model)
    rates = [v for k, v in cfg.to_dict().items() if "dropout" in k and isinstance(v, (int, float))]
    modules = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    return any(r > 0 for r in rates + modules)


class Adaptive(Method):
    Options = AdaptiveOptions
    defaults = dict(epochs=40, batch_size=32, lr=1e-5, weight_decay=0.0, warmup_ratio=0.5)
    presets = {"quick": {"lr": 1e-4}}  # only the top blocks train: a higher rate for the quick preset's 5 epochs

    def __init__(self, options):
        super().__init__(options)
        self.frozen_cache = False  # whether training runs on the cached output of the frozen blocks (train_items)

    def prepare(self, ctx, model):
        prefix, blocks = find_blocks(model)
        n = self.opts.train_layers
        if n > len(blocks):
            raise FewtuneError(f"--train-layers {n} is larger than the model's depth ({len(blocks)} blocks).")
        top = {f"{prefix}.{i}." for i in range(len(blocks) - n, len(blocks))}
        heads = head_names(model)
        # what sits between the last block and the head (final norm, OPT's project_out) trains with the top block
        after = set(params_after_blocks(model, blocks))
        for name, p in model.named_parameters():
            in_top = any(name.startswith(t) for t in top)
            p.requires_grad_(in_top or name in heads or name in after)
        if ctx is not None:
            ctx.info["after_blocks_trained"] = sorted(after)
        self._prefix, self._depth, self._blocks = prefix, len(blocks), blocks
        return model

    def param_groups(self, ctx, model):
        lr = ctx.lr
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

    # --- frozen-block cache --------------------------------------------------------------------------
    # The embeddings and the lower blocks are frozen and (without dropout) deterministic, so their output
    # for a training example is the same every epoch: compute it once, then train with the lower blocks
    # replaced by PassThrough and the cached states fed as `inputs_embeds`. Valid only when the model adds
    # nothing between the embedding and the first block (true for Llama-style models; OPT adds learned
    # positions there): the first batch is checked against the full forward and the cache is dropped on a mismatch.
    def train_items(self, ctx, model, seqs, examples):
        items = super().train_items(ctx, model, seqs, examples)
        self.frozen_cache = ctx.info["frozen_cache"] = False
        if not self.opts.frozen_cache or not speedups_enabled() or has_dropout(model):
            return items
        k = self._depth - self.opts.train_layers
        model.eval()
        with torch.no_grad(), autocast(ctx.dtype, ctx.device):
            for start in range(0, len(items), ctx.config.scoring_rows):
                chunk = items[start:start + ctx.config.scoring_rows]
                batch = collate([it["ids"] for it in chunk], ctx.tokenizer.pad_token_id, device=ctx.device)
                hidden = model(**batch, output_hidden_states=True).hidden_states[k]
                for i, it in enumerate(chunk):
                    it["hidden"] = hidden[i, hidden.shape[1] - len(it["ids"]):].detach()
        self._lower = [(i, self._blocks[i]) for i in range(k)]
        ref = self._check_batch(ctx, model, items[: min(4, len(items))])
        for i, _ in self._lower:
            self._blocks[i] = PassThrough()
        got = self._check_batch(ctx, model, items[: min(4, len(items))], cached=True)
        diff = float((ref - got).abs().max())
        tolerance = 1e-3 if ctx.dtype == "fp32" else 5e-2
        ctx.info["frozen_cache_check_max_diff"] = diff
        if diff > tolerance:
            log.warning("adaptive: cached frozen blocks change the output by %.2g (> %g); training without the cache.", diff, tolerance)
            self._restore()
            for it in items:
                it.pop("hidden", None)
            return items
        self.frozen_cache = ctx.info["frozen_cache"] = True
        return items

    def _check_batch(self, ctx, model, chunk, cached=False):
        batch = collate([it["ids"] for it in chunk], ctx.tokenizer.pad_token_id, device=ctx.device)
        if cached:
            batch = self._cached_batch(chunk, batch)
        with torch.no_grad(), autocast(ctx.dtype, ctx.device):
            return class_logits(model, batch, ctx.label_ids if self.objective == "lm" else None).float()

    @staticmethod
    def _cached_batch(chunk, batch):
        width = batch["input_ids"].shape[1]
        first = chunk[0]["hidden"]
        embeds = torch.zeros((len(chunk), width, first.shape[-1]), dtype=first.dtype, device=first.device)
        for i, it in enumerate(chunk):
            embeds[i, width - it["hidden"].shape[0]:] = it["hidden"]
        out = {k: v for k, v in batch.items() if k != "input_ids"}
        out["inputs_embeds"] = embeds
        return out

    def packs(self, ctx):
        # the cached hidden states are laid out as the padded batch (_cached_batch)
        return not self.frozen_cache

    def loss(self, ctx):
        base = super().loss(ctx)

        def loss_fn(model, chunk, batch):
            if "hidden" in chunk[0]:
                batch = self._cached_batch(chunk, batch)
            return base(model, chunk, batch)
        return loss_fn

    def _restore(self):
        for i, block in getattr(self, "_lower", []):
            self._blocks[i] = block
        self._lower = []

    def after_train(self, ctx):
        self._restore()
