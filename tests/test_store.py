"""The results database: life cycle of a run, stale claims, several writers, foreign files left untouched."""

import hashlib
import json
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from fewtune.cli import main
from fewtune.config import RunConfig
from fewtune.errors import FewtuneError
from fewtune.store import SCHEMA_VERSION, Store, owner_alive, this_process


def cfg(**kw):
    return RunConfig(**{"task": "cola", "method": "pbft", "shots": 4, "seed": 0, **kw})


def result_for(c: RunConfig, acc: float = 0.75) -> dict:
    return {"schema": 1, "config": c.to_dict(), "config_hash": c.hash(),
            "evals": {"in_domain_dev": {"role": "in_domain", "n": 8, "accuracy": acc, "mcc": 0.5},
                      "out_of_domain_dev": {"role": "out_of_domain", "n": 8, "accuracy": acc - 0.1, "mcc": 0.4}},
            "cost": {"train_seconds": 1.5, "eval_seconds": 0.5, "peak_memory_mib": 100.0, "trainable_params": 10},
            "versions": {"fewtune": "0.1.0"}}


def dead_owner() -> dict:
    """The identity of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    import psutil
    started = psutil.Process(proc.pid).create_time()
    proc.wait()
    return {"host": this_process()["host"], "pid": proc.pid, "started": round(started, 2)}


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_new_database_has_schema_version_and_wal(tmp_path):
    path = tmp_path / "sub" / "r.db"
    with Store(path) as s:
        assert s.meta()["schema_version"] == str(SCHEMA_VERSION)
        assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s.rows() == []
    assert path.exists()


def test_claim_finish_and_skip(tmp_path):
    c = cfg()
    with Store(tmp_path / "r.db") as s:
        assert s.claim(c, label="pbft", grid="g") == "claimed"
        row = s.get(c.hash())
        assert row["status"] == "running" and row["attempts"] == 1 and row["owner"] == this_process()
        assert s.finish(c.hash(), result_for(c))
        row = s.get(c.hash())
        assert row["status"] == "success"
        assert row["metrics"]["in_domain_dev"]["accuracy"] == 0.75
        assert row["cost"]["train_seconds"] == 1.5
        assert row["versions"] == {"fewtune": "0.1.0"}
        assert row["result"]["config_hash"] == c.hash()
        assert row["config"] == c.to_dict() and row["task"] == "cola" and row["shots"] == 4
        assert s.claim(c) == "done"
        assert len(s.rows()) == 1


def test_failed_and_cancelled_runs_are_claimed_again_in_the_same_row(tmp_path):
    a, b = cfg(seed=1), cfg(seed=2)
    with Store(tmp_path / "r.db") as s:
        s.claim(a)
        s.fail(a.hash(), "RuntimeError: boom\n  second line")
        s.claim(b)
        s.cancel(b.hash())
        assert s.get(a.hash())["error"] == "RuntimeError: boom second line"  # one line
        assert s.get(b.hash())["status"] == "cancelled"
        assert s.claim(a) == "claimed" and s.claim(b) == "claimed"
        assert s.get(a.hash())["attempts"] == 2 and s.get(a.hash())["error"] is None
        assert len(s.rows()) == 2


def test_stale_running_row_is_reclaimed_live_one_is_busy(tmp_path):
    c = cfg()
    dead = dead_owner()
    assert not owner_alive(dead)
    with Store(tmp_path / "r.db") as s:
        assert s.claim(c, owner=dead) == "claimed"
        assert s.claim(c) == "claimed"  # the dead owner's claim is stale
        assert s.get(c.hash())["attempts"] == 2
        # the dead owner can no longer write its (late) result over the new claim
        assert not s.finish(c.hash(), result_for(c), owner=dead)
        assert s.get(c.hash())["status"] == "running"

        live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            import psutil
            owner = {"host": this_process()["host"], "pid": live.pid,
                     "started": round(psutil.Process(live.pid).create_time(), 2)}
            other = cfg(seed=5)
            assert s.claim(other, owner=owner) == "claimed"
            assert s.claim(other) == "busy"
            assert s.claim(other, reclaim=True) == "claimed"
        finally:
            live.kill()
            live.wait()
        assert len(s.rows()) == 2


@pytest.mark.parametrize("damaged", ["{not json", "[1, 2]", "42"])
def test_damaged_owner_claim_belongs_to_nobody(tmp_path, damaged):
    """A running row whose owner column is damaged is claimed again and the result is written (no traceback, no
    lost result); the claim that replaced it is respected."""
    c = cfg()
    with Store(tmp_path / "r.db") as s:
        assert s.claim(c) == "claimed"
        with s.transaction() as conn:
            conn.execute("UPDATE runs SET owner=? WHERE config_hash=?", (damaged, c.hash()))
        assert s.get(c.hash())["owner"] is None  # read as nobody's, the row not left out
        assert s.finish(c.hash(), result_for(c))  # the run that was running can still record its result
        assert s.get(c.hash())["status"] == "success" and s.get(c.hash())["owner"] == this_process()
        other = cfg(seed=3)
        s.claim(other)
        with s.transaction() as conn:
            conn.execute("UPDATE runs SET owner=? WHERE config_hash=?", (damaged, other.hash()))
        assert s.claim(other) == "claimed" and s.get(other.hash())["owner"] == this_process()
        assert s.get(other.hash())["attempts"] == 2


def test_write_atomic_leaves_no_temporary_file_when_the_rename_fails(tmp_path, monkeypatch):
    from fewtune import store
    target = tmp_path / "out.json"
    target.write_text("old")

    def broken(src, dst):
        raise OSError("rename refused")
    monkeypatch.setattr(store.os, "replace", broken)
    with pytest.raises(OSError, match="rename refused"):
        store.write_atomic(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_another_hosts_claim_counts_as_alive():
    assert owner_alive({"host": "some-other-host", "pid": 1, "started": 0.0})
    assert not owner_alive(None)


def test_several_writer_processes_no_lost_or_duplicate_rows(tmp_path):
    db = tmp_path / "r.db"
    Store(db).close()
    script = textwrap.dedent(f"""
        import sys
        from fewtune.config import RunConfig
        from fewtune.store import Store
        worker = int(sys.argv[1])
        with Store({str(db)!r}) as s:
            for seed in range(30):   # every worker tries every run: each must run exactly once
                c = RunConfig(task="cola", method="icl", shots=2, seed=seed)
                if s.claim(c) == "claimed":
                    s.finish(c.hash(), {{"evals": {{}}, "cost": {{"worker": worker}}}})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    with Store(db) as s:
        rows = s.rows()
    assert len(rows) == 30
    assert len({r["config_hash"] for r in rows}) == 30
    assert all(r["status"] == "success" and r["attempts"] == 1 for r in rows)


