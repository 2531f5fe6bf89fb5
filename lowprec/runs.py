"""The run index: one SQLite file under the output root that every finished run appends to.

It answers one question for the runner — "is there an fp32/fp32 run I can compare with?" — and
gives researchers one table to query (`sqlite3 outputs/runs.sqlite 'select * from runs'`).

Concurrency: parallel multirun jobs (joblib, SLURM arrays, torchrun ranks) write to the same file.
WAL mode lets readers proceed while one writer commits; `busy_timeout` makes a writer wait for the
lock instead of failing; each row is one `BEGIN IMMEDIATE; INSERT; COMMIT` transaction, so a row is
either fully there or not at all. WAL needs a local (or lock-honouring) filesystem: on NFS point
`index=` at a local disk or one writer per file.

Status: every run that ends gets a row, its `status` column saying how: ok, diverged (more than
trainer.max_skip_frac of its steps skipped as non-finite) or failed (the error is in the summary's
`error`). Only `ok` rows (and rows from before the column, NULL) are ever used as baselines, and
only those that pass `row_problem` when read (JSON summary, numbers where numbers belong, top-1 in
[0, 100], a finite loss >= 0); another is skipped with one warning.

Run directories: `run_dir_lock` holds an exclusive flock on <run dir>/.lock for a run's life, so
two processes never write one directory; `check_index` opens the index and proves it readable
and writable before any training (a corrupt or read-only file is one error naming it).

No torch import here: the index is usable from scripts and notebooks without the training stack.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, Iterator

STATUSES = ("ok", "diverged", "failed")

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
# `identity` its identity as JSON (lowprec.config.Experiment; `key` is the identity's hash);
# `metric` says how to read `degradation`: top1 (points of top-1 below the baseline) or val_loss
# (nats of validation loss above it, a language model's; `val_loss`/`baseline_val_loss` beside it).
_OPTIONAL = ("name", "identity", "status", "metric", "val_loss", "baseline_val_loss")
# Columns added after the first index files were written: connect() adds them to an old file.
_ADDED = {"name": "TEXT", "identity": "TEXT", "status": "TEXT", "metric": "TEXT", "val_loss": "REAL",
          "baseline_val_loss": "REAL"}


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
    row["status"] = summary.get("status", "ok")
    for c in ("metric", "val_loss", "baseline_val_loss"):
        row[c] = summary.get(c)
    if row["status"] not in STATUSES:
        raise ValueError(f"summary status {row['status']!r}; expected one of {STATUSES}")
    row = {k: strict_json(v) for k, v in row.items()}
    cols = ["run_dir", "finished_at", *_COLUMNS, *_OPTIONAL, "summary"]
    vals = [str(summary["run_dir"]), time.time(), *row.values(), dumps(summary, sort_keys=True)]
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
    found = [r for r in rows(path, **where) if r.get("status") in (None, "ok")]
    good = []
    for r in found:
        why = row_problem(r)
        if why is None:
            good.append(r)
        else:
            print(f"warning: {path}: row {r.get('id')} ({r.get('run_dir')}) skipped as a baseline: "
                  f"{why}", file=sys.stderr, flush=True)
    return good[-1] if good else None


def _num(v, lo: float, hi: float) -> bool:
    return (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            and lo <= v <= hi)


def row_problem(r: dict[str, Any]) -> str | None:
    """Why an index row cannot be trusted as a baseline (None: it can): its summary is not a JSON
    object, a numeric column holds text, or a value is impossible (top-1 outside [0, 100], a
    negative or non-finite validation loss)."""
    try:
        summ = json.loads(r.get("summary") or "")
    except (TypeError, ValueError):
        return "its summary is not JSON"
    if not isinstance(summ, dict):
        return "its summary is not a JSON object"
    for col in ("final_top1", "best_top1"):
        if r.get(col) is not None and not _num(r[col], 0.0, 100.0):
            return f"{col}={r[col]!r} is not a top-1 in [0, 100]"
    if r.get("final_top1") is None:
        return "final_top1 is empty"
    for col, v in (("val_loss", r.get("val_loss")), ("summary val_loss", summ.get("val_loss"))):
        if v is not None and not _num(v, 0.0, math.inf):
            return f"{col}={v!r} is not a finite loss >= 0"
    if r.get("metric") not in (None, "top1", "val_loss", "bleu", "f1"):  # bleu, f1: lowprec.task_loop
        return f"metric={r.get('metric')!r}"
    return None


def check_index(path: str | os.PathLike) -> None:
    """Open (creating if needed) the index and prove it is a readable and writable SQLite file:
    a ValueError naming the file and what to do otherwise. Run before any training, so a bad
    index never costs a run."""
    path = Path(path)
    what = "point index=... (or out_root=...) elsewhere"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"index={path}: cannot create its directory ({e.strerror}); {what}") from e
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise ValueError(f"index={path}: not readable and writable by this user; {what}")
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"index={path}: directory {path.parent} is not writable (SQLite needs "
                         f"its journal beside the file); {what}")
    try:
        con = connect(path)
        try:
            ok = con.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(ok)
            _retry(lambda: (con.execute("BEGIN IMMEDIATE"), con.execute("ROLLBACK")))
        finally:
            con.close()
    except sqlite3.Error as e:
        raise ValueError(f"index={path}: not a usable run index ({type(e).__name__}: {e}); move it "
                         f"away (a new one is created) or {what}") from e


def strict_json(v: Any) -> Any:
    """`v` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: strict_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [strict_json(x) for x in v]
    return v


def dumps(obj: Any, **kw: Any) -> str:
    """Strict JSON (non-finite floats as null; other objects via their .item() or str)."""
    def default(o):
        return strict_json(o.item()) if hasattr(o, "item") else str(o)
    return json.dumps(strict_json(obj), allow_nan=False, default=default, **kw)


_PROCESS_TAG = secrets.token_hex(3)  # one per process: run dirs started in the same second differ


def run_dir_name(overrides: str, default: str, seed: Any) -> str:
    """A run directory's name: the overrides (or `default`), the seed and a per-process random tag,
    in characters no shell or Hydra override needs quoted ([A-Za-z0-9._+-]): `grad=luq4,a.b=2`
    becomes `grad-luq4_a.b-2`. Long names keep 80 characters and a hash of the rest."""
    name = overrides or default
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", name.replace("=", "-").replace(",", "_"))
    name = re.sub(r"-{2,}", "-", name).strip("-")
    if len(name) > 100:
        name = name[:80] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{name}_s{seed}_{_PROCESS_TAG}"


class RunDirBusy(ValueError):
    """Another process holds the run directory's lock."""


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive flock on <run_dir>/.lock for the block; RunDirBusy at once (no wait)
    when another process holds it. The kernel drops the lock when the holder dies (kill -9)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / ".lock", "a")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise RunDirBusy(f"hydra.run.dir={run_dir}: in use by another running process "
                             "(its .lock is held); wait for it or use another run dir") from e
        yield
    finally:
        f.close()  # closing the descriptor releases the lock


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
