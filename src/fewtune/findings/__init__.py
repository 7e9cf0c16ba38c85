"""Findings files: claims about the options, stated before the results are seen, as data.

A findings file (TOML) lists claims, each "A better / worse / equivalent / not inferior to B" over option labels or
groups of them (globs allowed: `cd-*`), on an evaluation split role and the task's primary metric. fewtune ships
`study.toml` beside this module (the five findings of arXiv 2405.13181 and Mosbach et al. 2023); a user writes their
own. `fewtune report --findings FILE` judges every claim on every (model, task, shots) of the results
(fewtune.findings.judge); this module only reads and validates the file. The files live here, not in presets/,
because the grid lists every presets/*.toml as a grid spec. docs/findings.md describes the format.
"""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import FewtuneError, did_you_mean
from ..stats.metrics import METRICS
from ..tasks import METRIC_RANGES, builtin_names, check_margin, load_task

RELATIONS = ("better", "worse", "equivalent", "noninferior")
SPLITS = {"in_domain": "id", "out_of_domain": "ood"}  # a claim's split role -> the report's prefix
_NEEDS_MARGIN = ("equivalent", "noninferior")
_TOP_KEYS = {"title", "description", "claims"}
_CLAIM_KEYS = {"id", "relation", "a", "b", "split", "margin", "shots", "tasks", "models", "statement", "source"}
SHIPPED = ("study", "lpft")  # study.toml (the study's five findings), lpft.toml (Kumar et al.'s LP-FT claims)


@dataclass(frozen=True)
class Claim:
    """One pre-registered claim: `a` <relation> `b` on `split`, by the task's primary metric.

    The contrast judged is mean(a) − mean(b), each group's options averaged with equal weight at one number of shots.
    """
    id: str
    relation: str                     # better | worse | equivalent | noninferior
    a: tuple[str, ...]                # option labels or globs
    b: tuple[str, ...]
    split: str                        # in_domain | out_of_domain
    margin: float | None = None       # equivalent / noninferior: in the primary metric's units, fixed in advance
    shots: tuple[int, ...] | None = None   # None: every number of shots in the results
    tasks: tuple[str, ...] | None = None   # None: every task
    models: tuple[str, ...] | None = None  # None: every model
    statement: str = ""               # the claim in words
    source: str = ""                  # where it comes from (a quoted sentence)

    @property
    def prefix(self) -> str:
        return SPLITS[self.split]

    def applies_to(self, task: str, model: str) -> bool:
        return (self.tasks is None or task in self.tasks) and (self.models is None or model in self.models)


@dataclass(frozen=True)
class Findings:
    """A findings file as loaded: its claims in file order, and where it came from (for errors and the report)."""
    claims: tuple[Claim, ...]
    source: str
    title: str = ""
    description: str = ""

    @property
    def tasks(self) -> set[str] | None:
        """The tasks the file's claims name (None when some claim applies to every task)."""
        if any(c.tasks is None for c in self.claims):
            return None
        return {t for c in self.claims for t in c.tasks}

    @property
    def shipped(self) -> bool:
        return self.source.startswith("shipped ")


def matches(pattern: str, label: str) -> bool:
    """A claim's label or glob against an option's label ('lora', or 'lora [variant]' when a label has two
    identities: the variant suffix is not part of the label the user wrote)."""
    base = label.split(" [", 1)[0]
    return fnmatch.fnmatchcase(base, pattern)


def is_findings(raw: dict) -> bool:
    """A parsed TOML file is a findings file when it has a [[claims]] list (task files and grid specs have none), or
    a list of tables whose name is close to it ([[claim]]: a findings file with a typo, told so, not read as a task)."""
    if not isinstance(raw, dict):
        return False
    import difflib
    return "claims" in raw or any(isinstance(v, list) and v and all(isinstance(x, dict) for x in v)
                                  and difflib.get_close_matches("claims", [k], cutoff=0.8) for k, v in raw.items())


def load_findings(spec: str | Path) -> Findings:
    """A findings file from a path, or the shipped one by name (`study`). One-line FewtuneError on anything wrong."""
    text, where = _read(spec)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FewtuneError(f"Findings file {where} is not valid TOML: {e}.") from None
    return parse_findings(raw, where)


