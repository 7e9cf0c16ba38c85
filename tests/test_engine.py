"""The shared scorer and training loop, on tiny random Llamas around the real tokenizer (no files)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SHARP, make_tiny_classifier, make_tiny_lm, toy_rows

from fewtune.engine import batching, devices, engine, prefix_attention
from fewtune.errors import FewtuneError

CPU = torch.device("cpu")
# Lengths from 3 to ~40 tokens, so a batch of 8 is mostly padding for its short rows.
TEXTS = ["Yes.", "The cat sat on the mat, and then it slept for a very long time in the afternoon sun.",
         "Is this grammatical? Answer:", "Colorless green ideas sleep furiously.", "A", "Question: who? Answer:",
         *[text for text, _ in toy_rows(6)],
         "The president advised the doctor because the doctor had asked the president for advice about a law."]
WORDS = [" Yes", " No", " True", " False", " maybe"]


def word_ids(tokenizer):
    ids = [tokenizer(w, add_special_tokens=False).input_ids for w in WORDS]
    assert all(len(i) == 1 for i in ids)
    return [i[0] for i in ids]


def plain_last_logits(model, seq, label_ids=None):
    """One example, no padding, no attention mask, no position ids: the reference forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits
    return (logits[0, -1, label_ids] if label_ids is not None else logits[0]).numpy()


# ----------------------------------------------------------------------------- scoring
# llama: the bundled model's architecture (RoPE); gpt2: learned absolute positions, where left padding
# without the right position ids changes the outputs.
ARCHS = ["llama", "gpt2"]


@pytest.fixture(scope="module", params=ARCHS)
def lm(request, tokenizer):
    return make_tiny_lm(tokenizer, arch=request.param, **SHARP)


def test_padded_batch_scores_like_one_at_a_time(lm, tokenizer):
    seqs, _ = batching.encode(tokenizer, TEXTS)
    assert len({len(s) for s in seqs}) > 5  # really padded
    label_ids = word_ids(tokenizer)
    batched = engine.score(lm, tokenizer, seqs, label_ids, CPU, "fp32", batch_size=8)
    single = engine.score(lm, tokenizer, seqs, label_ids, CPU, "fp32", batch_size=1)
    assert batched.logits.shape == (len(TEXTS), len(WORDS))
    assert np.abs(batched.logits - single.logits).max() <= 1e-4
    assert np.abs(batched.logits).max() > 0.1


def test_label_word_scores_equal_a_plain_forward_pass(lm, tokenizer):
    seqs, _ = batching.encode(tokenizer, TEXTS)
    label_ids = word_ids(tokenizer)
    got = engine.score(lm, tokenizer, seqs, label_ids, CPU, "fp32", batch_size=8).logits
    want = np.stack([plain_last_logits(lm, s, label_ids) for s in seqs])
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_classifier_head_padded_batch_scores_like_a_plain_forward_pass(tokenizer, arch):
    model = make_tiny_classifier(tokenizer, arch=arch, **SHARP)
    seqs, _ = batching.encode(tokenizer, TEXTS)
    batched = engine.score(model, tokenizer, seqs, None, CPU, "fp32", batch_size=8).logits
    single = engine.score(model, tokenizer, seqs, None, CPU, "fp32", batch_size=1).logits
    want = np.stack([plain_last_logits(model, s) for s in seqs])
    assert batched.shape == (len(TEXTS), 2)
    assert np.abs(batched - single).max() <= 1e-4
    assert np.abs(batched - want).max() <= 1e-4


def test_prefix_cache_scores_like_the_full_prompt(lm, tokenizer):
    assert prefix_attention.supports_prefix_cache(lm)
    prefix = "".join(f"{t}\nAnswer: {' Yes' if i % 2 else ' No'}\n\n" for i, t in enumerate(TEXTS[:4]))
    prefix_ids = batching.encode(tokenizer, [prefix])[0][0]
    queries, _ = batching.encode(tokenizer, TEXTS, with_bos=False)
    label_ids = word_ids(tokenizer)
    cached = engine.score(lm, tokenizer, queries, label_ids, CPU, "fp32", 8, prefix_ids=prefix_ids, reuse_prefix=True)
    full = engine.score(lm, tokenizer, queries, label_ids, CPU, "fp32", 8, prefix_ids=prefix_ids, reuse_prefix=False)
    assert cached.tokens < full.tokens  # the cache was really used: the prefix ran once
    assert np.abs(cached.logits - full.logits).max() <= 1e-3
    assert (cached.logits.argmax(-1) == full.logits.argmax(-1)).all()
    want = np.stack([plain_last_logits(lm, prefix_ids + q, label_ids) for q in queries])
    assert np.abs(full.logits - want).max() <= 1e-4
    alone = engine.score(lm, tokenizer, batching.encode(tokenizer, TEXTS)[0], label_ids, CPU, "fp32", 8).logits
    assert np.abs(alone - full.logits).max() > 1e-2  # the prefix matters, so the comparison above means something


