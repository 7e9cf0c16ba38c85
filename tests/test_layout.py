"""The README's Layout lists every module, in the order data flows, and each module imports only modules listed
below it (layers look down): checked on the source, imports inside functions included."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "fewtune"
# Imports that still point up: none (cli_grid took check_writable from cli, Store.claim recomputed the identity:
# both gone). The set may only stay empty.
KNOWN_UP: set = set()


def layout() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text[text.index("## Layout"):]
    block = block[block.index("```\nsrc/fewtune/") + 4:]
    block = block[:block.index("```")]
    return [m.group(1).rstrip("/").removesuffix(".py") for m in re.finditer(r"^  (\S+)", block, re.M)]


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, the fewtune module it names) for every relative or `fewtune.` import in the file."""
    package = list(path.relative_to(SRC).parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            names = [".".join(base + [node.module])] if node.module else [".".join(base + [a.name]) for a in node.names]
        elif (node.module or "").startswith("fewtune."):
            names = [node.module.split(".", 1)[1]]
        else:
            continue
        out += [(node.lineno, n.split(".")[0]) for n in names if n]
    return out


def test_every_module_is_in_the_layout():
    modules = {p.relative_to(SRC).parts[0].removesuffix(".py") for p in SRC.rglob("*.py")} - {"__init__"}
    assert not sorted(modules - set(layout()))


def test_layers_look_down():
    rank = {name: i for i, name in enumerate(reversed(layout()))}
    up = set()
    for path in SRC.rglob("*.py"):
        me = path.relative_to(SRC).parts[0].removesuffix(".py")
        for line, other in imports(path):
            if other in rank and other != me and rank[other] > rank[me]:
                up.add((me, other))
    assert up <= KNOWN_UP, sorted(up - KNOWN_UP)
