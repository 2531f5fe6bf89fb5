#!/usr/bin/env python
"""Reproduce one results table as one Hydra multirun.

    python scripts/reproduce.py mvue_table --scale small            # runs it (seeds 0,1)
    python scripts/reproduce.py luq_table --scale full --seeds 0,1,2 --dry-run
    python scripts/reproduce.py luq_table --scale full -- hydra/launcher=slurm hydra.launcher.partition=gpu

Everything after `--` is passed to run.py as Hydra overrides.

The table's rows are the files conf/experiment/<scale>/<table>/*.yaml (files starting with `_` are
shared bases). The command is

    python run.py -m trainer.seed=<seeds> experiment=<row>,<row>,...  [extra overrides]

(seed is the outer loop: all rows of seed 0 finish before seed 1 starts). Every job finds or trains
its fp32 baseline (trainer.baseline=auto). --skip-done drops rows whose runs for every requested
seed are already in the index (e.g. the fp32 row shared by two tables). Each launch is appended to
<out_root>/commands.jsonl (command, git commit, time) for make_tables.py.

Small scale sets OMP_NUM_THREADS=1 unless it is set: on the shared 2-core machine a training step
was 10-20x slower with two threads. W&B: WANDB_MODE defaults to offline.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

from lowprec import tables
from lowprec.provenance import git_commit, log_launch


def build_command(table: str, scale: str, seeds: list[int], extra: list[str],
                  rows: list[str] | None = None) -> list[str]:
    rows = tables.rows(scale, table) if rows is None else rows
    return ["python", "run.py", "-m", f"trainer.seed={','.join(map(str, seeds))}",
            f"experiment={','.join(rows)}", *extra]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", help="folder under conf/experiment/<scale>/ (e.g. luq_table, mvue_table)")
    p.add_argument("--scale", choices=tables.SCALES, default="small")
    p.add_argument("--seeds", default=None, help="comma list (default: small 0,1; full 0,1,2)")
    p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    p.add_argument("--skip-done", action="store_true",
                   help="leave out rows already in the index for every requested seed")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    a = p.parse_args(argv)
    a.extra = extra
    seeds = [int(s) for s in (a.seeds or ("0,1" if a.scale == "small" else "0,1,2")).split(",")]
    try:
        rows = tables.rows(a.scale, a.table)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.skip_done:
        keep = []
        for r in rows:
            spec = tables.compose_row(r, a.extra)
            done = {x["seed"] for x in tables.matching_runs(
                spec, tables.index_rows(tables.REPO / spec.index))}
            if set(seeds) <= done:
                print(f"skip {r}: seeds {seeds} already in {spec.index}", file=sys.stderr)
            else:
                keep.append(r)
        rows = keep
        if not rows:
            print("nothing to run", file=sys.stderr)
            return 0
    cmd = build_command(a.table, a.scale, seeds, a.extra, rows)
    print(shlex.join(cmd), flush=True)
    if a.dry_run:
        return 0
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    if a.scale == "small":
        env.setdefault("OMP_NUM_THREADS", "1")
    spec = tables.compose_row(rows[0], a.extra)
    rec = {"table": a.table, "scale": a.scale, "seeds": seeds, "command": shlex.join(cmd),
           "commit": git_commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "env": {k: env[k] for k in ("OMP_NUM_THREADS", "WANDB_MODE") if k in env}}
    log_launch(tables.REPO / spec.out_root, rec)
    cmd[0] = sys.executable
    return subprocess.call(cmd, cwd=tables.REPO, env=env)


if __name__ == "__main__":
    sys.exit(main())
