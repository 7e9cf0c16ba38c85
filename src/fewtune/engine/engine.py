"""The one scorer and the one training loop, shared by every method.

Methods only prepare the model, turn examples into token sequences, and define the loss; batching,
padding, precision, the optimizer and schedule, and scoring live here, so a comparison differs only
in the method.

Below it: devices.py (device, dtype, autocast), batching.py (encoding, padded and packed batches),
prefix_attention.py (a shared prompt prefix computed once).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import FewtuneError
from .batching import (PACK_ROW_TOKENS, collate, collate_packed, length_batches,  # noqa: F401
                       scoring_token_budget, token_batches)
from .devices import autocast, speedups_enabled
from .models import text_config
from .prefix_attention import (SHARED_PREFIX_ATTENTION, SHARED_PREFIX_MODEL_TYPES, PrefixCache,
                               attention_implementation, query_mask, register_shared_prefix_attention,
                               shared_prefix_path, supports_prefix_cache)


# ----------------------------------------------------------------------------- the forward pass to class scores
def attention_dropout(cfg) -> float:
    """The attention dropout a model config declares, under the names transformers' architectures use."""
    names = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")
    return max(float(getattr(cfg, k, 0.0) or 0.0) for k in names)


def _unwrapped(model):
    """The transformers model inside a peft wrapper (the model itself when not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def packing_supported(model, device) -> bool:
    """Whether `train` may pack this model's batches: on CPU (measured there; GPUs keep padded batches), with
    speedups on, for full-attention decoders with rotary positions from `position_ids` (`SHARED_PREFIX_MODEL_TYPES`),
    without attention dropout, and not under a peft prompt-learning adapter (its virtual tokens are prepended to
    each row). The scores come from an LM head, or from a classification head `score` (transformers'
    *ForSequenceClassification), read at each sequence's last token."""
    if device.type != "cpu" or not speedups_enabled():
        return False
    cfg = text_config(model)
    if getattr(cfg, "model_type", None) not in SHARED_PREFIX_MODEL_TYPES or not supports_prefix_cache(model):
        return False
    if attention_dropout(cfg) > 0:
        return False
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return False
    base = _unwrapped(model)
    return hasattr(base, "lm_head") or isinstance(getattr(base, "score", None), torch.nn.Module)


def _packed_class_logits(model, batch: dict, label_ids: list[int] | None) -> torch.Tensor:
    # use_cache=False: transformers detects packed sequences only without a cache (and without an attention mask)
    inputs = {k: batch[k] for k in ("input_ids", "position_ids")}
    rows, ends = batch["packed_rows"], batch["packed_ends"]
    keep = torch.zeros(batch["input_ids"].shape, dtype=torch.bool, device=rows.device)
    keep[rows, ends] = True
    # the kept positions come out flattened in row-major order; `order` maps sequence i to its place there
    order = torch.argsort(rows * keep.shape[1] + ends).argsort()
    if label_ids is not None:
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # [n, V]
        return logits[order][:, label_ids]
    # A classification model pools each row's last token; here the head's output at every position is taken
    # from the head itself (a hook: the model's own forward still runs, with its hooks) and read at the ends.
    base = _unwrapped(model)
    seen = []
    handle = base.score.register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return seen[-1][rows, ends]


def class_logits(model, batch: dict, label_ids: list[int] | None, past_key_values=None, **kwargs) -> torch.Tensor:
    """[B, C] class scores. With `label_ids`: the LM's next-token logits of the label words at the last
    position (`logits_to_keep=1`: the vocabulary projection runs for one position only). Without: the
    sequence-classification head's logits (its last non-padding token is the last position here).
    `kwargs` go to the attention functions (`shared_prefix=` for the shared-prefix path).
    A packed batch (`collate_packed`) gives the same [B, C] in the order of its sequences."""
    if "packed_ends" in batch:
        return _packed_class_logits(model, batch, label_ids)
    if label_ids is None:
        return model(**batch, past_key_values=past_key_values, **kwargs).logits
    out = model(**batch, past_key_values=past_key_values, logits_to_keep=1, use_cache=past_key_values is not None, **kwargs)
    return out.logits[:, -1, label_ids]

# ----------------------------------------------------------------------------- scoring
@dataclass
class ScoreOutput:
    logits: np.ndarray   # [N, C]
    seconds: float
    tokens: int          # tokens run through the model (the prefix counted once)
    path: str = "none"   # how a shared prefix was handled: see shared_prefix_path (or "none": no prefix)
    prefix_seconds: float = 0.0  # of `seconds`, computing the prefix's KV cache (once per call)
    max_batch: int = 0           # the most rows scored in one batch


