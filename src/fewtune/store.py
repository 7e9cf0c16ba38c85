"""The results database: one SQLite file, one row per run, keyed by `RunConfig.hash()`.

Several processes may write at once (two grids on the same file, a grid and a report): WAL mode, a
busy timeout, and every state change in one `BEGIN IMMEDIATE` transaction. A run is *claimed* before
it starts (status `running`, owner = host, pid and process start time); a claim whose owner is dead is
stale and the run is claimed again, so a killed grid leaves no run stuck and none duplicated.

A file that is not SQLite, is corrupt, or carries another schema version is never written: opening it
raises a one-line `FewtuneError` that names the file. Schema: docs/grid.md.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import psutil

from .errors import FewtuneError
from .util import dumps, json_default, now, write_atomic  # noqa: F401  (grid, ray_backend import them from here)

SCHEMA_VERSION = 2
READABLE_VERSIONS = ("1", "2")  # 1: before per-example predictions; opened for writing it is upgraded to 2 in place
STATUSES = ("running", "success", "failed", "cancelled")
SQLITE_HEADER = b"SQLite format 3\x00"
BUSY_TIMEOUT_S = 60.0  # a writer holds the lock for milliseconds; 60 s only matters on a stalled disk

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    config_hash TEXT PRIMARY KEY,
    status      TEXT NOT NULL CHECK (status IN ('running', 'success', 'failed', 'cancelled')),
    label       TEXT,               -- the grid's name for the method entry (e.g. cd-fewshot)
    grid        TEXT,               -- the grid spec that last ran it
    model TEXT, task TEXT, method TEXT, shots INTEGER, seed INTEGER,  -- copied from config, for queries
    config      TEXT NOT NULL,      -- RunConfig.to_dict(), JSON
    metrics     TEXT,               -- result['evals'], JSON
    cost        TEXT,               -- result['cost'], JSON
    versions    TEXT,               -- result['versions'], JSON
    result      TEXT,               -- the full result record, JSON
    error       TEXT,               -- one line, for failed / cancelled runs
    owner       TEXT,               -- JSON {host, pid, started}: the process that claimed the run
    attempts    INTEGER NOT NULL DEFAULT 0,
    log_path    TEXT,
    created_at  TEXT NOT NULL,
    started_at  TEXT,
    finished_at TEXT,
    updated_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_status ON runs (status);
CREATE TABLE IF NOT EXISTS predictions (
    config_hash TEXT NOT NULL,      -- the run (runs.config_hash)
    split       TEXT NOT NULL,      -- the evaluation split
    n           INTEGER NOT NULL,   -- examples
    n_classes   INTEGER NOT NULL,
    data        BLOB NOT NULL,      -- zlib(idx int32[n] | gold int16[n] | pred int16[n] | logprobs float32[n, n_classes]), little-endian
    groups      TEXT,               -- JSON list of each example's groups (HANS heuristic), or NULL
    PRIMARY KEY (config_hash, split)
);
"""
JSON_COLUMNS = ("config", "metrics", "cost", "versions", "result", "owner")


def default_path() -> Path:
    """$FEWTUNE_DB, else results/fewtune.db in the current directory."""
    return Path(os.environ.get("FEWTUNE_DB") or Path("results") / "fewtune.db")


def this_process() -> dict:
    """Identity of the calling process that survives PID reuse: host, pid and its start time."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": round(psutil.Process(pid).create_time(), 2)}


def read_owner(text: str | None) -> dict | None:
    """A row's owner column; None when empty or damaged (not a JSON object): such a claim belongs to nobody."""
    if not text:
        return None
    try:
        owner = json.loads(text)
    except (ValueError, TypeError):
        return None
    return owner if isinstance(owner, dict) else None


def owner_alive(owner: dict | None) -> bool:
    """Whether the process that claimed a run still runs. Another host's process is assumed alive
    (it cannot be checked from here); `fewtune grid --reclaim` takes such runs over."""
    if not owner:
        return False
    if owner.get("host") != socket.gethostname():
        return True
    try:
        return abs(psutil.Process(owner["pid"]).create_time() - owner["started"]) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, TypeError):
        return False


