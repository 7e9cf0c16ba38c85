"""A grid spec: parse a TOML spec (or a shipped preset) and expand it into cells, each a validated RunConfig.

Nothing here runs anything: the driver (driver.py) runs the cells through a backend (backends.py, ray_backend.py).
Spec format: docs/grid.md.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..config import RunConfig
from ..errors import FewtuneError, did_you_mean, unknown

RUNNER_ENV = "FEWTUNE_GRID_RUNNER"  # "module:function" replacing fewtune.runner.run in the cells (tests, plug-ins)
GRID_KEYS = ("name", "description", "models", "tasks", "shots", "shots_per_class", "seeds", "methods", "resources", "max_retries",
             "findings",
             "workers",
             "opt_in")
# [resources]: what one cell (--backend ray) or one warm actor (ray-warm) asks of a Ray cluster; ignored locally
RESOURCE_KEYS = {"num_cpus": 1.0, "num_gpus": 0.0, "memory_gib": None}
MAX_RESOURCE = {"num_cpus": 1024, "num_gpus": 1024, "memory_gib": 65536}  # per cell: more is a typo, not a node
METHOD_KEYS = ("method", "label", "method_options", "shots", "shots_per_class")
PER_CELL = ("model", "task", "seed", "method", "method_options")  # set by the grid's axes, not as shared fields
MAX_CELLS = 10_000  # a spec that expands to more is almost surely a typo (seeds = 1000000); --max-cells raises it


@dataclass
class Cell:
    config: RunConfig
    label: str

    @functools.cached_property
    def key(self) -> str:  # computed once: hashing is most of the cost of expanding a large grid
        return self.config.hash()

    @functools.cached_property
    def seed_free(self) -> bool:
        """Whether its predictions cannot depend on the data seed (Method.seed_free: zero-shot icl): the grid runs
        such an option once, at the spec's first seed, and it stands for every seed. Asks the method registry
        (imports the method's module) on first use."""
        from ..methods import seed_free
        return seed_free(self.config)

    def describe(self) -> str:
        c = self.config
        return (f"{self.label} {task_name(c.task)} {c.model} shots={c.shots} seed={c.seed}"
                + (" (seed-free: runs once, for every seed)" if self.seed_free else ""))


def task_name(spec: str) -> str:
    """A task as the console names it: its `name`, not the path of its file (a file that does not load: its stem)."""
    from ..tasks import load_task
    try:
        return load_task(spec).name
    except FewtuneError:
        return Path(spec).stem


@dataclass
class Grid:
    name: str
    source: str
    description: str = ""
    cells: list[Cell] = field(default_factory=list)
    seeds: list = field(default_factory=list)  # the spec's seeds, in its order (a seed-free option runs at the first)
    resources: dict = field(default_factory=lambda: dict(RESOURCE_KEYS))  # per cell, for the Ray backend
    max_retries: int | None = None  # re-runs of a cell whose worker process died [backends.default_retries]
    workers: int | None = None      # cells at once on this machine (warm/process backends) [--workers, 1]
    findings: str | None = None     # the findings file its report judges (a path, a shipped name, or "none")
    opt_in: tuple = ()              # the spec's opt-in method lists added to its methods (--opt-in), by name
    opt_in_labels: tuple = ()       # the labels of every opt-in list, taken or not (`fewtune check --spec`)

    def seed_order(self) -> list:
        """The spec's seeds in its order (a grid built from cells alone: its cells' seeds, as they come)."""
        return list(self.seeds) or list(dict.fromkeys(c.config.seed for c in self.cells))


# --- the spec
def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in (resources.files("fewtune") / "presets").iterdir() if p.name.endswith(".toml"))


def load_grid(spec: str, validate: bool = True, max_cells: int = MAX_CELLS, models: list[str] | None = None,
              opt_in: list[str] | None = None) -> Grid:
    """A grid from a spec file path, or from the name of a spec shipped in fewtune/presets (paper, cpu, demo).
    A spec that expands to more than `max_cells` cells is refused before any cell is built. `models` replaces the
    spec's models (`fewtune grid paper --models smollm2-135m`: the study's design on another model); `opt_in` adds
    the spec's opt-in method lists of those names to its methods (`fewtune grid paper --opt-in ood`)."""
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
    if path.is_file() and isinstance(data.get("findings"), str):
        data["findings"] = resolve_task_path(data["findings"], path.parent)  # next to the spec, as task files are
    if models is not None:
        data["models"] = list(models)
    taken, labels = take_opt_in(data, opt_in or [], source)
    grid = expand(data, source, default_name, validate, max_cells)
    grid.opt_in, grid.opt_in_labels = taken, labels
    return grid


