"""The grid as a protocol (grid/protocol.py): what crosses the boundary between the driver and a worker, and nothing
lost on the way. Each test here failed on the code before the protocol (a78b24f): a result deleted before the
database had it, rows left 'running', a worker reused after a CUDA error, a re-claimed cell missing from the
summary, a hanging probe, a leaked pipe and an orphaned worker, a result recorded under another identity.
Cells run a fake runner (no model) named in their requests."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import textwrap
import time

import pytest

from fewtune.errors import FewtuneError
from fewtune.grid.backends import Job, ProcessBackend, WarmBackend, WorkerPlan, _Worker
from fewtune.grid.driver import Driver, run_grid
from fewtune.grid.grid_spec import load_grid
from fewtune.grid.protocol import CellOutcome, CellRequest, leaves_device_unusable
from fewtune.store import Store

FAKE = textwrap.dedent('''
    """A stand-in for fewtune.runner.run: FAKE_* variables say what to do to which method."""
    import os, time
    from pathlib import Path

    def run(cfg, progress=False):
        marks = os.environ["FAKE_MARKS"]
        with open(Path(marks, "calls.txt"), "a") as f:
            f.write(f"{cfg.hash()} {os.getpid()} {cfg.method}\\n")
        if cfg.method in os.environ.get("FAKE_CUDA", "").split(","):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if cfg.method in os.environ.get("FAKE_SLOW", "").split(","):
            time.sleep(120)
        return {"config": cfg.to_dict(), "config_hash": cfg.hash(),
                "evals": {"dev": {"role": "in_domain", "n": 10, "accuracy": 0.5, "mcc": 0.0}},
                "cost": {"train_seconds": 1.0, "eval_seconds": 0.5, "peak_memory_mib": 50.0}, "versions": {}}
''')

SPEC = textwrap.dedent('''
    name = "proto"
    models = ["fake-model"]
    tasks = ["cola"]
    shots = [16]
    seeds = [0]
    [[methods]]
    method = "icl"
    [[methods]]
    method = "pbft"
    [[methods]]
    method = "lora"
''')


@pytest.fixture
def fake(tmp_path, monkeypatch):
    (tmp_path / "proto_runner.py").write_text(FAKE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.syspath_prepend(str(tmp_path))
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("FAKE_MARKS", str(marks))
    for var in ("FAKE_CUDA", "FAKE_SLOW"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "proto.toml").write_text(SPEC)
    return marks


def calls(marks) -> list[tuple[str, int, str]]:
    path = marks / "calls.txt"
    return [(h, int(p), m) for h, p, m in (line.split() for line in path.read_text().splitlines())] if path.exists() else []


def statuses(db) -> dict:
    with Store(db, readonly=True) as store:
        return store.statuses()


RUNNER = "proto_runner:run"


def test_messages_round_trip_as_json():
    req = CellRequest(config={"method": "icl"}, key="ab" * 8, log_path="/x.log", runner=RUNNER, workers=None)
    assert CellRequest.from_json(req.to_json()) == req
    out = CellOutcome("failed", error="RuntimeError: CUDA error: device-side assert triggered", replace_worker=True)
    assert CellOutcome.from_json(out.to_json()) == out
    with pytest.raises(ValueError, match="status"):
        CellOutcome("ok")
    assert leaves_device_unusable(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not leaves_device_unusable(ValueError("lr must be > 0"))


def test_a_result_the_database_cannot_take_is_kept_and_recorded_by_the_next_grid(fake, tmp_path, monkeypatch):
    """Store.finish raising (a database locked past its timeout) stops the grid with one line naming the kept file;
    the row in flight beside it is cancelled, not left 'running'; the next grid records the kept result without
    running its cell again."""
    grid = load_grid(str(tmp_path / "proto.toml"))
    db, logs = tmp_path / "r.db", tmp_path / "logs"
    real_finish = Store.finish
    failing = {"n": 0}

    def finish(self, key, result, owner):
        if failing["n"] == 0:
            failing["n"] += 1
            raise sqlite3.OperationalError("database is locked")
        return real_finish(self, key, result, owner)
    monkeypatch.setattr(Store, "finish", finish)
    monkeypatch.setenv("FAKE_SLOW", "pbft")  # in flight when the first result cannot be recorded
    with Store(db) as store, pytest.raises(FewtuneError) as err:
        run_grid(grid, store, logs, backend=ProcessBackend(WorkerPlan(2, 1, (None, None)), runner=RUNNER),
                 progress=False, echo=lambda _: None)
    message = str(err.value)
    assert "\n" not in message and "could not record" in message and "database is locked" in message
    kept = [p for p in logs.glob("*.outcome.json")]
    assert len(kept) == 1 and str(kept[0]) in message
    first = kept[0].name.split(".")[0]
    assert "running" not in statuses(db).values()  # the pbft cell in flight was cancelled
    monkeypatch.setenv("FAKE_SLOW", "")
    with Store(db) as store:
        s = run_grid(grid, store, logs, backend=ProcessBackend(runner=RUNNER), progress=False, echo=lambda _: None)
    assert (s.success, s.failed) == (3, 0) and set(statuses(db).values()) == {"success"}
    assert [h for h, _, _ in calls(fake)].count(first) == 1  # recorded from the kept file, not run again
    assert not list(logs.glob("*.outcome.json"))


@pytest.mark.parametrize("backend", ["warm", "process"])
def test_a_worker_whose_cell_broke_its_device_runs_no_other_cell(fake, tmp_path, monkeypatch, backend):
    """A CUDA error fails its cell, and the warm worker that ran it is replaced before the next cell (its CUDA
    context may be unusable); the fresh-process backend starts a new process per cell anyway."""
    monkeypatch.setenv("FAKE_CUDA", "icl")
    grid = load_grid(str(tmp_path / "proto.toml"))
    made = (WarmBackend(WorkerPlan(1, 1, (None,)), runner=RUNNER) if backend == "warm"
            else ProcessBackend(runner=RUNNER))
    with Store(tmp_path / "r.db") as store:
        s = run_grid(grid, store, tmp_path / "logs", backend=made, progress=False, echo=lambda _: None)
    assert (s.success, s.failed) == (2, 1) and "CUDA error" in s.failures[0][1]
    pids = [pid for _, pid, _ in calls(fake)]
    assert pids[0] not in pids[1:]  # the cell after the CUDA error ran in another process


class _DiesOnce:
    """A backend whose cell's worker dies, while another grid takes the cell over (--reclaim)."""
    name, worker_noun, default_retries, synchronous = "stub", "stub worker", 1, False

    def __init__(self, store):
        self.store, self.jobs = store, []

    def open(self):
        pass

    def capacity(self):
        return 1

    def start(self, job):
        self.jobs.append(job)

    def poll(self, timeout):
        if not self.jobs:
            return []
        job = self.jobs.pop()
        other = {"host": "another-host", "pid": 1, "started": 0.0}
        assert self.store.claim(job.cell.config, job.cell.label, "other", str(job.log_path), other, True,
                                key=job.key, task_name="cola") == "claimed"
        return [(job, CellOutcome("died", error="stub worker killed"))]

    def cancel(self, job):
        pass

    def close(self):
        pass


