"""Scoring many queries after one shared prompt prefix (ICL demonstrations, CD's teacher context) without
recomputing it: the prefix's key/value cache (`PrefixCache`), and cascade attention that attends to the prefix
once per batch (`shared_prefix_attention`), registered with transformers' AttentionInterface."""

from __future__ import annotations

import contextlib
import math
import os

import torch

from .devices import autocast, speedups_enabled
from .models import text_config


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
    cfg = text_config(model)
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


def register_shared_prefix_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)
    # only used if a forward builds its own mask while the implementation is switched (ours passes a 4D mask)
    AttentionMaskInterface.register(SHARED_PREFIX_ATTENTION, sdpa_mask)


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
    cfg = text_config(model)
    if os.environ.get("FEWTUNE_SHARED_PREFIX", "") in ("0", "false", "no"):  # to measure what it buys
        return "prefix-cache"
    if getattr(cfg, "model_type", None) in SHARED_PREFIX_MODEL_TYPES and hasattr(cfg, "_attn_implementation"):
        return "shared-prefix"
    return "prefix-cache"


@contextlib.contextmanager
def attention_implementation(model, name: str):
    cfg = text_config(model)
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
