"""The one scorer and the one training loop, shared by every method.

Methods only prepare the model, turn examples into token sequences, and define the loss; batching,
padding, precision, the optimizer and schedule, and scoring live here, so a comparison differs only
in the method.

Padding: left padding with explicit position ids, so the last position of every row is its last real
token and a padded batch scores like one example at a time (tests/test_engine.py checks this).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from .errors import FewtuneError


def speedups_enabled() -> bool:
    """False when $FEWTUNE_NO_SPEEDUPS=1: no prefix KV reuse, no frozen-block cache, no fused optimizer.

    For measuring what the speed techniques buy (benchmarks, before/after timings); results are the same
    within float tolerance either way. Precision is separate: `--dtype fp32`.
    """
    return os.environ.get("FEWTUNE_NO_SPEEDUPS", "") not in ("1", "true", "yes")


# ----------------------------------------------------------------------------- device and precision
def pick_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise FewtuneError(f"--device {spec}: no CUDA GPU is available here; use --device cpu or auto.")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise FewtuneError(f"--device {spec!r} is not a device (auto, cpu, cuda, cuda:N).") from None


def cpu_has_bf16() -> bool:
    """bf16 matmuls are fast only with AVX512-BF16 or AMX; elsewhere autocast would be slower than fp32."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where the hardware runs it fast, else 'fp32'. fp16 is never used on CPU (60x slower)."""
    if dtype == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_has_bf16() else "fp32"
    return dtype


def autocast(dtype: str, device: torch.device):
    """bf16 autocast around forward passes; weights stay fp32 (pure-bf16 weights lose updates at lr 1e-5)."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- encoding and batches
def leading_special_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS for OPT/Llama-2; none for SmolLM2)."""
    with_special = tokenizer("x").input_ids
    without = tokenizer("x", add_special_tokens=False).input_ids
    n = len(with_special) - len(without)
    if n > 0 and with_special[n:n + len(without)] == without:
        return list(with_special[:n])
    return []


def encode(tokenizer, texts: list[str], max_length: int | None = None, with_bos: bool = True) -> tuple[list[list[int]], int]:
    """Token ids per text (leading specials only, never EOS), left-truncated to `max_length`.

    Returns (ids, number truncated). Truncation keeps the end, where the pattern's answer slot is.
    """
    bos = leading_special_ids(tokenizer) if with_bos else []
    out, truncated = [], 0
    for ids in tokenizer(list(texts), add_special_tokens=False).input_ids:
        if max_length is not None and len(bos) + len(ids) > max_length:
            ids = ids[len(ids) - (max_length - len(bos)):]
            truncated += 1
        out.append(bos + list(ids))
    return out, truncated


def collate(seqs: list[list[int]], pad_id: int, prefix_len: int = 0, device=None) -> dict:
    """Left-padded batch; positions continue after a cached prefix of `prefix_len` tokens."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0) + prefix_len
    if prefix_len:
        mask = torch.cat([torch.ones((len(seqs), prefix_len), dtype=torch.long), mask], dim=1)
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so little compute goes to padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def class_logits(model, batch: dict, label_ids: list[int] | None, past_key_values=None) -> torch.Tensor:
    """[B, C] class scores. With `label_ids`: the LM's next-token logits of the label words at the last
    position (`logits_to_keep=1`: the vocabulary projection runs for one position only). Without: the
    sequence-classification head's logits (its last non-padding token is the last position here)."""
    if label_ids is None:
        return model(**batch, past_key_values=past_key_values).logits
    out = model(**batch, past_key_values=past_key_values, logits_to_keep=1, use_cache=past_key_values is not None)
    return out.logits[:, -1, label_ids]


# ----------------------------------------------------------------------------- prefix cache
class PrefixCache:
    """Key/value states of a shared prompt prefix (ICL demonstrations, CD teacher context), computed once."""

    def __init__(self, model, prefix_ids: list[int], device, dtype: str):
        self.length = len(prefix_ids)
        with torch.no_grad(), autocast(dtype, device):
            out = model(input_ids=torch.tensor([prefix_ids], device=device), use_cache=True)
        cache = out.past_key_values
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]

    def expand(self, batch_size: int):
        from transformers import DynamicCache
        # expand() is a view; the forward pass concatenates onto it, so the shared tensors are never written.
        return DynamicCache([(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)) for k, v in self.layers])


