"""The experiment grid: expand a spec into runs, run each once, record every outcome in the store.

Each cell runs in its own child process (`python -m fewtune.grid --worker ...`), for three reasons:
a crash, an out-of-memory kill or a hung native library ends that cell only; the child's memory
(model, optimizer, CUDA context) goes back to the system when it exits, so cell 40 runs in the same
memory as cell 1; and the child's stdout/stderr, including what C extensions print, go to the cell's
log file at the file-descriptor level. The cost is ~3-6 s of imports and model loading per cell,
small next to a training run. `--in-process` runs cells in the grid's process instead (debugging).

The child watches its parent and exits if the grid dies (kill -9), so no orphan keeps computing.
The parent alone writes to the database; a cell killed with the grid stays `running` with a dead
owner, and the next grid claims it again (store.Store.claim): re-run, never duplicated.
Spec format and resume semantics: docs/grid.md.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .config import RunConfig
from .errors import FewtuneError, did_you_mean, unknown
from .store import Store, dumps, now, this_process, write_atomic

log = logging.getLogger("fewtune")
RUNNER_ENV = "FEWTUNE_GRID_RUNNER"  # "module:function" replacing fewtune.runner.run in the cells (tests, plug-ins)
GRID_KEYS = ("name", "description", "models", "tasks", "shots", "shots_per_class", "seeds", "methods", "resources", "max_retries")
# [resources]: what one cell asks of a Ray cluster (the local backend runs one cell at a time and ignores it)
RESOURCE_KEYS = {"num_cpus": 1.0, "num_gpus": 0.0, "memory_gib": None}
MAX_RESOURCE = {"num_cpus": 1024, "num_gpus": 1024, "memory_gib": 65536}  # per cell: more is a typo, not a node
METHOD_KEYS = ("method", "label", "method_options", "shots", "shots_per_class")
PER_CELL = ("model", "task", "seed", "method", "method_options")  # set by the grid's axes, not as shared fields
TERMINATE_GRACE_S = 10
MAX_CELLS = 10_000  # a spec that expands to more is almost surely a typo (seeds = 1000000); --max-cells raises it


@dataclass
class Cell:
    config: RunConfig
    label: str

    @functools.cached_property
    def key(self) -> str:  # computed once: hashing is most of the cost of expanding a large grid
        return self.config.hash()

    def describe(self) -> str:
        c = self.config
        return f"{self.label} {c.task} {c.model} shots={c.shots} seed={c.seed}"


@dataclass
class Grid:
    name: str
    source: str
    description: str = ""
    cells: list[Cell] = field(default_factory=list)
    resources: dict = field(default_factory=lambda: dict(RESOURCE_KEYS))  # per cell, for the Ray backend
    max_retries: int | None = None  # Ray backend: re-runs of a cell whose worker died [ray_backend.MAX_RETRIES]


# --- the spec
def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in (resources.files("fewtune") / "presets").iterdir() if p.name.endswith(".toml"))


def load_grid(spec: str, validate: bool = True, max_cells: int = MAX_CELLS) -> Grid:
    """A grid from a spec file path, or from the name of a spec shipped in fewtune/presets (paper, cpu, demo).
    A spec that expands to more than `max_cells` cells is refused before any cell is built."""
    path = Path(spec)
    if path.is_dir():
        raise FewtuneError(f"Grid spec {path} is a folder; give a spec file (.toml) or a shipped name "
                           f"({', '.join(preset_names())}).")
    if path.is_file():
        text, source = read_text(path), str(path)
    elif path.suffix == "" and "/" not in spec and spec in preset_names():
        text, source = (resources.files("fewtune") / "presets" / f"{spec}.toml").read_text(encoding="utf-8"), f"preset {spec}"
    elif path.suffix or "/" in spec:
        raise FewtuneError(f"Grid spec file {path} does not exist.")
    else:
        raise unknown("grid preset", spec, preset_names())
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FewtuneError(f"Grid spec {source} is not valid TOML: {e}.") from None
    default_name = spec if source.startswith("preset") else path.stem
    if path.is_file() and isinstance(data.get("tasks"), list):
        data["tasks"] = [resolve_task_path(t, path.parent) for t in data["tasks"]]
    return expand(data, source, default_name, validate, max_cells)


def resolve_task_path(task, spec_dir: Path):
    """A task file named by a relative path in a spec means the file next to the spec, wherever the grid is run
    from (a built-in name, an absolute path, or anything that is not a string, is left as it is). The task's
    content, not this path, is what enters the run's identity (fewtune.identity)."""
    if not isinstance(task, str):
        return task
    p = Path(task).expanduser()
    if p.is_absolute() or (p.suffix != ".toml" and "/" not in task):
        return task
    return str((spec_dir / p).resolve())


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark (Notepad) is not TOML
    except UnicodeDecodeError as e:
        raise FewtuneError(f"Grid spec {path} is not UTF-8 text (bad byte at offset {e.start}).") from None


