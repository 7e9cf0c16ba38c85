"""`fewtune grid SPEC --backend ray-warm`: warm workers (fewtune.grid.warm) as Ray actors, each with the spec's [resources].

The `ray` backend starts a fresh Ray worker per cell, which pays imports and the model load every cell. Here each actor
is a warm worker, as `--backend warm` keeps locally (cell_process.WarmCells): it loads a model once and runs many
cells, each from a pristine copy of the weights with its RNGs reset, so a result equals the fresh process's.
A fractional `num_gpus` shares a GPU: 0.25 puts four actors on one GPU (`cost.ray_num_gpus` records the share).

There are as many actors as the live nodes hold at once (ray_backend.cells_that_fit), each running one cell at a time.
The driver (driver.py) stays the only writer of the database; an actor hands back JSON text, never a pickle.
An actor that dies (killed, out of memory, its node lost) or hangs past --cell-timeout is replaced, its cell 'died'
(retried `max_retries` times, default 2, then failed); one whose memory keeps growing is replaced after its cell
(backends.outgrown), as is one whose cell failed with an error that can leave its device unusable (a CUDA error):
the rules of every warm pool (backends.WarmPool), local or on Ray. Memory beyond the node's is Ray's to police: its
memory monitor kills a worker when the node runs out, which is then a dead actor like any other.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..util import dumps, now
from .backends import Job, WarmPool, WarmSlot, runner_spec
from .cell_process import WarmCells
from .protocol import DEFAULT_RUNNER, CellOutcome, CellRequest
from .ray_backend import (MAX_RETRIES, WAIT_S, append_log, cells_that_fit, collect, connect, hand_back, import_ray,
                          task_options)

log = logging.getLogger("fewtune")


# --- in the Ray actor's worker process
class WarmActor:
    """A warm worker that Ray keeps alive between cells; made a Ray actor by RayWarmBackend."""

    def __init__(self, env: dict, num_cpus: float, num_gpus: float = 0, runner: str = DEFAULT_RUNNER):
        os.environ.update(env)  # the driver's FEWTUNE_* settings: data folder, cache
        # torch threads as the CPUs Ray reserved for this actor (at least one): it shares its node with other actors;
        # a template on the GPU only on a whole GPU of its own (a share's memory is sized for the cells alone)
        self.cells = WarmCells(max(1, int(num_cpus)), device_alone=num_gpus >= 1, runner=runner)

    def ready(self) -> str:
        return dumps({"host": socket.gethostname(), "pid": os.getpid()})

    def run(self, request_json: str) -> str:
        """One cell: a CellRequest in, a CellOutcome out (with the end of its log and where it ran), JSON text."""
        with tempfile.TemporaryDirectory(prefix="fewtune-cell-") as tmp:
            log_file = Path(tmp) / "cell.log"
            return hand_back(self.cells.run(CellRequest.from_json(request_json), log_file), log_file)


# --- in the driver
@dataclass
class _Actor(WarmSlot):
    handle: object = None
    ready_ref: object | None = None  # its ready() call until that answers: its imports do not count against the timeout
    ref: object | None = None        # the running cell's call


class RayWarmBackend(WarmPool):
    """As many warm actors as the live nodes hold at once; each runs one cell at a time. A dead, hung or growing actor,
    or one whose cell broke its device, is killed and replaced by a new one when the next cell needs it (WarmPool)."""
    name, worker_noun, default_retries, synchronous = "ray-warm", "Ray actor", MAX_RETRIES, False

    def __init__(self, resources: dict, address: str | None = None, cell_timeout_s: float | None = None,
                 max_rss_mib: float | None = None, runner: str | None = None):
        super().__init__(cell_timeout_s, max_rss_mib)
        self.resources, self.address = resources, address
        self.runner = runner_spec(runner)
        self.ray = None

    def open(self) -> None:
        self.ray = import_ray()
        connect(self.ray, self.address)
        self.slots = [None] * cells_that_fit(self.ray, self.resources)
        # no restarts, no retries inside Ray: a dead actor's cell goes back to the driver, which counts the tries
        self.actor_class = self.ray.remote(WarmActor).options(**task_options(self.resources), max_restarts=0,
                                                              max_task_retries=0)
        self.env = {k: v for k, v in os.environ.items() if k.startswith("FEWTUNE_")}

    def start(self, job: Job) -> None:
        i = self.free_slot()
        a = self.slots[i]
        if a is None:
            handle = self.actor_class.remote(self.env, self.resources["num_cpus"], self.resources["num_gpus"],
                                             self.runner)
            a = self.slots[i] = _Actor(i, handle=handle, ready_ref=handle.ready.remote())
        self._call(a, job)

    def _call(self, a: _Actor, job: Job) -> None:
        append_log(job.log_path, f"\n=== {now()} fewtune grid: {job.cell.describe()} [{job.key}], Ray actor {a.index} "
                                 f"(cell {a.cells + 1}), try {job.attempt}\n")
        a.job, a.t0 = job, time.monotonic()
        a.ref = a.handle.run.remote(job.request(self.name, self.runner, None, None).to_json())

    def _move_unstarted(self, idle: list[_Actor]) -> None:
        """Cells waiting for an actor that has not started (Ray may not place it while another grid's actors hold
        the nodes) move to `idle` actors: up, and left idle by the driver, which starts a cell wherever there is room,
        so it has none left to start. The unstarted actor is given up. Two grids on one cluster otherwise each wait
        for ever on an actor for which the other's leave no room."""
        for a in list(self.slots):
            if not idle:
                return
            if a is not None and a.job is not None and a.ready_ref is not None:
                job, to = a.job, idle.pop()
                append_log(job.log_path, f"\n=== {now()} Ray actor {a.index} not started yet: the cell moves to "
                                         f"actor {to.index}\n")
                a.job = None
                self.kill(a)
                self._call(to, job)

    def poll(self, timeout: float) -> list[tuple[Job, CellOutcome]]:
        self._move_unstarted([a for a in self.slots if a is not None and a.job is None and a.ready_ref is None])
        busy = [a for a in self.slots if a is not None and a.job is not None]
        if not busy:
            time.sleep(timeout)
            return []
        calls = {a.ref: a for a in busy} | {a.ready_ref: a for a in busy if a.ready_ref is not None}
        ready, _ = self.ray.wait(list(calls), num_returns=1, timeout=max(timeout, WAIT_S))
        out = []
        for ref in ready:
            a = calls[ref]
            if a.ready_ref is not None and ref == a.ready_ref:  # started (or dead: its cell's call then says so)
                a.ready_ref, a.t0, a.ready = None, time.monotonic(), True
                continue
            job = a.job
            outcome = collect(self.ray, ref, job.log_path, self.resources)
            a.ref, a.ready_ref = None, None
            out.append((job, outcome))
            self.finished(a, outcome)
        for a in busy:
            if a.job is not None and self.hung(a):
                append_log(a.job.log_path, f"\n=== {now()} Ray actor {a.index} hung past {self.cell_timeout_s:.0f} s: "
                                           "killed\n")
                outcome = CellOutcome("died", error=f"Ray actor hung: no result after {self.cell_timeout_s:.0f} s "
                                                    f"(--cell-timeout); see {a.job.log_path}")
                out.append((a.job, outcome))
                self.finished(a, outcome)
        return out

    def kill(self, a: _Actor) -> None:
        """Kill the actor (if it still lives); the next cell in its slot starts a new one."""
        with contextlib.suppress(Exception):  # already gone
            self.ray.kill(a.handle, no_restart=True)
        self.slots[a.index] = None

    def cancel(self, job: Job) -> None:
        # ray.kill, not ray.cancel(force=True), which sometimes aborted the driver inside Ray (RayBackend.cancel)
        for a in self.slots:
            if a is not None and a.job is not None and a.job.key == job.key:
                append_log(job.log_path, f"\n=== {now()} stopped by the grid (interrupted)\n")
                self.kill(a)

    def close(self) -> None:
        if self.ray is None:
            return
        for a in self.slots:
            if a is not None:
                self.kill(a)
        self.ray.shutdown()
        self.ray = None
