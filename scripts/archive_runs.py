#!/usr/bin/env python
"""Keep a table's finished runs across machines and sessions: the run index as reviewable text.

    python scripts/archive_runs.py save outputs/small_scaling      # -> results/runs/small_scaling.jsonl
    python scripts/archive_runs.py load outputs/small_scaling      # the archive back into its index

An output root (outputs/ is not in git) holds the run index (runs.sqlite) and the launches
(commands.jsonl). `save` writes every index row's summary, one JSON line per run, sorted by run
directory, with the repository's absolute path cut from run directories (so the file names no
machine), copies the launches beside it (<name>.commands.jsonl) and each run's metrics.jsonl,
gzipped without a timestamp (<name>/<hash of the run directory>.metrics.jsonl.gz: the curves and
noise records the tables' figures read). `load` inserts the archived runs whose run directories
the index lacks, writes back their metrics.jsonl where the run directory has none, and appends
the launches it lacks, so that `scripts/reproduce.py --skip-done` resumes a long table where
another session stopped and `scripts/make_tables.py` renders it, figures included.
Checkpoints are not archived. Saving never drops a run the archive already has.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from pathlib import Path

from lowprec import runs

REPO = ROOT = Path(__file__).resolve().parents[1]

PATH_KEYS = ("run_dir", "baseline_run")


def _rel(p: str | None) -> str | None:
    """`p` relative to ROOT, also when it runs through a link into ROOT (another worktree whose
    outputs/ links to this one's); else as it is."""
    if p is None:
        return p
    for q in (Path(p), *((Path(p).resolve(),) if Path(p).is_absolute() else ())):
        if q.is_relative_to(ROOT):
            return str(q.relative_to(ROOT))
    return p


def _abs(p: str | None) -> str | None:
    return p if p is None or Path(p).is_absolute() else str(ROOT / p)


def _set_root(root: str | None) -> None:
    """Paths are stored relative to `root` (default: this repository; a git worktree that ran the
    table is the root of its runs)."""
    global ROOT
    ROOT = REPO if root is None else Path(root).resolve()


def _lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def _metrics_file(dest: Path, rel_run_dir: str) -> Path:
    return dest.with_suffix("") / (hashlib.sha1(rel_run_dir.encode()).hexdigest()[:16] + ".metrics.jsonl.gz")


def save(out_root: Path, dest: Path) -> int:
    index = out_root / "runs.sqlite"
    if not index.exists():
        print(f"error: {index}: no run index to save", file=sys.stderr)
        return 2
    old = {json.loads(ln)["run_dir"]: ln for ln in _lines(dest)}
    for r in runs.rows(index):
        s = json.loads(r["summary"])
        s.update({k: _rel(s.get(k)) for k in PATH_KEYS if k in s})
        old[s["run_dir"]] = runs.dumps(s, sort_keys=True)
        m = Path(r["run_dir"]) / "metrics.jsonl"
        if m.exists():
            gz = _metrics_file(dest, s["run_dir"])
            gz.parent.mkdir(parents=True, exist_ok=True)
            gz.write_bytes(gzip.compress(m.read_bytes(), mtime=0))
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(old[k] + "\n" for k in sorted(old)))
    cmds = dest.with_suffix(".commands.jsonl")
    have = _lines(cmds)
    cmds.write_text("".join(ln + "\n" for ln in have + [
        ln for ln in _lines(out_root / "commands.jsonl") if ln not in have]))
    print(f"saved {len(old)} runs to {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
    return 0


def load(out_root: Path, src: Path) -> int:
    if not src.exists():
        print(f"error: {src}: no archive to load", file=sys.stderr)
        return 2
    index = out_root / "runs.sqlite"
    have = {r["run_dir"] for r in runs.rows(index)}
    n = 0
    for ln in _lines(src):
        s = json.loads(ln)
        gz = _metrics_file(src, s["run_dir"])
        s.update({k: _abs(s.get(k)) for k in PATH_KEYS if k in s})
        m = Path(s["run_dir"]) / "metrics.jsonl"
        if gz.exists() and not m.exists():
            m.parent.mkdir(parents=True, exist_ok=True)
            m.write_bytes(gzip.decompress(gz.read_bytes()))
        if s["run_dir"] not in have:
            out_root.mkdir(parents=True, exist_ok=True)
            runs.insert(index, s)
            n += 1
    cmds, mine = src.with_suffix(".commands.jsonl"), out_root / "commands.jsonl"
    known = set(_lines(mine))
    new = [ln for ln in _lines(cmds) if ln not in known]
    if new:
        with mine.open("a") as f:
            f.writelines(ln + "\n" for ln in new)
    print(f"loaded {n} runs into {index} ({len(have)} were there)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("action", choices=("save", "load"))
    p.add_argument("out_root", help="a table's output root, e.g. outputs/small_scaling")
    p.add_argument("--archive", default=None, help="default: results/runs/<out_root's name>.jsonl")
    p.add_argument("--root", default=None, help="the checkout the runs' paths are relative to "
                   "(default: this repository; e.g. the git worktree that ran them)")
    a = p.parse_args(argv)
    _set_root(a.root)
    out_root = Path(a.out_root).resolve()
    dest = Path(a.archive) if a.archive else REPO / "results" / "runs" / f"{out_root.name}.jsonl"
    return (save if a.action == "save" else load)(out_root, dest.resolve())


if __name__ == "__main__":
    sys.exit(main())