def as_list(value, key: str, where: str, kind) -> list:
    if key == "seeds" and not isinstance(value, list):  # `seeds = 3` reads as "three seeds" but would mean seed 3
        raise FewtuneError(f"{where}: 'seeds' must be a list of seeds, got {value!r:.40}: write seeds = [0, 1, 2] "
                           f"for three seeds, or seeds = [{value!r:.40}] for that one seed.")
    values = value if isinstance(value, list) else [value]
    if not values:
        raise FewtuneError(f"{where}: '{key}' is empty.")
    for v in values:
        if not isinstance(v, kind) or isinstance(v, bool):
            raise FewtuneError(f"{where}: '{key}' must hold {kind.__name__} values, got {v!r}.")
    seen = set()
    for v in values:
        if v in seen:
            raise FewtuneError(f"{where}: '{key}' lists {v!r} twice; remove the duplicate value.")
        seen.add(v)
    return values


def default_label(method: str, options: dict) -> str:
    if not options:
        return method
    return method + "(" + ",".join(f"{k}={options[k]}" for k in sorted(options)) + ")"


def expand(data: dict, where: str = "grid", default_name: str = "grid", validate: bool = True,
           max_cells: int = MAX_CELLS) -> Grid:
    """RunConfigs for every model x task x shots x method x seed, seed outermost: with one seed done,
    the whole comparison exists once; more seeds then narrow its intervals. Every cell's RunConfig is built
    (and so validated) here, before anything runs; more than `max_cells` cells is an error."""
    run_fields = set(RunConfig.__dataclass_fields__)
    for key in data:
        if key not in GRID_KEYS and key not in run_fields:
            raise FewtuneError(f"{where}: unknown key '{key}'.{did_you_mean(key, list(GRID_KEYS) + sorted(run_fields))}")
        if key in PER_CELL:
            plural = {"model": "models", "task": "tasks", "seed": "seeds"}.get(key, "methods")
            raise FewtuneError(f"{where}: '{key}' is an axis of the grid: write {plural} = [...] "
                               f"({'[[methods]] tables' if plural == 'methods' else 'a list'}).")
    for key in ("models", "tasks", "methods"):
        if key not in data:
            raise FewtuneError(f"{where}: missing '{key}'.")
    models = as_list(data["models"], "models", where, str)
    tasks = as_list(data["tasks"], "tasks", where, str)
    shots = grid_shots(data, where, ("total", as_list(data.get("shots", 16), "shots", where, int)))
    seeds = as_list(data.get("seeds", [0]), "seeds", where, int)
    shared = {k: v for k, v in data.items() if k not in GRID_KEYS}
    entries = data["methods"]
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise FewtuneError(f"{where}: 'methods' must be a list of tables ([[methods]] with method = \"...\").")

    methods = []
    for i, entry in enumerate(entries):
        at = f"{where} methods[{i}]"
        if "method" not in entry:
            raise FewtuneError(f"{at}: missing 'method'.")
        for key in entry:
            if key not in METHOD_KEYS and (key not in run_fields or key in PER_CELL):
                raise FewtuneError(f"{at}: unknown key '{key}'.{did_you_mean(key, list(METHOD_KEYS) + sorted(run_fields))}")
        options = entry.get("method_options", {})
        if not isinstance(options, dict):
            raise FewtuneError(f"{at}: 'method_options' must be a table, e.g. {{context = \"few-shot\"}}.")
        label = entry.get("label") or default_label(entry["method"], options)
        if not isinstance(label, str):
            raise FewtuneError(f"{at}: 'label' must be a string.")
        if any(label == m[0] for m in methods):
            raise FewtuneError(f"{at}: label '{label}' is used by two method entries; give each a distinct label.")
        overrides = {k: v for k, v in entry.items() if k not in METHOD_KEYS}
        entry_shots = grid_shots(entry, at, shots)
        methods.append((label, entry["method"], options, overrides, entry_shots))
        if validate:
            from .methods import get_method
            try:
                get_method(entry["method"], options)  # unknown method or option: fail now, not hours later
            except FewtuneError as e:
                raise FewtuneError(f"{at}: {e}") from None
    loaded = {}
    if validate:
        from .tasks import load_task
        for task in tasks:
            loaded[task] = load_task(task)
    pairs = sum(len(m[4][1]) for m in methods)  # (method entry, sample size) pairs
    total = len(seeds) * len(models) * len(tasks) * pairs
    if total > max_cells:  # counted before a single cell is built: a typo must not take hours to report
        raise FewtuneError(f"{where}: expands to {total:,} cells ({len(models)} models × {len(tasks)} tasks × "
                           f"{pairs} method/shots pairs × {len(seeds)} seeds), more than "
                           f"the limit of {max_cells:,}; check the axes, or pass --max-cells {total} to run it anyway.")

    cells, seen = [], {}
    for seed in seeds:
        for model in models:
            for task in tasks:
                for label, method, options, overrides, (kind, method_shots) in methods:
                    for n in method_shots:
                        if kind == "per_class":  # recorded as the total: the same cell as shots = K x labels
                            from .tasks import load_task
                            n *= len((loaded.get(task) or load_task(task)).labels)
                        fields = {**shared, **overrides, "model": model, "task": task, "shots": n, "seed": seed,
                                  "method": method, "method_options": dict(options)}
                        try:
                            cell = Cell(RunConfig.from_dict(fields, where=f"{where} ({label})"), label)
                            cell.key  # the run's identity, computed once here: its errors name the entry too
                        except FewtuneError as e:
                            if str(e).startswith(where):
                                raise
                            raise FewtuneError(f"{where} ({label}): {e}") from None
                        if cell.key in seen:
                            raise FewtuneError(f"{where}: methods '{seen[cell.key]}' and '{label}' give the same run "
                                               f"({cell.describe()}); remove one.")
                        seen[cell.key] = label
                        cells.append(cell)
    if loaded:  # what else would fail in every cell at run time: a pattern or an evaluation split the task lacks
        checked = set()
        for cell in cells:
            c = cell.config
            if (c.task, c.pattern, tuple(c.eval_splits or ())) in checked:
                continue
            checked.add((c.task, c.pattern, tuple(c.eval_splits or ())))
            task = loaded[c.task]
            try:
                task.pattern(c.pattern)
                for name in c.eval_splits or ():
                    if name not in task.splits:
                        raise FewtuneError(f"Task '{task.name}' has no split '{name}' (splits: {', '.join(task.splits)}).")
            except FewtuneError as e:
                raise FewtuneError(f"{where} ({cell.label}): {e}") from None
    order = {axis: {v: i for i, v in enumerate(values)} for axis, values in
             (("seed", seeds), ("model", models), ("task", tasks))}  # dicts: list.index per cell is quadratic
    cells.sort(key=lambda c: (order["seed"][c.config.seed], order["model"][c.config.model],
                              order["task"][c.config.task], c.config.shots))  # stable: method order within a block
    name = data.get("name", default_name)
    return Grid(name=str(name), source=where, description=str(data.get("description", "")), cells=cells,
                resources=parse_resources(data.get("resources", {}), where),
                max_retries=check_max_retries(data["max_retries"], where) if "max_retries" in data else None)


