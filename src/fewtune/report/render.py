"""The report as a list of blocks (headings, paragraphs, verdict boxes, tables, figures), rendered twice: Markdown
that links the figure files, and one self-contained HTML file with the SVG figures embedded as data URIs.
Both renderings print the same strings, so report.md and report.html cannot disagree.

The HTML is laid out for a 1280 px laptop screen: the verdict boxes first, each table in its own horizontal scroll
container with its first column kept in view, cells wrapping between words (an interval stays whole), and columns
sorted by a click (a few lines of
inline JavaScript: the file loads nothing from anywhere).
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1200px; margin: 1em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; margin: 0.2em 0; font-size: 1.7em; }
h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
.scroll { overflow-x: auto; max-width: 100%; margin: 0.3em 0 1em; }
table { border-collapse: separate; border-spacing: 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; border-width: 0 1px 1px 0; padding: 3px 5px; text-align: right;
         background: #fff; }
tr > :first-child { border-left-width: 1px; } thead th { border-top-width: 1px; }
th { background: #f0f0f0; vertical-align: bottom; cursor: pointer; }
th[aria-sort=ascending]::after { content: " ▲"; } th[aria-sort=descending]::after { content: " ▼"; }
td:first-child, th:first-child { text-align: left; position: sticky; left: 0; z-index: 1; white-space: nowrap; }
td.text { text-align: left; min-width: 6.5em; } td.long { min-width: 16em; text-align: left; }
tbody tr:nth-child(even) td { background: #fafafa; }
.tcap { font-size: 0.85em; margin: 1em 0 0; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; } .note { color: #555; font-size: 0.9em; }
details { margin: 1em 0; color: #555; font-size: 0.9em; } summary { cursor: pointer; font-weight: 600; }
code { background: #f4f4f4; padding: 0 3px; }
.answer { display: flex; flex-wrap: wrap; gap: 0.5em 1.5em; border: 2px solid #999; border-radius: 6px;
          padding: 0.6em 1em; margin: 0.8em 0; }
.answer.resolved { border-color: #2a7d4f; } .answer.open { border-color: #c77700; }
.answer .verdict { flex: 1 1 340px; } .answer figure { flex: 1.6 1 560px; margin: 0; }
.answer h3 { margin: 0.1em 0 0.3em; font-size: 1.05em; } .answer ul { margin: 0; padding-left: 1.1em; }
.answer li { margin: 0.15em 0; font-size: 0.92em; }
.badge { color: #fff; background: #777; border-radius: 3px; padding: 0 0.4em; margin-right: 0.3em; }
.resolved .badge { background: #2a7d4f; } .open .badge { background: #c77700; }
"""

# Click a header: sort the table's rows by that column (numbers by their leading value, '–' last), again: reverse.
SORT_JS = """
document.querySelectorAll("table.sortable").forEach(t => t.tHead.querySelectorAll("th").forEach((th, i) => {
  th.title = "sort by this column";
  th.addEventListener("click", () => {
    const up = th.getAttribute("aria-sort") !== "ascending", body = t.tBodies[0];
    t.tHead.querySelectorAll("th").forEach(h => h.removeAttribute("aria-sort"));
    th.setAttribute("aria-sort", up ? "ascending" : "descending");
    const key = r => { const s = r.cells[i].textContent.trim(), m = s.match(/^[+-]?[0-9][0-9,]*(\\.[0-9]+)?/);
                       return m ? [0, parseFloat(m[0].replace(/,/g, ""))] : [s === "–" ? 2 : 1, s]; };
    const cmp = (a, b) => a[0] - b[0] || (a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0);
    [...body.rows].map(r => [key(r), r]).sort((a, b) => a[0][0] - b[0][0] || (up ? 1 : -1) * cmp(a[0], b[0]))
      .forEach(([, r]) => body.appendChild(r));
  });
}));
"""
LONG = 60  # characters: a cell longer than this (a sentence, a list of options) gets a wider column to wrap in
BRACKETS = re.compile(r"\[[^\]]{0,40}\]|\([^)]{0,20}\)")  # an interval, "(32 shots)": never broken inside
NUMBER = re.compile(r"^(?:[-+≤]?\s?[0-9.,]|–$)")  # a cell that starts as a number (or is empty): right-aligned


