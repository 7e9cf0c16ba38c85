"""The worker side of the grid: what runs inside the process that computes a cell, for every backend.

- a fresh process per cell (`python -m fewtune.grid.cell_process REQUEST_JSON`, backends.ProcessBackend), which writes
  its outcome to the request's result_path;
- a warm worker (`warm_worker_main`, a multiprocessing child of backends.WarmBackend): loads a model once and runs
  many cells, each from a pristine copy of the weights, its RNGs reset (fewtune.grid.warm);
- a Ray task (ray_backend.run_cell_task), which calls `run_request` here;
- a Ray actor (ray_warm.WarmActor): a warm worker on a Ray cluster, as the local one (`WarmCells`).

Each receives a protocol.CellRequest and hands a protocol.CellOutcome back to the driver (driver.py), the only writer
of the results database. The runner is the one the request names ("module:function", fewtune.runner.run unless the
driver was given another), imported here: nothing is looked up in the environment.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from ..util import write_atomic
from .protocol import DEFAULT_RUNNER, CellOutcome, CellRequest, leaves_device_unusable


def import_runner(spec: str = DEFAULT_RUNNER):
    """The callable a request names ("module:function")."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr or "run")


def watch_parent(interval_s: float = 1.0) -> None:
    """Exit when the grid that started this process is gone (it was killed: nobody would record our result)."""
    parent = os.getppid()

    def loop():
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os._exit(137)
    threading.Thread(target=loop, daemon=True, name="watch-parent").start()


def set_threads(threads: int | None) -> None:
    """This process's share of the cores. Two fewtune processes that each take every core's threads slow each other
    10-27x on 2 cores (SST-2 cells: zero-shot 6 s alone vs 60 s beside another job): N workers get cores/N each."""
    if threads:
        import torch
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for libraries that read it later (tokenizers, numpy)


def configure_cell_process(runner: str = DEFAULT_RUNNER) -> None:
    """Logging and quiet libraries in a process that runs cells (a child process, a warm worker, a Ray worker)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    for noisy in ("transformers", "huggingface_hub", "datasets", "peft", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if runner == DEFAULT_RUNNER:  # the real runner: keep transformers' per-load progress bars out of the log
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()


def run_request(req: CellRequest) -> CellOutcome:
    """Run one cell with the request's runner. Any exception is a failed cell (its traceback goes to the log), and
    one that can leave the device unusable (a CUDA error) also asks for the worker to be replaced; KeyboardInterrupt
    propagates. The result says how its cost figures were measured (`measured`)."""
    from ..config import RunConfig
    try:
        runner = import_runner(req.runner)  # first: a plug-in runner may register what its configs need
        result = runner(RunConfig.from_dict(req.config), progress=False)
    except Exception as e:
        traceback.print_exc()
        return CellOutcome("failed", error=f"{type(e).__name__}: {e}", replace_worker=leaves_device_unusable(e))
    return CellOutcome("success", result=measured(result, req))


@contextlib.contextmanager
def output_to(path: Path):
    """Send this process's stdout and stderr (file descriptors 1 and 2: C libraries too) to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def measured(result, req: CellRequest):
    """Say in the result how its cost figures were measured: which backend, how many cells shared the machine (None:
    not known, as on a Ray node shared with whatever the cluster schedules there), with how many threads. Costs
    measured alike compare; a cell timed beside 3 others is not one timed alone."""
    if isinstance(result, dict) and isinstance(result.setdefault("cost", {}), dict):
        threads = req.threads
        if threads is None and "torch" in sys.modules:
            threads = sys.modules["torch"].get_num_threads()
        result["cost"].update(backend=req.backend, workers=req.workers,
                              shared_with=None if req.workers is None else req.workers - 1, torch_threads=threads)
    return result


# --- a fresh process per cell
def fresh_main(request_json: str) -> int:
    req = CellRequest.from_json(request_json)
    watch_parent()
    configure_cell_process(req.runner)
    set_threads(req.threads)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        out = run_request(req)
    except KeyboardInterrupt:
        return 130
    write_atomic(Path(req.result_path), out.to_json())  # the driver sees the whole outcome or none
    return 0 if out.status == "success" else 1


