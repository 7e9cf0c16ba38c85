"""The grid: spec expansion, resume, failure isolation, and interruption (kill -9, SIGINT) of a real
`fewtune grid` process. Cells run a fake runner (fast, no model) named by $FEWTUNE_GRID_RUNNER."""

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from fewtune.cli import main
from fewtune.errors import FewtuneError
from fewtune.grid import expand, load_grid, preset_names, run_grid
from fewtune.store import Store

FAKE_RUNNER = textwrap.dedent('''
    """A stand-in for fewtune.runner.run: no model; behaviour set by environment variables."""
    import os, signal, time
    from pathlib import Path
    from fewtune.errors import FewtuneError

    def run(cfg, progress=False):
        marks = os.environ.get("FAKE_MARKS")
        if marks:
            Path(marks, cfg.hash() + ".pid").write_text(str(os.getpid()))
        print("fake runner stdout", cfg.hash(), flush=True)
        if cfg.method == os.environ.get("FAKE_CRASH"):
            os.kill(os.getpid(), signal.SIGKILL)          # a hard crash: no exception, no result
        if cfg.method == os.environ.get("FAKE_SLOW"):
            time.sleep(120)
        if cfg.method == os.environ.get("FAKE_FAIL"):
            raise FewtuneError("fake failure for " + cfg.method)
        acc = 0.5 + (int(cfg.hash()[:4], 16) % 40) / 100
        return {"schema": 1, "config": cfg.to_dict(), "config_hash": cfg.hash(),
                "evals": {"in_domain_dev": {"role": "in_domain", "n": 10, "accuracy": acc, "mcc": 0.1},
                          "out_of_domain_dev": {"role": "out_of_domain", "n": 10, "accuracy": acc - 0.05, "mcc": 0.0}},
                "cost": {"train_seconds": 1.0, "eval_seconds": 0.5, "peak_memory_mib": 50.0, "trainable_params": 3},
                "versions": {"fewtune": "test"}}
''')