def take_opt_in(data: dict, names: list[str], where: str) -> tuple[tuple, tuple]:
    """Move the spec's `[[opt_in.NAME]]` method lists out of `data`, appending the ones named in `names` to its
    `methods`: ((the names taken), (the labels of every list)). Options a grid runs only when asked for (paper's
    `ood`: methods beyond the study's), so the spec's own cells, and their keys, stay as they are without them."""
    lists = data.pop("opt_in", {})
    if not isinstance(lists, dict) or not all(isinstance(v, list) and v and all(isinstance(e, dict) for e in v)
                                              for v in lists.values()):
        raise FewtuneError(f"{where}: 'opt_in' must hold named lists of method tables ([[opt_in.NAME]] with method = "
                           f"\"...\").")
    for name in names:
        if name not in lists:
            known = f"its lists: {', '.join(lists)}" if lists else "it has none"
            raise FewtuneError(f"--opt-in {name}: {where} has no opt-in method list '{name}' ({known})."
                               f"{did_you_mean(name, list(lists))}")
    if len(set(names)) != len(names):
        raise FewtuneError(f"--opt-in lists a name twice: {', '.join(names)}.")
    if names:
        if not isinstance(data.get("methods"), list):
            raise FewtuneError(f"{where}: 'methods' must be a list of tables ([[methods]] with method = \"...\").")
        data["methods"] = list(data["methods"]) + [e for name in names for e in lists[name]]
    labels = tuple(e.get("label") or default_label(e.get("method", "?"), e.get("method_options") or {})
                   for entries in lists.values() for e in entries)
    for name, entries in lists.items():  # a list not taken is still checked: it must work when someone opts in
        if name in names:
            continue
        from ..methods import get_method
        for i, entry in enumerate(entries):
            try:
                get_method(str(entry.get("method")), entry.get("method_options") or {})
            except FewtuneError as e:
                raise FewtuneError(f"{where} opt_in.{name}[{i}]: {e}") from None
    return tuple(names), labels


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
            from ..methods import get_method
            try:
                get_method(entry["method"], options)  # unknown method or option: fail now, not hours later
            except FewtuneError as e:
                raise FewtuneError(f"{at}: {e}") from None
    loaded = {}
    if validate:
        from ..tasks import load_task
        for task in tasks:
            loaded[task] = load_task(task)
    pairs = sum(len(m[4][1]) for m in methods)  # (method entry, sample size) pairs
    total = len(seeds) * len(models) * len(tasks) * pairs
    if total > max_cells:  # counted before a single cell is built: a typo must not take hours to report
        raise FewtuneError(f"{where}: expands to {total:,} cells ({len(models)} models × {len(tasks)} tasks × "
                           f"{pairs} method/shots pairs × {len(seeds)} seeds), more than "
                           f"the limit of {max_cells:,}; check the axes, or pass --max-cells {total} to run it anyway.")

    cells, seen = [], {}
    once = set()  # (model, task, label, shots) of the seed-free options: their one cell is the first seed's
    for seed in seeds:
        for model in models:
            for task in tasks:
                for label, method, options, overrides, (kind, method_shots) in methods:
                    for n in method_shots:
                        if kind == "per_class":  # recorded as the total: the same cell as shots = K x labels
                            from ..tasks import load_task
                            n *= len((loaded.get(task) or load_task(task)).labels)
                        if (model, task, label, n) in once:
                            continue  # seed-free: the first seed's cell (its key as it always was) stands for this
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
                        if seed == seeds[0] and len(seeds) > 1 and cell_seed_free(cell, validate):
                            once.add((model, task, label, n))
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
    findings = check_findings_key(data["findings"], [m[0] for m in methods], where) if "findings" in data else None
    return Grid(name=str(name), source=where, description=str(data.get("description", "")), cells=cells,
                seeds=list(seeds),
                resources=parse_resources(data.get("resources", {}), where),
                max_retries=check_max_retries(data["max_retries"], where) if "max_retries" in data else None,
                workers=check_workers_key(data["workers"], where) if "workers" in data else None,
                findings=findings)


def cell_seed_free(cell: Cell, validate: bool) -> bool:
    """Whether the cell's option runs once (Cell.seed_free). Unvalidated (expand(validate=False)), a method the
    registry does not know is not seed-free rather than an error."""
    try:
        return cell.seed_free
    except FewtuneError:
        if validate:
            raise
        return False


def check_findings_key(value, labels: list[str], where: str) -> str:
    """The spec's `findings`: a findings file (path or shipped name) whose claims name only this grid's labels,
    or "none"; checked before anything runs."""
    if not isinstance(value, str) or not value:
        raise FewtuneError(f"{where}: 'findings' must be a findings file (a path, or a shipped name: study) or "
                           f"\"none\", got {value!r:.60}.")
    if value != "none":
        from ..findings import check_against_labels, load_findings
        check_against_labels(load_findings(value), labels, where)
    return value


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
        if key == "num_gpus":
            check_gpu_share(value, where)
        out[key] = float(value)
    return out


def check_gpu_share(value: float, where: str) -> None:
    """Ray gives a cell a share of one GPU (0.25: four cells on one GPU, in Ray's steps of 0.0001) or whole GPUs; 1.5
    would be neither (Ray would never schedule it), and a share finer than 0.0001 is 0 to Ray."""
    if value > 1 and value != int(value):
        raise FewtuneError(f"{where}: 'resources.num_gpus' above 1 must be a whole number (a GPU is shared as a "
                           f"fraction of one, e.g. 0.25: four cells per GPU), got {value!r}.")
    if 0 < value < 0.0001:
        raise FewtuneError(f"{where}: 'resources.num_gpus' must be 0 or at least 0.0001 (Ray's smallest share of a "
                           f"GPU), got {value!r}.")


def check_max_retries(value, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 100:
        raise FewtuneError(f"{where}: 'max_retries' must be an integer from 0 to 100, got {value!r:.60}.")
    return value




def check_workers_key(value, where: str) -> int:
    """The spec's `workers`: an integer ≥ 1 (what the machine can hold is checked when the grid starts)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise FewtuneError(f"{where}: 'workers' must be an integer ≥ 1, got {value!r:.60}.")
    return value


def check_models(grid: Grid) -> None:
    """Refuse a grid naming a model that cannot be resolved (an unknown name, a missing folder) before any cell
    runs: otherwise every cell of it starts, fails with the same error, and the grid exits 1 hours later.
    Hub ids are accepted as written (whether the Hub has them is known only when a cell loads them)."""
    from ..engine.models import check_resolvable
    for model in dict.fromkeys(c.config.model for c in grid.cells):
        try:
            check_resolvable(model)
        except FewtuneError as e:
            raise FewtuneError(f"{grid.source}: model '{model}' cannot be used: {e}") from None