def test_prefix_cache_is_not_modified_by_scoring(tiny_lm, tokenizer):
    prefix_ids = batching.encode(tokenizer, ["Some shared context.\n\n"])[0][0]
    cache = prefix_attention.PrefixCache(tiny_lm, prefix_ids, CPU, "fp32")
    before = [(k.clone(), v.clone()) for k, v in cache.layers]
    batch = batching.collate([[5, 6, 7], [8, 9]], tokenizer.pad_token_id, prefix_len=cache.length)
    with torch.no_grad():
        engine.class_logits(tiny_lm, batch, [1, 2], past_key_values=cache.expand(2))
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(cache.layers, before))


def test_bf16_autocast_stays_close_to_fp32(tiny_lm, tokenizer):
    seqs, _ = batching.encode(tokenizer, TEXTS[:6])
    label_ids = word_ids(tokenizer)
    fp32 = engine.score(tiny_lm, tokenizer, seqs, label_ids, CPU, "fp32", 8).logits
    bf16 = engine.score(tiny_lm, tokenizer, seqs, label_ids, CPU, "bf16", 8).logits
    assert np.abs(fp32 - bf16).max() < 0.1 * max(1.0, np.abs(fp32).max())
    assert all(p.dtype == torch.float32 for p in tiny_lm.parameters())  # autocast never casts the weights


# ----------------------------------------------------------------------------- encoding and batches
def test_collate_left_pads_with_positions_from_the_first_real_token():
    batch = batching.collate([[11, 12, 13], [21]], pad_id=0)
    assert batch["input_ids"].tolist() == [[11, 12, 13], [0, 0, 21]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    with_prefix = batching.collate([[11, 12, 13], [21]], pad_id=0, prefix_len=4)
    assert with_prefix["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 1, 0, 0, 1]]
    assert with_prefix["position_ids"].tolist() == [[4, 5, 6], [4, 4, 4]]


def test_encode_truncates_from_the_left_and_adds_no_eos(tokenizer):
    text = "one two three four five six seven eight nine ten eleven twelve"
    full = batching.encode(tokenizer, [text])[0][0]
    (cut,), truncated = batching.encode(tokenizer, [text], max_length=5)
    assert truncated == 1 and len(cut) == 5 and cut == full[-5:]  # the end (the answer slot) is kept
    assert tokenizer.eos_token_id not in full
    assert batching.encode(tokenizer, [text], max_length=500)[1] == 0


def test_length_batches_cover_every_index_once():
    lengths = [5, 1, 9, 3, 3, 7, 2]
    batches = batching.length_batches(lengths, 3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) <= 3 for b in batches)
    assert [lengths[i] for i in batches[0]] == [9, 7, 5]


def test_leading_special_ids_of_smollm2_is_empty(tokenizer):
    assert batching.leading_special_ids(tokenizer) == []


# ----------------------------------------------------------------------------- training
def _items(tokenizer, n=8):
    rows = toy_rows(n)
    seqs, _ = batching.encode(tokenizer, [t for t, _ in rows])
    return [{"ids": s, "label": int(y)} for s, (_, y) in zip(seqs, rows)]


def _lm_loss(label_ids):
    def loss_fn(model, chunk, batch):
        logits = engine.class_logits(model, batch, label_ids)
        labels = torch.tensor([it["label"] for it in chunk])
        return torch.nn.functional.cross_entropy(logits.float(), labels), logits
    return loss_fn


def test_micro_batches_give_the_same_update_as_one_batch(tokenizer):
    """Gradient accumulation: 4 micro-batches of 2 then one step == one step on the batch of 8."""
    label_ids = word_ids(tokenizer)[:2]
    weights = []
    for micro in (None, 2):
        model = make_tiny_lm(tokenizer, seed=1)
        settings = engine.TrainSettings(epochs=2, batch_size=8, lr=1e-3, warmup_ratio=0.0, micro_batch_size=micro)
        result = engine.train(model, _items(tokenizer), _lm_loss(label_ids), settings, CPU, pad_id=tokenizer.pad_token_id, progress=False)
        assert result.steps == 2 and result.examples_seen == 16
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    start = dict(make_tiny_lm(tokenizer, seed=1).named_parameters())
    assert any(not torch.equal(weights[0][n], start[n]) for n in start)
    assert max(float((weights[0][n] - weights[1][n]).abs().max()) for n in start) <= 1e-5


def test_train_leaves_frozen_parameters_alone_and_returns_eval_mode(tokenizer):
    model = make_tiny_lm(tokenizer, seed=2)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("model.layers.3."))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = engine.TrainSettings(epochs=3, batch_size=4, lr=1e-3, warmup_ratio=0.0)
    out = engine.train(model, _items(tokenizer), _lm_loss(word_ids(tokenizer)[:2]), settings, CPU,
                       pad_id=tokenizer.pad_token_id, progress=False)
    assert not model.training and out.steps == 6 and len(out.epoch_losses) == 3
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name


