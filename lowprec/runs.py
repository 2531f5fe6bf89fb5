"""The run index: one SQLite file under the output root that every finished run appends to.

It answers one question for the runner — "is there an fp32/fp32 run I can compare with?" — and
gives researchers one table to query (`sqlite3 outputs/runs.sqlite 'select * from runs'`).

Concurrency: parallel multirun jobs (joblib, SLURM arrays, torchrun ranks) write to the same file.
WAL mode lets readers proceed while one writer commits; `busy_timeout` makes a writer wait for the
lock instead of failing; each row is one `BEGIN IMMEDIATE; INSERT; COMMIT` transaction, so a row is
either fully there or not at all. WAL needs a local (or lock-honouring) filesystem: on NFS point
`index=` at a local disk or one writer per file.

No torch import here: the index is usable from scripts and notebooks without the training stack.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

BUSY_TIMEOUT_MS = 120_000  # a writer waits up to 2 min for the lock; inserts take milliseconds

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    run_dir       TEXT NOT NULL UNIQUE,
    finished_at   REAL NOT NULL,
    model         TEXT NOT NULL,
    data          TEXT NOT NULL,
    fwd           TEXT NOT NULL,
    grad          TEXT NOT NULL,
    epochs        INTEGER NOT NULL,
    fnt_epochs    INTEGER NOT NULL,
    seed          INTEGER NOT NULL,
    batch_size    INTEGER NOT NULL,
    is_baseline   INTEGER NOT NULL,
    key           TEXT NOT NULL,
    name          TEXT,
    identity      TEXT,
    final_top1    REAL,
    best_top1     REAL,
    baseline_top1 REAL,
    degradation   REAL,
    wall_time     REAL,
    summary       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_baseline ON runs (is_baseline, model, data, epochs, fnt_epochs,
                                                  seed, batch_size);
"""

# Columns copied from a summary dict into their own column (the whole summary is kept as JSON too).
_COLUMNS = ("model", "data", "fwd", "grad", "epochs", "fnt_epochs", "seed", "batch_size",
            "is_baseline", "key", "final_top1", "best_top1", "baseline_top1", "degradation",
            "wall_time")
# Columns a summary may lack (older summaries): NULL then. `name` is the experiment's name and
# `identity` its identity as JSON (lowprec.config.Experiment; `key` is the identity's hash).
_OPTIONAL = ("name", "identity")
# Columns added after the first index files were written: connect() adds them to an old file.
_ADDED = {"name": "TEXT", "identity": "TEXT"}


def connect(path: str | os.PathLike) -> sqlite3.Connection:
    """Open (creating if needed) the index at `path`, in WAL mode with a busy timeout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, so one INSERT is one transaction.
    con = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    con.row_factory = sqlite3.Row
    con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    # Switching to WAL takes a write lock; another process may be doing the same at this moment.
    _retry(lambda: con.execute("PRAGMA journal_mode = WAL"))
    _retry(lambda: con.executescript(_SCHEMA))
    _retry(lambda: _migrate(con))
    return con


def _migrate(con: sqlite3.Connection) -> None:
    """Add the columns of _ADDED that an index written by an older version lacks."""
    have = {r["name"] for r in con.execute("PRAGMA table_info(runs)")}
    for col, decl in _ADDED.items():
        if col not in have:
            try:
                con.execute(f"ALTER TABLE runs ADD COLUMN {col} {decl}")
            except sqlite3.OperationalError as e:  # another process added it meanwhile
                if "duplicate column" not in str(e):
                    raise


def _retry(fn, tries: int = 50):
    for i in range(tries):
        try:
            return fn()
        except sqlite3.OperationalError as e:  # "database is locked" outside busy_timeout's reach
            if "locked" not in str(e) or i == tries - 1:
                raise
            time.sleep(0.05 * (i + 1))


def insert(path: str | os.PathLike, summary: dict[str, Any]) -> None:
    """Append one finished run. `summary` needs `run_dir` and the `_COLUMNS` keys.

    A run that finishes twice (restarted after the summary was written) replaces its own row, so
    the index has one row per run directory.
    """
    missing = [c for c in ("run_dir", *_COLUMNS) if c not in summary]
    if missing:
        raise ValueError(f"summary lacks index columns {missing}")
    row = {c: summary[c] for c in _COLUMNS}
    row["is_baseline"] = int(bool(row["is_baseline"]))
    row["name"] = summary.get("name")
    ident = summary.get("identity")
    row["identity"] = None if ident is None else json.dumps(ident, sort_keys=True, default=str)
    cols = ["run_dir", "finished_at", *_COLUMNS, *_OPTIONAL, "summary"]
    vals = [str(summary["run_dir"]), time.time(), *row.values(),
            json.dumps(summary, sort_keys=True, default=str)]
    sql = (f"INSERT OR REPLACE INTO runs ({', '.join(cols)}) "
           f"VALUES ({', '.join('?' * len(cols))})")
    con = connect(path)
    try:
        def txn():
            con.execute("BEGIN IMMEDIATE")
            try:
                con.execute(sql, vals)
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        _retry(txn)
    finally:
        con.close()


def rows(path: str | os.PathLike, **where: Any) -> list[dict[str, Any]]:
    """All rows (oldest first) whose columns equal the given values; [] when there is no index."""
    if not Path(path).exists():
        return []
    bad = set(where) - {"run_dir", *_COLUMNS, *_OPTIONAL}
    if bad:
        raise ValueError(f"unknown index columns {sorted(bad)}")
    clause = " AND ".join(f"{k} = ?" for k in where) or "1"
    con = connect(path)
    try:
        cur = con.execute(f"SELECT * FROM runs WHERE {clause} ORDER BY id", list(where.values()))
        return [dict(r) for r in cur.fetchall()]
    finally:
        con.close()


def find_baseline(path: str | os.PathLike, *, model: str, data: str, epochs: int,
                  fnt_epochs: int, seed: int, batch_size: int,
                  key: str | None = None) -> dict[str, Any] | None:
    """The newest fp32/fp32 run with the same model, data, epochs (incl. FNT), seed and batch
    size; None if there is none. `key` (the hash of the experiment identity, which holds every
    other setting that changes the result: optimizer, schedule, data and model options, ...)
    narrows it further. The runner passes `lowprec.config.Experiment.baseline_match`."""
    where = dict(is_baseline=1, model=model, data=data, epochs=epochs, fnt_epochs=fnt_epochs,
                 seed=seed, batch_size=batch_size)
    if key is not None:
        where["key"] = key
    found = rows(path, **where)
    return found[-1] if found else None


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive advisory lock (flock) on `path`, blocking. The kernel releases it when the holder
    dies, even by SIGKILL, so a crashed holder never wedges the waiters."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
