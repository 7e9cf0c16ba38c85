"""`fewtune grid SPEC --backend ray-warm`: warm workers (fewtune.grid.warm) as Ray actors, each with the spec's [resources].

The `ray` backend starts a fresh Ray worker per cell, which pays imports and the model load every cell. Here each actor
is a warm worker, as `--backend warm` keeps locally (cell_process.WarmCells): it loads a model once and runs many
cells, each from a pristine copy of the weights with its RNGs reset, so a result equals the fresh process's.
A fractional `num_gpus` shares a GPU: 0.25 puts four actors on one GPU (`cost.ray_num_gpus` records the share).

There are as many actors as the live nodes hold at once (ray_backend.cells_that_fit), each running one cell at a time.
The driver (driver.py) stays the only writer of the database; an actor hands back JSON text, never a pickle.
An actor that dies (killed, out of memory, its node lost) or hangs past --cell-timeout is replaced, its cell 'died'
(retried `max_retries` times, default 2, then failed); one whose memory keeps growing is replaced after its cell
(backends.outgrown). Memory beyond the node's is Ray's to police: its memory monitor kills a worker when the node
runs out, which is then a dead actor like any other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..store import dumps, now
from .backends import STARTUP_LIMIT_S, Job, Outcome, outgrown
from .cell_process import WarmCells
from .ray_backend import (
    MAX_RETRIES,
    WAIT_S,
    append_log,
    cells_that_fit,
    collect,
    connect,
    hand_back,
    import_ray,
    task_options,
)

log = logging.getLogger("fewtune")


# --- in the Ray actor's worker process
class WarmActor:
    """A warm worker that Ray keeps alive between cells; made a Ray actor by RayWarmBackend."""

    def __init__(self, env: dict, num_cpus: float, num_gpus: float = 0):
        os.environ.update(env)  # the driver's FEWTUNE_* settings: runner, data folder, cache
        # torch threads as the CPUs Ray reserved for this actor (at least one): it shares its node with other actors;
        # a template on the GPU only on a whole GPU of its own (a share's memory is sized for the cells alone)
        self.cells = WarmCells("ray-warm", None, max(1, int(num_cpus)), device_alone=num_gpus >= 1)

    def ready(self) -> str:
        return dumps({"host": socket.gethostname(), "pid": os.getpid()})

    def run(self, config_json: str) -> str:
        """One cell: JSON text {"ok", "result" | "error", "rss_mib", "cache_miss", "log", "host", "pid"}."""
        with tempfile.TemporaryDirectory(prefix="fewtune-cell-") as tmp:
            log_file = Path(tmp) / "cell.log"
            return hand_back(self.cells.run(config_json, log_file), log_file)


# --- in the driver
@dataclass
class _Actor:
    index: int
    handle: object
    ready_ref: object | None       # its ready() call until that answers: its imports do not count against the timeout
    job: Job | None = None
    ref: object | None = None      # the running cell's call
    t0: float = 0.0
    cells: int = 0
    rss_mib: list = field(default_factory=list)  # after each cell since its last new model


class RayWarmBackend:
    """As many warm actors as the live nodes hold at once; each runs one cell at a time. A dead, hung or growing actor
    is killed and replaced by a new one when the next cell needs it."""
    name, worker_noun, default_retries, synchronous = "ray-warm", "Ray actor", MAX_RETRIES, False

    def __init__(self, resources: dict, address: str | None = None, cell_timeout_s: float | None = None,
                 max_rss_mib: float | None = None):
        self.resources, self.address = resources, address
        self.cell_timeout_s, self.max_rss_mib = cell_timeout_s, max_rss_mib
        self.ray = None
        self.actors: list[_Actor | None] = []
        self.replaced = 0  # actors killed for a fault (died, hung, grew), not at cancel or close

    def open(self) -> None:
        self.ray = import_ray()
        connect(self.ray, self.address)
        self.actors = [None] * cells_that_fit(self.ray, self.resources)
        # no restarts, no retries inside Ray: a dead actor's cell goes back to the driver, which counts the tries
        self.actor_class = self.ray.remote(WarmActor).options(**task_options(self.resources), max_restarts=0,
                                                              max_task_retries=0)
        self.env = {k: v for k, v in os.environ.items() if k.startswith("FEWTUNE_")}

    def capacity(self) -> int:
        return len(self.actors)

    def start(self, job: Job) -> None:
        i = next(i for i, a in enumerate(self.actors) if a is None or a.job is None)
        a = self.actors[i]
        if a is None:
            handle = self.actor_class.remote(self.env, self.resources["num_cpus"], self.resources["num_gpus"])
            a = self.actors[i] = _Actor(i, handle, handle.ready.remote())
        append_log(job.log_path, f"\n=== {now()} fewtune grid: {job.cell.describe()} [{job.key}], Ray actor {i} "
                                 f"(cell {a.cells + 1}), try {job.attempt}\n")
        a.job, a.t0 = job, time.monotonic()
        a.ref = a.handle.run.remote(json.dumps(job.cell.config.to_dict()))

    def poll(self, timeout: float) -> list[tuple[Job, Outcome]]:
        busy = [a for a in self.actors if a is not None and a.job is not None]
        if not busy:
            time.sleep(timeout)
            return []
        calls = {a.ref: a for a in busy} | {a.ready_ref: a for a in busy if a.ready_ref is not None}
        ready, _ = self.ray.wait(list(calls), num_returns=1, timeout=max(timeout, WAIT_S))
        out = []
        for ref in ready:
            a = calls[ref]
            if a.ready_ref is not None and ref == a.ready_ref:  # started (or dead: its cell's call then says so)
                a.ready_ref, a.t0 = None, time.monotonic()
                continue
            job = a.job
            outcome, data = collect(self.ray, ref, job.log_path, self.resources)
            a.job, a.ref, a.ready_ref, a.cells = None, None, None, a.cells + 1
            out.append((job, outcome))
            if outcome.status == "died":
                self._replace(a)
            elif data.get("rss_mib") is not None:
                a.rss_mib, why = outgrown(a.rss_mib, data["rss_mib"], bool(data.get("cache_miss")), self.max_rss_mib)
                if why:
                    log.warning("Ray actor %d %s: replaced", a.index, why)
                    self._replace(a)
        for a in busy:
            if a.job is not None and self._hung(a):
                append_log(a.job.log_path, f"\n=== {now()} Ray actor {a.index} hung past {self.cell_timeout_s:.0f} s: "
                                           "killed\n")
                out.append((a.job, Outcome("died", error=f"Ray actor hung: no result after {self.cell_timeout_s:.0f} s "
                                                         f"(--cell-timeout); see {a.job.log_path}")))
                self._replace(a)
        return out

    def _hung(self, a: _Actor) -> bool:
        if not self.cell_timeout_s:
            return False
        limit = self.cell_timeout_s if a.ready_ref is None else max(self.cell_timeout_s, STARTUP_LIMIT_S)
        return time.monotonic() - a.t0 > limit

    def _kill(self, a: _Actor) -> None:
        """Kill the actor (if it still lives); the next cell in its slot starts a new one."""
        with contextlib.suppress(Exception):  # already gone
            self.ray.kill(a.handle, no_restart=True)
        self.actors[a.index] = None

    def _replace(self, a: _Actor) -> None:
        self._kill(a)
        self.replaced += 1

    def cancel(self, job: Job) -> None:
        # ray.kill, not ray.cancel(force=True), which sometimes aborted the driver inside Ray (RayBackend.cancel)
        for a in self.actors:
            if a is not None and a.job is not None and a.job.key == job.key:
                append_log(job.log_path, f"\n=== {now()} stopped by the grid (interrupted)\n")
                self._kill(a)

    def close(self) -> None:
        if self.ray is None:
            return
        for a in self.actors:
            if a is not None:
                self._kill(a)
        self.ray.shutdown()
        self.ray = None
