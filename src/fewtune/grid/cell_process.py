"""The worker side of the grid: what runs inside the process that computes a cell, for every backend.

- a fresh process per cell (`python -m fewtune.grid.cell_process CONFIG_JSON RESULT_PATH [THREADS]`, backends.ProcessBackend);
- a warm worker (`warm_worker_main`, a multiprocessing child of backends.WarmBackend): loads a model once and runs
  many cells, each from a pristine copy of the weights, its RNGs reset (fewtune.grid.warm);
- a Ray task (ray_backend.run_cell_task), which calls `run_config` here;
- a Ray actor (ray_warm.WarmActor): a warm worker on a Ray cluster, as the local one (`WarmCells`).

None of them writes the results database: each hands its outcome back to the driver (driver.py), the only writer.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from ..config import RunConfig
from ..store import dumps, write_atomic
from .grid_spec import RUNNER_ENV


def resolve_runner():
    """fewtune.runner.run, or the callable named by $FEWTUNE_GRID_RUNNER ("module:function")."""
    spec = os.environ.get(RUNNER_ENV)
    if not spec:
        from ..runner import run
        return run
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


def configure_cell_process() -> None:
    """Logging and quiet libraries in a process that runs cells (a child process, a warm worker, a Ray worker)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    for noisy in ("transformers", "huggingface_hub", "datasets", "peft", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not os.environ.get(RUNNER_ENV):  # the real runner: keep transformers' per-load progress bars out of the log
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()


def run_config(config_json: str) -> dict:
    """Run one cell's config with the grid's runner: {"ok": True, "result": ...} or {"ok": False, "error": one line}.
    Any exception is a failed cell (its traceback goes to the log); KeyboardInterrupt propagates."""
    try:
        runner = resolve_runner()  # first: a plug-in runner may register what its configs need
        cfg = RunConfig.from_dict(json.loads(config_json))
        return {"ok": True, "result": runner(cfg, progress=False)}
    except Exception as e:
        traceback.print_exc()
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


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


def mark_shared(out: dict, backend: str, workers: int | None, threads: int | None) -> dict:
    """Say in the result how its cost figures were measured: which backend, how many cells shared the machine (None:
    not known, as on a Ray node shared with whatever the cluster schedules there), with how many threads. Costs
    measured alike compare; a cell timed beside 3 others is not one timed alone."""
    result = out.get("result")
    if out.get("ok") and isinstance(result, dict):
        cost = result.setdefault("cost", {})
        if isinstance(cost, dict):
            import torch
            cost.update(backend=backend, workers=workers, shared_with=None if workers is None else workers - 1,
                        torch_threads=threads or torch.get_num_threads())
    return out


# --- a fresh process per cell
def fresh_main(config_json: str, result_path: str, threads: int | None, workers: int) -> int:
    watch_parent()
    configure_cell_process()
    set_threads(threads)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        out = mark_shared(run_config(config_json), "process", workers, threads)
    except KeyboardInterrupt:
        return 130
    write_atomic(Path(result_path), dumps(out))  # the driver sees the whole record or none
    return 0 if out["ok"] else 1


# --- a warm worker: a local one (warm_worker_main) or a Ray actor (ray_warm.WarmActor)
def cell_device(config_json: str):
    """The device a cell's config will run on (its `device`, 'auto' resolved), or None when it names none usable
    (the run itself then says why)."""
    try:
        from ..engine.devices import pick_device
        return pick_device(json.loads(config_json).get("device") or "auto")
    except Exception:  # noqa: BLE001 - the run reports a bad device in its own words
        return None


class WarmCells:
    """What makes a process a warm worker: its share of the cores, a model cache (fewtune.grid.warm) as the process's model
    provider, and each cell run from a pristine state (RNGs, grad mode, allocator reset), its output in its log."""

    def __init__(self, backend: str, workers: int | None, threads: int | None, device_alone: bool = True):
        configure_cell_process()
        set_threads(threads)
        from ..engine import models
        from . import warm
        self.backend, self.workers, self.threads = backend, workers, threads
        # a template on the GPU only for a worker alone on its device: the worker plan sizes shared devices by the
        # cells' measured peaks, which a second copy of the weights per worker would overrun
        self.cache = warm.WarmModels(device_templates=device_alone)
        models.set_model_provider(self.cache)

    def run(self, config_json: str, log_path: Path) -> dict:
        """One cell, stdout/stderr appended to `log_path`: {"ok", "result" | "error", "rss_mib", "cache_miss"}."""
        import psutil

        from . import warm
        cache = self.cache
        with output_to(log_path):
            warm.reset_process_state()
            cache.begin_cell(cell_device(config_json))
            out = mark_shared(run_config(config_json), self.backend, self.workers, self.threads)
            if out.get("ok"):
                out["result"].setdefault("cost", {}).update(warm_model_cache=cache.last_hit,
                                                            warm_template_on_device=cache.last_on_device)
        out["rss_mib"] = round(psutil.Process().memory_info().rss / 2**20, 1)
        out["cache_miss"] = cache.last_hit is False  # it kept a new model: more memory, by design
        return out


def warm_worker_main(conn, threads: int | None, workers: int, env: dict, device_alone: bool = True) -> None:
    """Serve cells from the driver over `conn` until it sends None or goes away.

    Receives JSON {"config": json, "log": path} (b"": stop); runs the cell with stdout/stderr in the cell's log; answers
    {"ok", "result" | "error", "rss_mib", "cache_miss"}. The model cache lives as long as this process."""
    os.setsid()  # a terminal's Ctrl-C reaches the driver only, which then stops the cells it owns
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ.update(env)
    for entry in reversed(env.get("PYTHONPATH", "").split(os.pathsep)):  # what a fresh child would import from
        if entry and entry not in sys.path:
            sys.path.insert(0, entry)
    watch_parent()
    cells = WarmCells("warm", workers, threads, device_alone)
    conn.send_bytes(b'{"ready": true}')  # the driver times the first cell from here, not from the spawn
    while True:
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if not raw:  # the driver's "stop"
            return
        job = json.loads(raw)
        out = cells.run(job["config"], Path(job["log"]))
        try:
            conn.send_bytes(dumps(out).encode())
        except (BrokenPipeError, OSError):
            return


if __name__ == "__main__":
    if len(sys.argv) in (3, 5):
        threads = int(sys.argv[3]) if len(sys.argv) == 5 and sys.argv[3] != "0" else None
        sys.exit(fresh_main(sys.argv[1], sys.argv[2], threads, int(sys.argv[4]) if len(sys.argv) == 5 else 1))
    sys.exit("usage: python -m fewtune.grid.cell_process CONFIG_JSON RESULT_PATH [THREADS WORKERS] (started by `fewtune grid`)")
