"""`fewtune grid SPEC --until-resolved [--time-budget 15m]`: spend the runs where the answer is still open.

The allocation rule (docs/grid.md, "Until resolved"; the statistics: docs/statistics.md):
1. Rounds 1 and 2 run the first two seeds of every option (model × task × method entry × shots) of the spec:
   nothing is judged from one seed, where no interval can see training instability.
2. After each later round, per model × task, the in-domain family's claims are computed (fewtune.stats.compare:
   simultaneous intervals over all pairs, α spent over the spec's looks). The look only allocates
   (`allocate`): options shown worse, or shown equivalent to the best within the task's margin, get no more
   seeds; every other candidate for the best gets the next seed in the spec's `seeds` list (the highest estimate
   first).
3. It stops when every family is resolved, when the seeds are used up, or when the time budget would be overrun:
   before each run, the time it will take is estimated from the runs of the same option (its longest, else the mean
   of all runs so far) times 1.25; a run that would not finish within the budget is not started.
4. The answer is made once, at the end, on all the runs, by the same analysis as `fewtune report`
   (fewtune.stats.claims), and is RESOLVED only when every claim it needs holds at the family-wise level with ≥ 2 seeds
   per option; for what stays open it says what it would take (seeds, or evaluation examples bounded by the split).
The whole rule is simulated in tests/test_compare.py with `allocate` as it runs: with 8 equal options, ≤ 5 % of
runs end with any false claim. Everything runs through the ordinary grid (claim, record, resume): an interrupted
`--until-resolved` resumes from the database, and finished runs are never run again.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FewtuneError
from ..stats import claims, compare
from ..stats.fmt import METRIC_NAMES, signed, with_interval
from .grid_spec import Cell, Grid

_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m(?:in)?)?\s*(?:(\d+(?:\.\d+)?)\s*s)?\s*$")


def parse_duration(text: str, flag: str = "--time-budget") -> float:
    """'15m', '90s', '1h30m', '1.5h' -> seconds. A bare number is refused (minutes or seconds?)."""
    m = _DURATION.match(str(text)) if text is not None else None
    if not m or not any(m.groups()):
        raise FewtuneError(f"{flag} {text!r} is not a duration; write e.g. 15m, 90s or 1h30m.")
    h, mi, s = (float(x) if x else 0.0 for x in m.groups())
    seconds = 3600 * h + 60 * mi + s
    if not seconds > 0:
        raise FewtuneError(f"{flag} {text!r} must be longer than zero.")
    return seconds


@dataclass
class Option:
    key: tuple                      # (model, task, label, shots)
    cells: list[Cell]               # in the spec's seed order
    seconds: list[float] = field(default_factory=list)  # wall time of its runs done here

    def describe(self) -> str:
        model, task, label, shots = self.key
        return f"{label} ({shots} shots)"


@dataclass
class Decision:
    resolved: bool
    lines: list[str]
    rounds: int
    runs: int
    seconds: float
    state: dict = field(default_factory=dict)  # (model, task) -> best, worse, tied, open: the last assessment


def options_of(grid: Grid) -> dict[tuple, list[Option]]:
    """(model, task) -> its options, each with its cells in seed order."""
    seed_order = []
    for c in grid.cells:
        if c.config.seed not in seed_order:
            seed_order.append(c.config.seed)
    by_option: dict[tuple, list[Cell]] = {}
    for c in grid.cells:
        by_option.setdefault((c.config.model, c.config.task, c.label, c.config.shots), []).append(c)
    out: dict[tuple, list[Option]] = {}
    for key, cells in by_option.items():
        cells.sort(key=lambda c: seed_order.index(c.config.seed))
        out.setdefault(key[:2], []).append(Option(key, cells))
    for (model, task), opts in out.items():
        if len(opts) < 2:
            raise FewtuneError(f"--until-resolved compares options, and {task} / {model} has only one "
                               f"({opts[0].describe()}); give the spec at least two method entries or sample sizes.")
    if max(len(o.cells) for opts in out.values() for o in opts) < 2:
        raise FewtuneError("--until-resolved adds seeds where the answer is open: give the spec more than one seed "
                           "(seeds = [0, 1, 2, 3, 4]); it runs only the ones it needs.")
    return out


def run_until_resolved(grid: Grid, store, log_dir: Path, time_budget_s: float, echo=print, in_process: bool = False,
                       runner=None, reclaim: bool = False, backend=None, retries: int | None = None,
                       equivalence_margin: float | None = None) -> Decision:
    """Run `grid` by the allocation rule above within `time_budget_s` seconds of this invocation, on `backend`
    (default: a fresh process per cell; this process with `in_process`/`runner`). A round's cells run at once as far
    as the backend's capacity allows (several warm workers); the backend stays open across rounds."""
    from .backends import InlineBackend, ProcessBackend
    from .driver import Driver
    t0 = time.perf_counter()
    groups_of = options_of(grid)
    option_of = {c.key: o for opts in groups_of.values() for o in opts for c in o.cells}
    active = {mt: list(opts) for mt, opts in groups_of.items()}  # options still getting seeds
    depth = {o.key: 0 for opts in groups_of.values() for o in opts}  # seeds given so far
    all_seconds: list[float] = []
    runs = rounds = 0
    out_of_time = False
    state: dict[tuple, dict] = {}
    if backend is None:
        backend = InlineBackend(runner) if in_process or runner is not None else ProcessBackend()
    if retries is None:
        retries = grid.max_retries

    def admit(cell) -> bool:  # asked right before each cell starts: would it finish within the budget?
        nonlocal out_of_time
        o = option_of[cell.key]
        estimate = _estimate(o, all_seconds)
        left = time_budget_s - (time.perf_counter() - t0)
        if estimate is not None and estimate > left:
            out_of_time = True
            echo(f"time budget: {o.describe()} on {o.key[1]} would take about {estimate:.0f} s, "
                 f"{max(left, 0):.0f} s are left: not started")
            return False
        return True

    def on_done(cell, outcome, seconds) -> None:
        nonlocal runs
        option_of[cell.key].seconds.append(seconds)
        all_seconds.append(seconds)
        runs += 1

    with Driver(backend, store, log_dir, grid.name, reclaim=reclaim, retries=retries, echo=echo) as driver:
        while True:
            todo = [o for opts in active.values() for o in opts if depth[o.key] < len(o.cells)]
            if not todo:
                break
            # the best option first: every open comparison is with it, so its next seed is worth the most
            bests = {st["best_key"] for st in state.values() if st.get("best_key")}
            todo.sort(key=lambda o: o.key not in bests)
            rounds += 1
            cells = [o.cells[depth[o.key]] for o in todo]
            summary = driver.run(cells, admit=admit, on_done=on_done)
            kept = set(summary.not_started)
            for o in todo:
                if o.cells[depth[o.key]].key not in kept:
                    depth[o.key] += 1
            state = _assess(store, groups_of, depth, equivalence_margin)
            active = {}
            for mt, st in state.items():
                if st["open"]:
                    active[mt] = [o for o in groups_of[mt] if o.key in st["next"]]
            _print_round(rounds, state, active, all_seconds, time_budget_s - (time.perf_counter() - t0), echo)
            if out_of_time or not active:
                break
    lines = _answer(state, out_of_time)
    for line in lines:
        echo(line)
    resolved = all(st.get("final") is not None and st["final"].verdict.resolved
                   and st["final"].verdict.min_seeds >= compare.MIN_SEEDS for st in state.values())
    return Decision(resolved=resolved, lines=lines, rounds=rounds, runs=runs, seconds=time.perf_counter() - t0,
                    state=state)