class Store:
    """The results database at `path`. `readonly=True` never creates or changes the file."""

    def __init__(self, path: str | os.PathLike, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self.conn = None
        self._check_file()
        try:
            if readonly:
                self.conn = self._connect_readonly()
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            self._check_schema()
            if not readonly:
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=NORMAL")
                self._create()
        except BaseException as e:
            # Close a connection that was opened before the failure: left to the garbage collector, a connection
            # still open in this process made later reads of the same file fail as 'malformed' (a flaky test)
            if self.conn is not None:
                self.conn.close()
            if isinstance(e, sqlite3.DatabaseError):
                raise self._error(e) from None
            if isinstance(e, OSError):
                raise FewtuneError(f"Results database {self.path}: {e.strerror or e}.") from None
            raise

    # --- opening
    def _connect_readonly(self, tries: int = 4):
        """A read-only connection whose schema has been read. Just after the last writer closes, a read-only
        connection (which may not create or reset the WAL index) has been seen to fail once with 'database
        disk image is malformed' on a sound file (integrity_check ok a moment later): retry briefly before
        calling the file corrupt."""
        for attempt in range(tries):
            try:
                return self._open_readonly("mode=ro")
            except sqlite3.DatabaseError:
                if self._wal_empty():
                    # A WAL database in a folder this process cannot write: SQLite must create the -shm index
                    # to read it and refuses. With no -wal file (the last writer checkpointed and removed it),
                    # the file alone holds every committed row and no writer is active (one would hold the
                    # -wal open): reading it as immutable is exact.
                    try:
                        return self._open_readonly("mode=ro&immutable=1")
                    except sqlite3.DatabaseError:
                        pass
                if attempt == tries - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def _open_readonly(self, query: str):
        conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?{query}", uri=True, timeout=BUSY_TIMEOUT_S,
                               isolation_level=None)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except BaseException:
            conn.close()
            raise
        return conn

    def _wal_empty(self) -> bool:
        wal = self.path.with_name(self.path.name + "-wal")
        return not wal.exists() or wal.stat().st_size == 0

    def _check_file(self):
        if self.path.is_dir():
            raise FewtuneError(f"Results database {self.path} is a folder; give a file path (--db results/fewtune.db).")
        for parent in self.path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise FewtuneError(f"Results database {self.path}: {parent} is a file, not a folder.")
                break
        if not self.path.exists():
            if self.readonly:
                raise FewtuneError(f"No results database at {self.path} (run `fewtune grid SPEC --db {self.path}` first).")
            return
        with open(self.path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
        if head and head != SQLITE_HEADER:  # checked before sqlite3 touches it: nothing is written to a foreign file
            raise FewtuneError(f"{self.path} is not a fewtune results database (not an SQLite file); "
                               "give another --db or move the file away.")

    def _check_schema(self):
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            if self.readonly:
                raise FewtuneError(f"{self.path} is an empty database with no fewtune results.")
            return
        if "meta" not in tables or "runs" not in tables:
            raise FewtuneError(f"{self.path} is an SQLite database but not a fewtune results database "
                               f"(tables: {', '.join(sorted(tables))}); give another --db.")
        row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        found = row[0] if row else None
        if str(found) not in READABLE_VERSIONS:
            raise FewtuneError(f"{self.path} holds fewtune results schema version {found}, this fewtune reads versions "
                               f"{' and '.join(READABLE_VERSIONS)}; use the matching fewtune version or a new --db (the file is left as is).")

    def _create(self):
        with self.transaction():
            for statement in SCHEMA.split(";"):  # not executescript(): it would COMMIT the open transaction
                if statement.strip():
                    self.conn.execute(statement)
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            # an older database gains the predictions table above; its old runs simply have no predictions
            self.conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
            from . import __version__
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('created_by', ?)", (f"fewtune {__version__}",))
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('created_at', ?)", (now(),))

    def _error(self, e: Exception) -> FewtuneError:
        if isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e)):
            return FewtuneError(f"Results database {self.path} is locked by another process (waited "
                                f"{BUSY_TIMEOUT_S:g} s): {e}; try again once it is done (the file is left as is).")
        if self.readonly and isinstance(e, sqlite3.OperationalError) and "readonly" in str(e):
            return FewtuneError(f"Results database {self.path} cannot be read from this folder: the folder is not "
                                f"writable and the write-ahead log {self.path.name}-wal holds changes not yet in the "
                                "file; open it once where the folder is writable, then it reads anywhere.")
        if isinstance(e, sqlite3.OperationalError) and "unable to open" in str(e):
            return FewtuneError(f"Results database {self.path} cannot be created or opened there ({e}); "
                                "give a --db in a folder you can write.")
        return FewtuneError(f"Results database {self.path} cannot be used: {e} (corrupt, or not a fewtune database; "
                            "the file is left as is).")

    @contextmanager
    def transaction(self):
        """One write transaction; IMMEDIATE takes the write lock up front, so read-then-write is atomic."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as e:
            raise self._error(e) from None
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    def close(self):
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # --- the run life cycle: claim -> finish | fail | cancel
    def claim(self, cfg, label: str | None = None, grid: str | None = None, log_path: str | None = None,
              owner: dict | None = None, reclaim: bool = False, key: str | None = None,
              task_name: str | None = None) -> str:
        """Mark a run `running` for `owner` (default: this process) unless it need not or cannot run.

        `key` is the run's identity hash and `task_name` its task's name, as the caller has them (a grid cell's
        `cell.key`): the store takes them and does not compute identities (layers look down); without them it asks
        the config (`cfg.hash()`, `cfg.identity()`), which hashes the task file, the data files and a model folder.
        Returns 'claimed', 'done' (already succeeded), or 'busy' (claimed by a process that is alive). Failed,
        cancelled and stale running rows are claimed again (same row, attempts + 1).
        """
        owner = owner or this_process()
        d, t = cfg.to_dict(), now()
        if key is None:
            key = cfg.hash()
        if task_name is None:
            task_name = cfg.identity()["task"]["name"]
        d_task = task_name
        with self.transaction() as c:
            row = c.execute("SELECT status, owner FROM runs WHERE config_hash=?", (key,)).fetchone()
            if row and row["status"] == "success":
                return "done"
            if row and row["status"] == "running" and not reclaim:
                current = read_owner(row["owner"])
                if current != owner and owner_alive(current):
                    return "busy"
            if row is None:
                c.execute("INSERT INTO runs (config_hash, status, label, grid, model, task, method, shots, seed, config, "
                          "owner, attempts, log_path, created_at, started_at, updated_at) "
                          "VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?)",
                          (key, label, grid, d["model"], d_task, d["method"], d["shots"], d["seed"],
                           dumps(d), dumps(owner), log_path, t, t, t))
            else:
                c.execute("UPDATE runs SET status='running', label=COALESCE(?, label), grid=COALESCE(?, grid), "
                          "owner=?, attempts=attempts+1, error=NULL, log_path=?, started_at=?, finished_at=NULL, "
                          "updated_at=? WHERE config_hash=?", (label, grid, dumps(owner), log_path, t, t, key))
        return "claimed"

    def finish(self, key: str, result: dict, owner: dict | None = None) -> bool:
        """Record a successful run. False (nothing written) when the claim was taken over meanwhile."""
        return self._close_run(key, "success", None, owner, result)

    def fail(self, key: str, error: str, owner: dict | None = None, result: dict | None = None) -> bool:
        return self._close_run(key, "failed", error, owner, result)

    def cancel(self, key: str, error: str = "cancelled (interrupted)", owner: dict | None = None) -> bool:
        return self._close_run(key, "cancelled", error, owner, None)

    def _close_run(self, key, status, error, owner, result) -> bool:
        owner = owner or this_process()
        t = now()
        error = " ".join(str(error).split()) if error else None  # one line
        with self.transaction() as c:
            row = c.execute("SELECT status, owner FROM runs WHERE config_hash=?", (key,)).fetchone()
            current = read_owner(row["owner"]) if row is not None else None
            if row is None or row["status"] != "running" or (current is not None and current != owner):
                return False
            if result is None:
                c.execute("UPDATE runs SET status=?, error=?, owner=?, finished_at=?, updated_at=? WHERE config_hash=?",
                          (status, error, dumps(owner), t, t, key))
            else:
                predictions = result.get("predictions")
                result = {k: v for k, v in result.items() if k != "predictions"}  # kept compactly, in their own table
                c.execute("DELETE FROM predictions WHERE config_hash=?", (key,))
                for split, p in (predictions or {}).items():
                    c.execute("INSERT INTO predictions VALUES (?, ?, ?, ?, ?, ?)", (key, split, *pack_predictions(p)))
                c.execute("UPDATE runs SET status=?, error=?, owner=?, metrics=?, cost=?, versions=?, result=?, "
                          "finished_at=?, updated_at=? WHERE config_hash=?",
                          (status, error, dumps(owner), dumps(result.get("evals")), dumps(result.get("cost")),
                           dumps(result.get("versions")), dumps(result), t, t, key))
        return True

    # --- reading
    def get(self, key: str) -> dict | None:
        rows = self.rows(where="config_hash=?", params=(key,))
        return rows[0] if rows else None

    def rows(self, statuses=None, where: str | None = None, params=()) -> list[dict]:
        """Rows as dicts, JSON columns decoded, in insertion order."""
        sql, args = "SELECT * FROM runs", list(params)
        clauses = [where] if where else []
        if statuses:
            clauses.append(f"status IN ({', '.join('?' * len(statuses))})")
            args += list(statuses)
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        def text(raw: bytes):  # invalid UTF-8 in one cell must not end the whole query (sqlite3's default)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return raw
        self.conn.text_factory = text
        try:
            out = []
            for r in self.conn.execute(sql + " ORDER BY rowid", args):
                d = dict(r)
                damaged = None
                for col, value in d.items():
                    if col == "owner":  # bookkeeping, not the result: a damaged one belongs to nobody
                        d[col] = read_owner(value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value)
                    elif col in JSON_COLUMNS and value is not None:
                        try:
                            d[col] = json.loads(value)
                        except (ValueError, TypeError) as e:  # JSONDecodeError, UnicodeDecodeError
                            damaged = damaged or (col, " ".join(str(e).split())[:80])
                    elif isinstance(value, bytes):
                        d[col] = value.decode("utf-8", errors="replace")
                if damaged:  # one damaged row is named and left out; the others are still read
                    logging.getLogger("fewtune").warning(
                        "fewtune: warning: results database %s: row %s has damaged JSON in column '%s' (%s); left "
                        "out (the file is left as is).", self.path, d.get("config_hash"), *damaged)
                    continue
                out.append(d)
            return out
        except sqlite3.DatabaseError as e:
            raise self._error(e) from None
        finally:
            self.conn.text_factory = str

    def has_predictions_table(self) -> bool:
        return bool(self.conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='predictions'").fetchone())

    def predictions(self, key: str) -> dict[str, dict]:
        """split -> {"idx", "gold", "pred", "logprobs", "groups"} (numpy arrays) for one run; {} when it has none
        (a failed run, or one recorded before fewtune stored predictions)."""
        if not self.has_predictions_table():
            return {}
        try:
            rows = self.conn.execute("SELECT split, n, n_classes, data, groups FROM predictions WHERE config_hash=? "
                                     "ORDER BY rowid", (key,)).fetchall()
        except sqlite3.DatabaseError as e:
            raise self._error(e) from None
        out = {}
        for r in rows:
            try:
                out[r["split"]] = unpack_predictions(r["n"], r["n_classes"], r["data"], r["groups"])
            except (ValueError, zlib.error) as e:
                raise FewtuneError(f"Results database {self.path}: the stored predictions of run {key} split "
                                   f"{r['split']} are damaged ({e}); rerun that run.") from None
        return out

    def statuses(self) -> dict[str, str]:
        """config_hash -> status, for every row."""
        return {k: s for k, s in self.conn.execute("SELECT config_hash, status FROM runs")}

    def meta(self) -> dict[str, str]:
        return {k: v for k, v in self.conn.execute("SELECT key, value FROM meta")}

    def seed_plans(self) -> dict[str, list]:
        """grid name -> the seeds of its spec, in order, as recorded when it ran (the looks of its claims follow
        them: fewtune.stats.sequential.Plan). Unreadable entries are skipped (the report then falls back)."""
        out = {}
        for k, v in self.meta().items():
            if k.startswith("seeds:"):
                try:
                    seeds = json.loads(v)
                except ValueError:
                    continue
                if isinstance(seeds, list) and seeds:
                    out[k[len("seeds:"):]] = seeds
        return out

    def set_meta(self, key: str, value: str) -> None:
        """Record a database-wide setting (the grid spec's findings file, read by `fewtune report`)."""
        with self.transaction() as c:
            c.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))


