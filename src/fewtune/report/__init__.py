"""`fewtune report`: tables, figures and a budget reading of the results database, as report.md and a
self-contained report.html. Numbers come from the database only (report.data), never from models."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import FewtuneError, one_line
from ..store import Store, write_atomic


def write_report(db_path: str | os.PathLike, out_dir: str | os.PathLike, volume: float | None = None,
                 max_latency_ms: float | None = None, max_retention_loss: float | None = None,
                 margin: float | None = None, findings="auto") -> dict[str, Path]:
    """Write <out>/report.md, <out>/report.html and <out>/figures/*.{png,svg}; return their paths. `volume`
    (predictions) and `max_latency_ms` make "which method" include the cost of use (report.use); `findings`: a
    findings file (path, or a shipped name: study), 'auto' (the shipped study for the tasks it covers) or 'none'."""
    from .build import build
    from .data import predictions_reader
    from .render import to_html, to_markdown

    out = Path(out_dir)
    fig_dir = out / "figures"
    paths = {"markdown": out / "report.md", "html": out / "report.html", "figures": fig_dir}
    with Store(db_path, readonly=True) as store:
        rows = store.rows()
        if findings == "auto" and store.meta().get("findings"):  # the grid spec's `findings = ...`
            findings = recorded_findings(store.meta()["findings"])
        try:  # a folder that cannot be written is the user's to fix: one line, before and while writing
            fig_dir.mkdir(parents=True, exist_ok=True)
            doc = build(rows, Path(db_path), fig_dir, predictions_reader(store), volume, max_latency_ms,
                        max_retention_loss, margin, findings, seed_plans=store.seed_plans())
        except OSError as e:
            raise cannot_write(out, e) from None
    try:
        write_atomic(paths["markdown"], to_markdown(doc))
        write_atomic(paths["html"], to_html(doc, "fewtune report", fig_dir))
    except OSError as e:
        raise cannot_write(out, e) from None
    return paths


def cannot_write(out: Path, e: OSError) -> FewtuneError:
    where = f" ({e.filename})" if e.filename else ""
    return FewtuneError(f"cannot write the report in {out}: {e.strerror or one_line(e)}{where}.")


def recorded_findings(ref: str):
    """The findings file a grid recorded in the database, loaded; if it cannot be (moved, deleted, edited into
    something invalid), a one-line warning that says the name came from the database, and the default ('auto')."""
    import sys

    from ..findings import load_findings
    try:
        return load_findings(ref)
    except FewtuneError as e:
        print(f"fewtune: warning: the findings file recorded in the database by its grid ({ref}) cannot be read, so "
              f"the report judges the default claims instead (--findings FILE names another): {e}", file=sys.stderr)
        return "auto"