SAFETY = 1.25  # a run's time varies (shared machines: 55 s then 179 s for the same option was seen); start it only
#                if 1.25x the estimate fits, so the budget is kept rather than overrun


def _estimate(o: Option, all_seconds: list[float]) -> float | None:
    """Seconds the option's next run will take: the longest of its runs so far, else the mean of all runs."""
    if o.seconds:
        return SAFETY * max(o.seconds)
    return SAFETY * (sum(all_seconds) / len(all_seconds)) if all_seconds else None


def _assess(store, groups_of, depth, margin: float | None = None) -> dict:
    """Per model × task, from the runs given so far: the verdict of the in-domain family at level 1 − α/L (L = the
    spec's seeds − 1: every round from the second is a look; docs/statistics.md), and where the next seeds go.

    Allocation only: options below 2 seeds get their next seed (nothing is judged from one); then every option
    that is still a candidate for the best and not shown equivalent to it. Options shown worse, or shown
    equivalent to the best within the task's margin, get no more seeds. The answer is not taken from these looks:
    it is the final verdict (`_answer`), on all the runs, made once."""
    from ..stats.options import flat_row, group_runs, predictions_reader
    given = {c.key for opts in groups_of.values() for o in opts for c in o.cells[:depth[o.key]]}
    rows = [r for r in store.rows(["success"]) if r["config_hash"] in given]
    groups = group_runs([flat_row(r) for r in rows], rows, predictions_reader(store))
    state = {}
    for (model, task), opts in groups_of.items():
        option_of = {c.key: o.key for o in opts for c in o.cells}  # run hash -> its option
        by_key = {option_of[h]: g for g in groups for h in g["runs"] if h in option_of}
        most = max(len(o.cells) for o in opts)
        fv = claims.view(list(by_key.values()), "id", _margin(margin, opts), looks=compare.looks_for(most))
        key_of = {claims.name(g): k for k, g in by_key.items()}
        failed = [o for o in opts if o.key not in by_key and depth[o.key] > 0]  # ran, no successful run
        unrun = [o for o in opts if depth[o.key] == 0]  # not started (the time budget)
        left = {o.key for o in opts if depth[o.key] < len(o.cells)}
        if fv is None:
            nxt = {o.key for o in opts if o.key in left and not o.seconds}
            state[(model, task)] = {"view": None, "groups": [], "next": nxt, "open": bool(nxt), "best_key": None,
                                    "failed": failed, "unrun": unrun}
            continue
        v = fv.verdict
        wanted, resolved = allocate(v, {claims.name(g): g["n_runs"] for g in by_key.values()})
        nxt = {key_of[n] for n in wanted if n in key_of} & left
        state[(model, task)] = {"view": fv, "groups": list(by_key.values()), "next": nxt,
                                "open": bool(nxt) and not resolved, "best_key": key_of.get(v.best), "failed": failed,
                                "unrun": unrun}
    return state


