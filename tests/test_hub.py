"""The Hub paths (models by id, datasets through `datasets`), with only the network replaced.

Models: a tiny model is placed in a Hugging Face cache laid out as the Hub client writes it, and the Hub
client runs offline (HF_HUB_OFFLINE=1): `from_pretrained("org/name")` goes through the real resolution code.
Datasets: `datasets.load_dataset(<hub id>, ...)` is redirected to the same library's parquet reader over a
local file with the Hub's columns, so column and label mapping run for real.
"""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fewtune import data
from fewtune.cli import main
from fewtune.engine import models
from fewtune.tasks import load_task


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hub cache holding `fewtune-test/tiny-llama` (real files in the client's snapshot layout)."""
    tok = models.load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, max_position_embeddings=512)
    revision = "0" * 40
    snap = tmp_path / "hub" / "models--fewtune-test--tiny-llama" / "snapshots" / revision
    LlamaForCausalLM(cfg).save_pretrained(snap)
    tok.save_pretrained(snap)
    refs = tmp_path / "hub" / "models--fewtune-test--tiny-llama" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return "fewtune-test/tiny-llama"


def test_model_by_hub_id_loads_through_the_hub_client(hub_cache):
    model = models.load_model(hub_cache, "lm")
    tok = models.load_tokenizer(hub_cache)
    assert model.config.num_hidden_layers == 2
    assert tok.padding_side == "left"


def test_run_with_a_hub_model_id(hub_cache, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["run", "--method", "icl", "--task", "cola", "--model", hub_cache, "--shots", "2",
               "--eval-limit", "10", "--dtype", "fp32", "-q", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    assert r["config"]["model"] == hub_cache and r["evals"]["in_domain_dev"]["n"] == 10


def test_unreachable_hub_model_is_one_line_error(hub_cache, capsys):
    rc = main(["run", "--method", "icl", "--task", "cola", "--model", "fewtune-test/not-there", "--shots", "0", "--eval-limit", "4"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("fewtune: error:") and "fewtune-test/not-there" in err and len(err.splitlines()) == 1


@pytest.fixture
def hub_glue_cola(tmp_path, monkeypatch):
    """`nyu-mll/glue` config `cola` served from local parquet files with the Hub's columns (sentence, label, idx)."""
    import datasets
    import pandas as pd
    rows = {"train": [("A sentence that is fine.", 1), ("Sentence a fine is that.", 0)] * 5,
            "validation": [("The dog barked.", 1), ("Dog the barked the.", 0)] * 3}
    files = {}
    for split, rs in rows.items():
        path = tmp_path / f"cola-{split}.parquet"
        pd.DataFrame({"sentence": [s for s, _ in rs], "label": [y for _, y in rs], "idx": range(len(rs))}).to_parquet(path)
        files[split] = str(path)
    real = datasets.load_dataset
    calls = []

    def fake_network(path, name=None, split=None, revision=None, **kw):
        calls.append((path, name, split))
        if (path, name) != ("nyu-mll/glue", "cola"):
            raise ConnectionError(f"no network for {path}")
        return real("parquet", data_files={split: files[split]}, split=split)
    monkeypatch.setattr(datasets, "load_dataset", fake_network)
    return calls


def test_hub_dataset_path_maps_columns_and_labels(hub_glue_cola):
    task = load_task("cola")
    train = data.load_split(task, "train", source="hub")
    assert hub_glue_cola == [("nyu-mll/glue", "cola", "train")]
    assert len(train) == 10 and {ex.label for ex in train} == {0, 1}
    assert train[0].fields["sentence"] == "A sentence that is fine." and train[0].label == 1


def test_hub_dataset_failure_is_one_line_error(hub_glue_cola):
    task = load_task("mnli")
    with pytest.raises(Exception) as e:
        data.load_split(task, "train", source="hub")
    assert type(e.value).__name__ == "FewtuneError" and "nyu-mll/glue" in str(e.value) and "\n" not in str(e.value)
