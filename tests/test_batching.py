"""Scoring batches sized by a token budget (what CUDA devices get): every example scored once, in length order, no
batch over the budget, and the same logits as fixed batches of 16."""

from __future__ import annotations

import random

import numpy as np
import torch

from fewtune.engine import batching, engine


def test_token_batches_cover_every_index_once_within_the_budget():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(2000)] + [5000]  # one longer than the budget
    batches = batching.token_batches(lengths, 4096, max_rows=100)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    for b in batches:
        assert len(b) <= 100
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 4096
    assert [5000] in [[lengths[i] for i in b] for b in batches]


def test_the_token_budget_is_for_cuda_when_no_batch_size_is_given():
    from fewtune.config import RunConfig
    assert batching.scoring_token_budget(torch.device("cuda"), None) == batching.CUDA_TOKEN_BUDGET
    assert batching.scoring_token_budget(torch.device("cuda"), 16) is None   # --eval-batch-size 16 asked: 16 rows
    assert batching.scoring_token_budget(torch.device("cuda"), 64) is None   # asked for a size: kept
    assert batching.scoring_token_budget(torch.device("cpu"), None) is None  # CPUs keep 16 rows
    assert RunConfig().scoring_rows == 16 and RunConfig(eval_batch_size=16).eval_batch_size == 16


def test_scoring_by_token_budget_gives_the_same_logits(tiny_lm, tokenizer):
    texts = [("a short one" if i % 3 else "a much longer sentence about nothing at all, " * (1 + i % 4)) + str(i)
             for i in range(40)]
    seqs, _ = batching.encode(tokenizer, texts, 64)
    label_ids = [tokenizer.encode(" No")[0], tokenizer.encode(" Yes")[0]]
    fixed = engine.score(tiny_lm, tokenizer, seqs, label_ids, torch.device("cpu"), "fp32", 16)
    budget = engine.score(tiny_lm, tokenizer, seqs, label_ids, torch.device("cpu"), "fp32", 16, token_budget=512)
    assert fixed.max_batch == 16 and budget.max_batch > 16
    np.testing.assert_allclose(fixed.logits, budget.logits, rtol=0, atol=1e-5)
    assert (fixed.logits.argmax(-1) == budget.logits.argmax(-1)).all()
