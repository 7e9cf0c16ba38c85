"""`fewtune grid SPEC --dry-run --probe`: time the kinds of cell (option, model, task) that no stored run has timed, by
running one real cell of each here with its evaluation capped, in a temporary folder deleted afterwards.

Each probe is the kind's cell with the most shots (estimate.kinds_to_probe), run as a grid runs a cell: a fresh
`python -m fewtune.grid.cell_process` child (backends.ProcessBackend) with the real runner, its own training as configured,
`eval_limit` capped at estimate.PROBE_EVAL_LIMIT per split. Its result comes back through a file in the temporary folder
and reaches no database: a dry run only reads the user's. A probe that fails or dies costs one line, and its kind is
estimated at the default. How a cell's time is extrapolated from a probe: estimate.Probe.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from .backends import Job, Outcome, ProcessBackend
from .driver import Interrupted
from .estimate import (DEFAULT_CELL_S, PROBE_EVAL_LIMIT, Probe, eval_examples, fmt_seconds, kinds_to_probe,
                       stored_timings)
from .grid_spec import Cell

POLL_S = 0.2


class ProbeFailed(Exception):
    """The probe cell raised or its process died: the message is the cell's one-line error."""


def capped(cell: Cell, limit: int) -> Cell:
    """The probe's copy of `cell`: the same run, scoring at most `limit` examples per split."""
    cfg = cell.config
    own = cfg.eval_limit
    return Cell(dataclasses.replace(cfg, eval_limit=limit if own is None else min(own, limit)), cell.label)


def run_probe(backend: ProcessBackend, cell: Cell, log_path: Path) -> Outcome:
    backend.start(Job(cell, log_path))
    while True:
        for _, outcome in backend.poll(POLL_S):
            return outcome


def one_line(error: str | None, most: int = 200) -> str:
    text = " ".join((error or "no result").split())
    return text if len(text) <= most else text[:most - 3] + "..."


def describe(p: Probe, cfg) -> str:
    n = eval_examples(cfg, p.population)
    peak = f"peak {p.peak_memory_mib:.0f} MiB on {p.device or '?'}" if p.peak_memory_mib else f"on {p.device or '?'}"
    return (f"load {p.load_seconds:.1f} s, train {p.train_seconds:.1f} s, other {p.fixed_seconds:.1f} s, scoring "
            f"{1000 * p.seconds_per_example:.1f} ms/example ({p.examples} scored; {peak}) -> ~"
            f"{fmt_seconds(p.load_seconds + p.work_seconds(cfg))} for this cell's {n} evaluation examples")


def run_probes(cells, rows: list[dict], limit: int | None = None, out=None, cell_timeout_s: float | None = None) -> dict:
    """Probe each kind among `cells` that `rows` (successful stored runs) have not timed; kind -> Probe for those that
    succeeded. One line per kind on `out` (stderr), the kind's head first so a long probe shows what it is doing.
    Interrupted (Ctrl-C; SIGTERM under driver.signals_raise), it stops the probe's process and removes its folder; a
    probe with no result after `cell_timeout_s` (--cell-timeout) is stopped and counts as failed."""
    limit = limit or PROBE_EVAL_LIMIT
    out = out or sys.stderr
    todo = kinds_to_probe(cells, rows)
    if not todo:
        print("probe: every kind of cell to run has a stored timing; nothing to probe", file=out)
        return {}
    print(f"probe: {len(todo)} kind(s) of cell (option, model, task) with no stored timing: one real cell of each, "
          f"evaluation capped at {limit} examples per split, in a temporary folder", file=out, flush=True)
    probes, timed, t0 = {}, stored_timings(rows), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fewtune-probe-") as tmp:
        backend = ProcessBackend(cell_timeout_s=cell_timeout_s)
        try:
            for i, (kind, cell) in enumerate(todo.items(), 1):
                print(f"probe {i}/{len(todo)} {cell.describe()}: ", end="", file=out, flush=True)
                t, log = time.perf_counter(), Path(tmp) / f"probe-{i}.log"
                try:
                    outcome = run_probe(backend, capped(cell, limit), log)
                    if outcome.status != "success":  # a died process's error names its log: it goes with the folder
                        raise ProbeFailed((outcome.error or "no result").replace(f"; see {log}", ""))
                    probes[kind] = Probe.from_result(outcome.result, time.perf_counter() - t)
                except (KeyboardInterrupt, Interrupted):
                    print("interrupted", file=out, flush=True)
                    raise
                except Exception as e:  # noqa: BLE001 - a probe that fails costs a line, never the dry run
                    why = str(e) if isinstance(e, ProbeFailed) else f"{type(e).__name__}: {e}"
                    _, method, model, task = kind
                    instead = ("from stored runs of the same method" if (None, method, model, task) in timed
                               or (None, method, None, task) in timed else f"at the default {DEFAULT_CELL_S:.0f} s a cell")
                    print(f"failed ({one_line(why)}); its kind is estimated {instead}", file=out, flush=True)
                    continue
                print(f"{describe(probes[kind], cell.config)}; took {probes[kind].seconds:.0f} s", file=out, flush=True)
        finally:
            backend.close()
    scored = sorted({p.examples for p in probes.values()})
    print(f"probe: {len(probes)} of {len(todo)} kind(s) measured in {time.perf_counter() - t0:.0f} s; scoring "
          f"extrapolated from {'/'.join(map(str, scored)) or 'no'} examples per probe (at most {limit} per split) to "
          "each cell's own evaluation examples", file=out, flush=True)
    return probes