def pack_predictions(p: dict) -> tuple:
    """(n, n_classes, blob, groups JSON) from {"idx", "gold", "pred", "logprobs"[, "groups"]}: HANS's 30,000
    examples x 2 classes take about 250 kB before compression, instead of megabytes of JSON."""
    import numpy as np
    idx = np.asarray(p["idx"], dtype="<i4")
    gold = np.asarray(p["gold"], dtype="<i2")
    pred = np.asarray(p["pred"], dtype="<i2")
    logprobs = np.asarray(p["logprobs"], dtype="<f4")
    n = len(idx)
    if not (len(gold) == len(pred) == n and logprobs.ndim == 2 and logprobs.shape[0] == n):
        raise ValueError(f"predictions of inconsistent lengths: idx {n}, gold {len(gold)}, pred {len(pred)}, "
                         f"logprobs {logprobs.shape}")
    blob = zlib.compress(idx.tobytes() + gold.tobytes() + pred.tobytes() + logprobs.tobytes(), 6)
    groups = p.get("groups")
    return n, int(logprobs.shape[1]), blob, (json.dumps(groups) if groups and any(groups) else None)


def unpack_predictions(n: int, n_classes: int, blob: bytes, groups: str | None) -> dict:
    import numpy as np
    raw = zlib.decompress(blob)
    sizes = (4 * n, 2 * n, 2 * n, 4 * n * n_classes)
    if len(raw) != sum(sizes):
        raise ValueError(f"{len(raw)} bytes where {sum(sizes)} were expected")
    a, b, c = sizes[0], sizes[0] + sizes[1], sizes[0] + sizes[1] + sizes[2]
    return {"idx": np.frombuffer(raw[:a], dtype="<i4"), "gold": np.frombuffer(raw[a:b], dtype="<i2"),
            "pred": np.frombuffer(raw[b:c], dtype="<i2"),
            "logprobs": np.frombuffer(raw[c:], dtype="<f4").reshape(n, n_classes),
            "groups": json.loads(groups) if groups else None}
