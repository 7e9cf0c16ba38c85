"""A warm worker's model cache: load a model once, hand every cell a pristine copy of it.

A fresh process per cell pays imports, and reading and building the model, for every cell (on 2 CPU cores the
demo's 29 runs spent 65 s loading and ~55 s starting processes out of 574 s; on an H200 8-10 s of a 14-29 s CoLA
cell). A warm worker keeps the first load of each model as a template (on the CPU) and gives each cell
`copy.deepcopy(template)`: the methods may then wrap it (peft injects adapters in place), freeze or swap blocks,
train it, and the next cell still starts from the weights as read from disk.

On a GPU the template is also kept on the device when it fits (free memory ≥ DEVICE_ROOM x its size) and the worker
has the device to itself (several workers on one GPU are planned by the cells' measured peaks, which a copy of the
weights per worker would overrun), so a cell's copy never crosses the host link; only for models whose load draws
nothing from the RNG (a new head is initialised on the CPU from the CPU generator, which a copy on the GPU could not
replay). The device copy stays allocated across cells, so CUDA's max allocated counts it: such cells say
`warm_template_on_device` in their cost, and their memory compares only with cells measured alike.

Exactness. The runner seeds torch right before `models.load_model`, and a load can draw from that RNG: a new
classification head (ft) has no weights in the checkpoint and is initialised at random. A copy must give the same
head for the cell's seed, and leave the RNG where the load would have left it. So, on the first load, the cache
finds the parameters that did not come from the checkpoint (transformers marks the loaded ones
`_is_hf_initialized`), replays their initialisation on a copy from the same RNG state, and keeps the template
only if the replay gives the load's values bit for bit and the same RNG state after; otherwise that model is
loaded from disk for every cell (slower, never different). Tests: tests/test_warm.py (every method, warm = fresh).
"""

from __future__ import annotations

import copy
import gc
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..engine.models import ModelRequest, resolve

log = logging.getLogger("fewtune")
DEVICE_ROOM = 4  # a template moves to the GPU only when the free memory is at least 4x its size (the cell's own
#                  model, gradients and optimizer state need the rest)


def reset_process_state() -> None:
    """A clean start for the next cell: grad mode on, no garbage of the previous cell holding memory, and RNGs at a
    fixed state (seed 0), so that nothing depends on the cells before. A fresh process differs here: its Python and
    NumPy generators start from OS entropy. The runner seeds torch itself before anything it draws; a cell that
    drew from Python's or NumPy's generator without seeding it would differ between the two (none does)."""
    import numpy as np
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.set_grad_enabled(True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _fingerprint(spec: str) -> tuple:
    """A model folder's files' sizes and modification times: weights trained again into a folder are a new model."""
    try:
        where = Path(resolve(spec))
    except Exception:  # noqa: BLE001 - the real load reports it
        return (spec,)
    if not where.is_dir():
        return (str(where),)
    return (str(where),) + tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                        for p in where.iterdir() if p.is_file()))


@dataclass
class Template:
    model: object | None            # None: not replayable, load from disk every time
    random_params: list[str] = field(default_factory=list)  # initialised from the RNG at load (a new head)
    rng_draws: bool = False
    on_device: dict = field(default_factory=dict)  # str(device) -> a copy of `model` there (GPUs only)


def _nbytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _free_bytes(device) -> int:
    return torch.cuda.mem_get_info(device)[0]


def _random_params(model) -> list[str]:
    return [n for n, p in model.named_parameters() if not getattr(p, "_is_hf_initialized", False)]


def _replay(template, names: list[str]):
    """A copy of `template` with the parameters `names` initialised again from the current RNG, as from_pretrained
    initialises missing keys (`initialize_weights`, which skips every tensor flagged `_is_hf_initialized`)."""
    model = copy.deepcopy(template)
    if not names:
        return model
    wanted = set(names)
    for n, p in model.named_parameters():
        p._is_hf_initialized = n not in wanted
    for n, b in model.named_buffers():
        b._is_hf_initialized = True
    for m in model.modules():
        m._is_hf_initialized = False
    model.initialize_weights()
    for p in model.parameters():
        p._is_hf_initialized = True
    return model


class WarmModels:
    """The process's model provider (models.set_model_provider) in a warm worker."""

    def __init__(self, device_templates: bool = True):
        self.device_templates = device_templates  # False: a worker sharing its GPU keeps templates on the CPU only
        self.templates: dict[tuple, Template] = {}
        self.last_hit: bool | None = None  # recorded in the result's cost: this cell's model came from the cache
        self.device = None                 # the cell's device (set by the worker before each cell)
        self.last_on_device: bool = False  # this cell's copy came from a template kept on its GPU

    def begin_cell(self, device) -> None:
        """Before each cell: the device it runs on, and nothing yet said about where its model came from."""
        self.device, self.last_hit, self.last_on_device = device, None, False

    def __call__(self, request: ModelRequest, load):
        key = (request, _fingerprint(request.spec))
        t = self.templates.get(key)
        if t is None:
            self.last_hit = False
            before = torch.get_rng_state()
            model = load()
            after = torch.get_rng_state()
            self.templates[key] = self._template(model, before, after)
            return model
        if t.model is None:
            self.last_hit = False
            return load()
        self.last_hit = True
        if t.random_params:
            return _replay(t.model, t.random_params)
        here = self._on_device(t)
        self.last_on_device = here is not None
        return copy.deepcopy(here if here is not None else t.model)

    def _on_device(self, t: Template):
        """The template's copy on the cell's GPU, made on first use when it fits; None on CPU or without room."""
        device = self.device
        if not self.device_templates or device is None or getattr(device, "type", "cpu") == "cpu":
            return None
        key = str(device)
        if key not in t.on_device:
            fits = device.type != "cuda" or _free_bytes(device) >= DEVICE_ROOM * _nbytes(t.model)
            t.on_device[key] = copy.deepcopy(t.model).to(device) if fits else None
            if not fits:
                log.info("warm cache: the template stays on the CPU (%s has less than %dx its %.0f MiB free)",
                         key, DEVICE_ROOM, _nbytes(t.model) / 2**20)
        return t.on_device[key]

    def _template(self, model, before: torch.Tensor, after: torch.Tensor) -> Template:
        names = _random_params(model)
        draws = not torch.equal(before, after)
        if not names and not draws:
            return Template(copy.deepcopy(model))
        if not names:  # it drew random numbers, but for nothing we can see: do not guess
            log.info("warm cache: %s draws from the RNG while loading; loaded from disk for every cell", type(model).__name__)
            return Template(None)
        template = copy.deepcopy(model)
        now = torch.get_rng_state()
        torch.set_rng_state(before)
        try:
            replayed = _replay(template, names)
            same_rng = torch.equal(torch.get_rng_state(), after)
            same = same_rng and all(torch.equal(a, b) for (_, a), (_, b) in
                                    zip(sorted(replayed.state_dict().items()), sorted(model.state_dict().items())))
        finally:
            torch.set_rng_state(now)
        if not same:
            log.info("warm cache: replaying the initialisation of %s does not give the loaded values; loaded from "
                     "disk for every cell", ", ".join(names))
            return Template(None)
        for p in template.parameters():
            p._is_hf_initialized = True
        return Template(template, names, draws)
