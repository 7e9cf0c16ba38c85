"""Render a fewtune report.html in headless Chromium and save a PNG screenshot, to check it by eye.

    python scripts/screenshot_report.py report/report.html --output report/screenshot.png [--height 6000]

Needs a Chromium binary (Debian: `apt-get install -y chromium`). The report is self-contained, so the
browser runs with networking and every background service off: what renders is what a reader sees offline.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    sys.exit(f"screenshot_report: no Chromium found (tried {', '.join(BROWSERS)}); apt-get install -y chromium")


def screenshot(html: Path, output: Path, width: int, height: int, timeout: int = 120) -> None:
    with tempfile.TemporaryDirectory(prefix="fewtune-chromium-") as profile:
        cmd = [find_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={output.resolve()}",
               html.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not output.exists():
        sys.exit(f"screenshot_report: chromium failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("html", type=Path, help="report.html written by `fewtune report`")
    p.add_argument("--output", "-o", type=Path, help="PNG to write [next to the report: screenshot.png]")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=4000, help="page height to capture, in CSS pixels")
    args = p.parse_args(argv)
    if not args.html.is_file():
        sys.exit(f"screenshot_report: {args.html} does not exist")
    output = args.output or args.html.with_name("screenshot.png")
    screenshot(args.html, output, args.width, args.height)
    print(f"screenshot written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
