"""Token ids and batches: encoding texts (leading special tokens, left truncation), left-padded batches with
explicit position ids, length buckets, and packed (padding-free) batches.

Padding: left padding with explicit position ids, so the last position of every row is its last real
token and a padded batch scores like one example at a time (tests/test_engine.py checks this).
"""

from __future__ import annotations

import math

import torch


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


def scoring_token_budget(device, eval_batch_size: int | None) -> int | None:
    """The token budget of a scoring batch: on CUDA when eval_batch_size is not given (None); else None (fixed
    batches of rows: the number given, or 16 on a CPU, whose forward pass gains little past 16 rows). An explicit
    eval_batch_size, 16 included, is always a number of rows."""
    if getattr(device, "type", str(device)) == "cuda" and eval_batch_size is None:
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
