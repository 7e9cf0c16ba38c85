"""`fewtune grid SPEC --backend ray`: the same grid, each cell a Ray task somewhere on a cluster.

The driver (driver.py, the `fewtune grid` process) is still the only writer of the results database: it claims a
cell, this backend submits it as a task with the spec's `[resources]` (num_cpus, num_gpus, memory_gib), and the
driver records what comes back, exactly as for the local backends.
A task runs `cell_process.run_request` in a fresh Ray worker process (`max_calls=1`: its memory and CUDA context go
back when the cell ends, as with the local backend's child processes): it takes a protocol.CellRequest and returns a
protocol.CellOutcome carrying the end of the cell's log, both as JSON text; the driver appends the log to
`<db folder>/logs/<hash>.log`.

An exception inside a cell is a failed cell, never retried (it would fail again). A worker process or node
that dies is retried by the driver, `max_retries` times (`--max-retries`, spec key `max_retries`), each try
counted in the row's `attempts`; then the cell is recorded failed with the error. See docs/grid.md.
Warm workers as Ray actors (`--backend ray-warm`), which load a model once for many cells: ray_warm.py.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from pathlib import Path

from ..errors import FewtuneError
from ..util import now
from .backends import Job, runner_spec
from .cell_process import configure_cell_process, output_to, run_request
from .protocol import CellOutcome, CellRequest, leaves_device_unusable

log = logging.getLogger("fewtune")
MAX_RETRIES = 2     # re-runs of a cell whose worker died (a node lost, an out-of-memory kill), not of one that raised
LOG_LIMIT = 2 << 20  # bytes of a cell's log sent back to the driver (the end is kept: that is where errors are)
INSTALL_HINT = "pip install 'fewtune[ray]'"
WAIT_S = 1.0         # the driver wakes this often to notice Ctrl-C / SIGTERM
CONNECT_TIMEOUT_S = 10.0
RESOURCE_UNITS = 10_000  # Ray counts resources in 1/10,000ths (ray._raylet.RESOURCE_UNIT_SCALING)


def import_ray():
    try:
        import ray
    except ImportError:
        raise FewtuneError(f"--backend ray needs Ray, which is not installed: {INSTALL_HINT} "
                           "(or pip install -e '.[ray]' in a checkout).") from None
    return ray


# --- in the Ray worker
def run_cell_task(request_json: str, env: dict) -> str:
    """The Ray task: one cell in this (fresh, dedicated) worker process. Takes a CellRequest and returns a
    CellOutcome with the end of the cell's log and where it ran, both JSON text (like the local child's, no pickle)."""
    os.environ.update(env)  # the driver's FEWTUNE_* settings: data folder, cache
    req = CellRequest.from_json(request_json)
    with tempfile.TemporaryDirectory(prefix="fewtune-cell-") as tmp:
        log_file = Path(tmp) / "cell.log"
        with output_to(log_file):
            configure_cell_process(req.runner)
            out = run_request(req)
        return hand_back(out, log_file)


def hand_back(out: CellOutcome, log_file: Path) -> str:
    """What a Ray worker returns for a cell: its outcome, the end of its log and where it ran, as JSON text."""
    with open(log_file, "rb") as f:
        f.seek(max(0, log_file.stat().st_size - LOG_LIMIT))
        text = f.read().decode("utf-8", errors="replace")
    return out.with_(log=text, host=socket.gethostname(), pid=os.getpid()).to_json()


# --- in the driver
def check_address(address: str | None) -> None:
    """A HOST:PORT address must be well-formed and reachable: ray.init retries an unreachable one for ever."""
    if address and address not in ("auto", "local"):
        host, _, port = address.removeprefix("ray://").rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise FewtuneError(f"--address {address}: expected auto or HOST:PORT, e.g. 127.0.0.1:6379.")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise FewtuneError(f"Cannot connect to the Ray cluster at {address}: {e.strerror or e} (is `ray start "
                               f"--head --port {port}` running there?).") from None


def connect(ray, address: str | None) -> None:
    """Join the cluster at `address` ('auto', 'HOST:PORT'); None: $RAY_ADDRESS, a running local Ray, or a new one."""
    check_address(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False,
                 configure_logging=True)
    except Exception as e:  # ConnectionError, ValueError, RuntimeError, depending on what is wrong
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:240]
        raise FewtuneError(f"Cannot connect to the Ray cluster at {address or 'the default address'}: {first}") from None


def task_options(resources: dict) -> dict:
    opts = {"num_cpus": resources["num_cpus"], "num_gpus": resources["num_gpus"]}
    if resources.get("memory_gib"):
        opts["memory"] = int(resources["memory_gib"] * 2**30)
    return opts


def cells_that_fit(ray, resources: dict) -> int:
    """How many cells the live nodes can run at once; a FewtuneError if no node can run one (Ray would
    otherwise wait forever for an infeasible task)."""
    need = {"CPU": resources["num_cpus"], "GPU": resources["num_gpus"],
            "memory": (resources.get("memory_gib") or 0) * 2**30}
    total, largest = 0, {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        fits = min(units(have.get(k, 0)) // units(v) for k, v in need.items() if v > 0) if any(need.values()) else 1
        total += fits
        for k in need:
            largest[k] = max(largest.get(k, 0), have.get(k, 0))
    if total == 0:
        asked = ", ".join(f"{k}={v:g}" for k, v in (("num_cpus", need["CPU"]), ("num_gpus", need["GPU"]),
                                                    ("memory_gib", need["memory"] / 2**30)) if v)
        biggest = (f"CPU {largest.get('CPU', 0):g}, GPU {largest.get('GPU', 0):g}, "
                   f"memory {largest.get('memory', 0) / 2**30:.1f} GiB")
        raise FewtuneError(f"No node of the Ray cluster can run a cell asking for [resources] {asked} "
                           f"(the largest node has {biggest}); lower the grid spec's [resources].")
    return total


def units(quantity: float) -> int:
    """A resource quantity in Ray's fixed-point units (1/10,000): in floats 1 // 0.2 is 4.0, in Ray five 0.2-GPU actors
    share one GPU."""
    return round(quantity * RESOURCE_UNITS)


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


class RayBackend:
    """Each cell a Ray task (`max_calls=1`: a fresh worker process per cell) with the spec's [resources]; capacity is
    how many cells the live nodes can run at once, so the driver claims only what the cluster can start now."""
    name, worker_noun, default_retries, synchronous = "ray", "Ray worker", MAX_RETRIES, False

    def __init__(self, resources: dict, address: str | None = None, runner: str | None = None):
        self.resources, self.address = resources, address
        self.runner = runner_spec(runner)
        self.ray = None
        self.pending: dict = {}  # ObjectRef -> Job
        self.window = 1

    def open(self) -> None:
        self.ray = import_ray()
        connect(self.ray, self.address)
        self.window = cells_that_fit(self.ray, self.resources)
        self.remote = self.ray.remote(max_calls=1, max_retries=0)(run_cell_task).options(**task_options(self.resources))
        self.env = {k: v for k, v in os.environ.items() if k.startswith("FEWTUNE_")}

    def capacity(self) -> int:
        return self.window

    def start(self, job: Job) -> None:
        with open(job.log_path, "a", encoding="utf-8") as logf:
            logf.write(f"\n=== {now()} fewtune grid: {job.cell.describe()} [{job.key}], Ray task, try {job.attempt}\n")
        # a Ray worker shares its node with whatever else the cluster schedules there: workers unknown (None)
        req = job.request(self.name, self.runner, None, None)
        self.pending[self.remote.remote(req.to_json(), self.env)] = job

    def poll(self, timeout: float) -> list[tuple[Job, CellOutcome]]:
        if not self.pending:
            time.sleep(timeout)
            return []
        ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=max(timeout, WAIT_S))
        out = []
        for ref in ready:
            job = self.pending.pop(ref)
            out.append((job, collect(self.ray, ref, job.log_path, self.resources)))
        return out

    def cancel(self, job: Job) -> None:
        # Nothing here: the driver records the cell cancelled, then close() disconnects, and Ray kills a job's
        # workers when its driver leaves. `ray.cancel(force=True)` sometimes aborted the driver inside Ray
        # (ray 2.60: "Tried to complete task that was not pending"), losing the exit code.
        for ref, j in list(self.pending.items()):
            if j.key == job.key:
                del self.pending[ref]

    def close(self) -> None:
        if self.ray is not None:
            self.ray.shutdown()
            self.ray = None


def collect(ray, ref, log_path: Path, resources: dict) -> CellOutcome:
    """The outcome of a finished task or actor call (success, failed, died); appends the cell's log. A success records
    the GPU share asked (`cost.ray_num_gpus`: 0.25 = shared by 4). An error raised outside the cell's runner that can
    leave the device unusable asks for the worker to be replaced, as one inside it does."""
    from ray.exceptions import RayTaskError
    try:
        out = CellOutcome.from_json(ray.get(ref))
    except RayTaskError as e:  # raised outside run_request (e.g. fewtune missing on that node): would fail again
        error = one_line(e.cause) if getattr(e, "cause", None) else one_line(e)
        append_log(log_path, f"=== {now()} Ray task failed: {e}\n")
        return CellOutcome("failed", error=error, replace_worker=leaves_device_unusable(str(e)))
    except ray.exceptions.RayError as e:  # the worker, actor or node died, the call was lost: worth another try
        append_log(log_path, f"=== {now()} Ray worker died: {e}\n")
        return CellOutcome("died", error=one_line(e))
    append_log(log_path, out.log + f"\n=== {now()} on {out.host} pid {out.pid}: {out.status}\n")
    if out.status == "success" and isinstance(out.result.get("cost"), dict):
        out.result["cost"]["ray_num_gpus"] = resources["num_gpus"]
    return out.with_(log="")


def append_log(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
