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
    """False when $FEWTUNE_NO_SPEEDUPS=1: no prefix KV reuse, no frozen-block cache, no fused optimizer, no packed
    batches, no eager training attention.

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


# Scoring on a GPU by a token budget instead of 16 rows: on an H200 the bundled model's plain forward runs 410 / 1,773 /
# 7,407 / 14,246 examples/s at batch 16 / 64 / 256 / 1,024 (40 tokens), and fewtune at --eval-batch-size 512 scored
# MNLI dev + HANS at 5,648 ex/s vs 180-270 at 16. 16,384 tokens = 512 rows of 32 tokens; at most 1,024 rows.
CUDA_TOKEN_BUDGET = 16_384
MAX_ROWS = 1_024


def scoring_token_budget(device, eval_batch_size: int, default_batch_size: int = 16) -> int | None:
    """The token budget of a scoring batch: on CUDA when eval_batch_size is left at its default; else None (fixed
    batches of eval_batch_size rows; CPUs keep them: their forward pass gains little past 16 rows)."""
    if getattr(device, "type", str(device)) == "cuda" and eval_batch_size == default_batch_size:
        return CUDA_TOKEN_BUDGET
    return None


def token_batches(lengths: list[int], max_tokens: int, max_rows: int = MAX_ROWS) -> list[list[int]]:
    """Indices in batches of similar length (longest first), each at most `max_tokens` padded tokens
    (rows x its longest sequence) and `max_rows` rows; a sequence longer than the budget is a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current, width = [], [], 0
    for i in order:
        w = max(width, lengths[i])
        if current and ((len(current) + 1) * w > max_tokens or len(current) >= max_rows):
            batches.append(current)
            current, w = [], lengths[i]
        current.append(i)
        width = w
    if current:
        batches.append(current)
    return batches


# ----------------------------------------------------------------------------- packed (padding-free) batches
# A training batch of sequences of different lengths, left-padded to the longest, spends the model's FLOPs on
# padding: the benchmark's MNLI pairs (11-126 tokens, batch 8) are 55 % real tokens. Packed, the batch's sequences
# are laid end to end in a few rows with `position_ids` restarting at 0 for each sequence and no attention mask:
# transformers (5.x, `masking_utils.find_packed_sequence_indices`) then builds a block-diagonal causal mask, so
# no token attends to another sequence's. The same logits, loss and gradients as the padded batch (within float
# tolerance; tests/test_engine.py), with fewer tokens through every matmul. Rows hold about PACK_ROW_TOKENS tokens
# (a longer sequence gets a row of its own): a row's [heads, W, W] attention scores are kept for the backward
# pass, and the attention between the sequences of one row is computed and then masked.
PACK_ROW_TOKENS = 256


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
    cfg = _text_config(model)
    if getattr(cfg, "model_type", None) not in SHARED_PREFIX_MODEL_TYPES or not supports_prefix_cache(model):
        return False
    if attention_dropout(cfg) > 0:
        return False
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return False
    base = _unwrapped(model)
    return hasattr(base, "lm_head") or isinstance(getattr(base, "score", None), torch.nn.Module)


def collate_packed(seqs: list[list[int]], pad_id: int, device=None, row_tokens: int = PACK_ROW_TOKENS) -> dict:
    """The sequences packed into ceil(total / row_tokens) rows (at least the longest sequence wide), longest first
    onto the least-filled row, right-padded to the fullest row. `position_ids` restart at 0 for every sequence
    (padding: 0 each, so every padding token is a sequence of its own); no `attention_mask` (transformers derives
    the block-diagonal mask from the positions). `packed_rows`/`packed_ends`: the row and last position of
    sequence i, in the order given."""
    lengths = [len(s) for s in seqs]
    n_rows = max(1, math.ceil(sum(lengths) / max(row_tokens, max(lengths))))
    fill = [0] * n_rows
    place = [None] * len(seqs)
    for i in sorted(range(len(seqs)), key=lambda i: -lengths[i]):
        r = min(range(n_rows), key=fill.__getitem__)
        place[i] = (r, fill[r])
        fill[r] += lengths[i]
    width = max(fill)
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n_rows, width), dtype=torch.long)
    for i, (r, start) in enumerate(place):
        n = lengths[i]
        ids[r, start:start + n] = torch.tensor(seqs[i], dtype=torch.long)
        positions[r, start:start + n] = torch.arange(n)
    batch = {"input_ids": ids, "position_ids": positions,
             "packed_rows": torch.tensor([r for r, _ in place]),
             "packed_ends": torch.tensor([start + n - 1 for (_, start), n in zip(place, lengths)])}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


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


