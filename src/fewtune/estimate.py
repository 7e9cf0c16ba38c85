"""`fewtune grid SPEC --dry-run`: how long the grid would take, from stored timings of similar cells.

A cell's time splits into what every backend pays (the runner's own work: data, training, scoring) and the start-up
that depends on the backend: a fresh process pays imports (~3-5 s on 2 CPU cores) and the model load (the
result's `cost.load_seconds`) per cell; a warm worker pays them once per worker and then a copy of the weights
(~0.1-0.3 s for 135M parameters). Similar = same method, model and task (else same method and task; else the
stated default). N workers are assumed to share the work evenly and not to slow each other, which holds on a GPU
with room and not on CPU cores (each worker then has 1/N of the cores): on CPU the N-worker figure is a floor.
"""

from __future__ import annotations

import statistics

DEFAULT_CELL_S = 60.0   # a cell with no similar stored run: about a minute of a quick-preset cell on 2 CPU cores
PROCESS_START_S = 4.0   # a fresh child's imports (torch, transformers) before it loads the model, 2 CPU cores
WARM_COPY_S = 0.3       # a warm worker's copy of a 135M-parameter model


def _work_and_load(row: dict) -> tuple[float, float] | None:
    result = row.get("result") or {}
    wall = result.get("wall_seconds")
    if not isinstance(wall, (int, float)):
        return None
    load = (result.get("cost") or {}).get("load_seconds") or 0.0
    return max(float(wall) - float(load), 0.0), float(load)


def _fmt(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_grid(cells, rows: list[dict], backend: str, workers: int | None) -> list[str]:
    """Lines that estimate the time of `cells` on each backend and worker count, from `rows` (successful runs)."""
    if not cells:
        return ["estimate: nothing to run"]
    by = {}
    for r in rows:
        t = _work_and_load(r)
        if t is not None:
            by.setdefault((r.get("method"), r.get("model"), r.get("task")), []).append(t)
            by.setdefault((r.get("method"), None, r.get("task")), []).append(t)
    work = load = 0.0
    matched = loads = 0
    for c in cells:
        cfg = c.config
        from .tasks import load_task
        try:
            task = load_task(cfg.task).name
        except Exception:  # noqa: BLE001 - an estimate, not a check
            task = cfg.task
        similar = by.get((cfg.method, cfg.model, task)) or by.get((cfg.method, None, task))
        if similar:
            matched += 1
            work += statistics.median(w for w, _ in similar)
            load += statistics.median(ld for _, ld in similar)
            loads += 1
        else:
            work += DEFAULT_CELL_S
    mean_load = load / loads if loads else 3.0
    n = len(cells)
    fresh = work + n * (PROCESS_START_S + mean_load)
    models = len({c.config.model for c in cells})
    lines = [f"estimate: {n} cells to run; {matched} timed from similar stored runs (same method and task, median), "
             f"{n - matched} at the default {DEFAULT_CELL_S:.0f} s each"]
    counts = sorted({1, workers or 1, 2})
    for w in counts:
        warm = work + n * WARM_COPY_S + w * models * (PROCESS_START_S + mean_load)
        note = "" if w == 1 else " (a floor on CPU: each worker has 1/%d of the cores)" % w
        lines.append(f"  {w} worker{'s' if w > 1 else ''}: process ~{_fmt(fresh / w)}, warm ~{_fmt(warm / w)}{note}")
    lines.append(f"  (this run: --backend {backend}" + (f", {workers} worker(s))" if workers else ")"))
    return lines
