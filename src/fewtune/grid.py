"""The experiment grid, in one import: the spec (grid_spec.py), the driver that runs cells (driver.py), the
backends that run them (backends.py: a fresh process per cell, warm workers, in-process; ray_backend.py: Ray),
and the process that computes a cell (cell_process.py).

The parent (the `fewtune grid` process) alone writes the database; a cell killed with the grid stays `running`
with a dead owner, and the next grid claims it again (store.Store.claim): re-run, never duplicated.
Spec format, backends and resume semantics: docs/grid.md.
"""

from __future__ import annotations

from .backends import BACKENDS, InlineBackend, Job, Outcome, ProcessBackend, WarmBackend, WorkerPlan  # noqa: F401
from .cell_process import configure_cell_process, resolve_runner, run_config, watch_parent  # noqa: F401
from .driver import Driver, Interrupted, Summary, brief, run_grid, signals_raise  # noqa: F401
from .grid_spec import (GRID_KEYS, MAX_CELLS, RUNNER_ENV, Cell, Grid, check_max_retries, check_models,  # noqa: F401
                        check_workers_key, expand, load_grid, preset_names)