class Doc:
    def __init__(self):
        self.blocks: list[tuple] = []

    def heading(self, level: int, text: str):
        self.blocks.append(("heading", level, text))

    def para(self, text: str, note: bool = False):
        self.blocks.append(("para", text, note))

    def details(self, summary: str, text: str):
        """A note collapsed in HTML (`<details>`), a labelled paragraph in Markdown."""
        self.blocks.append(("details", summary, text))

    def bullets(self, items: list[str]):
        if items:
            self.blocks.append(("bullets", items))

    def box(self, status: str, title: str, lines: list[str], figure: tuple | None = None):
        """A verdict box: status (RESOLVED, OPEN, ...), a title, one line per statement, and a figure
        ((name, caption, alt) from Doc.figure's arguments, or None)."""
        self.blocks.append(("box", status, title, lines, figure))

    def table(self, headers: list[str], rows: list[list[str]], caption: str | None = None):
        self.blocks.append(("table", headers, rows, caption))

    def figure(self, name: str | None, caption: str, alt: str):
        """A figure file (None: not drawn, nothing added); `caption` says what to read from it, `alt` what it shows."""
        if name:
            self.blocks.append(("figure", name, caption, alt))


def md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_figure(name: str, caption: str, alt: str) -> str:
    return f"![{md_cell(alt)}](figures/{name}.png)\n\n*{caption}* ([SVG](figures/{name}.svg))"


def to_markdown(doc: Doc) -> str:
    out = []
    for block in doc.blocks:
        kind = block[0]
        if kind == "heading":
            out.append("#" * block[1] + " " + block[2])
        elif kind == "para":
            out.append(f"*{block[1]}*" if block[2] else block[1])
        elif kind == "details":
            out.append(f"*{block[1]}.* *{block[2]}*")
        elif kind == "bullets":
            out.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "box":
            _, status, title, lines, figure = block
            out.append(f"### {status} · {title}")
            if lines:
                out.append("\n".join(f"- {line}" for line in lines))
            if figure:
                out.append(md_figure(*figure))
        elif kind == "table":
            _, headers, rows, caption = block
            lines = [] if caption is None else [f"**{caption}**", ""]
            lines.append("| " + " | ".join(md_cell(h) for h in headers) + " |")
            lines.append("|" + "|".join("---" for _ in headers) + "|")
            lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "figure":
            out.append(md_figure(*block[1:]))
    return "\n\n".join(out) + "\n"


def html_figure(figures_dir: Path, name: str, caption: str, alt: str) -> str:
    e = html.escape
    # a data URI keeps the file self-contained; <img> (not inline <svg>) keeps each SVG's ids apart
    data = base64.b64encode((figures_dir / f"{name}.svg").read_bytes()).decode("ascii")
    return (f'<figure><img alt="{e(alt)}" src="data:image/svg+xml;base64,{data}">'
            f"<figcaption>{e(caption)}</figcaption></figure>")


def html_table(headers: list[str], rows: list[list[str]], caption: str | None) -> str:
    e = html.escape

    def cell(c) -> str:
        text = BRACKETS.sub(lambda m: m.group(0).replace(" ", "\u00a0"), str(c))
        kind = "long" if len(text) > LONG else "" if NUMBER.match(text) else "text"
        return f'<td class="{kind}">{e(text)}</td>' if kind else f"<td>{e(text)}</td>"
    parts = [f'<p class="tcap"><b>{e(caption)}</b></p>'] if caption else []
    parts.append('<div class="scroll"><table class="sortable"><thead><tr>'
                 + "".join(f"<th>{e(str(h))}</th>" for h in headers) + "</tr></thead><tbody>")
    parts += ["<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in rows]
    return "".join(parts) + "</tbody></table></div>"


def to_html(doc: Doc, title: str, figures_dir: Path) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{e(title)}</title><style>{CSS}</style></head><body>"]
    for block in doc.blocks:
        kind = block[0]
        if kind == "heading":
            level = min(block[1], 6)
            out.append(f"<h{level}>{e(block[2])}</h{level}>")
        elif kind == "para":
            out.append(f'<p class="note">{e(block[1])}</p>' if block[2] else f"<p>{e(block[1])}</p>")
        elif kind == "details":
            out.append(f"<details><summary>{e(block[1])}</summary><p>{e(block[2])}</p></details>")
        elif kind == "bullets":
            out.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "box":
            _, status, title_, lines, figure = block
            out.append(f'<section class="answer {e(status.lower().replace(" ", "-"))}"><div class="verdict">'
                       f'<h3><span class="badge">{e(status)}</span> {e(title_)}</h3>'
                       + ("<ul>" + "".join(f"<li>{e(x)}</li>" for x in lines) + "</ul>" if lines else "") + "</div>"
                       + (html_figure(figures_dir, *figure) if figure else "") + "</section>")
        elif kind == "table":
            out.append(html_table(*block[1:]))
        elif kind == "figure":
            out.append(html_figure(figures_dir, *block[1:]))
    out.append(f"<script>{SORT_JS}</script></body></html>")
    return "\n".join(out) + "\n"
