"""`fewtune grid SPEC --until-resolved [--time-budget 15m]`: spend the runs where the answer is still open.

The allocation rule (docs/grid.md, "Until resolved"):
1. Round 1 runs the first seed of every option (model × task × method entry × shots) of the spec.
2. After each round, per model × task, the option with the best mean of the task's primary metric (in-domain) is
   compared with every other option *paired* (same seeds, same examples; fewtune.stats). An option whose interval of
   (best − it) excludes 0 is **settled**: it is worse, and gets no more runs. The others are **open**.
3. The next round gives one more seed (the next in the spec's `seeds` list) to the best option first (every open
   comparison is with it) and then to every open one. A model × task is resolved when nothing is open; it stays open
   when its options have used every seed. An option settled after one seed is settled on evaluation noise alone
   (the interval cannot see training instability yet): the answer marks such statements with †.
4. Before each run, the time it will take is estimated from the runs of the same option (its longest, else the mean
   of all runs so far) times 1.25; a run that would not finish within the time budget is not started.
It prints, after every round, what is settled and what is open with an estimate of the time left, and ends with the
answer in plain words (the report's conclusion sentences) and, for what stays open, what it would take to resolve
it: more seeds, or more evaluation examples when evaluation sampling is what keeps the interval wide.
Everything runs through the ordinary grid (claim, record, resume): an interrupted `--until-resolved` resumes from
the database, and finished runs are never run again.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FewtuneError
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
                       runner=None, reclaim: bool = False, backend=None, retries: int | None = None) -> Decision:
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
            state = _assess(store, groups_of, depth)
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
    resolved = all(st["best"] is not None and not st["tied"] and not st["unpaired"] for st in state.values())
    return Decision(resolved=resolved, lines=lines, rounds=rounds, runs=runs, seconds=time.perf_counter() - t0,
                    state=state)


SAFETY = 1.25  # a run's time varies (shared machines: 55 s then 179 s for the same option was seen); start it only
#                if 1.25x the estimate fits, so the budget is kept rather than overrun


def _estimate(o: Option, all_seconds: list[float]) -> float | None:
    """Seconds the option's next run will take: the longest of its runs so far, else the mean of all runs."""
    if o.seconds:
        return SAFETY * max(o.seconds)
    return SAFETY * (sum(all_seconds) / len(all_seconds)) if all_seconds else None


def _assess(store, groups_of, depth) -> dict:
    """Per model × task: the options (report groups of the runs given so far), the best, settled and open ones."""
    from .report.budget import compare_to_best, finite, mean_of
    from .report.data import flat_row, group_runs, predictions_reader
    given = {c.key for opts in groups_of.values() for o in opts for c in o.cells[:depth[o.key]]}
    rows = [r for r in store.rows(["success"]) if r["config_hash"] in given]
    groups = group_runs([flat_row(r) for r in rows], rows, predictions_reader(store))
    state = {}
    for (model, task), opts in groups_of.items():
        option_of = {c.key: o.key for o in opts for c in o.cells}  # run hash -> its option
        by_key = {option_of[h]: g for g in groups for h in g["runs"] if h in option_of}
        gs = [g for g in by_key.values() if finite(mean_of(g, "id"))]
        if not gs:
            state[(model, task)] = {"groups": [], "best": None, "worse": [], "tied": [], "unpaired": [],
                                    "open": False, "next": set(), "failed": [o for o in opts if o.key not in by_key]}
            continue
        c = compare_to_best(gs, "id")
        key_of = {id(g): k for k, g in by_key.items()}
        open_ = [g for g, _ in c["tied"]] + c["unpaired"]
        st = {"groups": gs, "best": c["best"], "worse": c["worse"], "tied": c["tied"], "unpaired": c["unpaired"],
              "failed": [o for o in opts if o.key not in by_key], "best_key": key_of[id(c["best"])]}
        nxt = {key_of[id(g)] for g in [c["best"], *open_]}
        st["next"] = {k for k in nxt if depth[k] < len(next(o for o in opts if o.key == k).cells)}
        # open while some comparison with the best is open and a seed is left for at least one side of it
        st["open"] = bool(open_) and bool(st["next"])
        state[(model, task)] = st
    return state


