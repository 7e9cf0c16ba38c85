"""Where fewtune reads data and keeps its caches. Each location can be set by an environment variable."""

import os
from pathlib import Path

from .errors import FewtuneError


def data_root(explicit: str | os.PathLike | None = None) -> Path | None:
    """The folder laid out like `shared/data` (cola/, mnli/, hans/).

    Order: the explicit argument, $FEWTUNE_DATA, then `../shared/data` next to the current
    directory or next to the source checkout, when it exists. None when nothing is found
    (tasks then fall back to the Hub).
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise FewtuneError(f"Data folder {path} does not exist (from --data-root).")
        return path
    env = os.environ.get("FEWTUNE_DATA")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FewtuneError(f"Data folder {path} does not exist (from $FEWTUNE_DATA).")
        return path
    checkout = Path(__file__).resolve().parents[2]
    for candidate in (Path.cwd() / ".." / "shared" / "data", checkout / ".." / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def cache_dir() -> Path:
    """$FEWTUNE_CACHE, else $XDG_CACHE_HOME/fewtune, else ~/.cache/fewtune. Created on demand."""
    env = os.environ.get("FEWTUNE_CACHE")
    if env:
        path = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = Path(base) / "fewtune"
    return path
