"""--dry-run's estimate and worker plan: the probe's extrapolation (fake records), the memory per worker from peaks
measured on a GPU (fake rows, fake GpuInfo: no GPU needed), and `--dry-run --probe` end to end on the tiny model:
one real cell per kind not yet timed, the database left as it was, a probe that fails is one line."""

from __future__ import annotations

import hashlib
import textwrap

import pytest
from test_grid import SPEC  # noqa: E402  (the tiny three-option grid: icl, pbft, lora on "fake-model", cola)

from fewtune.cli import main
from fewtune.grid import backends, probe
from fewtune.grid.backends import CUDA_CONTEXT_BYTES, GpuInfo, plan_workers
from fewtune.grid.driver import run_grid
from fewtune.grid.estimate import Probe, estimate_grid, eval_examples, worker_need
from fewtune.grid.grid_spec import Grid, load_grid
from fewtune.store import Store

MIB, GIB = 2**20, 2**30


@pytest.fixture
def tiny_grid(tmp_path):
    (tmp_path / "tiny.toml").write_text(SPEC)
    return load_grid(str(tmp_path / "tiny.toml"))


def probe_record(**cost) -> dict:
    """A probe's result record as the runner writes it: 64 examples scored per split, of 1,000 and 30,000; its wall
    time 0.8 s more than load, training and scoring."""
    cost = {"load_seconds": 2.0, "train_seconds": 10.0, "eval_seconds": 3.2, "peak_memory_mib": 900.0, **cost}
    return {"wall_seconds": cost["load_seconds"] + cost["train_seconds"] + cost["eval_seconds"] + 0.8, "device": "cpu",
            "cost": cost, "evals": {"dev": {"n": 64, "population": 1000}, "hans": {"n": 64, "population": 30000}}}


def test_a_probe_extrapolates_scoring_to_each_cells_own_evaluation_examples(tiny_grid):
    p = Probe.from_result(probe_record(), seconds=20.0)
    assert p.seconds_per_example == pytest.approx(3.2 / 128) and p.examples == 128
    assert p.fixed_seconds == pytest.approx(0.8)   # retention, prefix fitting, the record: as measured
    cfg = tiny_grid.cells[0].config                                     # eval_limit = 10 per split
    assert eval_examples(cfg, p.population) == 20
    assert p.work_seconds(cfg) == pytest.approx(0.8 + 10.0 + 0.025 * 20)
    import dataclasses
    assert eval_examples(dataclasses.replace(cfg, eval_limit=None), p.population) == 31000
    assert p.work_seconds(dataclasses.replace(cfg, eval_limit=None)) == pytest.approx(0.8 + 10.0 + 0.025 * 31000)
    assert eval_examples(dataclasses.replace(cfg, eval_limit=500, eval_splits=["hans"]), p.population) == 500


def test_probed_kinds_count_like_stored_timings(tiny_grid):
    """icl and pbft probed (pbft's training 100 s), lora not: 2 + 2 cells from probes, 2 at the default."""
    probes = {(m, m, "fake-model", "cola"): Probe.from_result(probe_record(train_seconds=t, eval_seconds=0.0))
              for m, t in (("icl", 0.0), ("pbft", 100.0))}
    lines = estimate_grid(tiny_grid.cells, [], "process", None, probes)
    assert "6 cells to run; 0 timed from similar stored runs" in lines[0]
    assert "4 from a probe of their kind, 2 at the default 60 s each" in lines[0]
    # work: icl 2 x 0.8 s, pbft 2 x 100.8 s, lora 2 x 60 s = 323.2 s; a fresh process adds 4 s + the 2 s load to each
    # of the 6 cells (the default cells take the probed kinds' mean load): 359.2 s
    assert "1 worker: process ~6 min" in lines[1]
    assert estimate_grid(tiny_grid.cells, [], "process", None, {})[0].endswith("6 at the default 60 s each")