# --- a warm worker: a local one (warm_worker_main) or a Ray actor (ray_warm.WarmActor)
def cell_device(config: dict):
    """The device a cell's config will run on (its `device`, 'auto' resolved), or None when it names none usable
    (the run itself then says why)."""
    try:
        from ..engine.devices import pick_device
        return pick_device(config.get("device") or "auto")
    except Exception:  # noqa: BLE001 - the run reports a bad device in its own words
        return None


class WarmCells:
    """What makes a process a warm worker: its share of the cores, a model cache (fewtune.grid.warm) as the process's model
    provider, and each cell run from a pristine state (RNGs, grad mode, allocator reset), its output in its log."""

    def __init__(self, threads: int | None, device_alone: bool = True, runner: str = DEFAULT_RUNNER):
        configure_cell_process(runner)
        set_threads(threads)
        from ..engine import models
        from . import warm
        # a template on the GPU only for a worker alone on its device: the worker plan sizes shared devices by the
        # cells' measured peaks, which a second copy of the weights per worker would overrun
        self.cache = warm.WarmModels(device_templates=device_alone)
        models.set_model_provider(self.cache)

    def run(self, req: CellRequest, log_path: Path) -> CellOutcome:
        """One cell, stdout/stderr appended to `log_path`, with the worker's memory after it and whether it kept a
        new model."""
        import psutil

        from . import warm
        cache = self.cache
        with output_to(log_path):
            warm.reset_process_state()
            cache.begin_cell(cell_device(req.config))
            out = run_request(req)
            if out.status == "success":
                out.result.setdefault("cost", {}).update(warm_model_cache=cache.last_hit,
                                                         warm_template_on_device=cache.last_on_device)
        return out.with_(rss_mib=round(psutil.Process().memory_info().rss / 2**20, 1),
                         cache_miss=cache.last_hit is False)  # it kept a new model: more memory, by design


def warm_worker_entry(conn, env: dict, threads: int | None, device_alone: bool, runner: str) -> None:
    """A warm worker's first code (the spawn target): its environment (CUDA_VISIBLE_DEVICES, FEWTUNE_*, PYTHONPATH)
    is set here, before anything imports torch (this module imports only the standard library and fewtune's light
    modules at its top: tests/test_protocol.py checks it), then the worker loop starts."""
    os.environ.update(env)
    for entry in reversed(env.get("PYTHONPATH", "").split(os.pathsep)):  # what a fresh child would import from
        if entry and entry not in sys.path:
            sys.path.insert(0, entry)
    warm_worker_main(conn, threads, device_alone, runner)


def warm_worker_main(conn, threads: int | None, device_alone: bool = True, runner: str = DEFAULT_RUNNER) -> None:
    """Serve cells from the driver over `conn` until it sends b"" (stop) or goes away.

    Receives a CellRequest as JSON; runs the cell with stdout/stderr in the cell's log; answers a CellOutcome as JSON.
    The model cache lives as long as this process (started by warm_worker_entry)."""
    os.setsid()  # a terminal's Ctrl-C reaches the driver only, which then stops the cells it owns
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    watch_parent()
    cells = WarmCells(threads, device_alone, runner)
    conn.send_bytes(b'{"ready": true}')  # the driver times the first cell from here, not from the spawn
    while True:
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if not raw:  # the driver's "stop"
            return
        req = CellRequest.from_json(raw)
        out = cells.run(req, Path(req.log_path))
        try:
            conn.send_bytes(out.to_json().encode())
        except (BrokenPipeError, OSError):
            return


if __name__ == "__main__":
    if len(sys.argv) == 2:
        sys.exit(fresh_main(sys.argv[1]))
    sys.exit("usage: python -m fewtune.grid.cell_process REQUEST_JSON (started by `fewtune grid`)")
