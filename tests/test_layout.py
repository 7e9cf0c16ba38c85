"""The README's Layout lists every module by folder, in the order data flows, and the imports follow it:
- every top-level entry (a module or a folder) imports only entries listed below it (layers look down);
- inside a folder whose modules the Layout lists (grid/, engine/, stats/), each module imports only those below it;
- the engine, the methods and the statistics never import the grid, the store or the report (FORBIDDEN), whatever
  the order says.
Checked on the source: imports inside functions, `import fewtune.x` and "fewtune.x[:name]" strings (importlib and
lazy registries) included; imports under `if TYPE_CHECKING:` (annotations only, nothing runs) are not edges."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "fewtune"
# (importer, imported) folders or modules that must never meet, in either the order or a later edit of it
FORBIDDEN = {(low, high) for low in ("engine", "methods", "stats") for high in ("grid", "store", "report")}
MODULE_STRING = re.compile(r"^fewtune(\.\w+)+(:\w+)?$")


def layout() -> tuple[list[str], dict[str, list[str]]]:
    """The top-level entries, top to bottom, and the modules listed under each folder, top to bottom."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("## Layout"):]
    block = block[block.index("```\nsrc/fewtune/") + 4:]
    block = block[:block.index("```")]
    top, members = [], {}
    for m in re.finditer(r"^(  |    )(\S+)", block, re.M):
        name = m.group(2).rstrip("/").removesuffix(".py")
        if len(m.group(1)) == 2:
            top.append(name)
        else:
            members.setdefault(top[-1], []).append(name)
    return top, members


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, dotted name below fewtune) for every fewtune module the source names: relative and absolute imports,
    `import fewtune.x`, and "fewtune.x" / "fewtune.x:name" strings. `module` is the file's name below fewtune."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    package = [p for p in package if p]
    tree = ast.parse(source)
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                names = [".".join(base + node.module.split("."))] if node.module else \
                    [".".join(base + [a.name]) for a in node.names]
            elif node.module == "fewtune":
                names = [a.name for a in node.names]
            elif (node.module or "").startswith("fewtune."):
                names = [node.module.split(".", 1)[1]]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".", 1)[1] for a in node.names if a.name.startswith("fewtune.")]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.match(node.value):
            names = [node.value.split(":")[0].split(".", 1)[1]]
        out += [(node.lineno, n) for n in names if n]
    return out


def sources():
    for path in sorted(SRC.rglob("*.py")):
        yield path, module_name(path), path.name == "__init__.py"


def violations(files) -> list[str]:
    """Every import that breaks the Layout: `files` yields (path, module below fewtune, is a package)."""
    top, members = layout()
    rank = {name: i for i, name in enumerate(reversed(top))}
    inner = {folder: {m: i for i, m in enumerate(reversed(ms))} for folder, ms in members.items()}
    bad = []
    for path, me, is_package in files:
        mine = me.split(".")
        source = path.read_text() if isinstance(path, Path) else path
        for line, other in imports(source, me, is_package):
            theirs = other.split(".")
            if theirs[0] == mine[0]:
                folder = inner.get(mine[0], {})
                # inside a folder: by the folder's own order (the package's __init__ may name any of its modules)
                if len(mine) > 1 and len(theirs) > 1 and mine[1] in folder and theirs[1] in folder \
                        and folder[theirs[1]] > folder[mine[1]]:
                    bad.append(f"{me}:{line} imports {other}, listed above it in {mine[0]}/")
                continue
            if (mine[0], theirs[0]) in FORBIDDEN:
                bad.append(f"{me}:{line} imports {other}: {mine[0]} never imports {theirs[0]}")
            elif theirs[0] in rank and rank[theirs[0]] > rank[mine[0]]:
                bad.append(f"{me}:{line} imports {other}, listed above it")
    return bad


def test_every_module_is_in_the_layout():
    top, members = layout()
    entries = {p.relative_to(SRC).parts[0].removesuffix(".py") for p in SRC.rglob("*.py")} - {"__init__"}
    assert not sorted(entries - set(top))
    for folder, listed in members.items():
        present = {p.stem for p in (SRC / folder).glob("*.py")} - {"__init__"}
        assert sorted(present) == sorted(listed), folder


def test_layers_look_down():
    assert violations(sources()) == []


def test_the_check_finds_each_kind_of_upward_import():
    """The check itself can fail: each spelling of a forbidden or upward import is caught."""
    engine = SRC / "engine" / "engine.py"
    cases = {
        "from ..store import Store": "never imports store",
        "import fewtune.grid.driver": "never imports grid",
        "def f():\n    from fewtune.report import write_report": "never imports report",
        "RUN = 'fewtune.grid.cell_process:run_config'": "never imports grid",
        "from .. import runner": "listed above it",
        "from . import models": None,  # below it in engine/: allowed
        "from .models import resolve": None,
        "if TYPE_CHECKING:\n    from ..config import RunConfig": None,  # annotations only
    }
    for source, expected in cases.items():
        found = violations([(source, "engine.engine", False)])
        assert bool(found) == bool(expected), (source, found)
        if expected:
            assert expected in found[0], found
    assert engine.is_file()
    # and inside a folder: engine/models.py may not import engine/engine.py
    assert "listed above it in engine/" in violations([("from .engine import train", "engine.models", False)])[0]