def _read(spec) -> tuple[str, str]:
    name = str(spec)
    if name.endswith(".toml") and name[:-5] in SHIPPED and not Path(name).exists():
        name = name[:-5]  # `fewtune check lpft.toml`: the shipped file, when there is no such file here
    if name in SHIPPED:
        return (resources.files("fewtune") / "findings" / f"{name}.toml").read_text(encoding="utf-8"), \
            f"shipped {name}.toml"
    path = Path(name)
    try:
        return path.read_text(encoding="utf-8-sig"), str(path)  # a byte-order mark is not TOML
    except FileNotFoundError:
        hint = did_you_mean(name, SHIPPED)
        raise FewtuneError(f"Findings file {path} does not exist (give a file, or a shipped name: "
                           f"{', '.join(SHIPPED)}; or none).{hint}") from None
    except UnicodeDecodeError as e:
        raise FewtuneError(f"Findings file {path} is not UTF-8 text (bad byte at offset {e.start}).") from None
    except OSError as e:  # a folder, no permission
        raise FewtuneError(f"Findings file {path} cannot be read: {e.strerror or e}.") from None


def parse_findings(raw: dict, where: str) -> Findings:
    """Validate a parsed findings file; every error names the file and the claim."""
    if not isinstance(raw, dict) or "claims" not in raw:
        import difflib
        near = difflib.get_close_matches("claims", list(raw) if isinstance(raw, dict) else [], n=1, cutoff=0.6)
        hint = f" It has [[{near[0]}]]: Did you mean [[claims]]?" if near else ""
        raise FewtuneError(f"{where}: a findings file needs a [[claims]] list (docs/findings.md); this one has none."
                           + hint)
    for key in raw:
        if key not in _TOP_KEYS:
            raise FewtuneError(f"{where}: unknown key '{key}'.{did_you_mean(key, sorted(_TOP_KEYS))} "
                               f"Known: {', '.join(sorted(_TOP_KEYS))}.")
    items = raw["claims"]
    if not isinstance(items, list) or not items or not all(isinstance(c, dict) for c in items):
        raise FewtuneError(f"{where}: 'claims' must be a non-empty list of tables ([[claims]]).")
    claims, seen = [], set()
    for i, item in enumerate(items):
        named = isinstance(item.get("id"), str) and item["id"].strip()
        c = _parse_claim(item, f"{where} claim '{item['id']}'" if named else f"{where} claims[{i}]")
        if c.id in seen:
            raise FewtuneError(f"{where}: claim id '{c.id}' is used twice; give each claim its own id.")
        seen.add(c.id)
        claims.append(c)
    title = raw.get("title", "")
    if not isinstance(title, str):
        raise FewtuneError(f"{where}: 'title' must be a string.")
    return Findings(tuple(claims), where, title, str(raw.get("description", "")))


def _parse_claim(item: dict, at: str) -> Claim:
    for key in item:
        if key not in _CLAIM_KEYS:
            raise FewtuneError(f"{at}: unknown key '{key}'.{did_you_mean(key, sorted(_CLAIM_KEYS))} "
                               f"Known: {', '.join(sorted(_CLAIM_KEYS))}.")
    for key in ("id", "relation", "a", "b", "split"):
        if key not in item:
            raise FewtuneError(f"{at}: missing '{key}' (a claim needs id, relation, a, b, split).")
    cid = item["id"]
    if not isinstance(cid, str) or not cid.strip():
        raise FewtuneError(f"{at}: 'id' must be a non-empty string.")
    relation = item["relation"]
    if relation not in RELATIONS:
        raise FewtuneError(f"{at}: unknown relation {relation!r:.40}.{did_you_mean(str(relation), RELATIONS)} "
                           f"Known: {', '.join(RELATIONS)}.")
    a, b = _group(item["a"], f"{at}: 'a'"), _group(item["b"], f"{at}: 'b'")
    both = sorted(set(a) & set(b))
    if both:
        raise FewtuneError(f"{at}: {', '.join(both)} is in both 'a' and 'b'; a claim compares two distinct groups.")
    split = item["split"]
    if split not in SPLITS:
        raise FewtuneError(f"{at}: unknown split {split!r:.40}.{did_you_mean(str(split), list(SPLITS))} "
                           f"Known: {', '.join(SPLITS)}.")
    margin = item.get("margin")
    if relation in _NEEDS_MARGIN and margin is None:
        raise FewtuneError(f"{at}: relation '{relation}' needs a margin (in the primary metric's units, e.g. "
                           "margin = 0.05), fixed before the results are seen.")
    if relation not in _NEEDS_MARGIN and margin is not None:
        raise FewtuneError(f"{at}: relation '{relation}' takes no margin (only equivalent and noninferior do).")
    tasks = _names(item.get("tasks"), f"{at}: 'tasks'")
    if margin is not None:
        # at most the range of the primary metric of every task named (built-ins known now; a user task's metric
        # is checked when the claim is judged); without tasks, at most the widest range of any metric (MCC's 2)
        builtin = set(builtin_names())  # their primary metric from their own task file (a user task's: when judged)
        widest = max(METRICS.values(), key=lambda m: m.hi - m.lo).name
        metrics = [load_task(t).primary_metric for t in tasks or () if t in builtin] or [widest]
        for m in metrics:
            margin = check_margin(margin, m, f"{at}: 'margin'")
    shots = item.get("shots")
    if shots is not None:
        if isinstance(shots, int) and not isinstance(shots, bool):
            shots = [shots]
        if not isinstance(shots, list) or not shots or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shots):
            raise FewtuneError(f"{at}: 'shots' must be an integer ≥ 0 or a non-empty list of them, got {shots!r:.60}.")
        shots = tuple(shots)
    for key in ("statement", "source"):
        if not isinstance(item.get(key, ""), str):
            raise FewtuneError(f"{at}: '{key}' must be a string.")
    return Claim(cid, relation, a, b, split, margin, shots, tasks, _names(item.get("models"), f"{at}: 'models'"),
                 item.get("statement", ""), item.get("source", ""))


