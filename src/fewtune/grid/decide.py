"""`fewtune grid SPEC --until-resolved [--time-budget 15m] [--futility 0.2]`: spend the runs where the answer can
still change.

The allocation rule (docs/grid.md, "Until resolved"; the statistics: docs/statistics.md):
1. A seed-free option (zero-shot: its method never reads the data seed) runs once, in the first round; it is a
   known constant for every seed. Every trained option runs seeds in the spec's order.
2. After each round, per model × task, the in-domain family is looked at (fewtune.stats.claims.view over the plan
   of the spec's seeds: a look at 4, 5, … N seeds, each with its share of α; fewtune.stats.sequential), and
   `allocate` decides: below 4 seeds every trained option gets its next seed (nothing is judged before 4), as
   long as some comparison can still be settled; from 4 seeds the next seed goes to the highest estimate and to
   each open comparison (an option neither shown worse than the best nor within the margin of it) whose chance of
   being settled within reach (the seeds left in the spec, and the rounds the time budget still allows) is at least
   the futility threshold (FUTILITY = 20 %, `--futility`).
3. It stops when every family is resolved, when no open comparison can reach the threshold (the early answer
   "cannot be settled within the spec's seeds", with what it would take), when the seeds are used up, or when
   the time budget would be overrun: before each run, the time it will take is estimated from the runs of the
   same option (its longest, else the mean of all runs so far) times 1.25; a run that would not finish within the
   budget is not started.
4. The answer is the same analysis as `fewtune report` (fewtune.stats.claims) on all the runs, under the same
   plan, so the claims made at the looks are the claims of the answer. One line per family says what is settled,
   what is not, and what it would take.
The whole rule is simulated in tests/test_compare.py and benchmarks/claims.py with `allocate` as it runs. Everything
runs through the ordinary grid (claim, record, resume): an interrupted `--until-resolved` resumes from the
database, and finished runs are never run again.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FewtuneError
from ..stats import claims, compare, sequential
from ..stats.fmt import METRIC_NAMES, with_interval
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
    cells: list[Cell]               # in the spec's seed order (one cell for a seed-free option)
    seconds: list[float] = field(default_factory=list)  # wall time of its runs done here
    seed_free: bool = False

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
    state: dict = field(default_factory=dict)  # (model, task) -> the last look and allocation
    futile: bool = False                       # stopped because no open comparison could be settled


@dataclass
class Allocation:
    """What one look decides for one family."""
    next: set[str]                  # options that get their next seed
    resolved: bool                  # every claim the answer needs is made
    chances: dict[str, float]       # open comparison (option vs the best) -> chance to settle it within reach
    out_of_reach: list[str]         # open comparisons below the futility threshold
    futile: bool                    # open, and no open comparison reaches the threshold: stop


def task_name(task: str) -> str:
    """A task as the lines name it: its own name (a task given as a file: the name inside, not the path)."""
    try:
        from ..tasks import load_task
        return load_task(task).name
    except Exception:  # the name is for reading; a task that cannot load has failed louder elsewhere
        return Path(str(task)).stem


def check_futility(value: float) -> float:
    if value is None or not (isinstance(value, (int, float)) and 0 < value < 1):
        raise FewtuneError(f"--futility {value!r} must be a chance strictly between 0 and 1 (e.g. 0.2).")
    return float(value)


def options_of(grid: Grid) -> dict[tuple, list[Option]]:
    """(model, task) -> its options, each with its cells in seed order (a seed-free option: its one cell)."""
    seed_order = grid.seed_order()
    by_option: dict[tuple, list[Cell]] = {}
    for c in grid.cells:
        by_option.setdefault((c.config.model, c.config.task, c.label, c.config.shots), []).append(c)
    out: dict[tuple, list[Option]] = {}
    for key, cells in by_option.items():
        cells.sort(key=lambda c: seed_order.index(c.config.seed))
        out.setdefault(key[:2], []).append(Option(key, cells, seed_free=cells[0].seed_free))
    for (model, task), opts in out.items():
        if len(opts) < 2:
            raise FewtuneError(f"--until-resolved compares options, and {task_name(task)} / {model} has only one "
                               f"({opts[0].describe()}); give the spec at least two method entries or sample sizes.")
        if all(o.seed_free for o in opts):
            raise FewtuneError(f"--until-resolved adds seeds where the answer is open, and every option of "
                               f"{task_name(task)} / {model} is seed-free (it runs once): nothing to allocate; run the "
                               "grid without --until-resolved.")
    if len(seed_order) < compare.MIN_SEEDS:
        raise FewtuneError(f"--until-resolved adds seeds where the answer is open, and nothing is judged before "
                           f"{compare.MIN_SEEDS} seeds: give the spec at least {compare.MIN_SEEDS} seeds "
                           f"(seeds = [0, 1, 2, 3]; it runs only the ones it needs), not {len(seed_order)}.")
    return out


def run_until_resolved(grid: Grid, store, log_dir: Path, time_budget_s: float, echo=print, in_process: bool = False,
                       runner=None, reclaim: bool = False, backend=None, retries: int | None = None,
                       equivalence_margin: float | None = None,
                       futility: float = sequential.FUTILITY) -> Decision:
    """Run `grid` by the allocation rule above within `time_budget_s` seconds of this invocation, on `backend`
    (default: a fresh process per cell; this process with `in_process`/`runner`). A round's cells run at once as far
    as the backend's capacity allows (several warm workers); the backend stays open across rounds."""
    from .backends import InlineBackend, ProcessBackend
    from .driver import Driver
    futility = check_futility(futility)
    t0 = time.perf_counter()
    groups_of = options_of(grid)
    seed_order = grid.seed_order()
    plan = sequential.Plan(len(seed_order))
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
            echo(f"time budget: {o.describe()} on {task_name(o.key[1])} would take about {estimate:.0f} s, "
                 f"{max(left, 0):.0f} s are left: not started")
            return False
        return True

    def on_done(cell, outcome, seconds) -> None:
        nonlocal runs
        option_of[cell.key].seconds.append(seconds)
        all_seconds.append(seconds)
        runs += 1

    def rounds_left() -> float:  # how many more rounds of the trained options the time budget allows
        left = time_budget_s - (time.perf_counter() - t0)
        if math.isinf(left):
            return math.inf
        per = sum(_estimate(o, all_seconds) or 0.0 for opts in groups_of.values() for o in opts if not o.seed_free)
        return math.floor(left / per) if per > 0 else math.inf

    futile = False
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
            state = _assess(store, groups_of, depth, plan, seed_order, equivalence_margin, rounds_left(), futility)
            active = {}
            for mt, st in state.items():
                if st["open"]:
                    active[mt] = [o for o in groups_of[mt] if o.key in st["next"]]
            _print_round(rounds, state, active, all_seconds, time_budget_s - (time.perf_counter() - t0), echo)
            if out_of_time or not active:
                break
    futile = bool(state) and any(st.get("futile") for st in state.values())
    lines = _answer(state, out_of_time, futility)
    for line in lines:
        echo(line)
    resolved = all(st.get("view") is not None and st["view"].verdict.resolved for st in state.values())
    return Decision(resolved=resolved, lines=lines, rounds=rounds, runs=runs, seconds=time.perf_counter() - t0,
                    state=state, futile=futile)


