"""Grid throughput: the same cells with a fresh process per cell vs warm workers, interleaved, results compared.

Run:  .venv/bin/python benchmarks/grid_throughput.py                 # the demo's first round (8 options, seed 0)
      .venv/bin/python benchmarks/grid_throughput.py --mini --workers 2   # every method, tiny sizes, + 2 workers

Each variant runs the whole set of cells into its own fresh database; variants alternate (fresh, warm, warm, fresh,
...) so a busy neighbour slows both alike; the figure is the ratio of their summed wall times. Every cell's
predictions must be identical between the variants (same model, same seeds; warm workers copy pristine weights),
or the script says which differ. Wall time includes each variant's start-up: worker processes, imports, first loads.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fewtune.grid.backends import ProcessBackend, WarmBackend, WorkerPlan, machine_plan, model_need_bytes
from fewtune.grid.driver import run_grid
from fewtune.grid.grid_spec import Grid, expand, load_grid
from fewtune.store import Store

MINI = {  # every method once, tiny sizes: what a cell costs besides its arithmetic
    "name": "mini", "models": ["smollm2-135m"], "tasks": ["cola"], "shots": [8], "seeds": [0], "eval_limit": 16,
    "epochs": 1, "batch_size": 8, "max_length": 64, "retention": "off",
    "methods": [{"method": "icl", "label": "zero-shot", "shots": [0]}, {"method": "icl"}, {"method": "ft"},
                {"method": "pbft"}, {"method": "adaptive"}, {"method": "lora"}, {"method": "cd"},
                {"method": "peft", "label": "peft-ia3", "method_options": {"peft_type": "IA3"}}],
}


def cells(mini: bool) -> Grid:
    if mini:
        return expand(MINI, "mini", "mini")
    demo = load_grid("demo")
    first = demo.cells[0].config.seed
    return Grid(name="demo-round1", source=demo.source, cells=[c for c in demo.cells if c.config.seed == first])


def run_variant(name: str, grid: Grid, workers: int, root: Path, threads: int | None = None) -> dict:
    folder = root / f"{name}-{time.monotonic_ns()}"
    folder.mkdir()
    need = model_need_bytes([c.config.model for c in grid.cells])
    plan = machine_plan(workers, need, use_gpu=False)
    if threads and workers == 1:
        plan = WorkerPlan(1, threads, (None,))
    backend = (ProcessBackend if name.startswith("fresh") else WarmBackend)(plan)
    t0 = time.perf_counter()
    with Store(folder / "r.db") as store:
        s = run_grid(grid, store, folder / "logs", backend=backend, progress=False, echo=lambda _: None)
        seconds = time.perf_counter() - t0
        preds = {c.key: {split: list(map(int, p["pred"])) for split, p in store.predictions(c.key).items()}
                 for c in grid.cells}
        per_cell = {r["label"]: r["result"]["wall_seconds"] for r in store.rows(["success"])}
    if s.failed:
        raise SystemExit(f"{name}: {s.failed} cells failed: {s.failures[:2]}")
    return {"seconds": seconds, "preds": preds, "runner_seconds": per_cell}


def measure(mini: bool, reps: int, workers: int, echo=print, threads: int | None = None) -> dict:
    """Each variant `reps` times, interleaved; cells/hour, speed-up over fresh processes, identical predictions."""
    grid = cells(mini)
    variants = ["fresh", "warm"] + ([f"fresh×{workers}", f"warm×{workers}"] if workers > 1 else [])
    root = Path(tempfile.mkdtemp(prefix="fewtune-grid-bench-"))
    times = {v: [] for v in variants}
    runner = {v: [] for v in variants}  # the cells' own wall time (in their worker): the rest is start-up and hand-over
    preds = {}
    try:
        for rep in range(reps):
            for v in (variants if rep % 2 == 0 else list(reversed(variants))):
                r = run_variant(v, grid, workers if "×" in v else 1, root, threads)
                times[v].append(r["seconds"])
                runner[v].append(sum(r["runner_seconds"].values()))
                preds.setdefault(v, r["preds"])
                echo(f"  rep {rep + 1} {v:8s} {len(grid.cells)} cells in {r['seconds']:.1f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    same = {v: preds[v] == preds["fresh"] for v in variants}
    out = {"cells": len(grid.cells), "grid": grid.name, "reps": reps, "seconds": times,
           "cells_per_hour": {v: 3600 * len(grid.cells) * len(t) / sum(t) for v, t in times.items()},
           "speedup_vs_fresh": {v: sum(times["fresh"]) / sum(t) for v, t in times.items()},
           "cells_runner_seconds": runner, "identical_predictions": same, "machine": platform.processor() or platform.machine(),
           "python": sys.version.split()[0]}
    alone = sum(runner["fresh"])
    for v in variants:
        # what sharing does to each cell's own cost figures: its seconds in its worker, against fresh cells alone
        echo(f"  {v:8s} {out['cells_per_hour'][v]:7.0f} cells/h  {out['speedup_vs_fresh'][v]:.2f}x fresh  "
             f"cells' own seconds {sum(runner[v]):.0f} ({sum(runner[v]) / alone:.2f}x fresh)  "
             f"identical predictions: {same[v]}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mini", action="store_true", help="every method at tiny sizes instead of the demo's first round")
    ap.add_argument("--reps", type=int, default=2, help="runs of each variant, interleaved [2]")
    ap.add_argument("--workers", type=int, default=1,
                    help="also fresh processes ×N and warm workers ×N (N > 1) [1: fresh vs warm only]")
    ap.add_argument("--threads", type=int, help="torch threads of each single-worker variant (1 on a busy machine: "
                                                "threads spinning beside other jobs' threads measure the neighbours)")
    ap.add_argument("--output", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    out = measure(args.mini, args.reps, args.workers, threads=args.threads)
    out["threads"] = args.threads
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=2))
    return 0 if all(out["identical_predictions"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
