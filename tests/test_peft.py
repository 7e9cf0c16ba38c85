"""The peft method beyond the shared invariants of tests/test_methods.py (which runs IA3, LoHa, VeRA, prompt and
prefix tuning through training, freezing and save -> predict): virtual tokens under left padding, options and errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import SHARP, make_tiny_lm

from fewtune.cli import main
from fewtune.engine import batching, engine
from fewtune.errors import FewtuneError
from fewtune.methods import get_method
from fewtune.methods.peft import align_virtual_tokens, peft_types


def _wrapped(tokenizer, peft_type, **fields):
    from peft import get_peft_model
    method = get_method("peft", {"peft_type": peft_type, **fields})
    model = get_peft_model(make_tiny_lm(tokenizer, **SHARP), method.opts.build())
    torch.manual_seed(1)  # prompt vectors of the size of the sharp model's embeddings, so they matter
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.2)
    return model.eval()


TEXTS = ["The cat sat.", "A much longer sentence about the dog that ran across the field today.", "Yes", "It rained all day long."]


@pytest.mark.parametrize("peft_type", ["PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"])
def test_virtual_tokens_score_a_padded_batch_like_single_rows(tokenizer, peft_type):
    model = align_virtual_tokens(_wrapped(tokenizer, peft_type, num_virtual_tokens=5))
    seqs, _ = batching.encode(tokenizer, TEXTS)
    ids = [tokenizer("No", add_special_tokens=False).input_ids[0], tokenizer("Yes", add_special_tokens=False).input_ids[0]]
    cpu = torch.device("cpu")
    one = engine.score(model, tokenizer, seqs, ids, cpu, "fp32", batch_size=1).logits
    batched = engine.score(model, tokenizer, seqs, ids, cpu, "fp32", batch_size=4).logits
    assert np.abs(one - batched).max() <= 1e-4
    assert np.abs(one[0] - one[1]).max() > 1e-3  # the logits depend on the text: the comparison means something


def test_peft_own_prompt_tuning_forward_depends_on_padding(tokenizer):
    """Why align_virtual_tokens exists: peft's forward puts the padding between the virtual tokens and the text."""
    model = _wrapped(tokenizer, "PROMPT_TUNING", num_virtual_tokens=5)
    seqs, _ = batching.encode(tokenizer, TEXTS)
    ids = [tokenizer("No", add_special_tokens=False).input_ids[0]]
    cpu = torch.device("cpu")
    one = engine.score(model, tokenizer, seqs, ids, cpu, "fp32", batch_size=1).logits
    batched = engine.score(model, tokenizer, seqs, ids, cpu, "fp32", batch_size=4).logits
    assert np.abs(one - batched).max() > 1e-3


# ----------------------------------------------------------------------------- options and errors
def test_types_and_fields_come_from_peft():
    from peft import PeftType
    assert set(peft_types()) == {t.value for t in PeftType} & set(peft_types())
    assert {"IA3", "LOHA", "VERA", "PROMPT_TUNING", "PREFIX_TUNING", "LORA"} <= set(peft_types())
    with pytest.raises(FewtuneError) as e:
        get_method("peft", {"peft_type": "IA3", "rank": 4})
    from peft import IA3Config
    for f in dataclasses.fields(IA3Config):
        if f.name not in ("peft_type", "task_type", "inference_mode", "revision", "base_model_name_or_path",
                          "peft_version", "auto_mapping"):
            assert f.name in str(e.value)


@pytest.mark.parametrize("options, words", [
    ({}, "needs a peft_type .*IA3.*VERA"),
    ({"peft_type": "IA4"}, "unknown peft_type 'IA4'. Did you mean: IA3"),
    ({"peft_type": "LOHA", "rank": 4}, "LoHaConfig has no field 'rank'.*Fields: .*alpha"),
    ({"peft_type": "PROMPT_TUNING", "objective": "ft"}, "cannot be combined with objective ft"),
    ({"peft_type": "PREFIX_TUNING", "objective": "ft"}, "cannot be combined with objective ft"),
    ({"peft_type": "P_TUNING", "objective": "ft"}, "cannot be combined with objective ft"),
    ({"peft_type": "TRAINABLE_TOKENS"}, "needs option.*token_indices"),
    ({"peft_type": "ADALORA"}, "not supported: .*update_and_allocate"),
    ({"peft_type": "IA3", "objective": "mlm"}, "objective must be pbft or ft"),
    ({"peft_type": "PROMPT_TUNING", "prompt_tuning_init": "TEXT"}, "peft PROMPT_TUNING: .*prompt_tuning_init_text"),
    ({"peft_type": 3}, "must be a string"),
    # a value of the wrong type: named with the field and the type peft declares, before any model is loaded
    ({"peft_type": "LORA", "r": "eight"}, r"LoraConfig field 'r' must be int, got 'eight' \(str\)"),
    ({"peft_type": "LOHA", "target_modules": 3}, r"LoHaConfig field 'target_modules' must be .*list\[str\].*, got 3"),
    ({"peft_type": "LORA", "use_dora": "yes"}, r"field 'use_dora' must be bool, got 'yes'"),
])
def test_bad_peft_options_are_one_line_errors(options, words):
    with pytest.raises(FewtuneError, match=words) as e:
        get_method("peft", options)
    assert "\n" not in str(e.value)