SAFETY = 1.25  # a run's time varies (shared machines: 55 s then 179 s for the same option was seen); start it only
#                if 1.25x the estimate fits, so the budget is kept rather than overrun


def _estimate(o: Option, all_seconds: list[float]) -> float | None:
    """Seconds the option's next run will take: the longest of its runs so far, else the mean of all runs."""
    if o.seconds:
        return SAFETY * max(o.seconds)
    return SAFETY * (sum(all_seconds) / len(all_seconds)) if all_seconds else None


def _assess(store, groups_of, depth, plan, seed_order, margin: float | None = None, rounds_left: float = math.inf,
            futility: float = sequential.FUTILITY) -> dict:
    """Per model × task, from the runs given so far: the look (the in-domain family under the plan: the same
    analysis as the answer) and where the next seeds go (`allocate`)."""
    from ..stats.options import flat_row, group_runs, predictions_reader
    given = {c.key for opts in groups_of.values() for o in opts for c in o.cells[:depth[o.key]]}
    rows = [r for r in store.rows(["success"]) if r["config_hash"] in given]
    groups = group_runs([flat_row(r) for r in rows], rows, predictions_reader(store))
    state = {}
    for (model, task), opts in groups_of.items():
        option_of = {c.key: o.key for o in opts for c in o.cells}  # run hash -> its option
        by_key = {option_of[h]: g for g in groups for h in g["runs"] if h in option_of}
        for o in opts:  # what the option is, from the spec (runs recorded before seed_free was stored agree)
            if o.key in by_key:
                by_key[o.key]["seed_free"] = o.seed_free
        fv = claims.view(list(by_key.values()), "id", _margin(margin, opts), plan=plan, seed_order=seed_order)
        key_of = {claims.name(g): k for k, g in by_key.items()}
        failed = [o for o in opts if o.key not in by_key and depth[o.key] > 0]  # ran, no successful run
        unrun = [o for o in opts if depth[o.key] == 0]  # not started (the time budget)
        left = {o.key: len(o.cells) - depth[o.key] for o in opts}
        base = {"failed": failed, "unrun": unrun, "task": task_name(task)}
        if fv is None:
            nxt = {o.key for o in opts if left[o.key] and not o.seconds}
            state[(model, task)] = {**base, "view": None, "groups": [], "next": nxt, "open": bool(nxt),
                                    "best_key": None, "alloc": None}
            continue
        seeds = {claims.name(g): g["n_runs"] for g in by_key.values()}
        reach = {claims.name(g): g["n_runs"] + int(min(left[k], rounds_left)) for k, g in by_key.items()}
        constant = {claims.name(g) for k, g in by_key.items() if g.get("seed_free")}
        alloc = allocate(fv.verdict, seeds, reach, constant, futility)
        nxt = {key_of[n] for n in alloc.next if n in key_of and left[key_of[n]] > 0}
        nxt |= {o.key for o in opts if depth[o.key] == 0 and left[o.key]}  # never run (the budget): try again
        state[(model, task)] = {**base, "view": fv, "groups": list(by_key.values()), "next": nxt,
                                "open": bool(nxt) and not alloc.resolved and not alloc.futile,
                                "best_key": key_of.get(fv.verdict.best), "alloc": alloc, "futile": alloc.futile,
                                "time_limited": any(rounds_left < left[k] for k in by_key)}
    return state