def test_not_sqlite_file_is_an_error_and_untouched(tmp_path, capsys):
    path = tmp_path / "results.db"
    path.write_text("these are my notes, not a database\n")
    before = digest(path)
    with pytest.raises(FewtuneError, match="results.db.*not an SQLite file"):
        Store(path)
    for argv in (["results", "--db", str(path)], ["report", "--db", str(path), "--out", str(tmp_path / "rep")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fewtune: error:") and "\n" not in err and str(path) in err
    assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.db"]  # no -wal, -shm, nothing created


def test_corrupt_sqlite_file_is_an_error_and_untouched(tmp_path):
    good = tmp_path / "good.db"
    with Store(good) as s:
        s.claim(cfg())
    s.conn.close()
    data = good.read_bytes()  # closing the last connection checkpoints the WAL into the main file
    bad = tmp_path / "bad.db"
    bad.write_bytes(bytes(data[:100]) + b"\xff" * (max(len(data), 8192) - 100))
    before = digest(bad)
    with pytest.raises(FewtuneError) as e:
        with Store(bad) as s:
            s.rows()
    assert "bad.db" in str(e.value) and "\n" not in str(e.value)
    assert digest(bad) == before


def test_other_schema_version_is_an_error_and_untouched(tmp_path, capsys):
    path = tmp_path / "old.db"
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    before = digest(path)
    with pytest.raises(FewtuneError, match=r"old.db holds fewtune results schema version 99, this fewtune reads versions 1 and 2"):
        Store(path)
    assert main(["results", "--db", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "schema version 99" in err
    assert digest(path) == before


def test_sqlite_database_of_another_program_is_refused(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(FewtuneError, match="not a fewtune results database.*customers"):
        Store(path)


def test_missing_database_for_reading(tmp_path):
    with pytest.raises(FewtuneError, match="No results database"):
        Store(tmp_path / "none.db", readonly=True)
    assert not (tmp_path / "none.db").exists()


def test_db_path_from_environment(tmp_path, monkeypatch, capsys):
    path = tmp_path / "env.db"
    with Store(path) as s:
        c = cfg()
        s.claim(c, label="pbft")
        s.finish(c.hash(), result_for(c))
    monkeypatch.setenv("FEWTUNE_DB", str(path))
    assert main(["results"]) == 0
    out = capsys.readouterr().out
    assert c.hash() in out and "75.00" in out and "(1 runs)" in out


@pytest.fixture
def filled_db(tmp_path):
    path = tmp_path / "r.db"
    with Store(path) as s:
        for seed, acc in ((0, 0.7), (1, 0.8)):
            c = cfg(seed=seed)
            s.claim(c, label="pbft")
            s.finish(c.hash(), result_for(c, acc))
        bad = cfg(seed=2)
        s.claim(bad, label="pbft")
        s.fail(bad.hash(), "FewtuneError: no such model")
    return path


def test_results_formats(filled_db, tmp_path, capsys):
    assert main(["results", "--db", str(filled_db), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in rows] == ["success", "success", "failed"]
    assert rows[0]["metrics"]["in_domain_dev"]["accuracy"] == 0.7

    assert main(["results", "--db", str(filled_db), "--format", "csv", "--status", "failed"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "no such model" in lines[1]

    out = tmp_path / "r.parquet"
    assert main(["results", "--db", str(filled_db), "--format", "parquet", "--output", str(out)]) == 0
    import pandas as pd
    frame = pd.read_parquet(out)
    assert len(frame) == 3
    assert sorted(frame["id_accuracy"].dropna().tolist()) == [0.7, 0.8]

    assert main(["results", "--db", str(filled_db), "--format", "parquet"]) == 2
    assert main(["results", "--db", str(filled_db), "--status", "done"]) == 2
    err = capsys.readouterr().err
    assert "needs --output" in err and "--status done" in err