def score(model, tokenizer, seqs: list[list[int]], label_ids: list[int] | None, device, dtype: str = "fp32",
          batch_size: int = 16, prefix_ids: list[int] | None = None, reuse_prefix: bool = True,
          shared_prefix: bool = True, prefix_store: dict | None = None, token_budget: int | None = None) -> ScoreOutput:
    """Class logits for every sequence, optionally after a shared prefix (whose KV cache is reused).

    `seqs` are query token ids (from `encode`); with a prefix they must not start with BOS (the prefix has it).
    `reuse_prefix=False` scores the full prompts (the reference); `shared_prefix=False` keeps the prefix cache but
    not the cascade attention (for measuring what it buys). The path taken is in the output's `path`.
    `prefix_store`: a dict the caller keeps across calls on the SAME model weights (e.g. one run's evaluation
    splits): the prefix's KV cache is computed by the first call and reused by the next (`prefix_seconds` 0).
    `token_budget`: batches of at most this many padded tokens (`token_batches`) instead of `batch_size` rows.
    """
    model.eval()
    t0 = time.perf_counter()
    lengths = [len(s) for s in seqs]
    out = np.zeros((len(seqs), len(label_ids) if label_ids is not None else model.config.num_labels), dtype=np.float32)
    tokens = max_batch = 0
    cache = None
    path = "none"
    if prefix_ids:
        path = shared_prefix_path(model) if reuse_prefix else "full-prompt"
        if path == "shared-prefix" and not shared_prefix:
            path = "prefix-cache"
    if path in ("shared-prefix", "prefix-cache"):
        key = (tuple(prefix_ids), dtype, str(device))
        cache = prefix_store.get(key) if prefix_store is not None else None
        if cache is None:
            with torch.profiler.record_function("fewtune.prefix_cache"):
                cache = PrefixCache(model, prefix_ids, device, dtype)
            tokens += len(prefix_ids)
            if prefix_store is not None:
                prefix_store[key] = cache
    prefix_seconds = time.perf_counter() - t0
    switch = contextlib.nullcontext()
    if path == "shared-prefix":
        register_shared_prefix_attention()
        switch = attention_implementation(model, SHARED_PREFIX_ATTENTION)
    with torch.no_grad(), autocast(dtype, device), switch:
        batches = token_batches(lengths, token_budget) if token_budget else length_batches(lengths, batch_size)
        for idx in batches:
            max_batch = max(max_batch, len(idx))
            batch_seqs = [seqs[i] for i in idx]
            if prefix_ids and cache is None:
                batch_seqs = [prefix_ids + s for s in batch_seqs]
            batch = collate(batch_seqs, tokenizer.pad_token_id, prefix_len=cache.length if cache else 0, device=device)
            if path == "shared-prefix":
                # the queries' own tokens only: positions continue after the prefix, the prefix comes in as keys
                batch["attention_mask"] = query_mask(batch["attention_mask"][:, cache.length:])
                logits = class_logits(model, batch, label_ids, shared_prefix=cache)
            else:
                logits = class_logits(model, batch, label_ids, past_key_values=cache.expand(len(idx)) if cache else None)
            out[idx] = logits.float().cpu().numpy()
            tokens += sum(len(s) for s in batch_seqs)
    return ScoreOutput(out, time.perf_counter() - t0, tokens, path, prefix_seconds, max_batch)


# ----------------------------------------------------------------------------- training
@dataclass
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_ratio: float = 0.5
    micro_batch_size: int | None = None
    max_grad_norm: float = 1.0
    seed: int = 0
    dtype: str = "fp32"


@dataclass
class TrainResult:
    seconds: float
    steps: int
    examples_seen: int
    tokens: int
    epoch_losses: list
    final_loss: float
    train_accuracy: float | None
    packed: bool = False  # batches laid end to end (collate_packed) rather than padded


# Training batches up to this many tokens wide use transformers' "eager" attention (matmul, softmax, matmul)
# instead of sdpa on CPU: at the demo's shapes (batch 8, 15-70 tokens) the fused CPU kernel's backward pass took
# 17 % of the step (8.7 ms per layer call against 1.5 ms forward), and a step ran 1.2-1.4x faster with eager
# (benchmarks/profile_steps.py train; docs/speed.md). Eager keeps [B, heads, T, T] scores for the backward pass,
# so long batches stay on sdpa. 0 switches it off.
EAGER_TRAINING_ATTENTION_MAX_LEN = 128


def training_attention(model, width: int, device, packed: bool = False) -> str | None:
    """The attention implementation to train a batch `width` tokens wide with, or None to keep the model's.
    Packed rows (at most PACK_ROW_TOKENS wide unless one sequence is longer) use eager up to that width."""
    cfg = text_config(model)
    # With attention dropout the two implementations draw different random masks: not the same run any more.
    dropout = attention_dropout(cfg)
    limit = EAGER_TRAINING_ATTENTION_MAX_LEN
    if packed and limit:
        limit = max(limit, PACK_ROW_TOKENS)
    if (device.type == "cpu" and speedups_enabled() and width <= limit and dropout == 0.0
            and getattr(cfg, "_attn_implementation", None) == "sdpa"):
        return "eager"
    return None