def test_type_names_are_case_and_dash_insensitive():
    assert get_method("peft", {"peft_type": "prompt-tuning"}).opts.peft_type == "PROMPT_TUNING"
    assert get_method("peft", {"peft_type": "ia3"}).opts.prompt_learning is False


def test_cli_peft_flags(capsys, monkeypatch):
    from fewtune.cli import build_parser, config_from_args
    args = build_parser().parse_args(["run", "--method", "peft", "--peft-type", "LOHA", "--peft-option", "r=4",
                                      "--peft-option", 'target_modules=["q_proj", "v_proj"]', "--peft-option",
                                      "module_dropout=0.1", "--peft-option", "init_weights=true", "--objective", "ft"])
    cfg = config_from_args(args)
    assert cfg.method_options == {"peft_type": "LOHA", "objective": "ft", "r": 4, "module_dropout": 0.1,
                                  "target_modules": ["q_proj", "v_proj"], "init_weights": True}
    assert main(["run", "--method", "peft", "--peft-type", "IA3", "--peft-option", "nonsense"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert main(["run", "--method", "lora", "--peft-option", "r=4"]) == 2
    assert "--peft-option applies to method peft" in capsys.readouterr().err
    assert main(["run", "--method", "peft", "--peft-type", "VERA", "--peft-option", "rr=4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "VeraConfig has no field 'rr'" in err and "projection_prng_key" in err
    assert main(["ls", "methods"]) == 0
    out = capsys.readouterr().out
    assert "--peft-type:" in out and "IA3" in out and "ADALORA" not in out.split("--peft-type:")[1]


def test_grid_spec_validates_peft_options(tmp_path):
    from fewtune.grid import load_grid
    spec = tmp_path / "g.toml"
    spec.write_text('name = "g"\nmodels = ["smollm2-135m"]\ntasks = ["cola"]\nshots = [8]\nseeds = [0]\n'
                    '[[methods]]\nmethod = "peft"\nlabel = "ia3"\nmethod_options = { peft_type = "IA3", target_modules = ["k_proj"], feedforward_modules = [] }\n'
                    '[[methods]]\nmethod = "peft"\nlabel = "bad"\nmethod_options = { peft_type = "VERA", rank = 3 }\n')
    with pytest.raises(FewtuneError, match="VeraConfig has no field 'rank'"):
        load_grid(str(spec))


def test_unknown_architecture_falls_back_to_attention_linears(tokenizer, monkeypatch):
    """peft has no default target modules for an architecture: lora's rule (attention Linears) applies."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING as mapping

    from fewtune.methods import RunContext
    monkeypatch.delitem(mapping, "llama")
    model = make_tiny_lm(tokenizer)
    method = get_method("peft", {"peft_type": "LOHA"})
    ctx = RunContext(config=None, task=None, pattern=None, tokenizer=tokenizer, label_ids=[0, 1], train_examples=[],
                     device=torch.device("cpu"), dtype="fp32")
    wrapped = method.prepare(ctx, model)
    assert ctx.info["peft_target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert any("hada_" in n for n, _ in wrapped.named_parameters())


@pytest.mark.parametrize("peft_type, default_lr, quick_lr", [
    ("LOHA", 2e-4, 5e-4), ("IA3", 3e-3, 1e-2), ("VERA", 4e-3, 1e-2), ("PROMPT_TUNING", 3e-2, 3e-2), ("PREFIX_TUNING", 3e-2, 3e-2),
])
def test_learning_rate_by_kind_of_type(peft_type, default_lr, quick_lr):
    from fewtune.config import RunConfig
    from fewtune.hyperparameters import for_run as hyperparameters
    options = {"peft_type": peft_type}
    method = get_method("peft", options)
    assert hyperparameters(RunConfig(method="peft", method_options=options), method)["lr"] == default_lr
    quick = hyperparameters(RunConfig(method="peft", method_options=options, preset="quick"), method)
    assert quick["lr"] == quick_lr and quick["epochs"] == 5
    assert hyperparameters(RunConfig(method="peft", method_options=options, preset="quick", lr=0.5), method)["lr"] == 0.5


def test_cli_peft_option_of_the_wrong_type_is_one_line(capsys):
    """`--peft-option r="eight"` is refused before loading, naming the field, the value and peft's type (it used to
    fail inside peft's wrapping of the model: "'<=' not supported between instances of 'str' and 'int'")."""
    assert main(["run", "--method", "peft", "--peft-type", "LORA", "--peft-option", 'r="eight"']) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "field 'r' must be int, got 'eight'" in err
