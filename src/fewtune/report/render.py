"""The report as a list of blocks (headings, paragraphs, tables, figures), rendered twice: Markdown that
links the figure files, and one self-contained HTML file with the SVG figures embedded as data URIs.
Both renderings print the same strings, so report.md and report.html cannot disagree.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0; } figure img { width: 100%; max-width: 1000px; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; } .note { color: #555; font-size: 0.9em; }
code { background: #f4f4f4; padding: 0 3px; }
"""


class Doc:
    def __init__(self):
        self.blocks: list[tuple] = []

    def heading(self, level: int, text: str):
        self.blocks.append(("heading", level, text))

    def para(self, text: str, note: bool = False):
        self.blocks.append(("para", text, note))

    def bullets(self, items: list[str]):
        if items:
            self.blocks.append(("bullets", items))

    def table(self, headers: list[str], rows: list[list[str]], caption: str | None = None):
        self.blocks.append(("table", headers, rows, caption))

    def figure(self, name: str | None, caption: str):
        if name:
            self.blocks.append(("figure", name, caption))


def md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: Doc) -> str:
    out = []
    for block in doc.blocks:
        kind = block[0]
        if kind == "heading":
            out.append("#" * block[1] + " " + block[2])
        elif kind == "para":
            out.append(f"*{block[1]}*" if block[2] else block[1])
        elif kind == "bullets":
            out.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "table":
            _, headers, rows, caption = block
            lines = [] if caption is None else [f"**{caption}**", ""]
            lines.append("| " + " | ".join(md_cell(h) for h in headers) + " |")
            lines.append("|" + "|".join("---" for _ in headers) + "|")
            lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "figure":
            _, name, caption = block
            out.append(f"![{caption}](figures/{name}.png)\n\n*{caption}* ([SVG](figures/{name}.svg))")
    return "\n\n".join(out) + "\n"


def to_html(doc: Doc, title: str, figures_dir: Path) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{e(title)}</title><style>{CSS}</style></head><body>"]
    for block in doc.blocks:
        kind = block[0]
        if kind == "heading":
            level = min(block[1], 6)
            out.append(f"<h{level}>{e(block[2])}</h{level}>")
        elif kind == "para":
            out.append(f'<p class="note">{e(block[1])}</p>' if block[2] else f"<p>{e(block[1])}</p>")
        elif kind == "bullets":
            out.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "table":
            _, headers, rows, caption = block
            parts = ["<table>"]
            if caption:
                parts.append(f"<caption><b>{e(caption)}</b></caption>")
            parts.append("<tr>" + "".join(f"<th>{e(str(h))}</th>" for h in headers) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows]
            out.append("".join(parts) + "</table>")
        elif kind == "figure":
            _, name, caption = block
            # a data URI keeps the file self-contained; <img> (not inline <svg>) keeps each SVG's ids apart
            data = base64.b64encode((figures_dir / f"{name}.svg").read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{e(caption)}" src="data:image/svg+xml;base64,{data}">'
                       f"<figcaption>{e(caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
