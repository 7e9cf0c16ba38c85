"""The experiment grid: the spec (grid_spec.py), the driver that runs cells (driver.py), the backends that run them
(backends.py: a fresh process per cell, warm workers, in-process; ray_backend.py, ray_warm.py: Ray), the process
that computes a cell (cell_process.py), and --until-resolved (decide.py), --dry-run's estimate and probes.

The parent (the `fewtune grid` process) alone writes the database; a cell killed with the grid stays `running`
with a dead owner, and the next grid claims it again (store.Store.claim): re-run, never duplicated.
Spec format, backends and resume semantics: docs/grid.md.

The public names below load on first use (PEP 562), so importing one submodule (`python -m
fewtune.grid.cell_process`, or the report's reading of a spec) does not import the rest.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "fewtune.grid.backends": ("BACKENDS", "InlineBackend", "Job", "Outcome", "ProcessBackend", "WarmBackend",
                              "WorkerPlan"),
    "fewtune.grid.cell_process": ("configure_cell_process", "import_runner", "run_request", "watch_parent"),
    "fewtune.grid.protocol": ("CellOutcome", "CellRequest", "DEFAULT_RUNNER"),
    "fewtune.grid.driver": ("Driver", "Interrupted", "Summary", "brief", "run_grid", "signals_raise"),
    "fewtune.grid.grid_spec": ("GRID_KEYS", "MAX_CELLS", "RUNNER_ENV", "Cell", "Grid", "check_max_retries",
                               "check_models", "check_workers_key", "expand", "load_grid", "preset_names"),
}
_WHERE = {name: module for module, names in _NAMES.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'fewtune.grid' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