SPEC = textwrap.dedent('''
    name = "tiny"
    models = ["fake-model"]
    tasks = ["cola"]
    shots = [2]
    seeds = [0, 1]
    eval_limit = 10

    [[methods]]
    method = "icl"

    [[methods]]
    method = "pbft"

    [[methods]]
    method = "lora"
''')


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The fake runner as an importable module (for child processes) and as a function (in process)."""
    (tmp_path / "fake_runner.py").write_text(FAKE_RUNNER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("FEWTUNE_GRID_RUNNER", "fake_runner:run")
    for var in ("FAKE_CRASH", "FAKE_SLOW", "FAKE_FAIL", "FAKE_MARKS"):
        monkeypatch.delenv(var, raising=False)
    spec = importlib.util.spec_from_file_location("fake_runner", tmp_path / "fake_runner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "tiny.toml").write_text(SPEC)
    return module


def counting(runner):
    calls = []

    def wrapped(cfg, progress=False):
        calls.append(cfg.hash())
        return runner(cfg, progress)
    wrapped.calls = calls
    return wrapped


# --- expansion
def test_expand_cells_labels_and_order():
    grid = expand({"models": ["a", "b"], "tasks": ["cola", "mnli"], "shots": [4, 8], "seeds": [0, 1],
                   "eval_limit": 20, "preset": "quick",
                   "methods": [{"method": "icl", "shots": [0, 4]},
                               {"method": "cd", "label": "cd-fewshot",
                                "method_options": {"context": "few-shot", "context_shots": 2}},
                               {"method": "lora", "epochs": 3}]}, "spec")
    cells = grid.cells
    # per model x task: 5 method/shots pairs x 2 seeds, and icl's zero-shot once (seed-free, at the first seed)
    assert len(cells) == 2 * 2 * (5 * 2 + 1)
    assert len({c.key for c in cells}) == len(cells)
    assert all(c.config.eval_limit == 20 and c.config.preset == "quick" for c in cells)
    assert {c.label for c in cells} == {"icl", "cd-fewshot", "lora"}
    assert {c.config.shots for c in cells if c.label == "icl"} == {0, 4}
    assert all(c.config.epochs == 3 for c in cells if c.label == "lora")
    assert all(c.config.epochs is None for c in cells if c.label != "lora")
    cd = next(c for c in cells if c.label == "cd-fewshot")
    assert cd.config.method_options == {"context": "few-shot", "context_shots": 2}
    # seed outermost: the grid opens with seed 0, a whole comparison on its own (zero-shot included)
    assert [c.config.seed for c in cells] == [0] * (2 * 2 * 6) + [1] * (2 * 2 * 5)


@pytest.mark.parametrize("data, message", [
    ({"models": ["m"], "tasks": ["cola"], "methods": [{"method": "icl"}], "sedes": [0]}, "unknown key 'sedes'.*seeds"),
    ({"models": ["m"], "task": "cola", "methods": [{"method": "icl"}]}, "'task' is an axis.*tasks = "),
    ({"models": ["m"], "tasks": ["cola"]}, "missing 'methods'"),
    ({"models": ["m"], "tasks": ["cola"], "methods": [{"method": "icl"}, {"method": "icl", "label": "icl"}]},
     "label 'icl' is used by two"),
    ({"models": ["m"], "tasks": ["cola"], "methods": [{"method": "icl", "label": "a"}, {"method": "icl", "label": "b"}]},
     "methods 'a' and 'b' give the same run"),
    ({"models": ["m"], "tasks": ["cola"], "methods": [{"method": "lora", "method_options": {"rank": 4}}]},
     "no option 'rank'"),
    ({"models": ["m"], "tasks": ["cola"], "methods": [{"method": "lorra"}]}, "Did you mean: lora"),
    ({"models": ["m"], "tasks": ["colaa"], "methods": [{"method": "icl"}]}, "colaa"),
    ({"models": ["m"], "tasks": ["cola"], "shots": ["16"], "methods": [{"method": "icl"}]}, "'shots' must hold int"),
    ({"models": ["m"], "tasks": ["cola"], "epochs": 0, "methods": [{"method": "ft"}]}, "'epochs' must be a positive"),
])
def test_expand_errors_name_the_problem(data, message):
    with pytest.raises(FewtuneError, match=message):
        expand(data, "spec.toml")


def test_shipped_presets():
    assert preset_names() == ["beyond", "cpu", "demo", "models", "paper"]
    demo, cpu, paper = load_grid("demo"), load_grid("cpu"), load_grid("paper")
    methods = {"icl", "ft", "pbft", "adaptive", "lora", "cd"}
    for grid in (demo, cpu, paper):
        assert {c.config.method for c in grid.cells} == methods
    for grid in (cpu, paper):
        assert {c.config.task for c in grid.cells} == {"cola", "mnli"}
    # the demo: one task done properly, by --until-resolved (options x up to 4 seeds, zero-shot included)
    assert {c.config.task for c in demo.cells} == {"cola"} and {c.config.seed for c in demo.cells} == {0, 1, 2, 3}
    assert {c.config.model for c in demo.cells} == {"smollm2-135m"}
    assert all(c.config.eval_limit is not None and c.config.preset == "quick" for c in demo.cells)
    # zero-shot cannot depend on the seed: it runs once, at the first seed (7 options x 4 seeds + 1 = 29)
    assert len(demo.cells) == 7 * 4 + 1 and {c.config.shots for c in demo.cells} == {0, 32}
    assert [(c.label, c.config.seed) for c in demo.cells if c.seed_free] == [("zero-shot", 0)]
    assert {c.config.model for c in paper.cells} == {"facebook/opt-125m", "facebook/opt-350m"}
    assert {c.config.shots for c in paper.cells} == {16, 32, 64, 128}
    assert {c.config.seed for c in paper.cells} == {0, 1, 2, 3, 4}
    assert all(c.config.eval_limit is None for c in paper.cells)
    two = load_grid("models")
    assert {c.config.model for c in two.cells} == {"smollm2-135m", "gemma3-270m"}
    assert {c.config.method for c in two.cells} == methods | {"peft"} and len(two.cells) == 36
    assert all(c.config.eval_limit == 100 and c.config.preset == "quick" for c in two.cells)
    assert len(demo.cells) < len(cpu.cells) < len(paper.cells)
    beyond = load_grid("beyond")  # the out-of-domain methods beside ft, icl and zero-shot, on CoLA at 32 shots
    assert {c.config.method for c in beyond.cells} == {"icl", "ft", "probe", "lpft", "bitfit"}
    assert {c.config.task for c in beyond.cells} == {"cola"} and {c.config.shots for c in beyond.cells} == {0, 32}
    assert all(c.config.eval_limit == 200 and c.config.preset == "quick" for c in beyond.cells)
    assert len(beyond.cells) == 5 * 6 + 1 and beyond.findings == "lpft"  # zero-shot once
    assert not any(c.seed_free for grid in (cpu, paper, two) for c in grid.cells)  # no zero-shot entry in these


def test_unknown_spec(tmp_path):
    with pytest.raises(FewtuneError, match="Did you mean: demo"):
        load_grid("dmeo")
    with pytest.raises(FewtuneError, match="does not exist"):
        load_grid(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("models = [")
    with pytest.raises(FewtuneError, match="not valid TOML"):
        load_grid(str(bad))


def test_dry_run_lists_cells_and_creates_nothing(fake, tmp_path, capsys):
    db = tmp_path / "out" / "r.db"
    assert main(["grid", "demo", "--dry-run", "--db", str(db)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 30 and "29 cells, 29 to run" in out[-1]
    assert "seed-free, run once for every seed: zero-shot (0 shots)" in out[-1]
    zero = [line for line in out[:-1] if " zero-shot " in line]  # one line, that says it runs once
    assert len(zero) == 1 and "seed=0 (seed-free: runs once" in zero[0]
    assert not db.parent.exists()


SEED_FREE_SPEC = {"models": ["a", "b"], "tasks": ["cola"], "shots": [4], "eval_limit": 10,
                  "methods": [{"method": "icl", "label": "zero-shot", "shots": [0]}, {"method": "icl"},
                              {"method": "pbft"}]}


def test_a_seed_free_option_is_one_cell_with_its_first_seed_key():
    """Zero-shot (icl, 0 shots) is one cell per model x task, at the spec's first seed (not the smallest), with the key
    that cell always had; every other option's cells and keys are what one-seed grids give."""
    seeds = [3, 1, 2]
    grid = expand({**SEED_FREE_SPEC, "seeds": seeds}, "spec")
    assert grid.seeds == seeds
    once = [c for c in grid.cells if c.seed_free]
    assert [(c.label, c.config.model, c.config.seed) for c in once] == [("zero-shot", "a", 3), ("zero-shot", "b", 3)]
    assert len(grid.cells) == 2 * (2 * 3 + 1)
    alone = {s: {c.key: c for c in expand({**SEED_FREE_SPEC, "seeds": [s]}, "spec").cells} for s in seeds}
    assert {c.key for c in once} == {k for k, c in alone[3].items() if c.label == "zero-shot"}
    expected = set(alone[3]) | {k for s in (1, 2) for k, c in alone[s].items() if c.label != "zero-shot"}
    assert {c.key for c in grid.cells} == expected
    # one seed: nothing to drop, and the zero-shot cell is the same run
    assert {c.key for c in expand({**SEED_FREE_SPEC, "seeds": [3]}, "spec").cells} == set(alone[3])