def supports_prefix_cache(model) -> bool:
    """Plain full-attention decoders only; sliding-window or recurrent layers fall back to full prompts."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return False
    return not getattr(cfg, "sliding_window", None)


# ----------------------------------------------------------------------------- scoring
@dataclass
class ScoreOutput:
    logits: np.ndarray   # [N, C]
    seconds: float
    tokens: int          # tokens run through the model (the prefix counted once)


def score(model, tokenizer, seqs: list[list[int]], label_ids: list[int] | None, device, dtype: str = "fp32",
          batch_size: int = 16, prefix_ids: list[int] | None = None, reuse_prefix: bool = True,
          progress=None) -> ScoreOutput:
    """Class logits for every sequence, optionally after a shared prefix (whose KV cache is reused).

    `seqs` are query token ids (from `encode`); with a prefix they must not start with BOS (the prefix has it).
    """
    model.eval()
    t0 = time.perf_counter()
    lengths = [len(s) for s in seqs]
    out = np.zeros((len(seqs), len(label_ids) if label_ids is not None else model.config.num_labels), dtype=np.float32)
    tokens = 0
    cache = None
    if prefix_ids and reuse_prefix and speedups_enabled() and supports_prefix_cache(model):
        cache = PrefixCache(model, prefix_ids, device, dtype)
        tokens += len(prefix_ids)
    with torch.no_grad(), autocast(dtype, device):
        for idx in length_batches(lengths, batch_size):
            batch_seqs = [seqs[i] for i in idx]
            if prefix_ids and cache is None:
                batch_seqs = [prefix_ids + s for s in batch_seqs]
            batch = collate(batch_seqs, tokenizer.pad_token_id, prefix_len=cache.length if cache else 0, device=device)
            past = cache.expand(len(idx)) if cache else None
            logits = class_logits(model, batch, label_ids, past_key_values=past)
            out[idx] = logits.float().cpu().numpy()
            tokens += sum(len(s) for s in batch_seqs)
            if progress is not None:
                progress.update(len(idx))
    return ScoreOutput(out, time.perf_counter() - t0, tokens)


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


def train(model, items: list, loss_fn, settings: TrainSettings, device, param_groups=None, pad_id: int = 0,
          progress: bool = True, step_hook=None) -> TrainResult:
    """The training loop: AdamW, linear warmup then linear decay, gradient accumulation and clipping.

    `items`: dicts with at least "ids" (token ids) and "label" (class id); methods may add more (teacher
    probabilities, cached hidden states). `loss_fn(model, batch_items, batch) -> (loss, class_logits)`.
    Seeded: the same seed gives the same batches, the same head initialisation and the same result on CPU.
    """
    from transformers import get_linear_schedule_with_warmup
    from tqdm.auto import tqdm

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
    model.train()
    t0 = time.perf_counter()
    tokens = seen = steps = 0
    epoch_losses, correct, counted = [], 0, 0
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
                batch = collate([it["ids"] for it in chunk], pad_id, device=device)
                with autocast(settings.dtype, device):
                    loss, logits = loss_fn(model, chunk, batch)
                # Each micro-batch's mean loss weighted by its share of the step: the gradient equals one big batch.
                (loss.float() * len(chunk) / len(step_idx)).backward()
                epoch_loss += float(loss.detach()) * len(chunk)
                epoch_n += len(chunk)
                labels = torch.tensor([it["label"] for it in chunk], device=logits.device)
                correct += int((logits.argmax(-1) == labels).sum())
                counted += len(chunk)
                tokens += int(batch["attention_mask"].sum())
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            steps += 1
            seen += len(step_idx)
            bar.update(1)
            bar.set_postfix(epoch=f"{epoch + 1}/{settings.epochs}", loss=f"{epoch_loss / max(epoch_n, 1):.4f}")
            if step_hook is not None:
                step_hook(steps, epoch_loss / max(epoch_n, 1))
        epoch_losses.append(epoch_loss / max(epoch_n, 1))
    bar.close()
    model.eval()
    if not all(math.isfinite(x) for x in epoch_losses):
        raise FewtuneError(f"Training diverged: the loss became {epoch_losses[-1]} (try a lower --lr or --dtype fp32).")
    return TrainResult(seconds=time.perf_counter() - t0, steps=steps, examples_seen=seen, tokens=tokens,
                       epoch_losses=epoch_losses, final_loss=epoch_losses[-1],
                       train_accuracy=correct / counted if counted else None)
