"""The report in a real browser: report.html opened in headless Chromium at 1280 × 800 by scripts/check_report.py
(Playwright driving the system's Chromium: nothing is downloaded) and checked from the DOM. Skipped, with the
reason, where no browser can run; `make test` installs the Chromium package where apt is usable."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from test_report import N, first_box, synthetic_result

from fewtune.cli import main
from fewtune.config import RunConfig
from fewtune.store import Store

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_report.py"
_spec = importlib.util.spec_from_file_location("check_report", SCRIPT)
check_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_report)

DEMO = {  # the demo's eight options (label -> method, options, base accuracy, peak MiB, train s per shot, shots)
    "zero-shot": ("icl", {}, 0.52, 700.0, 0.0, 0),
    "icl": ("icl", {}, 0.55, 1500.0, 0.0, 32),
    "ft": ("ft", {}, 0.76, 3100.0, 9.0, 32),
    "pbft": ("pbft", {}, 0.84, 3000.0, 8.0, 32),
    "adaptive": ("adaptive", {}, 0.78, 1700.0, 2.0, 32),
    "lora": ("lora", {}, 0.82, 2200.0, 4.0, 32),
    "cd-instruction": ("cd", {"context": "instruction"}, 0.835, 3200.0, 8.3, 32),
    "cd-fewshot": ("cd", {"context": "few-shot", "context_shots": 2}, 0.80, 3300.0, 8.5, 32),
}


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    """A report of the demo's shape: CoLA, eight options, four seeds, in-domain and out-of-domain, the study's
    findings (their labels are the demo's)."""
    root = tmp_path_factory.mktemp("demo")
    rng = np.random.default_rng(11)
    with Store(root / "demo.db") as store:
        for seed in (0, 1, 2, 3):
            for label, (method, options, base, mem, per_shot, shots) in DEMO.items():
                cfg = RunConfig(task="cola", model="smollm2-135m", method=method, method_options=options,
                                shots=shots, seed=seed, eval_limit=N)
                r = synthetic_result(cfg, label, rng, (method, options, base, mem, per_shot))
                r["task"]["equivalence_margin"] = 0.05  # CoLA's task file's
                store.claim(cfg, label=label, grid="demo")
                store.finish(cfg.hash(), r)
    assert main(["report", "--db", str(root / "demo.db"), "--out", str(root / "report")]) == 0
    return root / "report"


def test_demo_like_report_reads_answer_first(demo_like):
    """Without a browser: the verdict boxes come first (in-domain, then out-of-domain), then the method notes; no
    MCC-vs-sample-size figure when every method ran at one sample size."""
    md = (demo_like / "report.md").read_text()
    heading, lines = first_box(md)
    assert re.match(r"(OPEN|RESOLVED) · cola / smollm2-135m · in-domain \(in_domain_dev, MCC\)", heading)
    assert any(line.startswith("Shown worse than ") for line in lines)
    assert any(line.startswith("Equivalent to the best within ±0.050: ") for line in lines)
    assert any("majority-class floor (MCC > 0)" in line for line in lines)
    assert any(line.startswith("The study's findings on this family: ") for line in lines)
    assert md.index("· in-domain") < md.index("· out-of-domain") < md.index("How to read this report") \
        < md.index("## The study's findings") < md.index("## Task cola")
    figures = {p.name for p in (demo_like / "figures").iterdir()}
    assert {"intervals-cola-smollm2-135m-id.svg", "intervals-cola-smollm2-135m-ood.svg"} <= figures
    assert not any("vs-shots" in f for f in figures)


@pytest.fixture(scope="module")
def browser():
    why = check_report.missing()
    if why:
        pytest.skip(f"no browser to check the report in: {why}")
    with check_report.browser() as context:
        yield context


def test_first_screen_in_chromium(browser, demo_like, tmp_path):
    """At 1280 × 800: the first verdict box and its interval plot without scrolling; nothing past the page's width
    outside a table's scroll container; every image loaded; no request but the file; columns sort."""
    result = check_report.check(browser, demo_like / "report.html", tmp_path / "first-screen.png")
    print("\n".join(check_report.summary(result)))
    assert result["failures"] == []
    facts = result["facts"]
    assert facts["images"] >= 4 and facts["tables"] >= 4 and result["sorted"] is not None
    assert (tmp_path / "first-screen.png").stat().st_size > 10_000


def test_one_seed_report_renders_in_chromium(browser, tmp_path):
    """Bad input (every option one seed) still gives a first screen that passes the same checks."""
    path = tmp_path / "one.db"
    rng = np.random.default_rng(12)
    with Store(path) as store:
        for label in ("icl", "pbft", "lora"):
            method, options, base, mem, per_shot, shots = DEMO[label]
            cfg = RunConfig(task="cola", model="m", method=method, shots=shots, seed=0, eval_limit=N)
            store.claim(cfg, label=label)
            store.finish(cfg.hash(), synthetic_result(cfg, label, rng, (method, options, base, mem, per_shot)))
    assert main(["report", "--db", str(path), "--out", str(tmp_path / "rep")]) == 0
    assert check_report.check(browser, tmp_path / "rep" / "report.html")["failures"] == []


def test_the_check_catches_what_it_checks(browser, tmp_path):
    """A page without a verdict box, with a wide table outside a scroll container, one inside whose first column
    scrolls away, and an image from the network: every one of those is reported (the check can fail)."""
    page = tmp_path / "bad.html"
    cells = "".join(f"<th>{'x' * 40}</th>" for _ in range(60))
    page.write_text(f'<!DOCTYPE html><html><body><table><tr>{cells}</tr></table>'
                    f'<div class="scroll" style="overflow-x: auto"><table><tr>{cells}</tr></table></div>'
                    '<img alt="remote" src="http://192.0.2.1/figure.png"></body></html>')
    failures = " | ".join(check_report.check(browser, page)["failures"])
    for expected in ("no verdict in the first verdict box", "the page scrolls sideways", "outside a scroll container",
                     "lose their first column when scrolled", "image(s) did not load",
                     "request(s) besides the file itself"):
        assert expected in failures, failures
