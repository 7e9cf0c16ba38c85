"""Where a grid's cells run: the backends the driver (driver.py) drives, all behind one small interface.

| backend | a cell runs in | start-up per cell | isolation |
|---|---|---|---|
| `process` (default) | a fresh `python -m fewtune.grid.cell_process` child | imports + model load (~3-6 s on CPU, 8-10 s on a GPU) | complete: its memory goes back when it exits |
| `warm` | one of N long-lived workers that keep the model loaded (fewtune.grid.warm) | a copy of the weights (~0.1-0.3 s for 135M params) | a crash, hang or memory growth replaces the worker |
| `ray` | a Ray task on a cluster (ray_backend.py) | as `process`, on the node | as `process` |
| `ray-warm` | one of the Ray actors (ray_warm.py), warm workers with the spec's [resources] | as `warm`, on the node | as `warm`: a dead, hung or growing actor is replaced |
| in-process (`--in-process`) | the driver's own process (debugging) | none | none |

The driver claims cells, starts them while `capacity()` allows, polls for outcomes, records them (it alone writes the
database), retries a cell whose worker died, and cancels what runs when interrupted. A backend only runs cells.
`--workers N` runs N cells at once on this machine (process and warm backends), each process with its share of the
cores as torch threads (`plan_workers`): never more threads than cores.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_ready
from pathlib import Path
from typing import Protocol

from ..errors import FewtuneError
from ..util import now
from .grid_spec import RUNNER_ENV, Cell
from .protocol import DEFAULT_RUNNER, CellOutcome, CellRequest

log = logging.getLogger("fewtune")
TERMINATE_GRACE_S = 10
POLL_S = 0.2           # the driver wakes this often to notice Ctrl-C / SIGTERM and finished cells
MAX_PER_GPU = 4        # warm workers per GPU at most by default: past ~4, kernel queues interleave and gain little
STARTUP_LIMIT_S = 300  # a warm worker that has not finished its imports after this long (with --cell-timeout) is stuck
GROWTH_STEP_MIB = 200  # a warm worker whose RSS after a cell rose by more than this after each of its last 3 cells is
GROWTH_CELLS = 3       # leaking (the allocator's cache plateaus after the largest cell; a leak keeps growing): replaced
RAM_SHARE = 0.8        # ... as is one holding more than 80 % of the machine's memory divided among the workers


@dataclass(frozen=True)
class Job:
    """One try of one cell, as the driver hands it to a backend."""
    cell: Cell
    log_path: Path
    attempt: int = 1
    started: float = field(default_factory=time.perf_counter)  # the first try's start: the cell's wall time

    @property
    def key(self) -> str:
        return self.cell.key

    @property
    def outcome_path(self) -> Path:
        """Where a success waits until the database has it (a fresh process writes it; the driver, for the others)."""
        return self.log_path.with_name(f"{self.key}.outcome.json")

    def request(self, backend: str, runner: str, workers: int | None, threads: int | None,
                result_path: Path | None = None) -> CellRequest:
        return CellRequest(config=self.cell.config.to_dict(), key=self.key, log_path=str(self.log_path),
                           attempt=self.attempt, runner=runner, backend=backend, workers=workers, threads=threads,
                           result_path=str(result_path) if result_path else None)


Outcome = CellOutcome  # what a backend's poll returns for a job (protocol.py)


def runner_spec(runner: str | None = None) -> str:
    """The runner the cells import: the one given, else $FEWTUNE_GRID_RUNNER (a plug-in), else fewtune.runner.run.
    Read here, in the driver, once: it travels to the cells in their requests."""
    return runner or os.environ.get(RUNNER_ENV) or DEFAULT_RUNNER


class Backend(Protocol):
    name: str
    worker_noun: str         # what dies when a cell "dies": "worker process", "warm worker", "Ray worker"
    default_retries: int     # re-runs of a died cell when neither --max-retries nor the spec says
    synchronous: bool        # start() runs the whole cell (in-process): a signal must interrupt it there

    def open(self) -> None: ...
    def capacity(self) -> int: ...
    def start(self, job: Job) -> None: ...
    def poll(self, timeout: float) -> list[tuple[Job, CellOutcome]]: ...
    def cancel(self, job: Job) -> None: ...
    def close(self) -> None: ...


# --- how many workers this machine holds
@dataclass(frozen=True)
class GpuInfo:
    index: int
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class WorkerPlan:
    workers: int
    threads: int | None            # torch threads per worker (None: torch's default, one worker alone)
    devices: tuple                 # per worker: the GPU index it is pinned to, or None (CPU)


def plan_workers(requested: int | None, cores: int, ram_available: int, need_bytes: int,
                 gpus: list[GpuInfo] = (), asked: str | None = None) -> WorkerPlan:
    """How many cells run at once and with how many threads each. On CPU: at most one worker per core, each with
    cores // workers threads (two processes that each take every core slow each other 10-27x on 2 cores); on GPUs:
    by default as many per device as its free memory holds at `need_bytes` each (at most MAX_PER_GPU), spread over
    the devices. More than the machine holds is an error, never oversubscription; `asked` says where the number was
    given, for that error (default: the --workers flag; a spec's `workers` key names its file)."""
    asked = asked or f"--workers {requested}"
    if requested is not None and requested < 1:
        raise FewtuneError(f"--workers must be ≥ 1, got {requested}.")
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    if gpus:
        fits = [max(0, g.free_bytes // max(need_bytes, 1)) for g in gpus]
        most = sum(fits)
        if most == 0:
            raise FewtuneError(f"No GPU has {gib(need_bytes)} free for one worker (free: "
                               f"{', '.join(gib(g.free_bytes) for g in gpus)}); free memory or lower the batch size.")
        if requested is None:
            requested = sum(min(f, MAX_PER_GPU) for f in fits)
        elif requested > most:
            raise FewtuneError(f"{asked}: the GPUs hold at most {most} workers at {gib(need_bytes)} "
                               f"each (free: {', '.join(gib(g.free_bytes) for g in gpus)}).")
        devices, left = [], list(fits)
        while len(devices) < requested:  # round robin over devices that still have room
            for i, g in enumerate(gpus):
                if left[i] > 0 and len(devices) < requested:
                    devices.append(g.index)
                    left[i] -= 1
        return WorkerPlan(requested, max(1, cores // requested), tuple(devices))
    requested = requested or 1
    if requested > cores:
        raise FewtuneError(f"{asked}: this machine has {cores} usable CPU core(s), so at most {cores} "
                           "workers (one core each) without oversubscribing them.")
    if requested * need_bytes > ram_available:
        raise FewtuneError(f"{asked}: each worker needs about {gib(need_bytes)} and "
                           f"{gib(ram_available)} of memory is available; at most {max(1, ram_available // need_bytes)}.")
    return WorkerPlan(requested, None if requested == 1 else cores // requested, (None,) * requested)


def visible_gpus(use_gpu: bool) -> list[GpuInfo]:
    """This machine's CUDA devices with their free memory now, when the cells use a GPU and torch sees one; else []."""
    if not use_gpu or not (Path("/proc/driver/nvidia").exists() or Path("/dev/kfd").exists()):
        return []  # no NVIDIA or ROCm driver here: no device to ask about
    # asked in a short-lived child: torch.cuda.mem_get_info creates a CUDA context on each device (~0.3-0.5 GiB),
    # which the grid process would otherwise hold on every GPU for the whole grid
    import json
    probe = ("import json, torch\n"
             "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
             "print(json.dumps([torch.cuda.mem_get_info(i) for i in range(n)]))")
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        sizes = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else []
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        sizes = []
    return [GpuInfo(i, free, total) for i, (free, total) in enumerate(sizes)]


def machine_plan(requested: int | None, need_bytes: int, use_gpu: bool = False,
                 gpus: list[GpuInfo] | None = None, asked: str | None = None) -> WorkerPlan:
    """plan_workers for this machine: its usable cores, available memory, and free GPU memory when cells use a GPU
    (`gpus`, else read from torch)."""
    import psutil
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    gpus = visible_gpus(use_gpu) if gpus is None else gpus
    return plan_workers(requested, cores, psutil.virtual_memory().available, need_bytes, gpus, asked)


# What a measured peak leaves out on CUDA: record.PeakMemory reads torch.cuda.max_memory_allocated, the tensors only.
# The process also holds its CUDA context (~0.3-0.5 GiB: kernels, cuBLAS workspaces) and the caching allocator keeps
# freed blocks reserved (fragmentation): +20 % of the peak and 0.5 GiB per worker cover both.
PEAK_MARGIN = 1.2
CUDA_CONTEXT_BYTES = 2**29


def model_need_bytes(models: list[str], measured_peak_mib: float | None = None) -> int:
    """Memory one worker needs: a measured peak of similar cells on a GPU (MiB, tensors only) with the margin above,
    else 6x the largest model's weights (weights, the warm copy, gradients and Adam's two moments of a full
    fine-tune), at least 1 GiB."""
    if measured_peak_mib:
        return int(measured_peak_mib * 2**20 * PEAK_MARGIN) + CUDA_CONTEXT_BYTES
    from ..engine.models import BUNDLED, cache_dir, resolve
    largest = 0
    for spec in models:
        try:
            where = Path(cache_dir() / "models" / spec) if spec in BUNDLED else Path(resolve(spec))
        except FewtuneError:
            continue
        if where.is_dir():
            largest = max(largest, sum(p.stat().st_size for p in where.glob("*.safetensors")))
    return max(6 * largest, 2**30)


# --- a fresh process per cell
def _died(code: int, log_path: Path) -> str:
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    return f"worker process {how} without a result (out of memory?); see {log_path}"


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(TERMINATE_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class _Child:
    job: Job
    proc: subprocess.Popen
    result_path: Path
    logf: object
    t0: float


class ProcessBackend:
    """Each cell in its own child process: a crash, an out-of-memory kill or a hung native library ends that cell
    only; its memory (model, optimizer, CUDA context) goes back when it exits; its stdout/stderr, C extensions
    included, go to the cell's log at the file-descriptor level. The cost: imports and model loading per cell."""
    name, worker_noun, default_retries, synchronous = "process", "worker process", 0, False

    def __init__(self, plan: WorkerPlan | None = None, cell_timeout_s: float | None = None, runner: str | None = None):
        self.plan = plan or WorkerPlan(1, None, (None,))
        self.cell_timeout_s = cell_timeout_s
        self.runner = runner_spec(runner)
        self.children: dict[str, _Child] = {}
        self.free_devices = list(self.plan.devices)

    def open(self) -> None:
        pass

    def capacity(self) -> int:
        return self.plan.workers

    def start(self, job: Job) -> None:
        result_path = job.outcome_path  # kept until the driver has recorded it (driver._settle)
        result_path.unlink(missing_ok=True)
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])  # the child imports this same fewtune
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        device = self.free_devices.pop(0) if self.free_devices else None
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(device)
        req = job.request(self.name, self.runner, self.plan.workers, self.plan.threads, result_path)
        cmd = [sys.executable, "-m", "fewtune.grid.cell_process", req.to_json()]
        logf = open(job.log_path, "a", encoding="utf-8")
        logf.write(f"\n=== {now()} fewtune grid: {job.cell.describe()} [{job.key}], child process, try {job.attempt}\n")
        logf.flush()
        # own session: a terminal's Ctrl-C reaches the grid only, which then stops the child and records it
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        proc.device = device
        self.children[job.key] = _Child(job, proc, result_path, logf, time.monotonic())

    def poll(self, timeout: float) -> list[tuple[Job, Outcome]]:
        deadline = time.monotonic() + timeout
        while True:
            done = []
            for key, c in list(self.children.items()):
                code = c.proc.poll()
                if code is None and self.cell_timeout_s and time.monotonic() - c.t0 > self.cell_timeout_s:
                    stop_process(c.proc)
                    done.append((c, CellOutcome("died", error=f"worker process hung: no result after "
                                                          f"{self.cell_timeout_s:.0f} s (--cell-timeout); see {c.job.log_path}")))
                elif code is not None:
                    done.append((c, self._outcome(c, code)))
            if done or time.monotonic() >= deadline:
                return [self._finish(c, o) for c, o in done]
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    @staticmethod
    def _outcome(c: _Child, code: int) -> CellOutcome:
        """The outcome the child wrote (whole or not at all). The file stays: the driver removes it once the database
        holds the result, so a failure to record loses nothing (the next grid records it from there)."""
        if c.result_path.exists():
            return CellOutcome.from_json(c.result_path.read_text())
        return CellOutcome("died", error=_died(code, c.job.log_path))

    def _finish(self, c: _Child, o: Outcome) -> tuple[Job, Outcome]:
        c.logf.write(f"\n=== {now()} child process exit code {c.proc.returncode}\n")
        c.logf.close()
        self.children.pop(c.job.key, None)
        if getattr(c.proc, "device", None) is not None:
            self.free_devices.append(c.proc.device)
        return c.job, o

    def cancel(self, job: Job) -> None:
        c = self.children.pop(job.key, None)
        if c is not None:
            stop_process(c.proc)
            c.logf.write(f"\n=== {now()} stopped by the grid (interrupted)\n")
            c.logf.close()  # an outcome it wrote before it was stopped stays: the next grid records it

    def close(self) -> None:
        for key in list(self.children):
            self.cancel(self.children[key].job)


# --- in the driver's process (debugging, tests with an injected runner)
class InlineBackend:
    """Cells run in the driver's own process, one at a time, their prints and log records going to the cell's
    log. A crash ends the grid: for debugging (`--in-process`) and for tests that inject a runner."""
    name, worker_noun, default_retries, synchronous = "in-process", "grid process", 0, True

    def __init__(self, runner=None):
        self.runner = runner  # a callable (tests), or None: the runner the environment names (runner_spec)
        self.done: list[tuple[Job, CellOutcome]] = []

    def open(self) -> None:
        if self.runner is None:
            from .cell_process import import_runner
            self.runner = import_runner(runner_spec())

    def capacity(self) -> int:
        return 1

    def start(self, job: Job) -> None:
        with open(job.log_path, "a", encoding="utf-8") as logf:
            logf.write(f"\n=== {now()} fewtune grid: {job.cell.describe()} [{job.key}], in process\n")
            handler = logging.StreamHandler(logf)
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
            root = logging.getLogger()
            root.addHandler(handler)
            try:
                with contextlib.redirect_stdout(logf), contextlib.redirect_stderr(logf):
                    result = self.runner(job.cell.config, progress=False)
                if isinstance(result, dict) and isinstance(result.get("cost"), dict):
                    result["cost"].update(backend=self.name, workers=1, shared_with=0)
                self.done.append((job, CellOutcome("success", result=result)))
            except Exception as e:
                traceback.print_exc(file=logf)
                self.done.append((job, CellOutcome("failed", error=f"{type(e).__name__}: {e}")))
            finally:
                root.removeHandler(handler)

    def poll(self, timeout: float) -> list[tuple[Job, CellOutcome]]:
        out, self.done = self.done, []
        return out

    def cancel(self, job: Job) -> None:
        pass

    def close(self) -> None:
        pass


# --- warm workers: local processes (WarmBackend) and Ray actors (ray_warm.RayWarmBackend) share WarmPool
def outgrown(history: list[float], rss_mib: float, cache_miss: bool,
             limit_mib: float | None) -> tuple[list[float], str | None]:
    """A warm worker's memory after a cell (a local worker or a Ray actor): its RSS history, counted from its last new
    model, and why it must be replaced, or None. Replaced when it leaks: its RSS after a cell grew by > GROWTH_STEP_MIB
    after each of its last GROWTH_CELLS cells that loaded no new model (a new model in the cache, ~540 MiB for the
    bundled one, is growth by design; RSS after a full fine-tune stays high, as the allocator keeps what it freed, but
    plateaus), or when it holds more than `limit_mib`. Seen on the mini-grid before cache misses were excluded:
    971 -> 1,388 -> 1,852 -> 2,663 MiB over zero-shot, icl, ft (a second model: the classifier), pbft."""
    history = [rss_mib] if cache_miss else history + [rss_mib]
    recent = history[-GROWTH_CELLS - 1:]
    if len(recent) > GROWTH_CELLS and all(b - a > GROWTH_STEP_MIB for a, b in zip(recent, recent[1:])):
        return history, (f"grew after each of its last {GROWTH_CELLS} cells "
                         f"({' -> '.join(f'{x:.0f}' for x in recent)} MiB)")
    if limit_mib and rss_mib > limit_mib:
        return history, f"holds {rss_mib:.0f} MiB (limit {limit_mib:.0f} MiB)"
    return history, None


@dataclass
class WarmSlot:
    """One warm worker as the driver sees it: the cell it runs, since when, and its memory after each cell."""
    index: int
    job: Job | None = None
    t0: float = 0.0
    cells: int = 0
    rss_mib: list = field(default_factory=list)  # after each cell since its last new model
    ready: bool = False   # its imports are done (the cell timeout counts from here)


class WarmPool:
    """What every warm backend does with its workers, local processes or Ray actors alike: one cell at a time per
    worker; a worker that died, hung past the cell timeout, leaks memory, or whose cell failed with an error that can
    leave its device unusable (a CUDA error) is killed and replaced before its next cell. Subclasses start, poll and
    kill their kind of worker."""
    worker_noun = "warm worker"

    def __init__(self, cell_timeout_s: float | None = None, max_rss_mib: float | None = None):
        self.cell_timeout_s, self.max_rss_mib = cell_timeout_s, max_rss_mib
        self.slots: list[WarmSlot | None] = []
        self.replaced = 0  # workers killed for a fault (died, hung, grew, a broken device), not at cancel or close

    def capacity(self) -> int:
        return len(self.slots)

    def free_slot(self) -> int:
        return next(i for i, w in enumerate(self.slots) if w is None or w.job is None)

    def memory_limit(self) -> float | None:
        return self.max_rss_mib

    def finished(self, w: WarmSlot, outcome: CellOutcome) -> None:
        """A cell's outcome came back from `w`: replace the worker if it must not run another cell."""
        w.job, w.cells = None, w.cells + 1
        why = None
        if outcome.status == "died":
            why = "died"
        elif outcome.replace_worker:
            why = f"ran a cell that failed with an error that can leave its device unusable ({outcome.error:.160})"
        elif outcome.rss_mib is not None:
            w.rss_mib, why = outgrown(w.rss_mib, outcome.rss_mib, outcome.cache_miss, self.memory_limit())
        if why:
            if why != "died":
                log.warning("%s %d %s: replaced", self.worker_noun, w.index, why)
            self.replace(w)

    def hung(self, w: WarmSlot) -> bool:
        if not self.cell_timeout_s or w.job is None:
            return False
        limit = self.cell_timeout_s if w.ready else max(self.cell_timeout_s, STARTUP_LIMIT_S)
        return time.monotonic() - w.t0 > limit

    def replace(self, w: WarmSlot) -> None:
        self.kill(w)
        self.replaced += 1

    def kill(self, w: WarmSlot) -> None:  # the worker is gone afterwards and its slot empty
        raise NotImplementedError


@dataclass
class _Worker(WarmSlot):
    process: multiprocessing.Process | None = None
    conn: object = None
    device: int | None = None


class WarmBackend(WarmPool):
    """N long-lived worker processes (multiprocessing, spawn) that keep the models they have loaded and run many cells
    each, from a pristine copy of the weights (fewtune.grid.warm). The driver retries or records the cell of a worker
    that dies, hangs past --cell-timeout, leaks or breaks its device; the pool replaces the worker. Workers never touch
    the database: requests and outcomes cross the pipe as JSON (protocol.py), never pickles."""
    name, worker_noun, default_retries, synchronous = "warm", "warm worker", 1, False

    def __init__(self, plan: WorkerPlan | None = None, cell_timeout_s: float | None = None,
                 max_rss_mib: float | None = None, runner: str | None = None):
        super().__init__(cell_timeout_s, max_rss_mib)
        self.plan = plan or WorkerPlan(1, None, (None,))
        self.runner = runner_spec(runner)
        self.slots = [None] * self.plan.workers
        self.ctx = multiprocessing.get_context("spawn")  # fork after torch's threads started is unsafe

    def open(self) -> None:
        pass

    def memory_limit(self) -> float:
        import psutil
        return self.max_rss_mib or RAM_SHARE * psutil.virtual_memory().total / 2**20 / max(self.plan.workers, 1)

    def _spawn(self, i: int) -> _Worker:
        from .cell_process import warm_worker_entry
        device = self.plan.devices[i] if i < len(self.plan.devices) else None
        env = {k: v for k, v in os.environ.items() if k.startswith(("FEWTUNE_", "PYTHONPATH", "HF_", "TOKENIZERS"))}
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(device)
        parent, child = self.ctx.Pipe()
        alone = device is None or self.plan.devices.count(device) == 1  # (a GPU shared: no template on it)
        p = self.ctx.Process(target=warm_worker_entry, args=(child, env, self.plan.threads, alone, self.runner),
                             name=f"fewtune-warm-{i}", daemon=True)
        p.start()
        child.close()
        w = _Worker(i, process=p, conn=parent, device=device)
        self.slots[i] = w
        return w

    def start(self, job: Job) -> None:
        i = self.free_slot()
        w = self.slots[i]
        if w is not None and not w.process.is_alive():
            self.kill(w)  # its pipe closed with it, not leaked
            w = None
        if w is None:
            w = self._spawn(i)
        with open(job.log_path, "a", encoding="utf-8") as logf:
            logf.write(f"\n=== {now()} fewtune grid: {job.cell.describe()} [{job.key}], warm worker {i} "
                       f"(pid {w.process.pid}, cell {w.cells + 1}), try {job.attempt}\n")
        w.job, w.t0 = job, time.monotonic()
        w.conn.send_bytes(job.request(self.name, self.runner, self.plan.workers, self.plan.threads).to_json().encode())

    def poll(self, timeout: float) -> list[tuple[Job, CellOutcome]]:
        import json
        busy = [w for w in self.slots if w is not None and w.job is not None]
        if not busy:
            time.sleep(timeout)
            return []
        ready = set(id(r) for r in wait_ready([w.conn for w in busy] + [w.process.sentinel for w in busy],
                                              timeout=timeout))
        out = []
        for w in busy:
            job = w.job
            if id(w.conn) in ready:
                try:
                    raw = w.conn.recv_bytes()
                except (EOFError, OSError):
                    raw = None
                if raw is not None and json.loads(raw).get("ready"):  # its imports do not count against the timeout
                    w.t0, w.ready = time.monotonic(), True
                    continue
                if raw is not None:
                    outcome = CellOutcome.from_json(raw)
                    out.append((job, outcome))
                    self.finished(w, outcome)
                    continue
            if id(w.conn) in ready or id(w.process.sentinel) in ready or not w.process.is_alive():
                w.process.join(1)
                code = w.process.exitcode
                how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
                       else f"exited with code {code}" if code is not None else "closed its pipe")
                self._log(job, f"warm worker {w.index} (pid {w.process.pid}) {how}")
                outcome = CellOutcome("died", error=f"warm worker {how} without a result (out of memory?); "
                                                    f"see {job.log_path}")
                out.append((job, outcome))
                self.finished(w, outcome)  # killed if it still runs (no exit code): never an orphan
            elif self.hung(w):
                self._log(job, f"warm worker {w.index} (pid {w.process.pid}) hung past {self.cell_timeout_s:.0f} s: killed")
                outcome = CellOutcome("died", error=f"warm worker hung: no result after {self.cell_timeout_s:.0f} s "
                                                    f"(--cell-timeout); see {job.log_path}")
                out.append((job, outcome))
                self.finished(w, outcome)
        return out

    @staticmethod
    def _log(job: Job, text: str) -> None:
        with open(job.log_path, "a", encoding="utf-8") as f:
            f.write(f"\n=== {now()} {text}\n")

    def kill(self, w: _Worker) -> None:
        if w.process.is_alive():
            w.process.kill()
        w.process.join(5)
        with contextlib.suppress(OSError):
            w.conn.close()
        self.slots[w.index] = None

    def cancel(self, job: Job) -> None:
        for w in self.slots:
            if w is not None and w.job is not None and w.job.key == job.key:
                self._log(job, "stopped by the grid (interrupted)")
                w.process.terminate()
                w.process.join(TERMINATE_GRACE_S)
                self.kill(w)

    def close(self) -> None:
        for w in list(self.slots):
            if w is None:
                continue
            with contextlib.suppress(OSError, BrokenPipeError):
                w.conn.send_bytes(b"")
            w.process.join(5)
            self.kill(w)
        self.replaced = 0


BACKENDS = ("process", "warm", "ray", "ray-warm")