def test_a_seed_free_option_runs_once_and_resumes(fake, tmp_path):
    """A grid runs zero-shot once for both seeds; run again, it runs nothing; the report's options read it as
    seed-free (the fake runner records no seed_free field: read as a row from before the field, icl with 0 shots)."""
    from fewtune.stats.options import flat_row, group_runs
    spec = tmp_path / "once.toml"
    spec.write_text(SPEC.replace('[[methods]]\nmethod = "icl"\n',
                                 '[[methods]]\nmethod = "icl"\nlabel = "zero-shot"\nshots = [0]\n', 1))
    grid = load_grid(str(spec))
    assert [(c.label, c.config.seed) for c in grid.cells if c.seed_free] == [("zero-shot", 0)]
    with Store(tmp_path / "r.db") as store:
        runner = counting(fake.run)
        s = run_grid(grid, store, tmp_path / "logs", runner=runner, in_process=True, progress=False,
                     echo=lambda _: None)
        assert (s.total, s.success, len(runner.calls)) == (5, 5, 5)  # zero-shot once, pbft and lora twice each
        runner = counting(fake.run)
        s = run_grid(load_grid(str(spec)), store, tmp_path / "logs", runner=runner, in_process=True,
                     progress=False, echo=lambda _: None)
        assert runner.calls == [] and s.done_before == 5
        rows = store.rows()
    assert sorted((r["label"], r["seed"]) for r in rows if r["label"] == "zero-shot") == [("zero-shot", 0)]
    groups = group_runs([flat_row(r) for r in rows], rows, lambda key: {})
    assert {g["label"]: (g["seed_free"], g["n_runs"]) for g in groups} == {
        "zero-shot": (True, 1), "pbft": (False, 2), "lora": (False, 2)}


