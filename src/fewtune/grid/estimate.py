"""`fewtune grid SPEC --dry-run`: how long the grid would take, and how much memory one worker needs, from stored runs
of similar cells or from a probe (`--probe`: one real cell of each kind not yet timed, run by probe.py).

A cell's time splits into what every backend pays (the runner's own work: data, training, scoring) and the start-up
that depends on the backend: a fresh process pays imports (~3-5 s on 2 CPU cores) and the model load (the
result's `cost.load_seconds`) per cell; a warm worker pays them once per worker and then a copy of the weights
(~0.1-0.3 s for 135M parameters). Similar = the same option (the grid's label: zero-shot and 32-shot icl are both
method icl and differ 4x in time), model and task; else a probe of that kind; else the same method, model and task;
else the same method and task; else the stated default. N workers are assumed to share the work evenly and not to slow each other, which
holds on a GPU with room and not on CPU cores (each worker then has 1/N of the cores): on CPU the N-worker figure is a
floor.

A probe scores at most PROBE_EVAL_LIMIT examples per split; a cell of its kind is estimated as the probe's load,
training and the rest of its run (data, tokenising, retention: none of them grows with the evaluation cap) as
measured, plus its scoring time per example times the cell's own number of evaluation examples (each split's size
capped by the cell's eval_limit).

What one worker needs on a GPU (the default and the limit of --workers there): the largest peak memory measured on a
CUDA device by successful runs of the same models and methods (record.PeakMemory: torch's max allocated, tensors
only), else 6x the weights (backends.model_need_bytes). A CPU run's peak is the process's RSS: it says nothing about
GPU memory and is never used for a GPU plan.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

DEFAULT_CELL_S = 60.0   # a cell with no similar stored run: about a minute of a quick-preset cell on 2 CPU cores
PROCESS_START_S = 4.0   # a fresh child's imports (torch, transformers) before it loads the model, 2 CPU cores
WARM_COPY_S = 0.3       # a warm worker's copy of a 135M-parameter model
# A probe's evaluation examples per split: 64 make its scoring time per example steady (batches of 16 on CPU; on CUDA
# a few token-budget batches) while keeping the probe to seconds on a GPU and about a minute on 2 CPU cores.
PROBE_EVAL_LIMIT = 64


def kind_of(cell) -> tuple[str, str, str, str]:
    """(label, method, model, task name): cells of one kind share a timing (a grid cell's label names its option)."""
    from .grid_spec import task_name
    cfg = cell.config
    return cell.label or cfg.method, cfg.method, cfg.model, task_name(cfg.task)


def eval_examples(cfg, population: dict) -> int:
    """How many examples a cell scores: each evaluation split's size (`population`: split -> rows) capped by the
    cell's eval_limit (its config's, else its preset's; none: the whole split). A split the probe did not score counts
    as its largest one."""
    from ..hyperparameters import preset_values
    limit = cfg.eval_limit if cfg.eval_limit is not None else preset_values(cfg.preset).get("eval_limit")
    largest = max(population.values(), default=0)
    sizes = [population.get(split, largest) for split in (cfg.eval_splits or list(population))]
    return sum(min(n, limit) if limit else n for n in sizes)


@dataclass(frozen=True)
class Probe:
    """What one probe cell measured, and the time it predicts for a cell of its kind."""
    load_seconds: float           # cost.load_seconds: task, data, tokenizer and model
    train_seconds: float          # cost.train_seconds: the same whatever the evaluation cap
    fixed_seconds: float          # the rest of the run's wall time but scoring (retention, prefix fitting, records)
    seconds_per_example: float    # cost.eval_seconds / the examples it scored
    examples: int                 # the examples it scored (all splits)
    population: dict = field(default_factory=dict)  # split -> its full size
    peak_memory_mib: float | None = None
    device: str = ""
    seconds: float = 0.0          # the probe's own wall time, process start included

    @classmethod
    def from_result(cls, result: dict, seconds: float = 0.0) -> "Probe":
        """The figures of a probe's result record (docs/results.md); a figure it lacks counts as 0."""
        cost = result.get("cost") or {}
        evals = {s: e for s, e in (result.get("evals") or {}).items() if isinstance(e, dict)}

        def num(value) -> float:
            return float(value) if isinstance(value, (int, float)) else 0.0
        load, train, scoring = (num(cost.get(k)) for k in ("load_seconds", "train_seconds", "eval_seconds"))
        examples = int(sum(num(e.get("n")) for e in evals.values()))
        wall = num(result.get("wall_seconds")) or load + train + scoring
        peak = cost.get("peak_memory_mib")
        return cls(load_seconds=load, train_seconds=train, fixed_seconds=max(wall - load - train - scoring, 0.0),
                   seconds_per_example=scoring / examples if examples else 0.0, examples=examples,
                   population={s: int(num(e.get("population")) or num(e.get("n"))) for s, e in evals.items()},
                   peak_memory_mib=float(peak) if isinstance(peak, (int, float)) else None,
                   device=str(result.get("device") or ""), seconds=seconds)

    def work_seconds(self, cfg) -> float:
        """A cell's time without its model load: training and the rest as measured, scoring extrapolated."""
        return self.fixed_seconds + self.train_seconds + self.seconds_per_example * eval_examples(cfg, self.population)


def _work_and_load(row: dict) -> tuple[float, float] | None:
    result = row.get("result") or {}
    wall = result.get("wall_seconds")
    if not isinstance(wall, (int, float)):
        return None
    load = (result.get("cost") or {}).get("load_seconds") or 0.0
    return max(float(wall) - float(load), 0.0), float(load)


def stored_timings(rows: list[dict]) -> dict:
    """(label, method, model, task), (None, method, model, task) and (None, method, None, task) -> [(work, load)] of the
    stored runs that say their time."""
    by = {}
    for r in rows:
        t = _work_and_load(r)
        if t is not None:
            method, model, task = r.get("method"), r.get("model"), r.get("task")
            for key in ((r.get("label") or method, method, model, task), (None, method, model, task),
                        (None, method, None, task)):
                by.setdefault(key, []).append(t)
    return by


def kinds_to_probe(cells, rows: list[dict]) -> dict:
    """Each kind among `cells` that no stored run of the same option, model and task has timed -> the cell its probe
    runs: the kind's cell with the most shots (the most training, the longest icl prompt), so the probe's figure is
    an upper estimate for the kind's smaller cells."""
    timed = stored_timings(rows)
    out = {}
    for c in cells:
        kind = kind_of(c)
        if kind not in timed and (kind not in out or c.config.shots > out[kind].config.shots):
            out[kind] = c
    return out


def fmt_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_grid(cells, rows: list[dict], backend: str, workers: int | None, probes: dict | None = None) -> list[str]:
    """Lines that estimate the time of `cells` on each backend and worker count, from `rows` (successful runs) and
    `probes` (kind -> Probe)."""
    if not cells:
        return ["estimate: nothing to run"]
    by = stored_timings(rows)
    probes = probes or {}
    work = load = 0.0
    matched = probed = loads = 0
    for c in cells:
        kind = kind_of(c)
        _, method, model, task = kind
        similar = by.get(kind)
        if not similar and kind not in probes:
            similar = by.get((None, method, model, task)) or by.get((None, method, None, task))
        if similar:
            matched += 1
            work += statistics.median(w for w, _ in similar)
            load += statistics.median(ld for _, ld in similar)
            loads += 1
        elif kind in probes:
            probed += 1
            work += probes[kind].work_seconds(c.config)
            load += probes[kind].load_seconds
            loads += 1
        else:
            work += DEFAULT_CELL_S
    mean_load = load / loads if loads else 3.0
    n = len(cells)
    fresh = work + n * (PROCESS_START_S + mean_load)
    models = len({c.config.model for c in cells})
    lines = [f"estimate: {n} cells to run; {matched} timed from similar stored runs (median), "
             + (f"{probed} from a probe of their kind, " if probes else "")
             + f"{n - matched - probed} at the default {DEFAULT_CELL_S:.0f} s each"]
    counts = sorted({1, workers or 1, 2})
    for w in counts:
        warm = work + n * WARM_COPY_S + w * models * (PROCESS_START_S + mean_load)
        note = "" if w == 1 else " (a floor on CPU: each worker has 1/%d of the cores)" % w
        lines.append(f"  {w} worker{'s' if w > 1 else ''}: process ~{fmt_seconds(fresh / w)}, "
                     f"warm ~{fmt_seconds(warm / w)}{note}")
    lines.append(f"  (this run: --backend {backend}" + (f", {workers} worker(s))" if workers else ")"))
    return lines


@dataclass(frozen=True)
class WorkerNeed:
    """The memory one worker needs and where the figure came from (the dry run says it)."""
    bytes: int
    says: str


def measured_gpu_peaks(cells, rows: list[dict], probes: dict | None = None) -> dict:
    """(model, method) of `cells` -> the peak memories (MiB) measured on a CUDA device by successful stored runs and
    probes of that model and method. CPU runs are left out: their peak is the process's RSS, not GPU memory."""
    wanted = {(c.config.model, c.config.method) for c in cells}
    peaks = {}

    def add(model, method, device, peak):
        if (model, method) in wanted and str(device or "").startswith("cuda") and isinstance(peak, (int, float)) \
                and peak > 0:
            peaks.setdefault((model, method), []).append(float(peak))
    for r in rows:
        result = r.get("result") or {}
        if r.get("status", "success") == "success":
            add(r.get("model"), r.get("method"), result.get("device"), (result.get("cost") or {}).get("peak_memory_mib"))
    for (_, method, model, _), p in (probes or {}).items():
        add(model, method, p.device, p.peak_memory_mib)
    return peaks


def worker_need(cells, rows: list[dict], probes: dict | None = None, on_gpu: bool = True) -> WorkerNeed:
    """What one worker of `cells` needs: on a GPU the largest measured peak of similar runs (same model and method) when
    every model and method among the cells has one; the larger of that and 6x the weights when only some have; else,
    and on CPU, 6x the largest model's weights."""
    from .backends import model_need_bytes
    models = sorted({c.config.model for c in cells})
    default = model_need_bytes(models)
    gib = f"{default / 2**30:.1f} GiB"
    if not on_gpu:
        return WorkerNeed(default, f"{gib}, 6x the largest model's weights (cells on the CPU)")
    peaks = measured_gpu_peaks(cells, rows, probes)
    if not peaks:
        return WorkerNeed(default, f"{gib}, 6x the largest model's weights: no run of these models and methods "
                                   "measured on a GPU")
    top = max(max(v) for v in peaks.values())
    runs = sum(len(v) for v in peaks.values())
    measured = model_need_bytes(models, top)
    what = (f"the largest measured peak ({top:.0f} MiB, +20 % and 0.5 GiB for the CUDA context) of {runs} similar "
            f"run{'s' if runs > 1 else ''} on a GPU")
    missing = sorted({(c.config.method, c.config.model) for c in cells} - {(m, mo) for mo, m in peaks})
    if not missing:
        return WorkerNeed(measured, f"{measured / 2**30:.1f} GiB, {what}")
    need = max(measured, default)
    return WorkerNeed(need, f"{need / 2**30:.1f} GiB, the larger of 6x the weights and {what}; not measured on a GPU: "
                            + ", ".join(f"{m} on {mo}" for m, mo in missing[:4]) + (" ..." if len(missing) > 4 else ""))
