"""`fewtune grid --until-resolved`: the allocation rule on a fake runner with known true accuracies.

The fake runner returns results as the real one records them (identity, per-example predictions, baselines), for
options whose true accuracy is known: examples share an ease (so options are paired), each seed shifts an option's
accuracy (training instability). The real grid, store, statistics and report code run on them."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fewtune.cli import main
from fewtune.errors import FewtuneError
from fewtune.grid import expand
from fewtune.grid.decide import parse_duration, run_until_resolved
from fewtune.stats import metrics
from fewtune.store import Store

N = 300
TRUE = {"a": 0.80, "b": 0.70, "c": 0.62, "d": 0.55}


def fake_runner(true: dict, trial: int, sleep: float = 0.0, calls: list | None = None):
    def run(cfg, progress=False):
        if calls is not None:
            calls.append((cfg.method_options.get("label_tag"), cfg.seed))
        time.sleep(sleep)
        label = cfg.method_options["label_tag"]
        rng = np.random.default_rng([trial, cfg.seed, ord(label)])
        ease = np.random.default_rng([trial, 999]).normal(0, 1.0, N)  # the same examples for every option and seed
        gold = np.random.default_rng([trial, 998]).integers(0, 2, N)
        logit = np.log(true[label] / (1 - true[label])) + rng.normal(0, 0.15)  # the seed's training luck
        correct = rng.random(N) < 1 / (1 + np.exp(-(logit + ease - ease.mean())))
        pred = np.where(correct, gold, 1 - gold)
        logprobs = np.log(np.where(np.arange(2)[None, :] == pred[:, None], 0.7, 0.3))
        labels = ["negative", "positive"]
        return {"config": cfg.to_dict(), "config_hash": cfg.hash(), "identity": cfg.identity(),
                "task": {"name": "toy", "primary_metric": "accuracy", "labels": labels},
                "evals": {"dev": {"role": "in_domain", **metrics.evaluation(gold.tolist(), pred.tolist(), logprobs,
                                                                           labels, ("accuracy", "mcc"))}},
                "predictions": {"dev": {"idx": list(range(N)), "gold": gold.tolist(), "pred": pred.tolist(),
                                        "logprobs": logprobs.tolist()}},
                "cost": {"train_seconds": 1.0}, "examples_used": cfg.shots}
    return run


def spec(toy, labels=tuple(TRUE), seeds=range(6)) -> dict:
    # each option an icl entry with its own `label_tag` (added to icl's options by the fixture below), so each
    # option is its own identity and the fake runner knows its true accuracy
    return {"name": "decide", "models": ["m"], "tasks": [str(toy.task_file)], "data_root": str(toy.root),
            "shots": [4], "seeds": list(seeds),
            "methods": [{"method": "icl", "label": label, "method_options": {"label_tag": label}} for label in labels]}


@pytest.fixture(autouse=True)
def _tag_option(monkeypatch):
    """Let icl carry a `label_tag` option for these tests, so each option is its own identity."""
    from dataclasses import field, make_dataclass

    from fewtune.methods import icl
    tagged = make_dataclass("TaggedIcl", [("label_tag", str, field(default=""))], bases=(icl.IclOptions,))
    monkeypatch.setattr(icl.ICL, "Options", tagged)


def test_finds_the_best_option_and_never_claims_what_the_intervals_do_not_support(toy, tmp_path):
    found = runs = 0
    trials = 20
    for trial in range(trials):
        grid = expand(spec(toy), where="test")
        with Store(tmp_path / f"t{trial}.db") as store:
            d = run_until_resolved(grid, store, tmp_path / "logs", float("inf"), echo=lambda _: None,
                                   in_process=True, runner=fake_runner(TRUE, trial))
        (st,) = d.state.values()
        v = st["view"].verdict
        label = {n: g["label"] for n, g in st["view"].by_name.items()}
        found += label[v.best] == "a"
        for worse, better in v.worse.items():  # every "worse" claim: made from 3 seeds on, and the truth agrees
            assert TRUE[label[worse]] < TRUE[label[better]] and v.claimed_at[worse] >= 3
        assert v.min_seeds >= 3
        runs += d.runs
    assert found / trials >= 0.9
    # fewer runs than the full grid of 4 options x 6 seeds: options shown worse get no more seeds
    assert runs / trials < 0.9 * 4 * 6


def decide_toy(toy, db, true: dict, trial: int, seeds=range(6)):
    """`--until-resolved` in process on the fake runner: (the decision, the (label, seed) calls, the printed lines)."""
    calls, lines = [], []
    grid = expand(spec(toy, labels=tuple(true), seeds=seeds), where="test")
    with Store(db) as store:
        d = run_until_resolved(grid, store, db.parent / "logs", float("inf"), echo=lines.append, in_process=True,
                               runner=fake_runner(true, trial, calls=calls))
    return d, calls, lines


def test_a_close_contest_gets_the_seeds_and_the_rest_stops(toy, tmp_path):
    true = {"a": 0.80, "b": 0.79, "c": 0.50}
    d, calls, lines = decide_toy(toy, tmp_path / "close.db", true, trial=0)
    seeds = {label: sorted(s for lab, s in calls if lab == label) for label in true}
    # c is clearly worse, shown so at the first look (4 seeds); a against b (one point apart) has no chance to be
    # settled within the spec's 6 seeds, so the grid stops there, early, and says what it would take
    assert seeds["a"] == seeds["b"] == seeds["c"] == [0, 1, 2, 3]
    assert d.futile and not d.resolved and any(line.startswith("OPEN") for line in d.lines)
    assert any("stopped early" in line and "What it would take" in line for line in d.lines)
    assert not any("shown worse" in line for line in lines if line.startswith(("round 1", "round 2", "round 3")))
    assert any(line.startswith("round 4") and "shown worse than the best: c" in line for line in lines)
    assert all(str(toy.task_file) not in line for line in lines + d.lines)  # a task file is named by its name


def test_no_early_stop_while_a_comparison_can_still_be_settled(toy, tmp_path):
    """One option clearly better (20 points): the chance to settle it within 6 seeds is high, so seeds keep coming until it is
    (or the spec's seeds end); never the early stop."""
    true = {"a": 0.85, "b": 0.65}
    d, calls, lines = decide_toy(toy, tmp_path / "clear.db", true, trial=3)
    assert not d.futile, "\n".join(lines)
    assert d.resolved or len(calls) == 12


def test_time_budget_stops_starting_runs_and_a_rerun_resumes(toy, tmp_path):
    calls = []
    grid = expand(spec(toy, labels=("a", "b", "c")), where="test")
    db = tmp_path / "budget.db"
    with Store(db) as store:
        d = run_until_resolved(grid, store, tmp_path / "logs", 0.5, echo=lambda _: None, in_process=True,
                               runner=fake_runner(TRUE, 1, sleep=0.3, calls=calls))
    assert d.runs < 3 and d.seconds < 1.5
    first = list(calls)
    with Store(db) as store:
        d2 = run_until_resolved(grid, store, tmp_path / "logs", float("inf"), echo=lambda _: None, in_process=True,
                                runner=fake_runner(TRUE, 1, calls=calls))
        assert len({r["config_hash"] for r in store.rows()}) == len(store.rows())  # no duplicated row
    assert all(c not in calls[len(first):] for c in first)  # what was done is not run again
    assert d2.state


@pytest.mark.parametrize("text, seconds", [("15m", 900), ("90s", 90), ("1h30m", 5400), ("1.5h", 5400), ("2m30s", 150)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["abc", "15", "0m", "-5m", "", "5 minutes"])
def test_bad_time_budget_is_an_error(text):
    with pytest.raises(FewtuneError, match="--time-budget"):
        parse_duration(text)


def test_cli_refuses_what_cannot_be_decided(toy, tmp_path, capsys):
    one = tmp_path / "one.toml"
    one.write_text(f'models = ["m"]\ntasks = ["{toy.task_file}"]\ndata_root = "{toy.root}"\nseeds = [0, 1]\n'
                   '[[methods]]\nmethod = "icl"\n')
    few = tmp_path / "few.toml"
    few.write_text(f'models = ["m"]\ntasks = ["{toy.task_file}"]\ndata_root = "{toy.root}"\nseeds = [0]\n'
                   '[[methods]]\nmethod = "icl"\n[[methods]]\nmethod = "ft"\n')
    zero = tmp_path / "zero.toml"
    zero.write_text(f'models = ["m"]\ntasks = ["{toy.task_file}"]\ndata_root = "{toy.root}"\nseeds = [0, 1, 2, 3]\n'
                    'shots = [0]\n[[methods]]\nmethod = "icl"\nlabel = "a"\n'
                    '[[methods]]\nmethod = "icl"\nlabel = "b"\nmethod_options = { separator = " | " }\n')
    for argv, message in [
        (["grid", str(one), "--until-resolved"], "has only one"),
        (["grid", str(few), "--until-resolved"], "at least 4 seeds"),
        (["grid", str(zero), "--until-resolved"], "nothing to allocate"),
        (["grid", "demo", "--until-resolved", "--futility", "1.5"], "--futility"),
        (["grid", "demo", "--until-resolved", "--futility", "0"], "--futility"),
        (["grid", "demo", "--futility", "0.3"], "goes with --until-resolved"),
        (["grid", str(one), "--time-budget", "5m"], "goes with --until-resolved"),
        (["grid", "demo", "--until-resolved", "--time-budget", "soon"], "not a duration"),
        (["grid", "demo", "--until-resolved", "--backend", "ray", "--workers", "2"], "does not go with --backend ray"),
    ]:
        assert main(argv + ["--db", str(tmp_path / "x.db")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
    assert not (tmp_path / "x.db").exists()


DECIDE_RUNNER = """
import sys
from dataclasses import field, make_dataclass
from fewtune.methods import icl
if "label_tag" not in icl.ICL.Options.__dataclass_fields__:  # as the _tag_option fixture does in this process
    icl.ICL.Options = make_dataclass("TaggedIcl", [("label_tag", str, field(default=""))], bases=(icl.IclOptions,))
sys.path.insert(0, {tests!r})
import test_decide
run = test_decide.fake_runner({{"a": 0.80, "b": 0.79, "c": 0.50}}, 0)
"""


@pytest.mark.parametrize("backend", ["process", "warm2"])
def test_until_resolved_on_every_backend(toy, tmp_path, monkeypatch, backend):
    """The same allocation on a fresh process per cell and on warm workers (two: a round's cells run at once)."""
    import os
    from pathlib import Path

    from fewtune.grid.backends import ProcessBackend, WarmBackend, WorkerPlan
    (tmp_path / "decide_runner.py").write_text(DECIDE_RUNNER.format(tests=str(Path(__file__).parent)))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("FEWTUNE_GRID_RUNNER", "decide_runner:run")
    true = {"a": 0.80, "b": 0.79, "c": 0.50}
    grid = expand(spec(toy, labels=tuple(true), seeds=range(6)), where="test")
    plan = WorkerPlan(2, 1, (None, None)) if backend == "warm2" else WorkerPlan(1, 1, (None,))
    runs_on = ProcessBackend(plan) if backend == "process" else WarmBackend(plan)
    with Store(tmp_path / "b.db") as store:
        d = run_until_resolved(grid, store, tmp_path / "logs", float("inf"), echo=lambda _: None, backend=runs_on)
        rows = store.rows()
    seeds = {label: sorted(r["seed"] for r in rows if r["label"] == label) for label in true}
    assert {r["status"] for r in rows} == {"success"}
    # as on the in-process runner above: c shown worse at 4 seeds, a against b out of reach: the early stop
    assert seeds["a"] == seeds["b"] == seeds["c"] == [0, 1, 2, 3]
    assert d.runs == 12 and not d.resolved and d.futile
    if backend != "process":
        assert {r["result"]["cost"]["workers"] for r in rows} == {plan.workers}


def test_a_seed_free_option_runs_once_under_until_resolved_and_resumes(toy, tmp_path):
    """Zero-shot (icl at 0 shots) runs in round 1 only and stands for every seed in the claims; an interrupted run
    (a time budget) resumes without running anything twice, and the rerun never runs zero-shot again."""
    true = {"z": 0.55, "a": 0.80, "b": 0.60}
    s = spec(toy, labels=("a", "b"), seeds=range(6))
    s["methods"].insert(0, {"method": "icl", "label": "z", "shots": 0, "method_options": {"label_tag": "z"}})
    grid = expand(s, where="test")
    assert [c.seed_free for c in grid.cells].count(True) == 1 and len(grid.cells) == 1 + 2 * 6
    calls, db = [], tmp_path / "z.db"
    with Store(db) as store:
        run_until_resolved(grid, store, tmp_path / "logs", 0.5, echo=lambda _: None, in_process=True,
                           runner=fake_runner(true, 4, sleep=0.2, calls=calls))
    first = list(calls)
    assert ("z", 0) in first and len(first) < 13
    with Store(db) as store:
        d = run_until_resolved(grid, store, tmp_path / "logs", float("inf"), echo=lambda _: None, in_process=True,
                               runner=fake_runner(true, 4, calls=calls))
    again = calls[len(first):]
    assert all(c not in first for c in again) and not any(label == "z" for label, _ in again)
    v = d.state[next(iter(d.state))]["view"].verdict
    assert v.constants == ["z (0 shots)"] and v.min_seeds >= 4
    assert "z (0 shots)" in v.worse  # 25 points below a: a constant compared with every seed of a


def test_when_the_time_left_cannot_reach_a_look_the_grid_stops_and_says_so(toy, tmp_path):
    """A budget that fits two rounds but not a third: no comparison can reach the first look (4 seeds) in the time
    left, so the grid stops after round 2 and the answer names the time, not 'every seed is used'."""
    true = {"a": 0.80, "b": 0.70, "c": 0.60}
    grid = expand(spec(toy, labels=tuple(true), seeds=range(6)), where="test")
    calls = []
    with Store(tmp_path / "t.db") as store:
        d = run_until_resolved(grid, store, tmp_path / "logs", 2.4, echo=lambda _: None, in_process=True,
                               runner=fake_runner(true, 5, sleep=0.3, calls=calls))
    assert len(calls) <= 6 and not d.resolved
    reason = next(line for line in d.lines if line.startswith("  toy / m:"))
    assert "time" in reason and "every seed of the spec is used" not in reason, reason
