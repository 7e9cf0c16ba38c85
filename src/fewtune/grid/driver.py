"""The one loop that runs a grid's cells, whatever runs them: claim, start, poll, record, retry, cancel.

The driver (the `fewtune grid` process) is the only writer of the results database. It claims a cell (store.claim:
'running', owned by this process), starts it on the backend while the backend has capacity, polls for outcomes and
records each ('success' + the result record, or 'failed' + a one-line error). A cell whose worker died (killed,
out of memory, a lost Ray node, a hung warm worker) is tried again in the same row up to `retries` times, then
recorded failed. SIGINT/SIGTERM cancel every cell in flight (recorded 'cancelled') and raise Interrupted, and so
does any other way out of the loop (the rows in flight are cancelled, never left 'running'); a cell killed with the
driver (kill -9) stays 'running' with a dead owner and the next grid claims it again.

Nothing is lost between a worker and the database: a success waits on disk (`<key>.outcome.json` beside the cell's
log) until the database holds it. If recording fails (the database locked past its timeout, a full disk), the grid
stops with one line naming that file, and the next grid records it from there without running the cell again.
Backends: backends.py (process, warm, in-process), ray_backend.py (ray), ray_warm.py (ray-warm). Docs:
docs/grid.md.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import FewtuneError
from ..store import Store, this_process
from ..util import write_atomic
from .backends import POLL_S, Backend, Job
from .grid_spec import Cell, Grid, task_name
from .protocol import CellOutcome


class Interrupted(Exception):
    """SIGINT or SIGTERM reached the grid: the cells in flight are recorded as cancelled."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_raise():
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop) both raise Interrupted in the grid process."""
    def handler(signum, frame):
        raise Interrupted(signum)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class Summary:
    total: int = 0
    done_before: int = 0
    success: int = 0
    failed: int = 0
    busy: int = 0
    lost: int = 0   # finished here but not recorded: another grid took the cell over meanwhile (--reclaim)
    not_started: list = field(default_factory=list)  # keys of the cells `admit` kept from starting (a time budget)
    failures: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)  # cell key -> wall seconds of the cells that ran here


def brief(result: dict) -> str:
    """The per-run console line's result: the task's name and its primary metric per split (stats.fmt.brief)."""
    from ..stats.fmt import brief as run_brief
    return run_brief(result)


class Driver:
    """`with Driver(backend, store, log_dir, grid_name) as d: d.run(cells)`: the backend stays open across runs
    (warm workers keep their models between --until-resolved rounds)."""

    def __init__(self, backend: Backend, store: Store, log_dir: Path, grid_name: str, reclaim: bool = False,
                 retries: int | None = None, echo=print):
        self.backend, self.store, self.log_dir, self.grid_name = backend, store, Path(log_dir), grid_name
        self.reclaim, self.echo = reclaim, echo
        self.retries = backend.default_retries if retries is None else retries
        self.owner = this_process()
        self.received: list[int] = []
        self._previous: dict = {}

    # --- signals: noted between polls (an exception inside Ray's C++ wait, or half-way through a pipe read, would
    # lose the outcome), raised at once while an in-process cell runs (nothing else would stop it)
    def _handler(self, signum, frame):
        self.received.append(signum)
        if self.backend.synchronous:
            raise Interrupted(signum)

    def _own_signals(self) -> None:  # Ray installs handlers of its own after connecting: keep ours in place
        for s in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(s) != self._handler:
                signal.signal(s, self._handler)

    def _check_signals(self) -> None:
        if self.received:
            raise Interrupted(self.received[0])

    def __enter__(self):
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        self._own_signals()
        try:
            self.backend.open()
            self._own_signals()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        try:
            self.backend.close()
        finally:
            for s, h in self._previous.items():
                signal.signal(s, h)
        return False

    # --- the loop
    def run(self, cells: list[Cell], progress: bool = False, admit: Callable[[Cell], bool] | None = None,
            on_done: Callable[[Cell, str, float], None] | None = None) -> Summary:
        """Run every cell of `cells` that has not succeeded yet. `admit(cell)`, asked right before a cell starts,
        may refuse it (a time budget): no later cell starts then. `on_done(cell, outcome, seconds)` after each."""
        from tqdm import tqdm
        self.log_dir.mkdir(parents=True, exist_ok=True)
        status = self.store.statuses()
        s = Summary(total=len(cells))
        s.done_before = sum(status.get(c.key) == "success" for c in cells)
        bar = tqdm(total=len(cells), initial=s.done_before, unit="run", desc=f"grid {self.grid_name}",
                   disable=not progress, dynamic_ncols=True)
        write = bar.write if progress else self.echo
        todo = [c for c in cells if status.get(c.key) != "success"]
        pending: dict[str, Job] = {}
        try:
            while todo or pending:
                while todo and len(pending) < self.backend.capacity():
                    cell = todo[0]
                    if admit is not None and status.get(cell.key) != "success" and not admit(cell):
                        s.not_started += [c.key for c in todo]
                        todo = []
                        break
                    todo.pop(0)
                    log_path = self._claim(cell, s, bar, write)
                    if log_path is None:
                        continue
                    job = Job(cell, log_path)
                    kept = self._kept_outcome(job)
                    if kept is not None:  # an earlier grid computed it but could not record it: record, not rerun
                        write(f"- {cell.describe()}: recording the result an earlier grid kept in {job.outcome_path}")
                        pending[job.key] = job
                        self._settle(job, kept, s, bar, write, on_done)
                        pending.pop(job.key, None)
                        continue
                    pending[job.key] = job
                    bar.set_postfix_str(cell.describe())
                    self.backend.start(job)
                self._check_signals()
                polled = self.backend.poll(POLL_S if pending else 0)
                for i, (job, outcome) in enumerate(polled):
                    try:
                        retry = self._settle(job, outcome, s, bar, write, on_done)
                    except BaseException:
                        self._keep(polled[i + 1:])  # received, not yet recorded: on disk for the next grid
                        raise
                    pending.pop(job.key, None)
                    if retry is not None:
                        pending[retry.key] = retry
                        self.backend.start(retry)
                self._own_signals()
                self._check_signals()
        except BaseException as e:  # every way out: the rows in flight are cancelled, never left 'running'
            why = (e if isinstance(e, Interrupted) else "SIGINT" if isinstance(e, KeyboardInterrupt)
                   else f"the grid stopping ({type(e).__name__})")
            for job in pending.values():
                with contextlib.suppress(Exception):
                    self.backend.cancel(job)
                with contextlib.suppress(Exception):  # the database itself may be what failed
                    if self.store.cancel(job.key, f"cancelled by {why} after {time.perf_counter() - job.started:.0f} s",
                                         self.owner):
                        write(f"x {job.cell.describe()}: cancelled [{job.key}]")
            raise
        finally:
            bar.close()
        return s

    def _claim(self, cell: Cell, s: Summary, bar, write) -> Path | None:
        """Claim a cell for this process: its log path, or None when it is done or running in another live process."""
        log_path = self.log_dir / f"{cell.key}.log"
        claim = self.store.claim(cell.config, cell.label, self.grid_name, str(log_path), self.owner, self.reclaim,
                                 key=cell.key, task_name=task_name(cell.config.task))
        if claim == "claimed":
            return log_path
        s.busy += claim == "busy"
        s.done_before += claim == "done"
        bar.update(1)
        if claim == "busy":
            write(f"- {cell.describe()}: running in another process, skipped")
        return None

    @staticmethod
    def _keep(received: list) -> None:
        """Successes that came back but will not be recorded by this grid (it is stopping): kept on disk, where the
        next grid finds them (best effort: the disk may be what failed)."""
        for job, o in received:
            if o.status == "success" and not job.outcome_path.exists():
                with contextlib.suppress(Exception):
                    write_atomic(job.outcome_path, o.to_json())

    @staticmethod
    def _kept_outcome(job: Job) -> CellOutcome | None:
        """A success that an earlier grid left on disk for this cell (it could not record it), if any and whole."""
        path = job.outcome_path
        if not path.is_file():
            return None
        try:
            kept = CellOutcome.from_json(path.read_text(encoding="utf-8"))
        except (ValueError, TypeError, OSError):
            return None
        if kept.status != "success":
            path.unlink(missing_ok=True)  # only successes are kept: a failure is cheap to meet again
            return None
        return kept

    def _settle(self, job: Job, o: CellOutcome, s: Summary, bar, write, on_done) -> Job | None:
        """Record a finished try, or return the next try of a cell whose worker died."""
        seconds = time.perf_counter() - job.started
        if o.status == "died" and job.attempt <= self.retries:
            write(f"! {job.cell.describe()}: {o.error}; retry {job.attempt}/{self.retries}")
            # the same row, attempts + 1 (the claim succeeds while the row is ours)
            if self.store.claim(job.cell.config, job.cell.label, self.grid_name, str(job.log_path), self.owner,
                                False, key=job.key, task_name=task_name(job.cell.config.task)) == "claimed":
                return Job(job.cell, job.log_path, job.attempt + 1, job.started)
            s.lost += 1  # another grid took the cell over meanwhile (--reclaim): counted, never silently dropped
            write(f"NOT RECORDED {job.cell.describe()}: its worker died ({o.error}) and another grid took this cell "
                  f"over meanwhile (--reclaim), so it is not retried here [{job.key}; log: {job.log_path}]")
            bar.update(1)
            return None
        if o.status == "success":
            outcome, payload = "success", o.result
            ran = payload.get("config_hash") if isinstance(payload, dict) else None
            if ran is not None and ran != job.key:  # the cell read other inputs than the grid claimed it with
                outcome, payload = "failed", (
                    f"its inputs changed after the grid claimed it: the run's identity hashes to {ran}, not to the "
                    f"cell's key {job.key} (a task, data or model file edited meanwhile?); run the grid again")
        else:
            outcome, payload = "failed", o.error
        if o.status == "died" and job.attempt > 1:
            payload = (f"{self.backend.worker_noun[0].upper()}{self.backend.worker_noun[1:]} died on each of "
                       f"{job.attempt} tries; last: {o.error}; see {job.log_path}")
        kept = job.outcome_path
        try:
            if outcome == "success":
                if not kept.exists():  # a fresh process wrote it already; the other backends hand it over
                    write_atomic(kept, o.to_json())
                recorded = self.store.finish(job.key, payload, self.owner)
            else:
                recorded = self.store.fail(job.key, payload, self.owner)
        except Exception as e:  # noqa: BLE001 - whatever it was, the result must not be lost with the grid
            where = f"; the result is kept in {kept}" if outcome == "success" and kept.exists() else ""
            raise FewtuneError(f"could not record {job.cell.describe()} [{job.key}] in the database "
                               f"({type(e).__name__}: {' '.join(str(e).split())[:200]}){where}: run the grid "
                               "again to record it (it will not run the cell again)") from None
        if recorded or outcome != "success":
            kept.unlink(missing_ok=True)  # the database has it now (a failure is cheap to meet again)
        s.seconds[job.key] = seconds
        if not recorded:  # the row is no longer ours: say so, never "ok"
            s.lost += 1
            what = f"succeeded ({brief(payload)})" if outcome == "success" else f"failed ({payload})"
            write(f"NOT RECORDED {job.cell.describe()}: {what} after {seconds:.0f} s, but another grid took this cell "
                  f"over meanwhile (--reclaim), so the row is that grid's [{job.key}; log: {job.log_path}]")
        elif outcome == "success":
            s.success += 1
            write(f"ok {job.cell.describe()}: {brief(payload)} ({seconds:.0f} s)")
        else:
            s.failed += 1
            s.failures.append((job.cell, payload))
            write(f"FAILED {job.cell.describe()}: {payload} [log: {job.log_path}]")
        bar.update(1)
        if on_done is not None:
            on_done(job.cell, outcome, seconds)
        return None


def run_grid(grid: Grid, store: Store, log_dir: Path, runner=None, in_process: bool = False, reclaim: bool = False,
             progress: bool = True, echo=print, backend: Backend | None = None, retries: int | None = None) -> Summary:
    """Run every cell of `grid` that has not succeeded yet on `backend` (default: a fresh process per cell, or this
    process with `in_process`/`runner`). A failed cell is recorded and the grid goes on; Interrupted (Ctrl-C,
    SIGTERM) records the cells in flight as cancelled and propagates."""
    if backend is None:
        from .backends import InlineBackend, ProcessBackend
        backend = InlineBackend(runner) if in_process or runner is not None else ProcessBackend()
    if retries is None and grid.max_retries is not None:
        retries = grid.max_retries
    with Driver(backend, store, log_dir, grid.name, reclaim=reclaim, retries=retries, echo=echo) as d:
        return d.run(grid.cells, progress=progress)
