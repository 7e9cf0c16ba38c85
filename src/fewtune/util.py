"""General helpers below every other module: time stamps, JSON for records, atomic file writes, and the check
that an output path can be written (made before a run, not after it)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from .errors import FewtuneError


def now() -> str:
    """The local time with its UTC offset, to the second (a record's started_at/finished_at)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def dumps(obj) -> str | None:
    """Sorted JSON for a database column (None stays NULL); numpy scalars as numbers."""
    if obj is None:
        return None
    return json.dumps(obj, sort_keys=True, default=json_default)


def digest(obj: dict, digits: int = 16) -> str:
    """Hex digits of the sha256 of sorted JSON: with 16, of a run's identity, the run's key in the results database."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:digits]


def decode_text_file(path: Path, what: str) -> str:
    """A text file a user gave, as UTF-8 without a byte-order mark (Excel's "CSV UTF-8", Notepad); `what` names it in
    the one-line error when it cannot be read or is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise FewtuneError(f"{what} {path} is not UTF-8 text (bad byte at offset {e.start}).") from None
    except OSError as e:
        raise FewtuneError(f"{what} {path} cannot be read: {e.strerror or e}.") from None


def nul_line(text: str) -> int | None:
    """The first line holding a NUL byte, or None. No text holds one: a file saved as UTF-16 without a byte-order
    mark (every other byte NUL for English) decodes as "UTF-8" into garbage that would be read as text."""
    if "\x00" not in text:
        return None
    return next(n for n, row in enumerate(text.splitlines(), 1) if "\x00" in row)


def read_text_file(path: Path, what: str) -> str:
    """decode_text_file, and a NUL byte refused (nul_line)."""
    text = decode_text_file(path, what)
    line = nul_line(text)
    if line is not None:
        raise FewtuneError(f"{what} {path} line {line} holds a NUL byte (\\x00): not UTF-8 text (UTF-16? save it "
                           "as UTF-8).")
    return text


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename: a reader sees the whole file or the old one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # left only when the write or the rename failed


def json_default(o):
    """numpy scalars as Python numbers (without importing numpy); anything else as its string."""
    if hasattr(o, "item") and callable(o.item):
        return o.item()
    return str(o)


def check_writable(path: str, flag: str) -> Path:
    """`path` as a Path if a file can be written there (named in errors by `flag`); a one-line error if not."""
    p = Path(path)
    if p.is_dir():  # checked before the run: writing would fail only after it, leaving a temporary file
        raise FewtuneError(f"{flag} {p} is a folder; give a file path.")
    parent = p.parent if str(p.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise FewtuneError(f"{flag} {p}: {parent} is a file, not a folder.")
    if not parent.is_dir():
        raise FewtuneError(f"{flag} {p}: folder {parent} does not exist.")
    if not os.access(parent, os.W_OK):
        raise FewtuneError(f"{flag} {p}: folder {parent} is not writable.")
    return p