def test_train_refuses_nothing_to_train(tokenizer):
    model = make_tiny_lm(tokenizer)
    settings = engine.TrainSettings(epochs=1, batch_size=4, lr=1e-3)
    with pytest.raises(FewtuneError, match="empty"):
        engine.train(model, [], _lm_loss([1, 2]), settings, CPU, progress=False)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(FewtuneError, match="no trainable parameter"):
        engine.train(model, _items(tokenizer, 2), _lm_loss([1, 2]), settings, CPU, progress=False)


# ----------------------------------------------------------------------------- device and precision
def test_dtype_auto_is_bf16_only_where_the_cpu_runs_it_fast():
    assert devices.resolve_dtype("auto", CPU) == ("bf16" if devices.cpu_has_bf16() else "fp32")
    assert devices.resolve_dtype("fp32", CPU) == "fp32"


def test_bad_device_is_a_fewtune_error():
    assert devices.pick_device("cpu") == CPU
    with pytest.raises(FewtuneError, match="not a device"):
        devices.pick_device("gpu0")


def test_fused_optimizer_trains_like_the_plain_one(tokenizer, monkeypatch):
    """$FEWTUNE_NO_SPEEDUPS switches the fused AdamW off; both give the same weights within float tolerance."""
    label_ids = word_ids(tokenizer)[:2]
    weights = []
    for off in ("", "1"):
        monkeypatch.setenv("FEWTUNE_NO_SPEEDUPS", off)
        assert devices.speedups_enabled() == (off == "")
        model = make_tiny_lm(tokenizer, seed=3)
        settings = engine.TrainSettings(epochs=2, batch_size=4, lr=1e-3, warmup_ratio=0.0)
        engine.train(model, _items(tokenizer), _lm_loss(label_ids), settings, CPU, pad_id=tokenizer.pad_token_id, progress=False)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    start = dict(make_tiny_lm(tokenizer, seed=3).named_parameters())
    assert any(not torch.equal(weights[0][n], start[n]) for n in start)
    assert max(float((weights[0][n] - weights[1][n]).abs().max()) for n in start) <= 1e-5


def test_no_speedups_scores_the_full_prompt(tiny_lm, tokenizer, monkeypatch):
    prefix_ids = batching.encode(tokenizer, ["Some shared context.\n\n"])[0][0]
    queries, _ = batching.encode(tokenizer, TEXTS, with_bos=False)
    on = engine.score(tiny_lm, tokenizer, queries, [1, 2], CPU, "fp32", 8, prefix_ids=prefix_ids)
    monkeypatch.setenv("FEWTUNE_NO_SPEEDUPS", "1")
    off = engine.score(tiny_lm, tokenizer, queries, [1, 2], CPU, "fp32", 8, prefix_ids=prefix_ids)
    assert off.tokens == on.tokens + len(prefix_ids) * (len(queries) - 1)  # the prefix ran with every query
    assert np.abs(on.logits - off.logits).max() <= 1e-3