def grid_shots(table: dict, where: str, default):
    """('total', [n, ...]) from `shots`, ('per_class', [k, ...]) from `shots_per_class`, else `default`."""
    if "shots" in table and "shots_per_class" in table:
        raise FewtuneError(f"{where}: 'shots' and 'shots_per_class' both given: 'shots' is the total over all classes; give one.")
    if "shots_per_class" in table:
        values = as_list(table["shots_per_class"], "shots_per_class", where, int)
        if any(v < 0 for v in values):
            raise FewtuneError(f"{where}: 'shots_per_class' must hold integers ≥ 0, got {values}.")
        return "per_class", values
    if "shots" in table:
        return "total", as_list(table["shots"], "shots", where, int)
    return default


def parse_resources(table, where: str) -> dict:
    """The [resources] table: num_cpus, num_gpus, memory_gib per cell, each a number in range."""
    if not isinstance(table, dict):
        raise FewtuneError(f"{where}: 'resources' must be a table, e.g. [resources] num_cpus = 2.")
    out = dict(RESOURCE_KEYS)
    for key, value in table.items():
        if key not in RESOURCE_KEYS:
            raise FewtuneError(f"{where}: unknown key 'resources.{key}'.{did_you_mean(key, list(RESOURCE_KEYS))} "
                               f"Known: {', '.join(RESOURCE_KEYS)}.")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise FewtuneError(f"{where}: 'resources.{key}' must be a number, got {value!r:.60}.")
        low_ok = value >= 0 if key == "num_gpus" else value > 0
        if not low_ok or not value <= MAX_RESOURCE[key]:  # `not <=` also catches nan
            bound = "≥ 0" if key == "num_gpus" else "> 0"
            raise FewtuneError(f"{where}: 'resources.{key}' must be {bound} and at most {MAX_RESOURCE[key]}, "
                               f"got {value!r}.")
        out[key] = float(value)
    return out