# ----------------------------------------------------------------------------- prefix cache
class PrefixCache:
    """Key/value states of a shared prompt prefix (ICL demonstrations, CD teacher context), computed once."""

    def __init__(self, model, prefix_ids: list[int], device, dtype: str):
        self.length = len(prefix_ids)
        with torch.no_grad(), autocast(dtype, device):
            out = model(input_ids=torch.tensor([prefix_ids], device=device), use_cache=True)
        cache = out.past_key_values
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]
        self._prepared = {}

    def prepared(self, layer: int, dtype: torch.dtype):
        """Layer `layer`'s keys transposed ([KV, d, P], contiguous) and values with a column of ones appended and
        zero-padded to a multiple of 16 columns ([KV, P, d+16]), in `dtype`: the operands of the chunked prefix
        attention (`_prefix_attention_chunked`), built once per prefix and layer."""
        key = (layer, dtype)
        if key not in self._prepared:
            k, v = self.layers[layer]
            k, v = k[0].to(dtype), v[0].to(dtype)
            KV, P, d = v.shape
            width = (d // 16 + 1) * 16
            vaug = torch.zeros(KV, P, width, dtype=dtype, device=v.device)
            vaug[..., :d] = v
            vaug[..., d] = 1
            self._prepared[key] = (k.transpose(-1, -2).contiguous(), vaug)
        return self._prepared[key]

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


# ----------------------------------------------------------------------------- shared-prefix attention
# Cascade ("Hydragen", arXiv 2402.05099) attention for a batch of queries that all follow one cached prefix.
# The plain prefix cache expands the prefix's keys/values to the batch, concatenates the queries' onto them in
# every layer, and (on CPU, with a padding mask) sdpa repeats them per query head: each batch copies the whole
# prefix cache several times and runs attention over B x prefix. Here attention is split in two parts:
#   1. every query token of every row against the ONE prefix, per key/value head group: the B x g query heads
#      that share a key/value head are stacked into one matrix ([KV, B*g*Q, d] against [KV, P, d]), nothing is
#      copied per row or per head;
#   2. each row's queries against its own keys (causal, left padding), small;
# and merged exactly with their log-sum-exps: softmax over [prefix | own keys] = the two partial softmaxes
# weighted by exp(lse_part - lse_total).
SHARED_PREFIX_ATTENTION = "fewtune_shared_prefix"
# Decoders whose attention modules apply rotary positions from `position_ids` and call the registered attention
# function with (query, key, value, mask) of the new tokens only; checked by tests/test_engine.py.
SHARED_PREFIX_MODEL_TYPES = ("llama", "mistral", "qwen2")


# Elements of one block of prefix scores ([KV, rows, P] bf16, ~2.4 MB): small enough to stay in cache between the
# score matmul, the exponential and the value matmul (the unblocked scores of a batch of 16 MNLI queries after 32
# demonstrations, ~17 MB, do not, and ran slower than the fused kernel). Measured on a 2-core AMD EPYC (1 MB L2
# per core, 32 MB L3): of 0.3M, 0.6M and 1.2M elements, 1.2M was fastest at 1,467- and 5,812-token prefixes.
_PREFIX_BLOCK_ELEMENTS = 1_200_000
# Below this softmax denominator (a row whose largest score is under -60) terms may have underflowed: the block
# is redone with the row max subtracted.
_MIN_DENOMINATOR = math.exp(-60)


def _prefix_attention_chunked(query, kt, vaug, scale):
    """Attention of query [KV, M, d] (bf16) to one prefix, in row blocks: scores as one bf16 matmul per block
    ([KV, C, d] x [KV, d, P]), exponentiated in place, then one matmul with the values
    and a column of ones ([KV, P, d+16] from `PrefixCache.prepared`), which yields the weighted values and the
    softmax's denominator together (no separate sum pass). Returns out [KV, M, d] fp32 and lse [KV, M] fp32.

    Why not the fused kernel: on CPU, `_scaled_dot_product_flash_attention_for_cpu` runs at ~90 GFLOP/s-equivalent
    at these shapes (fp32 or bf16); the two bf16 matmuls here run near the bf16 peak and the exponential over a
    cache-resident block costs about as much again: ~2x faster in all (docs/speed.md). The scores are rounded to bf16 before the
    softmax, as in transformers' eager attention under bf16 autocast (the fused kernel keeps them in fp32); fp32
    inputs keep the fused kernel, whose scores match the full prompt to ~1e-5."""
    KV, M, d = query.shape
    P = kt.shape[-1]
    rows = max(16, _PREFIX_BLOCK_ELEMENTS // (KV * P))
    qs = query * scale
    out = torch.empty(KV, M, d, dtype=torch.float32, device=query.device)
    lse = torch.empty(KV, M, dtype=torch.float32, device=query.device)
    for i in range(0, M, rows):
        s = torch.matmul(qs[:, i:i + rows], kt)
        # exp(s) without subtracting the row max first: a language model's attention scores are far inside
        # bf16's range (|s| < ~30; exp overflows above ~88), which saves two passes over the block and a second
        # rounding of the scores. The rare block where that is not so (a sum that overflowed, or so small that
        # terms underflowed) is redone with the max subtracted.
        o = torch.matmul(s.exp_(), vaug).float()
        den = o[..., d:d + 1]
        if not (torch.isfinite(o).all() and bool((den > _MIN_DENOMINATOR).all())):
            s = torch.matmul(qs[:, i:i + rows], kt)
            m = s.amax(-1, keepdim=True)
            o = torch.matmul(s.sub_(m).exp_(), vaug).float()
            den = o[..., d:d + 1]
            lse[:, i:i + rows] = (m.float() + den.log()).squeeze(-1)
        else:
            lse[:, i:i + rows] = den.log().squeeze(-1)
        torch.div(o[..., :d], den, out=out[:, i:i + rows])
    return out, lse


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on `t` run in: autocast's when it is on for t's device, else t's own."""
    kind = t.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return t.dtype


def _attend_with_lse(query, key, value, scale, mask=None):
    """Attention output and the log-sum-exp of each query's scores; query [N, KV, M, d] against key/value
    [N, KV, S, d] (the same key/value head for all M query rows); mask [N, 1, M, S] bool, True = attend."""
    if mask is None and query.device.type == "cpu" and query.dtype in (torch.float32, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False, scale=scale)
        return out.float(), lse
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse.unsqueeze(-1)).to(value.dtype), value).float(), lse


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            shared_prefix=None, **kwargs):
    """The attention function registered as `SHARED_PREFIX_ATTENTION` (transformers' AttentionInterface).

    query [B, H, Q, d]; key/value [B, KV, Q, d] of the queries only; attention_mask [B, 1, Q, Q] bool (from
    `score`: `query_mask`, left padding); `shared_prefix` the PrefixCache whose layer `module.layer_idx` holds
    keys/values [1, KV, P, d]. Padding positions are left out of the prefix attention.
    Returns [B, Q, H, d] like transformers' sdpa function.
    """
    if shared_prefix is None:  # a forward that is not ours while the implementation is switched
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    pk, pv = shared_prefix.layers[module.layer_idx]
    B, H, Q, d = query.shape
    KV = key.shape[1]
    g = H // KV
    scale = scaling if scaling is not None else d ** -0.5
    dtype = query.dtype
    # the real (not padding) query positions: the last position is real and sees every real key of its row
    valid = attention_mask[:, 0, -1, :]                        # [B, Q]
    # 1. the real query tokens of all rows against the shared prefix, per key/value head:
    #    [1, KV, Nv*g, d] against [1, KV, P, d]; query head h uses key/value head h // g
    rows = query.transpose(1, 2)[valid]                        # [Nv, H, d]
    nv = rows.shape[0]
    q_shared = rows.reshape(nv, KV, g, d).transpose(0, 1).reshape(1, KV, nv * g, d)
    if query.device.type == "cpu" and _compute_dtype(query) == torch.bfloat16 and nv:
        # under bf16 autocast the queries arrive in fp32 (the rotary embedding's fp32 cos/sin upcast them)
        kt, vaug = shared_prefix.prepared(module.layer_idx, torch.bfloat16)
        o1, lse1 = _prefix_attention_chunked(q_shared[0].to(torch.bfloat16), kt, vaug, scale)
    else:
        o1, lse1 = _attend_with_lse(q_shared, pk.to(dtype), pv.to(dtype), scale)
    o1 = o1.reshape(KV, nv, g, d).transpose(0, 1).reshape(nv, H, d)
    lse1 = lse1.reshape(KV, nv, g).transpose(0, 1).reshape(nv, H)
    # 2. each row's queries against its own keys; the [B, 1, Q, Q] mask repeated over the g heads of a group
    mask = attention_mask[:, :, None].expand(B, 1, g, Q, Q).reshape(B, 1, g * Q, Q)
    o2, lse2 = _attend_with_lse(query.reshape(B, KV, g * Q, d), key, value, scale, mask)
    o2 = o2.reshape(B, KV, g, Q, d).permute(0, 3, 1, 2, 4).reshape(B, Q, H, d)
    lse2 = lse2.reshape(B, KV, g, Q).permute(0, 3, 1, 2).reshape(B, Q, H)
    # 3. exact merge at the real positions (padding positions keep their own-key output: never used)
    o2v, lse2v = o2[valid], lse2[valid]
    lse = torch.logaddexp(lse1, lse2v)
    o2[valid] = o1 * torch.exp(lse1 - lse).unsqueeze(-1) + o2v * torch.exp(lse2v - lse).unsqueeze(-1)
    return o2.to(dtype), None


