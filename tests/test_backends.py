"""The backends behind the one driver: warm workers that crash, hang or grow are replaced and their cells never lost;
several workers; two grids on one database; SIGTERM with cells in flight on several workers; the worker plan
(threads per worker, GPUs from free memory: decided on fakes, no GPU needed); one-line errors for bad --workers;
a spec naming a model that cannot be resolved. Cells run a fake runner (no model) named by $FEWTUNE_GRID_RUNNER."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fewtune.cli import main
from fewtune.errors import FewtuneError
from fewtune.grid.backends import GpuInfo, WarmBackend, WorkerPlan, plan_workers
from fewtune.grid.driver import run_grid
from fewtune.grid.grid_spec import load_grid
from fewtune.store import Store

FAKE_RUNNER = textwrap.dedent('''
    """A stand-in for fewtune.runner.run; FAKE_* variables say what to do to which method."""
    import os, signal, time
    from pathlib import Path
    from fewtune.errors import FewtuneError

    HOARD = []  # what a leaking cell leaves behind in a warm worker

    def run(cfg, progress=False):
        marks = os.environ.get("FAKE_MARKS")
        if marks:
            Path(marks, cfg.hash() + ".pid").write_text(str(os.getpid()))
            with open(Path(marks, "calls.txt"), "a") as f:
                f.write(f"{cfg.hash()} {os.getpid()}\\n")
        methods = lambda var: os.environ.get(var, "").split(",")
        if cfg.method in methods("FAKE_CRASH"):
            os.kill(os.getpid(), signal.SIGKILL)
        if cfg.method in methods("FAKE_SLOW"):
            time.sleep(float(os.environ.get("FAKE_SLOW_S", "120")))
        if cfg.method in methods("FAKE_LEAK"):
            HOARD.append(bytearray(500 * 2**20))   # 500 MiB kept after the cell, touched so it is resident
            HOARD[-1][::4096] = b"x" * len(range(0, 500 * 2**20, 4096))
        acc = 0.5 + (int(cfg.hash()[:4], 16) % 40) / 100
        return {"schema": 1, "config": cfg.to_dict(), "config_hash": cfg.hash(),
                "evals": {"dev": {"role": "in_domain", "n": 10, "accuracy": acc, "mcc": 0.1}},
                "cost": {"train_seconds": 1.0, "eval_seconds": 0.5, "peak_memory_mib": 50.0}, "versions": {}}
''')

from test_grid import SPEC  # noqa: E402  (the same tiny three-option grid as the process-backend tests)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    (tmp_path / "fake_runner2.py").write_text(FAKE_RUNNER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("FEWTUNE_GRID_RUNNER", "fake_runner2:run")
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("FAKE_MARKS", str(marks))
    for var in ("FAKE_CRASH", "FAKE_SLOW", "FAKE_LEAK", "FAKE_SLOW_S"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "tiny.toml").write_text(SPEC)
    return marks


def calls(marks) -> list[tuple[str, int]]:
    path = marks / "calls.txt"
    return [(h, int(p)) for h, p in (line.split() for line in path.read_text().splitlines())] if path.exists() else []


def rows(db) -> dict:
    with Store(db, readonly=True) as store:
        return {r["config_hash"]: r for r in store.rows()}


# --- warm workers: replaced, never losing a cell
def test_a_warm_worker_that_hangs_is_replaced_and_its_cell_recorded(fake, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_SLOW", "pbft")
    db = tmp_path / "r.db"
    code = main(["grid", str(tmp_path / "tiny.toml"), "--db", str(db), "--quiet", "--backend", "warm",
                 "--cell-timeout", "3s", "--max-retries", "0"])
    out = capsys.readouterr().out
    assert code == 1 and "4 succeeded now, 2 failed" in out
    r = rows(db)
    hung = [x for x in r.values() if x["method"] == "pbft"]
    assert len(hung) == 2 and all(x["status"] == "failed" and "hung: no result after 3 s" in x["error"] for x in hung)
    assert {x["status"] for x in r.values() if x["method"] != "pbft"} == {"success"}
    # every hung cell killed its worker: the cells after it ran in a new one
    assert len({pid for _, pid in calls(fake)}) == 3


def test_a_warm_worker_that_grows_in_memory_is_replaced(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_LEAK", "icl,pbft,lora")
    grid = load_grid(str(tmp_path / "tiny.toml"))
    backend = WarmBackend(WorkerPlan(1, 1, (None,)))
    with Store(tmp_path / "r.db") as store:
        s = run_grid(grid, store, tmp_path / "logs", backend=backend, progress=False, echo=lambda _: None)
    assert (s.success, s.failed) == (6, 0)
    pids = [pid for _, pid in calls(fake)]
    # 500 MiB more after each cell: grown after each of 3 cells by the fourth, so the worker is replaced after it
    assert len(set(pids)) == 2 and pids[:4] == [pids[0]] * 4 and pids[4] != pids[0]


def test_a_crashing_warm_worker_is_retried_once_then_recorded(fake, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_CRASH", "lora")
    db = tmp_path / "r.db"
    assert main(["grid", str(tmp_path / "tiny.toml"), "--db", str(db), "--quiet", "--backend", "warm"]) == 1
    r = rows(db)
    crashed = [x for x in r.values() if x["method"] == "lora"]
    assert all(x["status"] == "failed" and x["attempts"] == 2 and
               x["error"].startswith("Warm worker died on each of 2 tries") for x in crashed)
    assert sum(x["status"] == "success" for x in r.values()) == 4
    assert "retry 1/1" in capsys.readouterr().err


# --- several workers, two grids, signals
def start_grid(tmp_path, db, *extra):
    return subprocess.Popen([sys.executable, "-m", "fewtune.cli", "grid", str(tmp_path / "tiny.toml"), "--db", str(db),
                             "--quiet", *extra], env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.parametrize("backend", [["--backend", "process"], ["--backend", "warm"]], ids=["process", "warm"])
def test_two_grids_on_one_database_run_every_cell_once(fake, tmp_path, monkeypatch, backend):
    monkeypatch.setenv("FAKE_SLOW", "icl,pbft,lora")
    monkeypatch.setenv("FAKE_SLOW_S", "0.5")
    db = tmp_path / "r.db"
    with Store(db):
        pass  # created before both start
    grids = [start_grid(tmp_path, db, *backend), start_grid(tmp_path, db, *backend)]
    outs = [g.communicate(timeout=180) for g in grids]
    assert all(g.returncode == 0 for g in grids), outs
    done = calls(fake)
    assert len(done) == 6 and len({h for h, _ in done}) == 6  # no cell ran twice
    assert {x["status"] for x in rows(db).values()} == {"success"} and len(rows(db)) == 6


@pytest.mark.parametrize("backend", [["--backend", "process", "--workers", "2"], ["--backend", "warm", "--workers", "2"]],
                         ids=["process2", "warm2"])
def test_sigterm_cancels_every_cell_in_flight_on_several_workers(fake, tmp_path, monkeypatch, backend):
    monkeypatch.setenv("FAKE_SLOW", "icl,pbft,lora")
    db = tmp_path / "r.db"
    grid = start_grid(tmp_path, db, *backend)
    deadline = time.monotonic() + 60
    while len(calls(fake)) < 2:
        assert time.monotonic() < deadline and grid.poll() is None, "two cells did not start"
        time.sleep(0.1)
    pids = {pid for _, pid in calls(fake)}
    assert len(pids) == 2  # two cells at once, in two processes
    grid.send_signal(signal.SIGTERM)
    out, err = grid.communicate(timeout=60)
    assert grid.returncode == 143, err
    r = rows(db)
    assert sum(x["status"] == "cancelled" and "SIGTERM" in x["error"] for x in r.values()) == 2
    assert "running" not in {x["status"] for x in r.values()}
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, "a worker outlived the grid's SIGTERM"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    import psutil
    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


# --- the worker plan and bad input
def test_worker_plan_splits_cores_and_never_oversubscribes():
    gib = 2**30
    assert plan_workers(None, 2, 20 * gib, gib) == WorkerPlan(1, None, (None,))
    assert plan_workers(2, 2, 20 * gib, gib) == WorkerPlan(2, 1, (None, None))
    assert plan_workers(2, 16, 20 * gib, gib).threads == 8
    for bad, message in [(0, "must be ≥ 1"), (-3, "must be ≥ 1"), (3, "2 usable CPU core"), (2, "memory")]:
        with pytest.raises(FewtuneError, match=message):
            plan_workers(bad, 2, (1 if message == "memory" else 20) * gib, gib)


def test_worker_plan_on_gpus_from_free_memory():
    gib = 2**30
    gpus = [GpuInfo(0, 10 * gib, 80 * gib), GpuInfo(1, 3 * gib, 80 * gib)]
    plan = plan_workers(None, 16, 100 * gib, 2 * gib, gpus)  # 5 fit on GPU 0 (4 by default), 1 on GPU 1
    assert plan.workers == 5 and sorted(plan.devices) == [0, 0, 0, 0, 1] and plan.threads == 3
    assert plan_workers(2, 16, 100 * gib, 2 * gib, gpus).devices == (0, 1)  # spread over the devices
    assert plan_workers(6, 16, 100 * gib, 2 * gib, gpus).workers == 6
    with pytest.raises(FewtuneError, match="hold at most 6 workers"):
        plan_workers(7, 16, 100 * gib, 2 * gib, gpus)
    with pytest.raises(FewtuneError, match="No GPU has"):
        plan_workers(None, 16, 100 * gib, 20 * gib, gpus)


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "--workers must be ≥ 1, got 0"),
    (["--workers", "-2"], "--workers must be ≥ 1, got -2"),
    (["--workers", "999"], "--workers 999: this machine has"),
    (["--backend", "ray", "--workers", "2"], "does not go with --backend ray"),
    (["--backend", "ray-warm", "--workers", "2"], "does not go with --backend ray-warm"),
    (["--backend", "ray", "--cell-timeout", "5m"], "--cell-timeout applies to the process, warm and ray-warm backends"),
    (["--in-process", "--backend", "warm"], "does not go with --backend warm"),
    (["--cell-timeout", "soon"], "--cell-timeout 'soon' is not a duration"),
    (["--probe"], "--probe goes with --dry-run"),
])
def test_bad_workers_and_flags_are_one_line(fake, tmp_path, capsys, argv, message):
    assert main(["grid", str(tmp_path / "tiny.toml"), "--db", str(tmp_path / "r.db"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fewtune: error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "r.db").exists()


def test_a_spec_naming_an_unresolvable_model_is_refused_before_any_cell(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FEWTUNE_GRID_RUNNER", raising=False)
    for model, message in [("no-such-model", "Unknown model 'no-such-model'"),
                           (str(tmp_path / "missing-folder" / "x"), "Unknown model")]:
        spec = tmp_path / "g.toml"
        spec.write_text(SPEC.replace('"fake-model"', f'"{model}"'))
        assert main(["grid", str(spec), "--db", str(tmp_path / "r.db")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fewtune: error: ") and "\n" not in err and f"model '{model}' cannot be used" in err, err
        assert message in err
        assert not (tmp_path / "r.db").exists()


def test_a_worker_that_cannot_load_the_model_fails_its_cells_and_the_grid_goes_on(tmp_path, toy, tiny_model_dir,
                                                                                  monkeypatch, capsys):
    """A model folder that resolves (config.json) but cannot be loaded: its cells fail with the loader's message,
    the next model's cells run."""
    monkeypatch.delenv("FEWTUNE_GRID_RUNNER", raising=False)
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    spec = tmp_path / "two.toml"
    spec.write_text(textwrap.dedent(f'''
        models = ["{broken}", "{tiny_model_dir}"]
        tasks = ["{toy.task_file}"]
        data_root = "{toy.root}"
        shots = [0]
        eval_limit = 4
        dtype = "fp32"
        device = "cpu"
        retention = "off"
        [[methods]]
        method = "icl"
    '''))
    db = tmp_path / "r.db"
    assert main(["grid", str(spec), "--db", str(db), "--quiet", "--backend", "warm"]) == 1
    r = list(rows(db).values())
    assert len(r) == 2
    bad = next(x for x in r if x["model"] == str(broken))
    assert bad["status"] == "failed" and "Could not load the tokenizer" in bad["error"] or "Could not load" in bad["error"]
    assert next(x for x in r if x["model"] == str(tiny_model_dir))["status"] == "success"