def _group(value, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise FewtuneError(f"{what} is an empty group; give at least one option label (or a glob such as 'cd-*').")
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise FewtuneError(f"{what} must be option labels (strings), got {value!r:.60}.")
    return tuple(dict.fromkeys(value))


def _names(value, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise FewtuneError(f"{what} must be a non-empty list of names, got {value!r:.60}.")
    return tuple(value)


def check_against_labels(findings: Findings, labels, where: str) -> None:
    """Every label and glob of every claim must name an option of `labels` (a grid spec's method labels): one-line
    FewtuneError naming the findings file, the claim and `where` (the spec) otherwise. The grid calls this for a
    spec's `findings = ...` key; `fewtune check FINDINGS --spec SPEC` too."""
    labels = sorted(set(labels))
    for c in findings.claims:
        for pattern in (*c.a, *c.b):
            if not any(matches(pattern, lab) for lab in labels):
                kind = "glob" if any(ch in pattern for ch in "*?[") else "label"
                raise FewtuneError(f"{findings.source} claim '{c.id}': {kind} '{pattern}' names no option of {where}."
                                   f"{did_you_mean(pattern, labels)} Its labels: {', '.join(labels)}.")


def answerable(findings: Findings, labels) -> bool:
    """Whether results with these option labels can answer some claim of the file: every label and glob of that
    claim names one of them."""
    labels = list(labels)
    return any(all(any(matches(p, lab) for lab in labels) for p in (*c.a, *c.b)) for c in findings.claims)


def companions(chosen: Findings | None, labels) -> list[Findings]:
    """The other shipped findings files that results with these labels can answer (lpft.toml where there are lpft
    and ft options): a report that judges shipped findings (the default, a grid's, or `--findings study`) judges
    these too, each in its own section with its own family-wise control. None beside a user's own file."""
    if chosen is not None and not chosen.shipped:
        return []
    taken = chosen.source if chosen is not None else None
    out = []
    for name in SHIPPED:
        if f"shipped {name}.toml" == taken:
            continue
        f = load_findings(name)
        if answerable(f, labels):
            out.append(f)
    return out


def check_margin_for(claim: Claim, metric: str) -> str | None:
    """Why the claim's margin cannot be used with `metric` (None when it can): a user task's metric is known only
    when its results are read."""
    if claim.margin is None:
        return None
    lo, hi = METRIC_RANGES[metric]
    if claim.margin > hi - lo:
        return f"margin {claim.margin:g} is larger than the range of {metric} ({hi - lo:g})"
    return None


def findings_ref(value: str) -> str:
    """How a database records a grid spec's findings: a shipped name or "none" as is, a file by its absolute path."""
    if value == "none" or (Path(value).suffix == "" and "/" not in value):
        return value
    return str(Path(value).expanduser().resolve())


def resolve(spec) -> tuple[Findings | None, bool]:
    """`--findings` as given: 'auto' -> the shipped study (it applies to the tasks its claims name: cola, mnli),
    flagged as the default; None or 'none' -> no findings; a Findings as is; else a file path or shipped name."""
    if isinstance(spec, Findings):
        return spec, False
    if str(spec) == "auto":
        return load_findings("study"), True
    if spec is None or str(spec) == "none":
        return None, False
    return load_findings(spec), False
