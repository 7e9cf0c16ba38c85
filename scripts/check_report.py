"""Open a fewtune report.html in headless Chromium at 1280 × 800 and check, from the DOM, what a reader sees.

    python scripts/check_report.py results/report/report.html [--screenshot first-screen.png]

Checks: the first verdict box and its interval plot lie inside the first viewport; no element reaches past the
page's width except inside a table's own scroll container (and the page itself does not scroll sideways); a table
wider than its container keeps its first column in view when scrolled to its end; every image has loaded; the page
asked for nothing but its own file (no network, no other file); a click on a column header sorts that table. Prints one line per check and exits 1 when any failed. tests/test_report_browser.py runs
it on a synthetic report.

Needs Python's `playwright` (the pinned wheel of pyproject's test extra) and a Chromium binary (Debian: `apt-get
install -y chromium`; `make test` installs it where apt is usable): Playwright drives the system's browser, so
nothing is downloaded. The browser runs with networking and background services off, in a fresh profile.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WIDTH, HEIGHT = 1280, 800

# Facts about the first screen, read from the laid-out page.
FACTS_JS = """() => {
  const W = document.documentElement.clientWidth, H = window.innerHeight;
  const rect = el => { if (!el) return null; const r = el.getBoundingClientRect();
                       return {left: r.left, top: r.top, right: r.right, bottom: r.bottom}; };
  const box = document.querySelector("section.answer");
  const name = el => el.tagName.toLowerCase() + (el.className && typeof el.className === "string" ?
                                                 "." + el.className.trim().split(/\\s+/).join(".") : "");
  const outside = [...document.body.querySelectorAll("*")].filter(el => !el.parentElement.closest(".scroll"));
  return {width: W, height: H, page_width: document.documentElement.scrollWidth,
          box: rect(box), verdict: rect(box && box.querySelector(".verdict")),
          plot: rect(box && box.querySelector("figure img")),
          overflowing: outside.filter(el => el.getBoundingClientRect().right > W + 0.5)
                              .map(el => name(el) + " to " + Math.round(el.getBoundingClientRect().right) + " px"),
          images: document.images.length,
          broken: [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt.slice(0, 60)),
          tables: document.querySelectorAll("table").length,
          unscrolled: [...document.querySelectorAll("table")].filter(t => !t.closest(".scroll")).length};
}"""

# Scroll every table wider than its box to its right end: its first column must stay at the box's left edge.
STICKY_JS = """() => {
  const wide = [...document.querySelectorAll(".scroll")].filter(el => el.scrollWidth > el.clientWidth + 1);
  const lost = wide.filter(el => {
    el.scrollLeft = el.scrollWidth;
    const gap = Math.abs(el.querySelector("th").getBoundingClientRect().left - el.getBoundingClientRect().left);
    el.scrollLeft = 0;
    return gap > 2;
  }).map(el => el.querySelector("th").textContent);
  return {wide: wide.length, lost};
}"""

# Click the header of the first column whose cells are all numbers, twice; read the column after each click.
SORT_JS = """() => {
  const num = s => parseFloat(s.replace(/,/g, ""));
  for (const t of document.querySelectorAll("table.sortable")) {
    const rows = [...t.tBodies[0].rows];
    if (rows.length < 3) continue;
    for (let i = 1; i < rows[0].cells.length; i++) {
      const col = () => [...t.tBodies[0].rows].map(r => r.cells[i].textContent.trim());
      if (!col().every(s => /^[+-]?[0-9][0-9,]*(\\.[0-9]+)?/.test(s)) || new Set(col()).size < 3) continue;
      const th = t.tHead.rows[0].cells[i];
      th.click(); const up = col().map(num);
      th.click(); const down = col().map(num);
      return {header: th.textContent, up, down};
    }
  }
  return null;
}"""


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def missing() -> str | None:
    """Why the check cannot run here (None: it can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Python's playwright is not installed (pip install -e '.[test]')"
    if find_browser() is None:
        return f"no Chromium found (tried {', '.join(BROWSERS)}): apt-get install -y chromium"
    return None


@contextlib.contextmanager
def browser():
    """A headless Chromium context at 1280 × 800 in a fresh profile (Playwright driving the system's browser)."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p, tempfile.TemporaryDirectory(prefix="fewtune-chromium-") as profile:
        context = p.chromium.launch_persistent_context(profile, executable_path=find_browser(), headless=True,
                                                       args=ARGS, viewport={"width": WIDTH, "height": HEIGHT})
        try:
            yield context
        finally:
            context.close()


def check(context, html: Path, screenshot: Path | None = None) -> dict:
    """Load `html` in a new page of `context` and check it: {"facts": ..., "sorted": ..., "requests": [...],
    "failures": [one line per failed check]}."""
    page = context.new_page()
    url = html.resolve().as_uri()
    requests = []
    page.on("request", lambda r: requests.append(r.url) if r.url != url and not r.url.startswith("data:") else None)
    page.route("**/*", lambda route: route.continue_() if route.request.url == url else route.abort())
    page.goto(url, wait_until="load")
    facts = page.evaluate(FACTS_JS)
    if screenshot is not None:
        page.screenshot(path=str(screenshot))
    sticky = page.evaluate(STICKY_JS)
    sort = page.evaluate(SORT_JS)
    page.close()
    failures = []
    for what in ("verdict", "plot"):
        r = facts[what]
        if r is None:
            failures.append(f"no {what} in the first verdict box")
        elif r["top"] < 0 or r["bottom"] > facts["height"] or r["right"] > facts["width"]:
            failures.append(f"the first box's {what} is not in the first {facts['width']}×{facts['height']} viewport: "
                            f"{r}")
    if facts["page_width"] > facts["width"]:
        failures.append(f"the page scrolls sideways: {facts['page_width']} px wide in a {facts['width']} px window")
    if facts["overflowing"]:
        failures.append(f"{len(facts['overflowing'])} element(s) past the page's width outside a scroll container: "
                        + "; ".join(facts["overflowing"][:5]))
    if facts["unscrolled"]:
        failures.append(f"{facts['unscrolled']} table(s) outside a scroll container")
    if sticky["lost"]:
        failures.append(f"{len(sticky['lost'])} wide table(s) lose their first column when scrolled: "
                        + "; ".join(sticky["lost"][:3]))
    if facts["broken"]:
        failures.append(f"{len(facts['broken'])} image(s) did not load: " + "; ".join(facts["broken"][:3]))
    if requests:
        failures.append(f"{len(requests)} request(s) besides the file itself: " + "; ".join(requests[:3]))
    if sort is not None and (sort["up"] != sorted(sort["up"]) or sort["down"] != sorted(sort["down"], reverse=True)):
        failures.append(f"clicking '{sort['header']}' did not sort its column: {sort['up']} / {sort['down']}")
    return {"facts": facts, "sticky": sticky, "sorted": sort, "requests": requests, "failures": failures}


def summary(result: dict) -> list[str]:
    f = result["facts"]
    def pos(r) -> str:
        return "none" if r is None else f"top {r['top']:.0f}, bottom {r['bottom']:.0f}, right {r['right']:.0f}"
    lines = [f"viewport {f['width']}×{f['height']}; page {f['page_width']} px wide",
             f"first verdict box: {pos(f['box'])}; its text: {pos(f['verdict'])}; its interval plot: {pos(f['plot'])}",
             f"images: {f['images']}, not loaded: {len(f['broken'])}; tables: {f['tables']}, outside a scroll "
             f"container: {f['unscrolled']}; elements past the page's width outside one: {len(f['overflowing'])}",
             f"tables wider than their scroll box: {result['sticky']['wide']}, first column lost when scrolled: "
             f"{len(result['sticky']['lost'])}",
             f"requests besides the file: {len(result['requests'])}",
             "sorting: " + (f"'{result['sorted']['header']}' ascending then descending" if result["sorted"]
                            else "no numeric column to try")]
    return lines + [f"FAIL: {x}" for x in result["failures"]] + ([] if result["failures"] else ["all checks passed"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("html", type=Path, help="report.html written by `fewtune report`")
    p.add_argument("--screenshot", type=Path, help="also save the first screen (1280 × 800) as this PNG")
    args = p.parse_args(argv)
    if not args.html.is_file():
        sys.exit(f"check_report: {args.html} does not exist")
    why = missing()
    if why:
        sys.exit(f"check_report: {why}")
    with browser() as context:
        result = check(context, args.html, args.screenshot)
    print("\n".join(summary(result)))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