def gpu_row(method: str, peak: float, device: str = "cuda:0", model: str = "fake-model") -> dict:
    return {"status": "success", "model": model, "method": method, "task": "cola",
            "result": {"device": device, "wall_seconds": 10.0, "cost": {"peak_memory_mib": peak, "load_seconds": 1.0}}}


def test_worker_need_is_the_largest_peak_measured_on_a_gpu(tiny_grid):
    rows = [gpu_row("icl", 700.0), gpu_row("pbft", 1000.0), gpu_row("lora", 800.0), gpu_row("lora", 900.0, "cuda:1"),
            gpu_row("pbft", 5000.0, device="cpu"),               # RSS on a CPU: not GPU memory
            gpu_row("pbft", 9000.0, model="other-model")]         # not a model of this grid
    need = worker_need(tiny_grid.cells, rows)
    assert need.bytes == int(1000 * MIB * 1.2) + CUDA_CONTEXT_BYTES
    assert "largest measured peak (1000 MiB" in need.says and "of 4 similar runs on a GPU" in need.says
    # 10 GiB free holds 5 workers of 1.67 GiB (4 by default), 3 GiB one: never more than the measured need allows
    gpus = [GpuInfo(0, 10 * GIB, 80 * GIB), GpuInfo(1, 3 * GIB, 80 * GIB)]
    plan = plan_workers(None, 16, 100 * GIB, need.bytes, gpus)
    assert plan.workers == 5 and sorted(plan.devices) == [0, 0, 0, 0, 1]
    with pytest.raises(Exception, match="hold at most 6 workers"):
        plan_workers(7, 16, 100 * GIB, need.bytes, gpus)
    # lora never ran on a GPU: the need is at least 6x the weights (1 GiB at least for an unresolvable model), said so
    partial = worker_need(tiny_grid.cells, rows[:2])
    assert partial.bytes == max(int(1000 * MIB * 1.2) + CUDA_CONTEXT_BYTES, GIB)
    assert "not measured on a GPU: lora on fake-model" in partial.says
    # nothing measured on a GPU (a CPU run's RSS does not count), and on CPU: 6x the weights
    for need in (worker_need(tiny_grid.cells, [gpu_row("pbft", 5000.0, device="cpu")]),
                 worker_need(tiny_grid.cells, rows, on_gpu=False)):
        assert need.bytes == GIB and "6x the largest model's weights" in need.says
    # a probe on the GPU is a measurement like a stored run
    probes = {(m, m, "fake-model", "cola"): Probe.from_result({**probe_record(peak_memory_mib=2000.0), "device": "cuda:0"})
              for m in ("icl", "pbft", "lora")}
    assert "largest measured peak (2000 MiB" in worker_need(tiny_grid.cells, [], probes).says


