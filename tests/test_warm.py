"""Warm workers give what fresh processes give: every method, run for real on the tiny model, once in a fresh child
process per cell and once in one warm worker that has already run other cells (so its model comes from the cache:
a copy of the pristine weights, the new head replayed from the cell's seed, RNGs reset). Same predictions, and the
log-probabilities within 1e-6 (fp32; both with one thread, so the same summation order)."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from fewtune.grid.backends import ProcessBackend, WarmBackend, WorkerPlan
from fewtune.grid.driver import run_grid
from fewtune.grid.grid_spec import load_grid
from fewtune.store import Store

# Every method, each in the variant that exercises what a warm worker could get wrong: icl with demonstrations (its
# prefix KV cache), ft (a new head drawn from the RNG at load), adaptive (its frozen-block cache), lora and peft
# (adapters injected into the model in place), a prompt-learning peft type (virtual tokens), cd with a few-shot
# teacher (the frozen base model scores the context); probe (a new head drawn at load, then fitted; mean pooling put
# on the model instance), lpft (the probe's head, then the loop), bitfit (the normalisation weights of a bias-free model).
METHODS = '''
[[methods]]
method = "icl"

[[methods]]
method = "ft"

[[methods]]
method = "pbft"

[[methods]]
method = "adaptive"
method_options = { train_layers = 2 }

[[methods]]
method = "lora"
lr = 1e-2

[[methods]]
method = "cd"
method_options = { context = "few-shot", context_shots = 4 }

[[methods]]
method = "peft"
label = "peft-prompt"
method_options = { peft_type = "PROMPT_TUNING", num_virtual_tokens = 4 }
lr = 3e-1

[[methods]]
method = "probe"
method_options = { pooling = "mean" }

[[methods]]
method = "lpft"

[[methods]]
method = "bitfit"
method_options = { params = "norm" }
lr = 1e-1
'''


def spec(tmp_path, toy, model_dir, name, seeds, methods=METHODS):
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(f'''
        name = "{name}"
        models = ["{model_dir}"]
        tasks = ["{toy.task_file}"]
        data_root = "{toy.root}"
        shots = [8]
        seeds = {seeds}
        eval_limit = 8
        max_length = 64
        dtype = "fp32"
        device = "cpu"
        epochs = 3
        batch_size = 4
        lr = 1e-3
        retention = "off"
    ''') + methods)
    return path


def test_a_warm_worker_gives_a_fresh_process_results_for_every_method(toy, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("FEWTUNE_GRID_RUNNER", raising=False)
    fresh_grid = load_grid(str(spec(tmp_path, toy, tiny_model_dir, "fresh", [1])))
    # the warm worker runs seed 0 of every method first: by seed 1 every model it needs comes from its cache
    warm_grid = load_grid(str(spec(tmp_path, toy, tiny_model_dir, "warm", [0, 1])))
    one_thread = WorkerPlan(1, 1, (None,))
    two_fresh = WorkerPlan(2, 1, (None, None))  # two fresh processes at once, one thread each: the same sums
    quiet = dict(progress=False, echo=lambda _: None)
    with Store(tmp_path / "fresh.db") as fresh_db, Store(tmp_path / "warm.db") as warm_db:
        s = run_grid(fresh_grid, fresh_db, tmp_path / "logs-fresh", backend=ProcessBackend(two_fresh), **quiet)
        assert (s.success, s.failed) == (10, 0), s.failures
        w = run_grid(warm_grid, warm_db, tmp_path / "logs-warm", backend=WarmBackend(one_thread), **quiet)
        assert (w.success, w.failed) == (20, 0), w.failures
        for cell in fresh_grid.cells:
            a, b = fresh_db.get(cell.key), warm_db.get(cell.key)
            assert b["result"]["cost"]["backend"] == "warm" and b["result"]["cost"]["warm_model_cache"] is True
            assert a["result"]["cost"]["backend"] == "process" and a["result"]["cost"]["torch_threads"] == 1
            assert a["result"]["train_indices"] == b["result"]["train_indices"]
            pa, pb = fresh_db.predictions(cell.key), warm_db.predictions(cell.key)
            assert pa.keys() == pb.keys() and pa
            for split in pa:
                assert list(pa[split]["pred"]) == list(pb[split]["pred"]), (cell.label, split)
                np.testing.assert_allclose(pa[split]["logprobs"], pb[split]["logprobs"], rtol=0, atol=1e-6,
                                           err_msg=f"{cell.label} {split}")
            if a["result"].get("training"):
                assert a["result"]["training"]["epoch_losses"] == pytest.approx(
                    b["result"]["training"]["epoch_losses"], rel=1e-6, abs=1e-7), cell.label


def test_the_template_is_copied_on_the_cells_device_when_it_draws_nothing_at_load():
    """A GPU cell's copy comes from a template kept on that device (no host copy per cell), made once; the CPU
    template stays; a model whose load drew a new head from the RNG is still replayed on the CPU. ('meta' stands
    in for a GPU: no GPU here; the free-memory check is CUDA's.)"""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fewtune.engine.models import ModelRequest
    from fewtune.grid.warm import WarmModels

    def load():  # like from_pretrained of a checkpoint with every weight: nothing drawn, every tensor marked loaded
        state = torch.get_rng_state()
        m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
        torch.set_rng_state(state)
        for p in m.parameters():
            p._is_hf_initialized = True
        return m

    cache = WarmModels()
    request = ModelRequest("no-such-folder", "lm", 2, False, False)
    first = cache(request, load)
    assert cache.last_hit is False and next(first.parameters()).device.type == "cpu"
    cache.device = torch.device("meta")
    second, third = cache(request, load), cache(request, load)
    assert cache.last_hit and cache.last_on_device
    assert {p.device.type for p in second.parameters()} == {"meta"} and second is not third
    (template,) = cache.templates.values()
    assert next(template.model.parameters()).device.type == "cpu" and list(template.on_device) == ["meta"]
    cache.device = torch.device("cpu")
    fourth = cache(request, load)
    assert not cache.last_on_device and next(fourth.parameters()).device.type == "cpu"
    assert all(torch.equal(a, b) for a, b in zip(fourth.state_dict().values(), first.state_dict().values()))
    shared = WarmModels(device_templates=False)  # a worker that shares its GPU: the CPU template only
    shared(request, load)
    shared.device = torch.device("meta")
    assert next(shared(request, load).parameters()).device.type == "cpu" and not shared.last_on_device