def train(model, items: list, loss_fn, settings: TrainSettings, device, param_groups=None, pad_id: int = 0,
          progress: bool = True, pack: bool = True) -> TrainResult:
    """The training loop: AdamW, linear warmup then linear decay, gradient accumulation and clipping.

    `items`: dicts with at least "ids" (token ids) and "label" (class id); methods may add more (teacher
    probabilities, cached hidden states). `loss_fn(model, batch_items, batch) -> (loss, class_logits)`.
    Seeded: the same seed gives the same batches, the same head initialisation and the same result on CPU.
    `pack`: lay each micro-batch's sequences end to end (`collate_packed`) where `packing_supported`; False for
    methods whose loss reads the padded batch's layout (adaptive's cached hidden states).
    """
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    if not items:
        raise FewtuneError("Nothing to train on: the training sample is empty.")
    params = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if not any(p.requires_grad for g in params for p in g["params"]):
        raise FewtuneError("The method left no trainable parameter.")
    micro = min(settings.micro_batch_size or settings.batch_size, settings.batch_size)
    steps_per_epoch = math.ceil(len(items) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    for g in params:
        g.setdefault("lr", settings.lr)
        g.setdefault("weight_decay", settings.weight_decay)
    try:
        if not speedups_enabled():
            raise RuntimeError("fused optimizer disabled by $FEWTUNE_NO_SPEEDUPS")
        # The fused kernel updates all parameters in one pass over memory: on 2 CPU cores it takes 0.09 s per
        # step for 148M fp32 parameters where the default implementation takes 0.34-0.52 s (measured).
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # a device or dtype without the fused kernel
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * total_steps), total_steps)
    generator = torch.Generator().manual_seed(settings.seed)
    pack = pack and packing_supported(model, device)
    model.train()
    t0 = time.perf_counter()
    tokens = seen = steps = 0
    epoch_losses, correct, counted = [], 0, 0
    on_gpu = getattr(device, "type", str(device)) == "cuda"
    if on_gpu:
        gpu_loss = torch.zeros((), dtype=torch.float64, device=device)
        gpu_correct = torch.zeros((), dtype=torch.long, device=device)
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not progress, leave=False)
    for epoch in range(settings.epochs):
        order = torch.randperm(len(items), generator=generator).tolist()
        epoch_loss, epoch_n = 0.0, 0
        correct = counted = 0  # training accuracy of the last epoch (as it trains)
        for start in range(0, len(order), settings.batch_size):
            step_idx = order[start:start + settings.batch_size]
            optimizer.zero_grad(set_to_none=True)
            for m in range(0, len(step_idx), micro):
                chunk = [items[i] for i in step_idx[m:m + micro]]
                seqs = [it["ids"] for it in chunk]
                batch = (collate_packed if pack else collate)(seqs, pad_id, device=device)
                attn = training_attention(model, batch["input_ids"].shape[1], device, packed=pack)
                switch = attention_implementation(model, attn) if attn else contextlib.nullcontext()
                with autocast(settings.dtype, device), switch:
                    loss, logits = loss_fn(model, chunk, batch)
                # Each micro-batch's mean loss weighted by its share of the step: the gradient equals one big batch.
                (loss.float() * len(chunk) / len(step_idx)).backward()
                labels = torch.tensor([it["label"] for it in chunk], device=logits.device)
                if on_gpu:  # summed on the device, read once per epoch: no host synchronisation per step
                    gpu_loss += loss.detach().double() * len(chunk)
                    gpu_correct += (logits.argmax(-1) == labels).sum()
                else:  # CPU: as before, to the bit
                    epoch_loss += float(loss.detach()) * len(chunk)
                    correct += int((logits.argmax(-1) == labels).sum())
                epoch_n += len(chunk)
                counted += len(chunk)
                tokens += sum(len(q) for q in seqs)
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            steps += 1
            seen += len(step_idx)
            bar.update(1)
            if not on_gpu:
                bar.set_postfix(epoch=f"{epoch + 1}/{settings.epochs}", loss=f"{epoch_loss / max(epoch_n, 1):.4f}")
        if on_gpu:
            epoch_loss, correct = float(gpu_loss), int(gpu_correct)
            gpu_loss.zero_()
            gpu_correct.zero_()
        epoch_losses.append(epoch_loss / max(epoch_n, 1))
    bar.close()
    model.eval()
    if not all(math.isfinite(x) for x in epoch_losses):
        raise FewtuneError(f"Training diverged: the loss became {epoch_losses[-1]} (try a lower --lr or --dtype fp32).")
    return TrainResult(seconds=time.perf_counter() - t0, steps=steps, examples_seen=seen, tokens=tokens,
                       epoch_losses=epoch_losses, final_loss=epoch_losses[-1],
                       train_accuracy=correct / counted if counted else None, packed=pack)
