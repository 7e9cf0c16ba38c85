"""Tasks are data: a TOML file says where the data is, how labels map, the patterns and the verbalizer.

Built-in tasks are the `*.toml` files beside this module; a user's own task is a path to a file of the
same shape (see docs/tasks.md). Files are parsed with `tomllib` (no code is executed).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FewtuneError, did_you_mean, unknown
from ..stats.metrics import METRICS

BUILTIN_DIR = Path(__file__).parent
DROP = "__drop__"  # label_map value: leave the row out (MNLI's neutral in the binary task)

_TOP_KEYS = {"name", "version", "description", "labels", "fields", "metrics", "primary_metric", "instruction",
             "raw_separator", "train", "in_domain", "out_of_domain", "patterns", "splits", "equivalence_margin"}
# How a run is analysed, not what it computes: left out of the task's content hash (a run's identity), so setting
# or changing a margin never makes finished runs look like another experiment.
ANALYSIS_KEYS = ("equivalence_margin",)
# what each metric can span: a margin (a difference) can be at most the width of that range
class _Ranges(dict):
    def __missing__(self, name):
        return (METRICS[name].lo, METRICS[name].hi)


METRIC_RANGES = _Ranges()  # read from the registry when asked
_SPLIT_KEYS = {"local", "columns", "label_map", "hub", "hub_columns", "hub_label_map", "hub_note", "group_by"}
_LOCAL_KEYS = {"path", "format", "header", "delimiter"}
_HUB_KEYS = {"path", "name", "split", "revision"}
_METRICS = METRICS  # the metric registry (fewtune.stats.metrics), read when a task loads
# names other tools use for the same metrics, too far from ours for difflib to suggest
def _metric_alias(name: str) -> str | None:
    return next((m.name for m in METRICS.values() if name in m.aliases), None)


@dataclass(frozen=True)
class Pattern:
    template: str
    verbalizer: tuple[str, ...]


@dataclass(frozen=True)
class Split:
    name: str
    local: dict | None
    columns: dict
    label_map: dict
    hub: dict | None = None
    hub_columns: dict | None = None
    hub_label_map: dict | None = None
    group_by: tuple[str, ...] = ()
    hub_note: str = ""  # why the split has no Hub source (said when --data-source hub asks for it)


@dataclass(frozen=True)
class Task:
    name: str
    version: int
    labels: tuple[str, ...]
    fields: tuple[str, ...]
    patterns: tuple[Pattern, ...]
    splits: dict
    train: str
    in_domain: str
    out_of_domain: tuple[str, ...]
    metrics: tuple[str, ...] = ("accuracy", "macro_f1", "mcc")
    primary_metric: str = "accuracy"  # what rankings, Pareto fronts and "which method" use (CoLA: mcc)
    description: str = ""
    instruction: str = ""
    raw_separator: str = "\n"
    source: str = ""  # the file it was read from
    sha256: str = ""  # of the task's content as loaded (canonical JSON of the parsed file): part of a run's identity
    # two options are called equivalent only when their simultaneous interval lies within ±this (primary metric's
    # units), fixed before the run; None: equivalence is never claimed (docs/statistics.md)
    equivalence_margin: float | None = None
    eval_splits: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "eval_splits", (self.in_domain, *self.out_of_domain))

    def pattern(self, index: int) -> Pattern:
        if not 0 <= index < len(self.patterns):
            raise FewtuneError(f"Task '{self.name}' has patterns 0..{len(self.patterns) - 1}; --pattern {index} does not exist.")
        return self.patterns[index]

    def format(self, pattern: Pattern, example) -> str:
        return pattern.template.format(**example.fields)

    def raw_text(self, example) -> str:
        """The input of vanilla `ft`: the fields joined, no pattern."""
        return self.raw_separator.join(example.fields[f] for f in self.fields)


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def load_task(name_or_path: str) -> Task:
    """A built-in task by name (`cola`, `mnli`) or a task file by path (`path/to/mytask.toml`)."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if path.is_dir():
            raise FewtuneError(f"Task file {path} is a folder; give the task's .toml file.")
        if not path.is_file():
            raise FewtuneError(f"Task file {path} does not exist.")
        return _parse_cached(path)
    if name_or_path not in builtin_names():
        raise unknown("task", name_or_path, builtin_names())
    return _parse_cached(BUILTIN_DIR / f"{name_or_path}.toml")


_PARSED: dict[tuple, Task] = {}


def _parse_cached(path: Path) -> Task:
    """parse_task_file, once per file content: a grid hashes every cell's identity, which loads its task (reading
    the bytes is cheap, parsing and checking them is not); an edited file is parsed again."""
    try:
        key = (str(path), hashlib.sha256(path.read_bytes()).hexdigest())
    except OSError:
        return parse_task_file(path)  # it says what is wrong
    if key not in _PARSED:
        _PARSED[key] = parse_task_file(path)
    return _PARSED[key]