def check_max_retries(value, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 100:
        raise FewtuneError(f"{where}: 'max_retries' must be an integer from 0 to 100, got {value!r:.60}.")
    return value


# --- running
def resolve_runner():
    """fewtune.runner.run, or the callable named by $FEWTUNE_GRID_RUNNER ("module:function")."""
    spec = os.environ.get(RUNNER_ENV)
    if not spec:
        from .runner import run
        return run
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr or "run")


class Interrupted(Exception):
    """SIGINT or SIGTERM reached the grid: the current cell is recorded as cancelled."""

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


def run_cell_child(cell: Cell, log_path: Path) -> tuple[str, dict | str]:
    """Run one cell in a child process; ('success', result) or ('failed', one-line error)."""
    result_path = log_path.with_name(f".{log_path.stem}.result-{os.getpid()}.json")
    result_path.unlink(missing_ok=True)
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])  # the child imports this same fewtune
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "fewtune.grid", "--worker", json.dumps(cell.config.to_dict()), str(result_path)]
    with open(log_path, "a", encoding="utf-8") as logf:
        logf.write(f"\n=== {now()} fewtune grid: {cell.describe()} [{cell.key}], child process\n")
        logf.flush()
        # own session: a terminal's Ctrl-C reaches the grid only, which then stops the child and records it
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        try:
            code = proc.wait()
        except BaseException:
            stop_child(proc)
            logf.write(f"\n=== {now()} stopped by the grid (interrupted)\n")
            raise
        logf.write(f"\n=== {now()} child process exit code {code}\n")
    try:
        if result_path.exists():
            out = json.loads(result_path.read_text())
            return ("success", out["result"]) if out.get("ok") else ("failed", out["error"])
    finally:
        result_path.unlink(missing_ok=True)
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    return "failed", f"worker process {how} without a result (out of memory?); see {log_path}"