def test_dry_run_estimates_from_stored_timings_of_similar_cells(fake, tmp_path, capsys):
    """Seed 0 ran (its results say how long each took); --dry-run of seeds 0-2 estimates seeds 1-2 from them."""
    grid = load_grid(str(tmp_path / "tiny.toml"))

    def timed(cfg, progress=False):
        return {"config": cfg.to_dict(), "evals": {}, "versions": {}, "wall_seconds": 100.0,
                "cost": {"load_seconds": 10.0}}
    from fewtune.grid.grid_spec import Grid
    with Store(tmp_path / "r.db") as store:
        run_grid(Grid("tiny", "t", cells=[c for c in grid.cells if c.config.seed == 0]), store, tmp_path / "logs",
                 runner=timed, progress=False, echo=lambda _: None)
    spec = tmp_path / "three.toml"
    spec.write_text(SPEC.replace("seeds = [0, 1]", "seeds = [0, 1, 2]"))
    assert main(["grid", str(spec), "--db", str(tmp_path / "r.db"), "--dry-run", "--workers", "2"]) == 0
    out = capsys.readouterr()
    assert len(out.out.strip().splitlines()) == 10  # 9 cells + the summary line: the estimate is on stderr
    err = out.err
    assert "6 cells to run; 6 timed from similar stored runs" in err
    # 6 cells x 90 s of work: a fresh process adds 4 s of imports + 10 s of loading to each; warm, once per worker
    assert "1 worker: process ~10 min, warm ~9 min" in err and "2 workers: process ~5 min" in err