# ----------------------------------------------------------------------------- shared-prefix attention
def _other_rope_lm(tokenizer, arch):
    """Tiny Qwen2 / Mistral decoders (the other model types the shared-prefix path accepts)."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
    kw = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
              initializer_range=0.2)
    torch.manual_seed(0)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kw)).eval()
    return MistralForCausalLM(MistralConfig(sliding_window=None, **kw)).eval()


def _icl_inputs(tokenizer):
    prefix = "".join(f"{t}\nAnswer: {' Yes' if i % 2 else ' No'}\n\n" for i, t in enumerate(TEXTS[:5]))
    return batching.encode(tokenizer, [prefix])[0][0], batching.encode(tokenizer, TEXTS, with_bos=False)[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_shared_prefix_attention_scores_like_the_full_prompt(tokenizer, arch, monkeypatch):
    model = make_tiny_lm(tokenizer, **SHARP) if arch == "llama" else _other_rope_lm(tokenizer, arch)
    assert model.config.num_attention_heads > model.config.num_key_value_heads  # grouped-query attention
    assert prefix_attention.shared_prefix_path(model) == "shared-prefix"
    calls = []
    real = prefix_attention.shared_prefix_attention
    monkeypatch.setattr(prefix_attention, "shared_prefix_attention", lambda *a, **k: calls.append(a[0].layer_idx) or real(*a, **k))
    prefix_ids, queries = _icl_inputs(tokenizer)
    label_ids = word_ids(tokenizer)
    kind = model.config._attn_implementation
    shared = engine.score(model, tokenizer, queries, label_ids, CPU, "fp32", 8, prefix_ids=prefix_ids)
    assert shared.path == "shared-prefix" and calls  # the cascade attention really ran, in every layer
    assert set(calls) == set(range(model.config.num_hidden_layers))
    assert model.config._attn_implementation == kind  # switched back after scoring
    expand = engine.score(model, tokenizer, queries, label_ids, CPU, "fp32", 8, prefix_ids=prefix_ids, shared_prefix=False)
    full = engine.score(model, tokenizer, queries, label_ids, CPU, "fp32", 8, prefix_ids=prefix_ids, reuse_prefix=False)
    assert (expand.path, full.path) == ("prefix-cache", "full-prompt")
    assert shared.tokens == expand.tokens < full.tokens
    assert np.abs(shared.logits - full.logits).max() <= 1e-4
    assert np.abs(shared.logits - expand.logits).max() <= 1e-4
    assert (shared.logits.argmax(-1) == full.logits.argmax(-1)).all()
    one_by_one = engine.score(model, tokenizer, queries, label_ids, CPU, "fp32", 1, prefix_ids=prefix_ids)
    assert np.abs(one_by_one.logits - shared.logits).max() <= 1e-4  # padding in a batch changes nothing
    alone = engine.score(model, tokenizer, batching.encode(tokenizer, TEXTS)[0], label_ids, CPU, "fp32", 8).logits
    assert np.abs(alone - full.logits).max() > 1e-2  # the prefix matters, so the comparisons above mean something
    bf16 = engine.score(model, tokenizer, queries, label_ids, CPU, "bf16", 8, prefix_ids=prefix_ids)
    assert np.abs(bf16.logits - full.logits).max() < 0.1 * max(1.0, np.abs(full.logits).max())


def test_prefix_store_computes_the_prefix_once_across_calls(tokenizer, monkeypatch):
    """With a prefix_store, a second call (another evaluation split) reuses the first call's KV cache: one
    PrefixCache built, the same scores as without the store, the prefix counted once."""
    model = make_tiny_lm(tokenizer, **SHARP)
    prefix_ids, queries = _icl_inputs(tokenizer)
    label_ids = word_ids(tokenizer)
    built = []
    real = engine.PrefixCache
    monkeypatch.setattr(engine, "PrefixCache", lambda *a: built.append(1) or real(*a))
    store = {}
    first = engine.score(model, tokenizer, queries[:6], label_ids, CPU, "fp32", 4, prefix_ids=prefix_ids, prefix_store=store)
    second = engine.score(model, tokenizer, queries[6:], label_ids, CPU, "fp32", 4, prefix_ids=prefix_ids, prefix_store=store)
    assert len(built) == 1 and len(store) == 1 and second.prefix_seconds < first.prefix_seconds
    assert first.tokens == len(prefix_ids) + sum(map(len, queries[:6])) and second.tokens == sum(map(len, queries[6:]))
    alone = engine.score(model, tokenizer, queries[6:], label_ids, CPU, "fp32", 4, prefix_ids=prefix_ids)
    assert len(built) == 2 and np.abs(alone.logits - second.logits).max() <= 1e-6
    engine.score(model, tokenizer, queries[:2], label_ids, CPU, "bf16", 4, prefix_ids=prefix_ids, prefix_store=store)
    assert len(built) == 3 and len(store) == 2  # another dtype: another cache


def test_shared_prefix_attention_merges_exactly():
    """The log-sum-exp merge of prefix and own-key attention equals one softmax over both, with GQA and padding."""
    torch.manual_seed(0)
    B, KV, g, Q, P, d = 3, 2, 3, 5, 7, 8
    module = type("M", (), {"layer_idx": 0})()
    pk, pv = torch.randn(1, KV, P, d), torch.randn(1, KV, P, d)
    q, k, v = torch.randn(B, KV * g, Q, d), torch.randn(B, KV, Q, d), torch.randn(B, KV, Q, d)
    pad = torch.tensor([[1] * Q, [0, 0, 1, 1, 1], [0] * (Q - 1) + [1]])
    mask = prefix_attention.query_mask(pad)
    prefix = type("C", (), {"layers": [(pk, pv)]})()
    got, _ = prefix_attention.shared_prefix_attention(module, q, k, v, mask, scaling=d ** -0.5, shared_prefix=prefix)
    keys = torch.cat([pk.expand(B, -1, -1, -1), k], 2).repeat_interleave(g, 1)
    values = torch.cat([pv.expand(B, -1, -1, -1), v], 2).repeat_interleave(g, 1)
    full_mask = torch.cat([torch.ones(B, 1, Q, P, dtype=torch.bool), mask], -1)
    want = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=full_mask).transpose(1, 2)
    real = pad.bool()[:, :, None, None].expand_as(want)  # padding positions' outputs are never used
    assert got.shape == want.shape
    assert (got - want)[real].abs().max() <= 1e-5


def _bf16_reference(q, k, v, scale):
    """Attention with the scores rounded to bf16 as the chunked kernel's score matmul rounds them, then an exact
    float64 softmax: what `_prefix_attention_chunked` computes up to the rounding of exp and of its outputs."""
    s = torch.matmul(q * scale, k.transpose(-1, -2)).double()  # bf16 inputs, bf16 scores
    lse = torch.logsumexp(s, -1)
    return torch.matmul(torch.exp(s - lse[..., None]), v.double()), lse


def _chunk_operands(k, v):
    cache = prefix_attention.PrefixCache.__new__(prefix_attention.PrefixCache)
    cache.layers, cache._prepared = [(k[None], v[None])], {}
    return cache.prepared(0, torch.bfloat16)


@pytest.mark.parametrize("q_scale", [1.0, 3.0, 40.0, -40.0])
def test_chunked_prefix_attention_is_the_softmax_of_its_bf16_scores(monkeypatch, q_scale):
    """bf16 prefix attention in row blocks: outputs and log-sum-exps equal an exact softmax over the same bf16
    scores, in several blocks; scores beyond exp's range (q_scale 40: |s| ~ 200) and rows whose every score is
    below -60 (q_scale -40) take the max-subtracting branch and stay finite and exact."""
    monkeypatch.setattr(prefix_attention, "_PREFIX_BLOCK_ELEMENTS", 2 * 37 * 16 * 3)  # blocks of 32 rows: 5 blocks + a partial one
    torch.manual_seed(0)
    KV, M, P, d = 2, 170, 37, 16
    q, k, v = torch.randn(KV, M, d) * abs(q_scale), torch.randn(KV, P, d), torch.randn(KV, P, d)
    if q_scale < 0:  # every score very negative
        q, k = q.abs(), -k.abs()
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    scale = d ** -0.5
    s_max = float(torch.matmul(q.float() * scale, k.float().transpose(-1, -2)).abs().max())
    assert (s_max > 100) == (abs(q_scale) == 40)
    out, lse = prefix_attention._prefix_attention_chunked(q, *_chunk_operands(k, v), scale)
    want, want_lse = _bf16_reference(q, k, v, scale)
    assert out.dtype == lse.dtype == torch.float32 and out.shape == (KV, M, d) and lse.shape == (KV, M)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert (out.double() - want).abs().max() <= 0.02 * max(1.0, float(want.abs().max()))
    assert (lse.double() - want_lse).abs().max() <= 0.02 * max(1.0, float(want_lse.abs().max()))


def test_bf16_shared_prefix_scoring_runs_the_chunked_kernel(tokenizer, monkeypatch):
    """Under bf16 autocast the prefix attention goes through `_prefix_attention_chunked` in every layer (the
    queries arrive in fp32 from the rotary embedding and are cast); fp32 scoring keeps the fused kernel."""
    model = make_tiny_lm(tokenizer, **SHARP)
    calls = []
    real = prefix_attention._prefix_attention_chunked
    monkeypatch.setattr(prefix_attention, "_prefix_attention_chunked", lambda q, *a: calls.append(q.dtype) or real(q, *a))
    prefix_ids, queries = _icl_inputs(tokenizer)
    label_ids = word_ids(tokenizer)
    full = engine.score(model, tokenizer, queries, label_ids, CPU, "bf16", 8, prefix_ids=prefix_ids, reuse_prefix=False)
    assert not calls
    engine.score(model, tokenizer, queries, label_ids, CPU, "fp32", 8, prefix_ids=prefix_ids)
    assert not calls
    got = engine.score(model, tokenizer, queries, label_ids, CPU, "bf16", 8, prefix_ids=prefix_ids)
    assert len(calls) == model.config.num_hidden_layers * 2 and set(calls) == {torch.bfloat16}  # 2 batches
    assert (got.logits.argmax(-1) == full.logits.argmax(-1)).mean() >= 0.9
    assert np.abs(got.logits - full.logits).max() < 0.1 * max(1.0, np.abs(full.logits).max())


def test_shared_prefix_falls_back_where_the_model_is_not_supported(tokenizer, monkeypatch):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(0)
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4, pad_token_id=tokenizer.pad_token_id)).eval()
    gpt2 = make_tiny_lm(tokenizer, arch="gpt2", **SHARP)
    assert prefix_attention.shared_prefix_path(gemma) == "full-prompt"      # sliding-window layers: no reuse at all
    assert prefix_attention.shared_prefix_path(gpt2) == "prefix-cache"      # learned absolute positions: today's cache
    prefix_ids, queries = _icl_inputs(tokenizer)
    label_ids = word_ids(tokenizer)
    for model, path in [(gemma, "full-prompt"), (gpt2, "prefix-cache")]:
        got = engine.score(model, tokenizer, queries[:6], label_ids, CPU, "fp32", 4, prefix_ids=prefix_ids)
        full = engine.score(model, tokenizer, queries[:6], label_ids, CPU, "fp32", 4, prefix_ids=prefix_ids, reuse_prefix=False)
        assert got.path == path
        assert np.abs(got.logits - full.logits).max() <= 1e-4
    llama = make_tiny_lm(tokenizer, **SHARP)
    monkeypatch.setenv("FEWTUNE_NO_SPEEDUPS", "1")
    assert prefix_attention.shared_prefix_path(llama) == "full-prompt"


def test_eager_training_attention_trains_like_sdpa(tokenizer, monkeypatch):
    """Short training batches use eager attention on CPU: the same weights as sdpa within float tolerance."""
    label_ids = word_ids(tokenizer)[:2]
    used = []
    real = engine.training_attention
    monkeypatch.setattr(engine, "training_attention", lambda *a, **k: used.append(real(*a, **k)) or used[-1])
    weights = []
    for max_len in (128, 0):
        monkeypatch.setattr(engine, "EAGER_TRAINING_ATTENTION_MAX_LEN", max_len)
        model = make_tiny_lm(tokenizer, seed=5, **SHARP)
        model.config._attn_implementation = "sdpa"
        settings = engine.TrainSettings(epochs=2, batch_size=4, lr=1e-3, warmup_ratio=0.0)
        engine.train(model, _items(tokenizer), _lm_loss(label_ids), settings, CPU, pad_id=tokenizer.pad_token_id, progress=False)
        assert model.config._attn_implementation == "sdpa"  # switched back after each batch
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert used[:4] == ["eager"] * 4 and used[4:] == [None] * 4
    start = dict(make_tiny_lm(tokenizer, seed=5, **SHARP).named_parameters())
    assert any(not torch.equal(weights[0][n], start[n]) for n in start)
    assert max(float((weights[0][n] - weights[1][n]).abs().max()) for n in start) <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_eager_attention_gives_sdpa_loss_and_gradients(tokenizer, arch):
    """One padded batch: loss and gradients with eager attention equal sdpa's (GPT-2 without attention dropout).
    (Over several AdamW steps GPT-2's tiny float differences grow: Adam turns near-zero gradients into lr-sized steps.)"""
    label_ids = word_ids(tokenizer)[:2]
    batch = batching.collate([it["ids"] for it in _items(tokenizer)], tokenizer.pad_token_id)
    chunk = _items(tokenizer)
    grads = []
    for attn in ("eager", "sdpa"):
        model = make_tiny_lm(tokenizer, seed=6, arch=arch, **SHARP, **({"attn_pdrop": 0.0} if arch == "gpt2" else {}))
        model.config._attn_implementation = "sdpa"
        model.train()
        torch.manual_seed(0)
        with prefix_attention.attention_implementation(model, attn):
            loss, _ = _lm_loss(label_ids)(model, chunk, batch)
        loss.backward()
        grads.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert abs(grads[0][0] - grads[1][0]) <= 1e-5
    scale = max(float(g.abs().max()) for g in grads[1][1].values())
    assert max(float((grads[0][1][n] - grads[1][1][n]).abs().max()) for n in grads[1][1]) <= 1e-5 * max(1.0, scale)


def test_eager_training_attention_not_with_attention_dropout(tokenizer):
    gpt2 = make_tiny_lm(tokenizer, arch="gpt2")  # attn_pdrop 0.1
    gpt2.config._attn_implementation = "sdpa"
    assert engine.training_attention(gpt2, 16, CPU) is None
    llama = make_tiny_lm(tokenizer)
    llama.config._attn_implementation = "sdpa"
    assert engine.training_attention(llama, 16, CPU) == "eager"
    assert engine.training_attention(llama, 10_000, CPU) is None  # long batches keep sdpa (memory)


# ----------------------------------------------------------------------------- packed (padding-free) training batches
def test_collate_packed_lays_sequences_end_to_end():
    seqs = [[5] * 7, [6] * 3, [7] * 9, [8] * 2, [9] * 5]
    batch = batching.collate_packed(seqs, pad_id=0, row_tokens=12)
    rows, ends = batch["packed_rows"].tolist(), batch["packed_ends"].tolist()
    assert batch["input_ids"].shape[0] == 3  # ceil(26 / 12)
    for i, s in enumerate(seqs):  # each sequence whole, in one row, with positions 0..n-1
        start = ends[i] - len(s) + 1
        assert batch["input_ids"][rows[i], start:ends[i] + 1].tolist() == s
        assert batch["position_ids"][rows[i], start:ends[i] + 1].tolist() == list(range(len(s)))
    assert "attention_mask" not in batch  # transformers builds the block-diagonal mask from the positions
    from transformers.masking_utils import find_packed_sequence_indices
    segments = find_packed_sequence_indices(batch["position_ids"])
    for i, s in enumerate(seqs):  # transformers reads one sequence per packed sequence, padding apart
        row = segments[rows[i]].tolist()
        inside = row[ends[i] - len(s) + 1:ends[i] + 1]
        assert len(set(inside)) == 1 and row.count(inside[0]) == len(s)
    assert int((batch["input_ids"] != 0).sum()) == sum(map(len, seqs))
    width = batch["input_ids"].shape[1]
    assert width < max(map(len, seqs)) * len(seqs) / 3  # fuller than the padded batch's rows
    one = batching.collate_packed(seqs, pad_id=0, row_tokens=4)  # rows at least the longest sequence wide
    assert one["input_ids"].shape[1] >= 9


@pytest.mark.parametrize("kind", ["llama-lm", "llama-head", "qwen2-lm", "mistral-lm"])
@pytest.mark.parametrize("row_tokens", [256, 24])
def test_packed_batch_gives_the_padded_loss_and_gradients(tokenizer, kind, row_tokens):
    """The same batch (TEXTS, 2-40 tokens) padded and packed (one row, or several): the same class logits in the
    same order, the same loss and the same gradients in fp32, with eager attention as training uses it."""
    seqs, _ = batching.encode(tokenizer, TEXTS)
    labels = torch.tensor([i % 2 for i in range(len(seqs))])
    arch, objective = kind.split("-")
    results = []
    for packed in (False, True):
        if arch == "llama":
            model = (make_tiny_lm if objective == "lm" else make_tiny_classifier)(tokenizer, seed=6, **SHARP)
        else:
            model = _other_rope_lm(tokenizer, arch)
        model.config._attn_implementation = "sdpa"
        model.train()
        assert engine.packing_supported(model, CPU)
        batch = (batching.collate_packed(seqs, tokenizer.pad_token_id, row_tokens=row_tokens) if packed
                 else batching.collate(seqs, tokenizer.pad_token_id))
        with prefix_attention.attention_implementation(model, "eager"):
            logits = engine.class_logits(model, batch, word_ids(tokenizer)[:2] if objective == "lm" else None)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        results.append((logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (l0, loss0, g0), (l1, loss1, g1) = results
    assert l0.shape == l1.shape == (len(seqs), 2)
    assert (l0 - l1).abs().max() <= 1e-4 and abs(float(loss0 - loss1)) <= 1e-5
    assert g0.keys() == g1.keys()
    scale = max(float(g.abs().max()) for g in g0.values())
    assert max(float((g0[n] - g1[n]).abs().max()) for n in g0) <= 1e-5 * max(1.0, scale)
    assert float(l0.std()) > 1e-3  # the rows differ: a mix-up of their order would show


def test_packed_training_gives_the_padded_weights(tokenizer, monkeypatch):
    """engine.train packs where it can: 2 epochs packed and padded end at the same weights (fp32)."""
    label_ids = word_ids(tokenizer)[:2]
    seqs, _ = batching.encode(tokenizer, TEXTS)
    items = [{"ids": s, "label": i % 2} for i, s in enumerate(seqs)]
    seen, weights = [], []
    real = batching.collate_packed
    monkeypatch.setattr(engine, "collate_packed", lambda *a, **k: seen.append(1) or real(*a, **k))
    for pack in (True, False):
        model = make_tiny_lm(tokenizer, seed=5, **SHARP)
        settings = engine.TrainSettings(epochs=2, batch_size=8, lr=1e-3, warmup_ratio=0.0)
        out = engine.train(model, items, _lm_loss(label_ids), settings, CPU, pad_id=tokenizer.pad_token_id,
                           progress=False, pack=pack)
        assert out.tokens == 2 * sum(map(len, seqs))  # real tokens, however the batch is laid out
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        if pack:
            assert len(seen) == 4  # 2 epochs x 2 batches
    start = dict(make_tiny_lm(tokenizer, seed=5, **SHARP).named_parameters())
    assert any(not torch.equal(weights[0][n], start[n]) for n in start)
    assert len(seen) == 4  # pack=False: never packed
    assert max(float((weights[0][n] - weights[1][n]).abs().max()) for n in start) <= 1e-5


def test_packing_only_where_the_model_takes_it(tokenizer, monkeypatch):
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    llama = make_tiny_lm(tokenizer)
    assert engine.packing_supported(llama, CPU)
    assert engine.packing_supported(make_tiny_classifier(tokenizer), CPU)
    assert not engine.packing_supported(make_tiny_lm(tokenizer, arch="gpt2"), CPU)  # learned absolute positions
    assert not engine.packing_supported(make_tiny_lm(tokenizer, attention_dropout=0.1), CPU)
    assert not engine.packing_supported(llama, torch.device("cuda"))
    lora = get_peft_model(make_tiny_lm(tokenizer), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert engine.packing_supported(lora, CPU)
    prompt = get_peft_model(make_tiny_lm(tokenizer), PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    assert not engine.packing_supported(prompt, CPU)  # virtual tokens are prepended to every row
    monkeypatch.setenv("FEWTUNE_NO_SPEEDUPS", "1")
    assert not engine.packing_supported(llama, CPU)