def allocate(v: compare.Verdict, seeds: dict[str, int], reach: dict[str, int] | None = None,
             constant: set[str] | frozenset = frozenset(), futility: float = sequential.FUTILITY) -> Allocation:
    """Where the next seeds go after a look (the module docstring, item 2). `seeds`: runs per option so far;
    `reach`: the most seeds each could have at the end (the spec's seeds and the time left); `constant`: seed-free
    options (never given a seed). The simulations in tests/test_compare.py and benchmarks/claims.py run this
    function, as the grid does, to measure the false-claim rate and the power of the whole rule."""
    reach = dict(reach if reach is not None else seeds)
    trained = [n for n in v.options if n not in constant]
    can_grow = {n for n in trained if reach.get(n, 0) > seeds.get(n, 0)}
    if v.resolved:
        return Allocation(set(), True, {}, [], False)
    if min((seeds.get(n, 0) for n in trained), default=0) < compare.ASSESS_SEEDS:
        return Allocation(can_grow, False, {}, [], False)  # not even a variance yet: every trained option grows
    chances = {n: c for n, c in sequential.chances(v, reach, v.margin).items()}
    live = {n for n, c in chances.items() if not math.isnan(c) and c >= futility}
    out = sorted(n for n in chances if n not in live)
    if not live:
        return Allocation(set(), False, chances, out, bool(chances))
    if v.reason:  # below MIN_SEEDS: every trained option needs the seeds that make a look possible
        return Allocation(can_grow, False, chances, out, False)
    wanted = live | ({v.best} if v.best in trained else set())
    return Allocation(wanted & can_grow, False, chances, out, False)


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
            echo(f"round {n} · {st['task']} / {model}: no successful run yet")
            continue
        v, metric = fv.verdict, fv.metric
        best = fv.best
        parts = [f"highest {v.best} {METRIC_NAMES[metric]} {with_interval(best['id_primary'], metric)}"]
        if v.reason:
            parts.append(f"nothing judged yet ({v.reason.split(':')[0]})")
        else:
            if v.worse:
                parts.append("shown worse than the best: " + ", ".join(v.worse))
            if v.equivalent_to_best:
                parts.append("within the margin of it: " + ", ".join(v.equivalent_to_best))
        alloc = st.get("alloc")
        if alloc is not None and alloc.chances:
            parts.append("open (chance to settle within reach): " + ", ".join(
                f"{o} {100 * c:.0f}%" for o, c in sorted(alloc.chances.items(), key=lambda kv: -kv[1])))
        if st["failed"]:
            parts.append("failed: " + ", ".join(o.describe() for o in st["failed"]))
        if st.get("unrun"):
            parts.append("not run: " + ", ".join(o.describe() for o in st["unrun"]))
        echo(f"round {n} · {st['task']} / {model}: " + "; ".join(parts))
    pending = sum(1 for opts in active.values() for _ in opts)
    if pending:
        mean = sum(all_seconds) / len(all_seconds) if all_seconds else math.nan
        echo(f"round {n + 1} will run {pending} more seed(s), about {pending * mean:.0f} s "
             f"({max(left, 0):.0f} s of the time budget left)")