# --- running in process, with an injected runner
def test_resume_skips_successes_and_reruns_failures(fake, tmp_path, monkeypatch):
    grid = load_grid(str(tmp_path / "tiny.toml"))
    db, logs = tmp_path / "r.db", tmp_path / "logs"
    monkeypatch.setenv("FAKE_FAIL", "pbft")
    runner = counting(fake.run)
    with Store(db) as store:
        s = run_grid(grid, store, logs, runner=runner, in_process=True, progress=False, echo=lambda _: None)
        assert (s.success, s.failed, len(runner.calls)) == (4, 2, 6)
        failed = store.rows(["failed"])
        assert {r["method"] for r in failed} == {"pbft"}
        assert all(r["error"] == "FewtuneError: fake failure for pbft" for r in failed)
        assert "Traceback" in (logs / f"{failed[0]['config_hash']}.log").read_text()

        monkeypatch.delenv("FAKE_FAIL")
        runner = counting(fake.run)
        s = run_grid(grid, store, logs, runner=runner, in_process=True, progress=False, echo=lambda _: None)
        assert (s.done_before, s.success, s.failed) == (4, 2, 0)
        assert sorted(runner.calls) == sorted(r["config_hash"] for r in failed)

        runner = counting(fake.run)
        s = run_grid(grid, store, logs, runner=runner, in_process=True, progress=False, echo=lambda _: None)
        assert runner.calls == [] and s.done_before == 6
        rows = store.rows()
    assert len(rows) == 6 and {r["status"] for r in rows} == {"success"}
    assert {r["config_hash"] for r in rows} == {c.key for c in grid.cells}
    assert {r["label"] for r in rows} == {"icl", "pbft", "lora"} and {r["grid"] for r in rows} == {"tiny"}
    assert sorted(r["attempts"] for r in rows) == [1, 1, 1, 1, 2, 2]


def test_any_exception_is_recorded_and_the_grid_goes_on(fake, tmp_path):
    grid = load_grid(str(tmp_path / "tiny.toml"))

    def runner(cfg, progress=False):
        if cfg.method == "icl":
            raise RuntimeError("CUDA out of memory\nsecond line")
        return fake.run(cfg)
    with Store(tmp_path / "r.db") as store:
        s = run_grid(grid, store, tmp_path / "logs", runner=runner, in_process=True, progress=False,
                     echo=lambda _: None)
        assert (s.success, s.failed) == (4, 2)
        assert {r["error"] for r in store.rows(["failed"])} == {"RuntimeError: CUDA out of memory second line"}


# --- running in child processes through the CLI: a fresh process per cell, or warm workers
BACKENDS = [["--backend", "process"], ["--backend", "warm"], ["--backend", "warm", "--workers", "2"]]
BACKEND_IDS = ["process", "warm", "warm2"]


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_child_processes_isolate_crashes_and_keep_logs(fake, tmp_path, monkeypatch, capsys, backend):
    monkeypatch.setenv("FAKE_CRASH", "lora")
    db = tmp_path / "res" / "r.db"
    assert main(["grid", str(tmp_path / "tiny.toml"), "--db", str(db), "--quiet", *backend]) == 1  # some failed
    captured = capsys.readouterr()
    assert "4 succeeded now, 2 failed" in captured.out
    with Store(db) as store:
        rows = store.rows()
    assert len(rows) == 6
    crashed = [r for r in rows if r["method"] == "lora"]
    assert all(r["status"] == "failed" and "killed by SIGKILL" in r["error"] for r in crashed)
    ok = [r for r in rows if r["method"] != "lora"]
    assert all(r["status"] == "success" for r in ok)
    for r in rows:  # each cell's own output is in its own log, next to the database
        log = (db.parent / "logs" / f"{r['config_hash']}.log").read_text()
        assert f"fake runner stdout {r['config_hash']}" in log
        assert r["log_path"] == str(db.parent / "logs" / f"{r['config_hash']}.log")
    assert not list((db.parent / "logs").glob(".*result*"))  # no leftovers of the result hand-over