def test_the_grid_plans_gpu_workers_from_stored_peaks(tmp_path, monkeypatch, capsys, tiny_grid):
    """Fake GPUs, stored runs that peaked at 1,000 MiB on cuda: the dry run's plan and the grid's say which figure
    they used."""
    monkeypatch.setenv("FEWTUNE_GRID_RUNNER", "unused:run")  # "fake-model" is a plug-in's name: not checked

    def on_gpu(cfg, progress=False):
        return {"config": cfg.to_dict(), "evals": {}, "versions": {}, "wall_seconds": 30.0, "device": "cuda:0",
                "cost": {"load_seconds": 5.0, "peak_memory_mib": 1000.0 if cfg.method == "pbft" else 600.0}}
    with Store(tmp_path / "r.db") as store:
        run_grid(Grid("tiny", "t", cells=[c for c in tiny_grid.cells if c.config.seed == 0]), store, tmp_path / "logs",
                 runner=on_gpu, progress=False, echo=lambda _: None)
    monkeypatch.setattr(backends, "visible_gpus", lambda use_gpu: [GpuInfo(0, 10 * GIB, 80 * GIB)] if use_gpu else [])
    assert main(["grid", str(tmp_path / "tiny.toml"), "--db", str(tmp_path / "r.db"), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "worker plan: 4 worker(s) on GPU 0,0,0,0; per worker: 1.7 GiB, the largest measured peak (1000 MiB" in err
    assert "of 3 similar runs on a GPU" in err
    # the real grid plans from the same figure and says so (every cell done here: nothing runs)
    with Store(tmp_path / "r.db") as store:
        run_grid(Grid("tiny", "t", cells=[c for c in tiny_grid.cells if c.config.seed == 1]), store, tmp_path / "logs",
                 runner=on_gpu, progress=False, echo=lambda _: None)
    assert main(["grid", str(tmp_path / "tiny.toml"), "--db", str(tmp_path / "r.db"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "4 process workers" in err and "per worker on a GPU: 1.7 GiB, the largest measured peak" in err, err
    assert "of 6 similar runs on a GPU" in err


def db_state(db) -> tuple:
    """The database file's bytes and what its write-ahead log holds (a read-only SQLite connection leaves an empty
    -wal and a -shm behind: nothing written)."""
    wal = db.with_name(db.name + "-wal")
    return hashlib.sha256(db.read_bytes()).hexdigest(), wal.stat().st_size if wal.exists() else 0


def test_dry_run_probe_times_untimed_kinds_on_the_real_runner(tmp_path, toy, tiny_model_dir, monkeypatch, capsys):
    """icl has stored timings on both models; pbft has none: one real pbft cell is probed on the tiny model (4 examples
    per split, extrapolated to the cells' 16 + 16) and one on a model that cannot load (one line, the default).
    The database is not written."""
    monkeypatch.delenv("FEWTUNE_GRID_RUNNER", raising=False)
    monkeypatch.setattr(probe, "PROBE_EVAL_LIMIT", 4)
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    spec = tmp_path / "probe.toml"
    spec.write_text(textwrap.dedent(f'''
        models = ["{broken}", "{tiny_model_dir}"]
        tasks = ["{toy.task_file}"]
        data_root = "{toy.root}"
        shots = [4]
        seeds = [0, 1]
        eval_limit = 16
        epochs = 2
        batch_size = 4
        max_length = 64
        dtype = "fp32"
        device = "cpu"
        retention = "off"
        [[methods]]
        method = "icl"
        [[methods]]
        method = "pbft"
    '''))
    grid = load_grid(str(spec))

    def timed(cfg, progress=False):
        return {"config": cfg.to_dict(), "evals": {}, "versions": {}, "wall_seconds": 7.0, "device": "cpu",
                "cost": {"load_seconds": 1.0}}
    db = tmp_path / "db" / "r.db"
    db.parent.mkdir()
    with Store(db) as store:
        run_grid(Grid("probe", "t", cells=[c for c in grid.cells if c.config.method == "icl" and c.config.seed == 0]),
                 store, tmp_path / "logs", runner=timed, progress=False, echo=lambda _: None)
    before = db_state(db)
    assert main(["grid", str(spec), "--db", str(db), "--dry-run", "--probe"]) == 0
    assert db_state(db) == before and before[1] == 0
    out = capsys.readouterr()
    assert len(out.out.strip().splitlines()) == 9  # 8 cells and the summary: the probe's lines are on stderr
    err = out.err
    assert "probe: 2 kind(s) of cell (option, model, task) with no stored timing" in err
    lines = [line for line in err.splitlines() if line.startswith("probe ")]
    assert len(lines) == 2, err
    bad, good = sorted(lines, key=lambda line: str(tiny_model_dir) in line)
    assert str(broken) in bad and ": failed (" in bad and "estimated at the default 60 s a cell" in bad
    assert "pbft toy" in good and "(8 scored; peak" in good and "this cell's 32 evaluation examples" in good, good
    assert "probe: 1 of 2 kind(s) measured in" in err and "extrapolated from 8 examples per probe" in err
    assert "6 cells to run; 2 timed from similar stored runs" in err
    assert "2 from a probe of their kind, 2 at the default 60 s each" in err