def test_a_cell_taken_over_while_its_worker_died_is_counted_not_lost(fake, tmp_path):
    grid = load_grid(str(tmp_path / "proto.toml"))
    lines = []
    with Store(tmp_path / "r.db") as store:
        with Driver(_DiesOnce(store), store, tmp_path / "logs", "proto", echo=lines.append) as d:
            s = d.run(grid.cells[:1])
    assert s.lost == 1 and s.success == s.failed == 0
    assert any(line.startswith("NOT RECORDED") for line in lines)


def test_a_hanging_probe_is_stopped_by_the_cell_timeout(fake, tmp_path, monkeypatch, capsys):
    from fewtune.grid.probe import run_probes
    monkeypatch.setenv("FAKE_SLOW", "icl")
    monkeypatch.setenv("FEWTUNE_GRID_RUNNER", RUNNER)  # the plug-in hook, read once by the driver side
    grid = load_grid(str(tmp_path / "proto.toml"))
    probes = run_probes([c for c in grid.cells if c.config.method == "icl"], [], cell_timeout_s=2)
    assert probes == {} and "hung: no result after 2 s" in capsys.readouterr().err


def _sleep_forever():
    time.sleep(600)


def test_a_warm_worker_without_an_exit_code_is_killed_not_orphaned(fake, tmp_path):
    """Its pipe closed while the process still runs: the cell 'died' and the process is killed (not left running)."""
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_sleep_forever, daemon=True)
    proc.start()
    parent, child = ctx.Pipe()
    child.close()  # the worker's end is gone: the driver reads EOF while the process lives
    backend = WarmBackend(WorkerPlan(1, 1, (None,)))
    job = Job(load_grid(str(tmp_path / "proto.toml")).cells[0], tmp_path / "cell.log")
    backend.slots[0] = _Worker(0, job=job, t0=time.monotonic(), process=proc, conn=parent)
    try:
        out = backend.poll(5)
        assert [o.status for _, o in out] == ["died"]
        assert not proc.is_alive() and backend.slots[0] is None
    finally:
        if proc.is_alive():
            proc.kill()