def start_grid(tmp_path, db, env_extra, backend=()):
    env = {**os.environ, **env_extra}
    return subprocess.Popen([sys.executable, "-m", "fewtune.cli", "grid", str(tmp_path / "tiny.toml"), "--db", str(db),
                             "--quiet", *backend], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_running(db, marks, method, timeout=60):
    """Wait until the slow cell runs in a child (its pid mark exists); return (row, child pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.exists():
            try:
                with Store(db, readonly=True) as store:
                    running = [r for r in store.rows(["running"]) if r["method"] == method]
            except FewtuneError:  # the grid has created the file but not yet its tables
                running = []
            for r in running:
                mark = marks / f"{r['config_hash']}.pid"
                if mark.exists() and mark.read_text():
                    return r, int(mark.read_text())
        time.sleep(0.1)
    raise AssertionError(f"no {method} cell started running within {timeout} s")


def wait_gone(pid, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("backend", BACKENDS[:2], ids=BACKEND_IDS[:2])  # one cell at a time: counts are exact
def test_kill_and_interrupt_then_resume(fake, tmp_path, backend):
    db = tmp_path / "res" / "r.db"
    marks = tmp_path / "marks"
    marks.mkdir()
    slow = {"FAKE_SLOW": "lora", "FAKE_MARKS": str(marks)}

    # 1. kill -9 the grid while a cell runs: the row stays 'running' with a dead owner, the child exits too
    grid = start_grid(tmp_path, db, slow, backend)
    row, child = wait_for_running(db, marks, "lora")
    grid.kill()
    grid.communicate(timeout=30)
    assert wait_gone(child), "the cell's child process outlived the killed grid"
    with Store(db, readonly=True) as store:
        assert store.get(row["config_hash"])["status"] == "running"
        assert len(store.rows(["success"])) == 2

    # 2. rerun, then SIGINT (Ctrl-C) while the same cell runs again: it is marked cancelled, exit 130
    (marks / f"{row['config_hash']}.pid").unlink()
    grid = start_grid(tmp_path, db, slow, backend)
    row2, child2 = wait_for_running(db, marks, "lora")
    assert row2["config_hash"] == row["config_hash"] and row2["attempts"] == 2
    grid.send_signal(signal.SIGINT)
    out, err = grid.communicate(timeout=60)
    assert grid.returncode == 130, err
    assert "rerun the same command to resume" in err
    assert wait_gone(child2)
    with Store(db, readonly=True) as store:
        r = store.get(row["config_hash"])
        assert r["status"] == "cancelled" and "SIGINT" in r["error"]

    # 3. rerun to the end: every cell exactly once, none running, the interrupted one on its third attempt
    grid = start_grid(tmp_path, db, {"FAKE_MARKS": str(marks)}, backend)
    out, err = grid.communicate(timeout=120)
    assert grid.returncode == 0, err
    assert "2 done before, 4 succeeded now, 0 failed" in out
    with Store(db, readonly=True) as store:
        rows = store.rows()
    expected = {c.key for c in load_grid(str(tmp_path / "tiny.toml")).cells}
    assert len(rows) == 6 and {r["config_hash"] for r in rows} == expected
    assert all(r["status"] == "success" for r in rows)
    assert {r["config_hash"]: r["attempts"] for r in rows}[row["config_hash"]] == 3


def test_cell_running_in_a_live_process_is_not_run_twice(fake, tmp_path):
    grid = load_grid(str(tmp_path / "tiny.toml"))
    cell = grid.cells[0]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = {"host": socket.gethostname(), "pid": live.pid, "started": round(psutil.Process(live.pid).create_time(), 2)}
        with Store(tmp_path / "r.db") as store:
            assert store.claim(cell.config, owner=owner) == "claimed"
            runner = counting(fake.run)
            s = run_grid(grid, store, tmp_path / "logs", runner=runner, in_process=True, progress=False,
                         echo=lambda _: None)
            assert s.busy == 1 and cell.key not in runner.calls and len(runner.calls) == 5
            s = run_grid(grid, store, tmp_path / "logs", runner=runner, in_process=True, progress=False,
                         reclaim=True, echo=lambda _: None)
            assert runner.calls[-1] == cell.key and store.get(cell.key)["status"] == "success"
            assert len(store.rows()) == 6
    finally:
        live.kill()
        live.wait()


def test_task_paths_in_a_spec_are_relative_to_the_spec(toy, tmp_path, monkeypatch):
    """A spec's relative task path means the file next to the spec, from any working directory; the same task
    reached by two spellings is one experiment (its content is the identity, not its path)."""
    import shutil
    specs = tmp_path / "experiments"
    (specs / "tasks").mkdir(parents=True)
    shutil.copy(toy.task_file, specs / "tasks" / "toy.toml")
    spec = specs / "grid.toml"
    spec.write_text(f'models = ["m"]\ntasks = ["tasks/toy.toml"]\ndata_root = "{toy.root}"\n[[methods]]\nmethod = "icl"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    grid = load_grid(str(spec))
    assert grid.cells[0].config.task == str((specs / "tasks" / "toy.toml").resolve())
    absolute = spec.with_name("abs.toml")
    absolute.write_text(spec.read_text().replace('"tasks/toy.toml"', f'"{toy.task_file}"'))
    assert load_grid(str(absolute)).cells[0].key == grid.cells[0].key