def _print_round(n, state, active, all_seconds, left, echo) -> None:
    from .report.budget import name
    from .report.data import METRIC_NAMES, signed, with_interval
    for (model, task), st in state.items():
        if st["best"] is None:
            echo(f"round {n} · {task} / {model}: no successful run yet")
            continue
        metric = st["best"]["primary_metric"]
        parts = [f"best {name(st['best'])} {METRIC_NAMES[metric]} {with_interval(st['best']['id_primary'], metric)}"]
        if st["worse"]:
            parts.append("settled (worse): " + ", ".join(f"{name(g)} {signed(d, metric)}" for g, d in st["worse"]))
        if st["tied"]:
            parts.append("open: " + ", ".join(f"{name(g)} {signed(d, metric)}" for g, d in st["tied"]))
        if st["failed"]:
            parts.append("failed: " + ", ".join(o.describe() for o in st["failed"]))
        echo(f"round {n} · {task} / {model}: " + "; ".join(parts))
    pending = sum(1 for opts in active.values() for _ in opts)
    if pending:
        mean = sum(all_seconds) / len(all_seconds) if all_seconds else math.nan
        echo(f"round {n + 1} will run {pending} more seed(s), about {pending * mean:.0f} s "
             f"({max(left, 0):.0f} s of the time budget left)")


def _answer(state, out_of_time) -> list[str]:
    from .report.budget import conclusion, name
    lines = []
    for (model, task), st in state.items():
        if not st["groups"]:
            lines.append(f"{task} / {model}: no option produced a result; see `fewtune results --status failed`.")
            continue
        verdict = "RESOLVED" if not st["tied"] and not st["unpaired"] else "OPEN"
        lines.append(f"{verdict} · " + " ".join(conclusion(st["groups"], task, model, ("id",))))
        if verdict == "OPEN":
            why = "the time budget ran out" if out_of_time else "every seed of the spec is used"
            for g, d in st["tied"]:
                lines.append(f"  still open: {name(st['best'])} vs {name(g)} ({why}). {_what_it_takes(d)}")
    return lines


def _what_it_takes(d) -> str:
    """How many seeds, or how many evaluation examples, would make the interval of this difference exclude 0 if
    the difference and the variances stay as measured."""
    from scipy import stats as st
    effect = abs(d.value)
    if effect == 0 or math.isnan(d.lo):
        return "The measured difference is 0: no number of runs will separate them; they are equivalent here."
    if d.n_seeds < 2:
        return ("More seeds: with one common seed the interval covers evaluation noise only, and how unstable "
                "training is stays unknown until a second seed of both runs.")
    z = st.t.ppf(0.975, max(d.n_examples - 1, 1))
    if z * math.sqrt(d.example_var) >= effect:  # seeds cannot help: the example part alone is too wide
        factor = (z * math.sqrt(d.example_var) / effect) ** 2 * 1.1
        if factor > 20:
            return (f"The difference measured ({effect:.3f}) is far inside the evaluation noise: about "
                    f"{math.ceil(d.n_examples * factor):,} evaluation examples would be needed; for a choice at this "
                    "budget, treat them as equivalent and take the cheaper.")
        return (f"Evaluation sampling limits it: about {math.ceil(d.n_examples * factor):,} evaluation examples "
                f"(now {d.n_examples:,}; raise eval_limit) would be needed, more seeds would not do it.")
    per_seed_var = d.seed_var * d.n_seeds
    for n in range(max(d.n_seeds, 2), 201):
        half = math.sqrt(st.t.ppf(0.975, n - 1) ** 2 * per_seed_var / n + z ** 2 * d.example_var)
        if half < effect:
            return f"About {n} seeds in all (now {d.n_seeds}) would resolve it if the difference holds."
    return "Hundreds of seeds would be needed: for this purpose they are equivalent."
