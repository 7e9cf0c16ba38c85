"""Reading a task's splits (local files or the Hub), binarising labels, and seeded sampling.

Every example keeps `idx`, its row number in the split as read (0-based, data rows only), so a result can
name exactly which examples it trained on and a later run can rebuild the same sample.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FewtuneError
from .settings import data_root
from .tasks import DROP, Split, Task
from .util import decode_text_file, nul_line

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass(frozen=True)
class Example:
    idx: int                 # data row number in the split file (0-based, blank lines skipped, before any label is dropped)
    fields: dict             # text fields by the task's field names
    label: int               # class id (index into task.labels)
    groups: dict = field(default_factory=dict)  # e.g. {"heuristic": "lexical_overlap"} for HANS breakdowns


def load_split(task: Task, split_name: str, root: Path | str | None = None, source: str = "auto") -> list[Example]:
    """The examples of one split. `source`: 'local' (files under the data root), 'hub' (`datasets`), or
    'auto' (local when the file exists, else the Hub)."""
    split = task.splits[split_name]
    if source not in ("auto", "local", "hub"):
        raise FewtuneError(f"Unknown data source '{source}': use auto, local or hub.")
    local_file, read_local = locate(task, split, root, source)
    # A data folder the user named (--data-root, $FEWTUNE_DATA) is meant to be read: a file missing there is
    # an error, not a silent download (only the auto-found ../shared/data falls back to the Hub).
    named_root = root is not None or bool(os.environ.get("FEWTUNE_DATA"))
    if source == "auto" and named_root and local_file is not None and not local_file.exists():
        # advise the Hub only where the task has a Hub entry for this split (else it fails a second time)
        hub = ", or use --data-source hub to download the split" if split.hub is not None else \
            f" (the task file {task.source} declares no Hub source for this split, so the file is needed)"
        raise FewtuneError(f"Data file {local_file} does not exist (task '{task.name}', split '{split_name}'); "
                           f"fix --data-root/$FEWTUNE_DATA{hub}.")
    if source == "hub" and split.hub is None:
        why = split.hub_note or f"{task.source} gives only a local file"
        raise FewtuneError(f"Task '{task.name}' split '{split_name}' has no Hub source ({why}); "
                           f"use --data-source local or auto, with --data-root/$FEWTUNE_DATA.")
    if read_local:
        if split.local is None:
            raise FewtuneError(f"Task '{task.name}' split '{split_name}' has no local file; use --data-source hub.")
        if local_file is None:
            raise FewtuneError(f"No data folder for {split.local['path']}: set $FEWTUNE_DATA or --data-root to a folder laid out like shared/data.")
        examples = _read_local(task, split, local_file)
    else:
        examples = _read_hub(task, split)
    if not examples:
        raise FewtuneError(f"Task '{task.name}' split '{split_name}' is empty after label mapping ({_where(split, local_file)}).")
    return examples


def locate(task: Task, split: Split, root, source: str) -> tuple[Path | None, bool]:
    """(the split's file under the data root, or None; whether the split is read from it rather than the Hub):
    the one decision `load_split` reads by and `provenance` hashes by. 'auto' reads the file when it exists or
    when there is no Hub entry. A relative path that leaves the data root is refused before anything is read."""
    if split.local is not None:
        check_inside_root(task, split)
    root_path = data_root(root) if source != "hub" else None
    local_file = (Path(root_path) / split.local["path"]) if (root_path and split.local) else None
    read_local = source == "local" or (source == "auto" and ((local_file is not None and local_file.exists())
                                                             or split.hub is None))
    return local_file, read_local


def check_inside_root(task: Task, split: Split) -> None:
    """A relative `path` names a file under the data root and may not climb out of it (`../../etc/passwd`);
    an absolute path is the user's own explicit choice. Checked on the text, so a data root that is itself
    a link, or holds links, is read as laid out."""
    rel = split.local["path"]
    if os.path.isabs(rel):
        return
    norm = os.path.normpath(rel)
    if norm == os.pardir or norm.startswith(os.pardir + os.sep):
        raise FewtuneError(f"Task '{task.name}' split '{split.name}': local path {rel!r} leaves the data root; "
                           "a relative path must stay inside it (write an absolute path to read a file elsewhere).")


def _names(header: list[str], limit: int = 8, width: int = 24) -> str:
    """Column names for an error message, bounded: a few, each cut short (never a whole line of the file)."""
    shown = [repr(h if len(h) <= width else h[:width] + "…") for h in header[:limit]]
    return ", ".join(shown) + (f", … ({len(header) - limit} more)" if len(header) > limit else "")


def _where(split: Split, local_file) -> str:
    return str(local_file) if local_file is not None else f"Hub dataset {split.hub['path']}"


def _read_local(task: Task, split: Split, path: Path) -> list[Example]:
    if not path.exists():
        hub = " (or --data-source hub)" if split.hub is not None else ""
        raise FewtuneError(f"Data file {path} does not exist (task '{task.name}', split '{split.name}'); set $FEWTUNE_DATA or --data-root{hub}.")
    fmt = split.local.get("format", "tsv")
    text = decode_text_file(path, "Data file")  # a byte-order mark is not part of the first column's name
    line_no = nul_line(text)
    if line_no is not None:
        # A NUL byte is no character of any text field: the file is binary, UTF-16 or damaged. csv would end the
        # row's field there or read it into the text, silently; refused like any other malformed row.
        raise FewtuneError(f"{path} line {line_no}: malformed row, it contains a NUL byte (\\x00): not a text data "
                           f"file, or a damaged one (task '{task.name}', split '{split.name}').")
    has_header = fmt != "jsonl" and split.local.get("header", True)
    if not text.strip():
        what = "0 bytes" if not text else "only blank lines"
        expected = "expected a header row" if has_header else "expected one example per line"
        raise FewtuneError(f"Data file {path} is empty ({expected}): the file has {what} (task '{task.name}', split '{split.name}').")
    if fmt == "jsonl":
        rows, header = [], None
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise FewtuneError(f"{path} line {n}: not valid JSON ({e.msg}).") from None
                if not isinstance(row, dict):
                    raise FewtuneError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}.")
                rows.append((n, row))
    else:
        delimiter = split.local.get("delimiter", "\t" if fmt == "tsv" else ",")
        # GLUE/CoLA/HANS files are read with quoting disabled: quotes are part of the text.
        quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
        reader = csv.reader(text.splitlines(), delimiter=delimiter, quoting=quoting)
        lines = list(reader)
        header = None
        start = 1
        if split.local.get("header", True):
            if not lines:
                raise FewtuneError(f"Data file {path} is empty (expected a header row).")
            header, lines, start = lines[0], lines[1:], 2
        width = len(header) if header else (len(lines[0]) if lines else 0)
        rows = []
        for n, row in enumerate(lines, start):
            if not row:
                continue
            if len(row) != width:
                raise FewtuneError(f"{path} line {n}: malformed row, expected {width} columns, found {len(row)}.")
            rows.append((n, dict(zip(header, row)) if header else row))
        if header:
            for key, col in split.columns.items():
                if isinstance(col, str) and col not in header:
                    # names only from a file under the data root: an absolute path may reach any file
                    names = "" if os.path.isabs(split.local["path"]) else f": {_names(header)}"
                    raise FewtuneError(f"{path}: column '{col}' (for '{key}') is not in the header row "
                                       f"({len(header)} column{'s' if len(header) != 1 else ''}{names}).")
    if not rows:  # not "empty after label mapping": there was nothing to map
        raise FewtuneError(f"Task '{task.name}' split '{split.name}' is empty: data file {path} has a header row but no data rows.")
    return _to_examples(task, split, rows, split.label_map, split.columns, str(path),
                        show_values=not os.path.isabs(split.local["path"]))


def _to_examples(task, split, rows, label_map, columns, where, show_values: bool = True) -> list[Example]:
    """`show_values`: whether an error may quote a cell (not for a file an absolute path reached)."""
    label_ids = {name: i for i, name in enumerate(task.labels)}
    out = []
    for i, (line_no, row) in enumerate(rows):
        def get(key):
            col = columns[key]
            try:
                value = row[col]
            except (KeyError, IndexError):
                raise FewtuneError(f"{where} line {line_no}: no column {col!r} (for '{key}').") from None
            return value
        raw_label = str(get("label")).strip()
        if raw_label not in label_map:
            shown = raw_label if len(raw_label) <= 24 else raw_label[:24] + "…"  # a cell, never a whole line
            shown = f"label '{shown}'" if show_values else "the label"
            raise FewtuneError(f"{where} line {line_no}: {shown} is not in the task's label_map {sorted(label_map)}.")
        target = label_map[raw_label]
        if target == DROP:
            continue
        fields = {}
        for f in task.fields:
            value = get(f)
            if not isinstance(value, str):
                raise FewtuneError(f"{where} line {line_no}: field '{f}' must be text, got {type(value).__name__}.")
            fields[f] = value.strip()
        groups = {g: str(get(g)) for g in split.group_by}
        out.append(Example(idx=i, fields=fields, label=label_ids[target], groups=groups))
    return out


def _read_hub(task: Task, split: Split) -> list[Example]:
    hub = split.hub
    if hub is None:
        why = f" ({split.hub_note})" if split.hub_note else ""
        raise FewtuneError(f"Task '{task.name}' split '{split.name}' has no Hub source{why}; "
                           f"use the local files (--data-source local, --data-root or $FEWTUNE_DATA).")
    try:
        import datasets
        ds = datasets.load_dataset(hub["path"], hub.get("name"), split=hub["split"], revision=hub.get("revision"))
    except Exception as e:  # network errors, missing datasets, auth: all become one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FewtuneError(f"Could not load Hub dataset {hub['path']} ({hub.get('name') or 'default'}, split {hub['split']}) "
                           f"for task '{task.name}': {msg[:200]}. Offline? Point $FEWTUNE_DATA at local files.") from None
    columns = split.hub_columns or split.columns
    label_map = split.hub_label_map or split.label_map
    rows = [(i + 1, row) for i, row in enumerate(ds)]
    return _to_examples(task, split, rows, label_map, columns, f"Hub dataset {hub['path']}:{hub['split']}")


def sample_train(examples: list[Example], shots: int, seed: int, n_labels: int, balanced: bool = True) -> list[int]:
    """Positions (into `examples`) of a seeded few-shot sample, in a seeded shuffled order.

    Balanced: shots // n_labels per class, the remainder to classes in a seeded order. Per class the
    examples are taken from the front of a seeded permutation, so for one seed a smaller sample is a
    subset of a larger one (16 shots ⊂ 32 shots), and every method sees the same sample.
    """
    if shots < 0:
        raise FewtuneError(f"--shots must be ≥ 0, got {shots}.")
    if shots == 0:
        return []
    rng = np.random.default_rng(seed)
    if not balanced:
        if shots > len(examples):
            raise FewtuneError(f"--shots {shots} is more than the {len(examples)} training examples.")
        chosen = [int(i) for i in rng.permutation(len(examples))[:shots]]
    else:
        by_class = defaultdict(list)
        for pos, ex in enumerate(examples):
            by_class[ex.label].append(pos)
        order = [int(c) for c in rng.permutation(n_labels)]
        per_class = {c: shots // n_labels for c in range(n_labels)}
        for c in order[: shots % n_labels]:
            per_class[c] += 1
        chosen = []
        for c in range(n_labels):
            pool = by_class.get(c, [])
            perm = rng.permutation(len(pool))
            if per_class[c] > len(pool):
                raise FewtuneError(f"--shots {shots} needs {per_class[c]} examples of class {c} but the training split has {len(pool)}.")
            chosen += [pool[int(j)] for j in perm[: per_class[c]]]
    return [chosen[int(j)] for j in rng.permutation(len(chosen))]


def eval_subsample(examples: list[Example], limit: int | None, seed: int = 0) -> list[Example]:
    """A deterministic stratified subsample (by label and groups) of at most `limit` examples, in data order.

    The seed is fixed (not the run's seed): every run of a comparison is scored on the same examples.
    """
    if limit is None or limit >= len(examples):
        return list(examples)
    if limit <= 0:
        raise FewtuneError(f"--eval-limit must be positive, got {limit}.")
    strata = defaultdict(list)
    for pos, ex in enumerate(examples):
        strata[(ex.label, *sorted(ex.groups.items()))].append(pos)
    keys = sorted(strata)
    total = len(examples)
    quotas = {k: limit * len(strata[k]) / total for k in keys}
    alloc = {k: int(quotas[k]) for k in keys}
    # Largest remainder: hand out what rounding down left, biggest fractional parts first (ties by key order).
    for k in sorted(keys, key=lambda k: -(quotas[k] - alloc[k]))[: limit - sum(alloc.values())]:
        alloc[k] += 1
    rng = np.random.default_rng(seed)
    chosen = []
    for k in keys:
        perm = rng.permutation(len(strata[k]))[: alloc[k]]
        chosen += [strata[k][int(j)] for j in perm]
    return [examples[p] for p in sorted(chosen)]


def shares_training_data(task: Task, split_name: str) -> bool:
    """True when `split_name` reads the same rows as the task's training split (the same split, or the same source)."""
    if split_name == task.train:
        return True
    a, b = task.splits[split_name], task.splits[task.train]
    return (a.local, a.hub, a.columns, a.label_map) == (b.local, b.hub, b.columns, b.label_map)


def exclude_training(task: Task, split_name: str, examples: list[Example], train_examples: list[Example]) -> tuple[list[Example], int]:
    """(examples, how many removed): an evaluation on the training data leaves out the run's few-shot sample
    (which holds the ICL and CD demonstrations); other splits are returned unchanged.

    Applied after the fixed-seed subsample, so every run is scored on a subset of the same examples.
    """
    if not shares_training_data(task, split_name):
        return examples, 0
    seen = {ex.idx for ex in train_examples}
    kept = [ex for ex in examples if ex.idx not in seen]
    if not kept:
        raise FewtuneError(f"Task '{task.name}' evaluation split '{split_name}' is the training data, and nothing is left of it "
                           f"once the {len(seen)} training examples are left out; evaluate on another split or raise --eval-limit.")
    return kept, len(examples) - len(kept)


def label_counts(examples) -> dict:
    return dict(sorted(Counter(ex.label for ex in examples).items()))


# ----------------------------------------------------------------------------- provenance (run identity)
_SHA_CACHE: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, cached by (path, size, mtime) so a grid of many cells reads each file once."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        import hashlib
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def provenance(task: Task, split_name: str, root: Path | str | None = None, source: str = "auto") -> dict:
    """Where a split's data comes from, as `load_split` would read it: {"local": relative path, "sha256": ...} or
    {"hub": dataset, "name", "split", "revision"}. Part of a run's identity: the same content read from another
    folder is the same experiment; other content, or the Hub instead of a local file, is not."""
    if split_name not in task.splits:
        raise FewtuneError(f"Task '{task.name}' has no split '{split_name}' (splits: {', '.join(task.splits)}).")
    split = task.splits[split_name]
    local_file, read_local = locate(task, split, root, source)
    if read_local:
        if local_file is None or not local_file.is_file():
            return {"local": split.local["path"] if split.local else None, "sha256": None}  # load_split will say why
        return {"local": split.local["path"], "sha256": file_sha256(local_file)}
    hub = split.hub or {}
    return {"hub": hub.get("path"), "name": hub.get("name"), "split": hub.get("split"), "revision": hub.get("revision")}