def allocate(v: compare.Verdict, seeds: dict[str, int]) -> tuple[set[str], bool]:
    """Where the next seeds go after a look, and whether the family is resolved: options with fewer than 2 seeds
    first (nothing is judged from one); then every candidate for the best that is not shown equivalent to it. An
    option shown worse, or shown equivalent to the best, gets no more seeds. The simulation in
    tests/test_compare.py runs this function, as the grid does, to measure the false-claim rate of the whole rule."""
    young = {n for n, k in seeds.items() if k < compare.MIN_SEEDS}
    if young:
        return young, False
    return {n for n in v.candidates if n not in v.equivalent_to_best}, v.resolved


def _margin(override: float | None, opts: list[Option]) -> float | None:
    """The equivalence margin, fixed before the run: --equivalence-margin, else the task file's."""
    if override is not None:
        return override
    from ..tasks import load_task
    return load_task(opts[0].cells[0].config.task).equivalence_margin


def _print_round(n, state, active, all_seconds, left, echo) -> None:
    for (model, task), st in state.items():
        fv = st["view"]
        if fv is None:
            echo(f"round {n} · {task} / {model}: no successful run yet")
            continue
        v, metric = fv.verdict, fv.metric
        best = fv.best
        parts = [f"highest {v.best} {METRIC_NAMES[metric]} {with_interval(best['id_primary'], metric)}"]
        if v.reason:
            parts.append(f"nothing judged yet ({v.reason.split(':')[0]})")
        else:
            if v.worse:
                parts.append("out (shown worse): " + ", ".join(f"{o} < {w}" for o, w in v.worse.items()))
            if v.equivalent_to_best:
                parts.append("shown equivalent to it: " + ", ".join(v.equivalent_to_best))
            if v.undecided:
                parts.append("open: " + ", ".join(f"{o} {signed(v.vs_best[o].diff, metric)}" if o in v.vs_best else o
                                                  for o in v.undecided))
        if st["failed"]:
            parts.append("failed: " + ", ".join(o.describe() for o in st["failed"]))
        if st.get("unrun"):
            parts.append("not run: " + ", ".join(o.describe() for o in st["unrun"]))
        echo(f"round {n} · {task} / {model} (looks allocate seeds; the answer comes at the end): " + "; ".join(parts))
    pending = sum(1 for opts in active.values() for _ in opts)
    if pending:
        mean = sum(all_seconds) / len(all_seconds) if all_seconds else math.nan
        echo(f"round {n + 1} will run {pending} more seed(s), about {pending * mean:.0f} s "
             f"({max(left, 0):.0f} s of the time budget left)")


def _answer(state, out_of_time) -> list[str]:
    """The final verdict, once, on all the runs: the same analysis as `fewtune report` (α spent over the looks the
    data can have had). RESOLVED only when every claim it needs holds at that level on ≥ 2 seeds per option."""
    lines = []
    for (model, task), st in state.items():
        if not st["groups"]:
            lines.append(f"{task} / {model}: no option produced a result; see `fewtune results --status failed`.")
            continue
        fv = claims.view(st["groups"], "id", st["view"].verdict.margin if st["view"] else None)
        st["final"] = fv
        resolved = fv.verdict.resolved and fv.verdict.min_seeds >= compare.MIN_SEEDS
        lines.append(f"{'RESOLVED' if resolved else 'OPEN'} · " + " ".join(claims.sentences(fv, task, model)))
        if not resolved:
            why = "the time budget ran out" if out_of_time else "every seed of the spec is used"
            if st.get("unrun"):
                lines.append(f"  not run ({why}): " + ", ".join(o.describe() for o in st["unrun"]) + ".")
            if fv.verdict.reason:
                lines.append(f"  still open ({why}): {fv.verdict.reason}.")
            for o in fv.verdict.undecided:
                lines.append(f"  still open ({why}): {fv.verdict.best} vs {o}. {claims.what_it_takes(fv, o)}")
    return lines