def parse_task_file(path: Path) -> Task:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark (Notepad) is not TOML
    except UnicodeDecodeError as e:
        raise FewtuneError(f"Task file {path} is not UTF-8 text ({e.reason} at byte {e.start}).") from None
    except tomllib.TOMLDecodeError as e:
        raise FewtuneError(f"Task file {path} is not valid TOML: {e}.") from None
    except OSError as e:
        raise FewtuneError(f"Task file {path} cannot be read: {e.strerror}.") from None
    return task_from_dict(raw, where=str(path))


def content_sha256(raw: dict) -> str:
    """Hash of a task's parsed content: comments and layout do not change it, any key or value does (but the
    analysis-only keys, ANALYSIS_KEYS)."""
    content = {k: v for k, v in raw.items() if k not in ANALYSIS_KEYS}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _check_keys(d: dict, allowed: set, where: str):
    for key in d:
        if key not in allowed:
            raise FewtuneError(f"{where}: unknown key '{key}'.{did_you_mean(key, sorted(allowed))}")


def _need(d: dict, key: str, typ, where: str):
    if key not in d:
        raise FewtuneError(f"{where}: missing key '{key}'.")
    value = d[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise FewtuneError(f"{where}: '{key}' must be {names}, got {type(value).__name__} {value!r:.60}.")
    return value


def _str_list(d: dict, key: str, where: str, default=None) -> tuple[str, ...]:
    if key not in d and default is not None:
        return tuple(default)
    value = _need(d, key, list, where)
    if not value or not all(isinstance(v, str) and v for v in value):
        raise FewtuneError(f"{where}: '{key}' must be a non-empty list of non-empty strings.")
    return tuple(value)


def task_from_dict(raw: dict, where: str = "<task>") -> Task:
    _check_keys(raw, _TOP_KEYS, where)
    name = _need(raw, "name", str, where)
    labels = _str_list(raw, "labels", where)
    if len(set(labels)) != len(labels) or len(labels) < 2:
        raise FewtuneError(f"{where}: 'labels' must name at least two distinct classes, got {list(labels)}.")
    fields = _str_list(raw, "fields", where)
    metrics = _str_list(raw, "metrics", where, default=("accuracy", "macro_f1", "mcc"))
    for m in metrics:
        if m not in _METRICS:
            alias = _metric_alias(m.lower())
            hint = f" Did you mean: {alias}?" if alias else did_you_mean(m, sorted(_METRICS))
            raise FewtuneError(f"{where}: Unknown metric '{m}' in 'metrics'.{hint} Known: {', '.join(sorted(_METRICS))}.")
    patterns = []
    for i, p in enumerate(_need(raw, "patterns", list, where)):
        pwhere = f"{where} patterns[{i}]"
        if not isinstance(p, dict):
            raise FewtuneError(f"{pwhere}: must be a table with 'template' and 'verbalizer'.")
        _check_keys(p, {"template", "verbalizer"}, pwhere)
        template = _need(p, "template", str, pwhere)
        verbalizer = _str_list(p, "verbalizer", pwhere)
        if len(verbalizer) != len(labels):
            raise FewtuneError(f"{pwhere}: verbalizer has {len(verbalizer)} words for {len(labels)} labels.")
        if len(set(verbalizer)) != len(verbalizer):
            raise FewtuneError(f"{pwhere}: verbalizer words must differ, got {list(verbalizer)}.")
        _check_template(template, fields, pwhere)
        patterns.append(Pattern(template, verbalizer))
    if not patterns:
        raise FewtuneError(f"{where}: 'patterns' must hold at least one pattern.")
    splits = {}
    for sname, s in _need(raw, "splits", dict, where).items():
        splits[sname] = _parse_split(sname, s, fields, labels, f"{where} splits.{sname}")
    train = _need(raw, "train", str, where)
    in_domain = _need(raw, "in_domain", str, where)
    ood = raw.get("out_of_domain", [])  # may be empty or left out: in-domain evaluation only
    if not isinstance(ood, list) or not all(isinstance(x, str) and x for x in ood):
        raise FewtuneError(f"{where}: 'out_of_domain' must be a list of split names (possibly empty), got {ood!r:.60}.")
    ood = tuple(ood)
    for role, sname in [("train", train), ("in_domain", in_domain)] + [("out_of_domain", s) for s in ood]:
        if sname not in splits:
            raise FewtuneError(f"{where}: {role} split '{sname}' is not declared under [splits].{did_you_mean(sname, list(splits))}")
    primary = raw.get("primary_metric", "accuracy")
    if not isinstance(primary, str) or primary not in _METRICS:
        raise FewtuneError(f"{where}: primary_metric {primary!r:.60} is not a metric fewtune computes "
                           f"({', '.join(sorted(_METRICS))}).{did_you_mean(str(primary), sorted(_METRICS))}")
    if primary not in metrics:
        metrics = (*metrics, primary)
    version = raw.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise FewtuneError(f"{where}: 'version' must be an integer.")
    margin = check_margin(raw["equivalence_margin"], primary, f"{where}: 'equivalence_margin'") \
        if "equivalence_margin" in raw else None
    return Task(equivalence_margin=margin, name=name, version=version, labels=labels, fields=fields, patterns=tuple(patterns), splits=splits,
                train=train, in_domain=in_domain, out_of_domain=ood, metrics=metrics, primary_metric=primary,
                sha256=content_sha256(raw), description=raw.get("description", ""), instruction=raw.get("instruction", ""),
                raw_separator=raw.get("raw_separator", "\n"), source=where)


def check_margin(value, metric: str, what: str) -> float:
    """An equivalence margin: a number > 0 and at most the width of the metric's range (1 for accuracy and
    macro-F1, 2 for MCC); `what` names where it was given, for the one-line error."""
    lo, hi = METRIC_RANGES[metric]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FewtuneError(f"{what} must be a number (a difference of {metric}), got {value!r:.60}.")
    if not 0 < value <= hi - lo:  # also refuses nan
        raise FewtuneError(f"{what} must be > 0 and at most {hi - lo:g} (the range of {metric}), got {value!r}.")
    return float(value)


def _check_template(template: str, fields, where: str):
    import string
    try:
        parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise FewtuneError(f"{where}: template {template!r} is malformed ({e}); write a literal brace as {{{{ or }}}}.") from None
    for f, spec, conv in parsed:  # fields only: `{sentence:d}` or `{sentence!r}` would fail or change the text
        if spec or conv:
            written = "{" + f + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            raise FewtuneError(f"{where}: template uses {written}; a template holds plain fields only, "
                               f"such as {{{f}}} (no format spec or conversion).")
    names = [f for f, _, _ in parsed]
    for f in names:
        if f not in fields:
            raise FewtuneError(f"{where}: template uses {{{f}}}, which is not one of the task's fields {list(fields)}.")
    missing = [f for f in fields if f not in names]
    if missing:
        raise FewtuneError(f"{where}: template does not use field(s) {missing}.")


def _source_table(table, keys, required, shape: str, where: str) -> None:
    """A split's `local` or `hub` entry: a table of known keys with its required strings."""
    if not isinstance(table, dict):
        raise FewtuneError(f"{where}: must be a table with {shape}.")
    _check_keys(table, keys, where)
    for key in required:
        _need(table, key, str, where)


def _parse_split(name: str, s, fields, labels, where: str) -> Split:
    if not isinstance(s, dict):
        raise FewtuneError(f"{where}: must be a table.")
    _check_keys(s, _SPLIT_KEYS, where)
    local, hub = s.get("local"), s.get("hub")
    if local is None and hub is None:
        raise FewtuneError(f"{where}: needs 'local' (a file under the data root) or 'hub' (a Hub dataset), or both.")
    if local is not None:
        _source_table(local, _LOCAL_KEYS, ("path",), "'path' and 'format'", f"{where}.local")
        fmt = local.get("format", "tsv")
        if fmt not in ("tsv", "csv", "jsonl"):
            raise FewtuneError(f"{where}.local: format '{fmt}' is not one of tsv, csv, jsonl.")
    if hub is not None:
        _source_table(hub, _HUB_KEYS, ("path", "split"), "'path' and 'split'", f"{where}.hub")
    group_by = tuple(s.get("group_by", ()))
    columns = _need(s, "columns", dict, where)
    for key in [*fields, "label", *group_by]:
        if key not in columns:
            raise FewtuneError(f"{where}.columns: missing '{key}' (which column holds it).")
    for key, col in columns.items():
        if not isinstance(col, (str, int)) or isinstance(col, bool):
            raise FewtuneError(f"{where}.columns.{key}: must be a column name or a 0-based column number.")
    # No label_map: identity, each raw label is the label of the same name (a file whose labels are the words).
    label_map = {str(k): v for k, v in _need(s, "label_map", dict, where).items()} if "label_map" in s else {l: l for l in labels}
    hub_label_map = s.get("hub_label_map")
    hub_note = s.get("hub_note", "")
    if not isinstance(hub_note, str):
        raise FewtuneError(f"{where}.hub_note: must be a string (why the split has no Hub source).")
    for mname, m in (("label_map", label_map), ("hub_label_map", hub_label_map or {})):
        for raw_label, target in m.items():
            if target != DROP and target not in labels:
                raise FewtuneError(f"{where}.{mname}: '{raw_label}' maps to '{target}', which is not one of the labels {list(labels)} (or \"{DROP}\").")
    return Split(name=name, local=local, columns=columns, label_map=label_map, hub=hub,
                 hub_columns=s.get("hub_columns"), hub_label_map={str(k): v for k, v in hub_label_map.items()} if hub_label_map else None,
                 group_by=group_by, hub_note=hub_note)