def test_a_dead_warm_worker_is_replaced_with_its_pipe_closed(fake, tmp_path):
    grid = load_grid(str(tmp_path / "proto.toml"))
    backend = WarmBackend(WorkerPlan(1, 1, (None,)), runner=RUNNER)
    try:
        w = backend._spawn(0)
        old_conn = w.conn
        w.process.kill()
        w.process.join(10)
        backend.start(Job(grid.cells[0], tmp_path / "cell.log"))
        assert old_conn.closed and backend.slots[0].conn is not old_conn
    finally:
        backend.close()


def test_a_result_of_other_inputs_than_the_claimed_cell_is_refused(fake, tmp_path, toy):
    """The task file edited between the claim and the run: the run's identity is not the row's key, so the result
    is recorded failed with why, not stored under a key it does not belong to."""
    from fewtune.grid.backends import InlineBackend
    task = tmp_path / "toy.toml"
    task.write_text(toy.task_file.read_text())
    (tmp_path / "edit.toml").write_text(SPEC.replace('tasks = ["cola"]', f'tasks = ["{task}"]')
                                        .replace('models = ["fake-model"]', 'models = ["fake-model"]\n'
                                                 f'data_root = "{toy.root}"'))
    grid = load_grid(str(tmp_path / "edit.toml"))

    def runner(cfg, progress=False):
        task.write_text(task.read_text().replace("description =", "description = 'edited' #", 1))
        return {"config": cfg.to_dict(), "config_hash": cfg.hash(), "evals": {}, "cost": {}}
    with Store(tmp_path / "r.db") as store:
        s = run_grid(grid, store, tmp_path / "logs", backend=InlineBackend(runner), progress=False,
                     echo=lambda _: None)
        rows = store.rows()
    assert s.success == 0 and s.failed == 3
    assert all(r["status"] == "failed" and "inputs changed after the grid claimed it" in r["error"] for r in rows)


def test_a_worker_sets_its_environment_before_torch_is_imported():
    """A warm worker's spawn target lives in a module whose imports do not load torch: CUDA_VISIBLE_DEVICES is set
    before the first CUDA call can see every device."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", "import sys; import fewtune.grid.cell_process, fewtune.grid.protocol; "
                           "print('torch' in sys.modules)"], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]


class _TwoAtOnce(_DiesOnce):
    """A backend whose two cells come back in one poll (two warm workers finishing together)."""
    def capacity(self):
        return 2

    def poll(self, timeout):
        if len(self.jobs) < 2:
            return []
        done, self.jobs = self.jobs, []
        return [(job, CellOutcome("success", result={"config_hash": job.key, "evals": {}, "cost": {}}))
                for job in done]


def test_results_received_with_one_the_database_refused_are_kept_too(fake, tmp_path, monkeypatch):
    grid = load_grid(str(tmp_path / "proto.toml"))

    def finish(self, key, result, owner):
        raise sqlite3.OperationalError("disk I/O error")
    with Store(tmp_path / "r.db") as store:
        monkeypatch.setattr(Store, "finish", finish)
        with pytest.raises(FewtuneError, match="disk I/O error"):
            with Driver(_TwoAtOnce(store), store, tmp_path / "logs", "proto", echo=lambda _: None) as d:
                d.run(grid.cells[:2])
    assert sorted(p.name.split(".")[0] for p in (tmp_path / "logs").glob("*.outcome.json")) == \
        sorted(c.key for c in grid.cells[:2])