def _answer(state, out_of_time, futility: float = sequential.FUTILITY) -> list[str]:
    """The answer: the last look (the same analysis as `fewtune report`, under the same plan), and one line per
    family on why it stopped and what it would take."""
    lines = []
    for (model, task), st in state.items():
        name = st.get("task", task)
        fv = st.get("view")
        if fv is None:
            lines.append(f"{name} / {model}: no option produced a result; see `fewtune results --status failed`.")
            continue
        v = fv.verdict
        lines.append(f"{'RESOLVED' if v.resolved else 'OPEN'} · " + " ".join(claims.sentences(fv, name, model)))
        if v.resolved:
            continue
        alloc = st.get("alloc")
        if alloc is not None and alloc.futile:
            why = (f"stopped early: no open comparison has a {100 * futility:.0f}% chance to be settled within the "
                   f"spec's seeds" + (" and the time left" if out_of_time or st.get("time_limited") else "")
                   + " (chances: "
                   + ", ".join(f"{o} {100 * c:.0f}%" for o, c in sorted(alloc.chances.items(), key=lambda kv: -kv[1]))
                   + ")")
        elif out_of_time or st.get("time_limited"):
            why = "the time budget ran out"
        else:
            why = "every seed of the spec is used"
        settled = [f"{o} worse" for o in v.worse] + [f"{o} within the margin" for o in v.equivalent_to_best]
        lines.append(f"  {name} / {model}: {why}. Settled: {', '.join(settled) if settled else 'nothing'}. "
                     f"What it would take: {claims.what_it_takes_all(fv)}")
        if st.get("unrun"):
            lines.append("  not run: " + ", ".join(o.describe() for o in st["unrun"]) + ".")
    return lines