def _register_shared_prefix_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)
    # only used if a forward builds its own mask while the implementation is switched (ours passes a 4D mask)
    AttentionMaskInterface.register(SHARED_PREFIX_ATTENTION, sdpa_mask)


def _text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def shared_prefix_path(model) -> str:
    """Which path `score` takes for queries after a shared prefix on this model:

    'shared-prefix' (cascade attention, the prefix attended once per batch), 'prefix-cache' (the prefix's KV cache
    expanded to the batch: models outside `SHARED_PREFIX_MODEL_TYPES`, e.g. GPT-2's learned absolute positions),
    or 'full-prompt' (no reuse: sliding-window or recurrent layers such as Gemma-3's, or $FEWTUNE_NO_SPEEDUPS=1).
    $FEWTUNE_SHARED_PREFIX=0 keeps the prefix cache but not the cascade attention.
    Recorded in a run's method_info as `prefix_path`.
    """
    if not speedups_enabled() or not supports_prefix_cache(model):
        return "full-prompt"
    cfg = _text_config(model)
    if os.environ.get("FEWTUNE_SHARED_PREFIX", "") in ("0", "false", "no"):  # to measure what it buys
        return "prefix-cache"
    if getattr(cfg, "model_type", None) in SHARED_PREFIX_MODEL_TYPES and hasattr(cfg, "_attn_implementation"):
        return "shared-prefix"
    return "prefix-cache"


@contextlib.contextmanager
def _attention_implementation(model, name: str):
    cfg = _text_config(model)
    before = cfg._attn_implementation
    cfg._attn_implementation = name
    try:
        yield
    finally:
        cfg._attn_implementation = before


def query_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, Q, Q] bool: causal among a row's own (left-padded) tokens. A padding position attends to itself
    only, so no row of scores is empty (its output is never used: real tokens do not attend to padding)."""
    Q = attention_mask.shape[1]
    causal = torch.ones(Q, Q, dtype=torch.bool, device=attention_mask.device).tril()
    eye = torch.eye(Q, dtype=torch.bool, device=attention_mask.device)
    return ((causal & attention_mask.bool()[:, None, None, :]) | eye)


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
        _register_shared_prefix_attention()
        switch = _attention_implementation(model, SHARED_PREFIX_ATTENTION)
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
    cfg = _text_config(model)
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
                switch = _attention_implementation(model, attn) if attn else contextlib.nullcontext()
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
