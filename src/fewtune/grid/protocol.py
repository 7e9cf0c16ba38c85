"""What crosses a process or actor boundary between the driver and whatever computes a cell, on every backend.

The driver sends a `CellRequest` (the config, its key computed once by the driver, the log, the runner, the
worker's share of the machine); the worker answers a `CellOutcome` (success with the result record, failed with a
one-line error, or died; with how the cell was measured and whether the worker must be replaced). Both travel as
JSON text (argv and a file for a fresh process, a pipe for a warm worker, a Ray call's argument and return value),
never as pickles. This module imports only the standard library: a worker process reads it before torch.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field

DEFAULT_RUNNER = "fewtune.runner:run"  # what computes a cell; a plug-in (or a test) names another "module:function"
STATUSES = ("success", "failed", "died")

# Errors after which a device may be unusable for the rest of the process: a CUDA context that saw an illegal
# address, a device-side assert or a launch failure stays broken (every later kernel fails), so the worker that
# raised one is replaced before its next cell. Matched on the exception's type name and message (torch raises
# RuntimeError or torch.AcceleratorError with these texts; cuBLAS and cuDNN their own).
DEVICE_ERROR = re.compile(r"CUDA error|CUBLAS_STATUS|CUDNN_STATUS|cuDNN error|device-side assert|illegal memory access"
                          r"|unspecified launch failure|AcceleratorError|NCCL error|CUDA driver error", re.I)


def leaves_device_unusable(error: BaseException | str) -> bool:
    """Whether an error can leave the process's GPU unusable (its worker must not run another cell)."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return bool(DEVICE_ERROR.search(text))


@dataclass(frozen=True)
class CellRequest:
    """One try of one cell, as a worker receives it."""
    config: dict                  # RunConfig.to_dict()
    key: str                      # RunConfig.hash(), computed by the driver when it claimed the cell
    log_path: str                 # the cell's log (a Ray worker writes a local one and hands back its end)
    attempt: int = 1
    runner: str = DEFAULT_RUNNER  # "module:function" called as runner(RunConfig, progress=False) -> result record
    backend: str = "process"      # how its cost is measured: process, warm, ray, ray-warm, in-process
    workers: int | None = 1       # cells sharing this machine (None: unknown, a Ray node shared with others)
    threads: int | None = None    # torch threads (None: torch's default)
    result_path: str | None = None  # a fresh process writes its outcome here (atomically)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> CellRequest:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class CellOutcome:
    """What came back for a request: 'success' with the result record, 'failed' with a one-line error (the cell
    raised: it would fail again), or 'died' (the worker process, actor or node died or hung: worth another try)."""
    status: str
    result: dict | None = None
    error: str | None = None
    replace_worker: bool = False   # the error may have left the device unusable: no further cell on this worker
    rss_mib: float | None = None   # the worker's resident memory after the cell (warm workers: leak watch)
    cache_miss: bool = False       # a warm worker kept a new model (its memory grows by design)
    log: str = ""                  # the end of the cell's log, where the worker could not append to it (Ray)
    host: str | None = None
    pid: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"CellOutcome status {self.status!r} is not one of {', '.join(STATUSES)}")

    def to_json(self) -> str:
        from ..util import json_default  # numpy scalars in a result record
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=json_default)

    @classmethod
    def from_json(cls, text: str | bytes) -> CellOutcome:
        return cls(**json.loads(text))

    def with_(self, **changes) -> CellOutcome:
        return dataclasses.replace(self, **changes)