def stop_child(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(TERMINATE_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_cell_inline(cell: Cell, log_path: Path, runner) -> tuple[str, dict | str]:
    """Run one cell in this process, its prints and log records going to its log file."""
    with open(log_path, "a", encoding="utf-8") as logf:
        logf.write(f"\n=== {now()} fewtune grid: {cell.describe()} [{cell.key}], in process\n")
        handler = logging.StreamHandler(logf)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        try:
            with contextlib.redirect_stdout(logf), contextlib.redirect_stderr(logf):
                return "success", runner(cell.config, progress=False)
        except (KeyboardInterrupt, Interrupted):
            raise
        except Exception as e:
            traceback.print_exc(file=logf)
            return "failed", f"{type(e).__name__}: {e}"
        finally:
            root.removeHandler(handler)


@dataclass
class Summary:
    total: int = 0
    done_before: int = 0
    success: int = 0
    failed: int = 0
    busy: int = 0
    lost: int = 0   # finished here but not recorded: another grid took the cell over meanwhile (--reclaim)
    failures: list = field(default_factory=list)


def start(grid: Grid, store: Store, log_dir: Path, progress: bool, echo):
    """What every backend does first: the log folder, this process's identity, the summary and the
    progress bar (`write` prints a line without breaking the bar)."""
    from tqdm import tqdm
    log_dir.mkdir(parents=True, exist_ok=True)
    status = store.statuses()
    summary = Summary(total=len(grid.cells))
    summary.done_before = sum(status.get(c.key) == "success" for c in grid.cells)
    bar = tqdm(total=len(grid.cells), initial=summary.done_before, unit="run", desc=f"grid {grid.name}",
               disable=not progress, dynamic_ncols=True)
    todo = [c for c in grid.cells if status.get(c.key) != "success"]
    return this_process(), summary, bar, (bar.write if progress else echo), todo


def claim_cell(cell: Cell, grid: Grid, store: Store, log_dir: Path, owner: dict, reclaim: bool, summary: Summary,
               bar, write) -> Path | None:
    """Claim a cell for `owner` (the grid process, the only writer): its log path, or None when it is done or
    running in another live process (counted in the summary)."""
    log_path = log_dir / f"{cell.key}.log"
    claim = store.claim(cell.config, cell.label, grid.name, str(log_path), owner, reclaim)
    if claim == "claimed":
        return log_path
    summary.busy += claim == "busy"
    summary.done_before += claim == "done"
    bar.update(1)
    if claim == "busy":
        write(f"- {cell.describe()}: running in another process, skipped")
    return None


def record_outcome(cell: Cell, store: Store, outcome: str, payload, owner: dict, seconds: float, log_path: Path,
                   summary: Summary, bar, write) -> None:
    """Write a finished cell to the database ('success' + result record, or 'failed' + one-line error)."""
    recorded = store.finish(cell.key, payload, owner) if outcome == "success" else store.fail(cell.key, payload, owner)
    if not recorded:  # the row is no longer ours: say so, never "ok"
        summary.lost += 1
        what = f"succeeded ({brief(payload)})" if outcome == "success" else f"failed ({payload})"
        write(f"NOT RECORDED {cell.describe()}: {what} after {seconds:.0f} s, but another grid took this cell over "
              f"meanwhile (--reclaim), so the row is that grid's [{cell.key}; log: {log_path}]")
    elif outcome == "success":
        summary.success += 1
        write(f"ok {cell.describe()}: {brief(payload)} ({seconds:.0f} s)")
    else:
        summary.failed += 1
        summary.failures.append((cell, payload))
        write(f"FAILED {cell.describe()}: {payload} [log: {log_path}]")
    bar.update(1)


def cancel_cell(cell: Cell, store: Store, why, seconds: float, owner: dict, write) -> None:
    if store.cancel(cell.key, f"cancelled by {why} after {seconds:.0f} s", owner):
        write(f"x {cell.describe()}: cancelled [{cell.key}]")


def run_grid(grid: Grid, store: Store, log_dir: Path, runner=None, in_process: bool = False,
             reclaim: bool = False, progress: bool = True, echo=print) -> Summary:
    """Run every cell that has not succeeded yet, one after the other on this machine. A failed cell is
    recorded and the grid goes on; Interrupted (Ctrl-C, SIGTERM) records the current cell as cancelled
    and propagates. The Ray backend (ray_backend.py) shares start/claim_cell/record_outcome/cancel_cell."""
    owner, summary, bar, write, todo = start(grid, store, log_dir, progress, echo)
    if in_process and runner is None:
        runner = resolve_runner()
    try:
        for cell in todo:
            log_path = claim_cell(cell, grid, store, log_dir, owner, reclaim, summary, bar, write)
            if log_path is None:
                continue
            bar.set_postfix_str(cell.describe())
            t0 = time.perf_counter()
            try:
                outcome, payload = (run_cell_inline(cell, log_path, runner) if in_process
                                    else run_cell_child(cell, log_path))
                record_outcome(cell, store, outcome, payload, owner, time.perf_counter() - t0, log_path,
                               summary, bar, write)
            except (KeyboardInterrupt, Interrupted) as e:
                cancel_cell(cell, store, e if isinstance(e, Interrupted) else "SIGINT", time.perf_counter() - t0,
                            owner, write)
                raise
    finally:
        bar.close()
    return summary


def brief(result: dict) -> str:
    parts = []
    for name, e in (result.get("evals") or {}).items():
        if isinstance(e, dict) and isinstance(e.get("accuracy"), (int, float)):
            parts.append(f"{name} acc {e['accuracy']:.3f}")
    return ", ".join(parts) or "done"


# --- the child process
def watch_parent(interval_s: float = 1.0) -> None:
    """Exit when the grid that started this child is gone (it was killed: nobody would record our result)."""
    parent = os.getppid()

    def loop():
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os._exit(137)
    threading.Thread(target=loop, daemon=True, name="watch-parent").start()


def configure_cell_process() -> None:
    """Logging and quiet libraries in a process that runs one cell (a child process or a Ray worker)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    for noisy in ("transformers", "huggingface_hub", "datasets", "peft", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not os.environ.get(RUNNER_ENV):  # the real runner: keep transformers' per-load progress bars out of the log
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()


def run_config(config_json: str) -> dict:
    """Run one cell's config with the grid's runner: {"ok": True, "result": ...} or {"ok": False, "error": one line}.
    Any exception is a failed cell (its traceback goes to the log); KeyboardInterrupt propagates."""
    try:
        cfg = RunConfig.from_dict(json.loads(config_json))
        return {"ok": True, "result": resolve_runner()(cfg, progress=False)}
    except Exception as e:
        traceback.print_exc()
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def worker_main(config_json: str, result_path: str) -> int:
    watch_parent()
    configure_cell_process()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    out_path = Path(result_path)
    try:
        out = run_config(config_json)
    except KeyboardInterrupt:
        return 130
    write_atomic(out_path, dumps(out))  # the parent sees the whole record or none
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2], sys.argv[3]))
    sys.exit("usage: python -m fewtune.grid --worker CONFIG_JSON RESULT_PATH (started by `fewtune grid`)")
