#!/usr/bin/env python
"""Reproduce one results table as one Hydra multirun.

    python scripts/reproduce.py mvue_table --scale small            # runs it (seeds 0,1)
    python scripts/reproduce.py luq_table --scale full --seeds 0,1,2 --dry-run
    python scripts/reproduce.py luq_table --scale full -- hydra/launcher=slurm hydra.launcher.partition=gpu
    python scripts/reproduce.py lm_table --seeds 0,1,2 --jobs 2      # two processes in parallel

Everything after `--` is passed to run.py as Hydra overrides.

The table's rows are the files conf/experiment/<scale>/<table>/*.yaml (files starting with `_` are
shared bases). The command is

    python run.py -m trainer.seed=<seeds> experiment=<row>,<row>,...  [extra overrides]

(seed is the outer loop: all rows of seed 0 finish before seed 1 starts). Every job finds or trains
its fp32 baseline (trainer.baseline=auto). --rows a,b runs only those rows of the table (e.g. rows that another table's launch is still
running). --skip-done runs only the (row, seed) pairs not yet in the index (e.g. the fp32 row
shared by two tables, or a table stopped part-way): rows missing the same seeds share one
multirun, and the groups that hold an fp32 row run first. Each launch is appended to
<out_root>/commands.jsonl (command, git commit, time) for make_tables.py.

--jobs N (N > 1) runs N multirun processes side by side, in two phases: first the fp32/fp32
rows, their seeds split over the N processes (so no later job trains a baseline twice; with
fewer seeds than processes the rows are split instead), then the other rows dealt to the N
processes by cost (steps × width², longest first to the least-loaded; round-robin when all rows
cost the same), each over every seed. Each process writes its
output to <out_root>/reproduce_<table>_<phase>_<i>.log. The launch log gets a second record at the
end with the measured wall time (`wall_s`), which make_tables.py prints.

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


def cost(spec) -> float:
    """A row's relative training cost for dealing rows to processes: its steps (or epochs) times
    the square of its model width when the model states one (n_embd: the scaling grid)."""
    ident = spec.identity or {}
    tr, kw = ident.get("trainer") or {}, (ident.get("model") or {}).get("kwargs") or {}
    return float(tr.get("max_steps") or spec.epochs or 1) * float(kw.get("n_embd") or 1) ** 2


def deal(rows: list[str], weights: dict[str, float], jobs: int) -> list[list[str]]:
    """Rows to `jobs` processes, longest first to the least-loaded (ties: the lower index); with
    equal weights this is round-robin in the given order (rows[i::jobs])."""
    loads, out = [0.0] * jobs, [[] for _ in range(jobs)]
    for r in sorted(rows, key=lambda r: -weights[r]):  # stable: equal weights keep their order
        i = min(range(jobs), key=lambda k: (loads[k], k))
        out[i].append(r)
        loads[i] += weights[r]
    return [o for o in out if o]


def plan(table: str, scale: str, seeds: list[int], extra: list[str], rows: list[str],
         jobs: int) -> list[list[list[str]]]:
    """Phases of parallel commands (--jobs): [[fp32 rows, seeds split (rows dealt when there are
    fewer seeds than jobs)], [other rows, dealt by cost]]."""
    if jobs <= 1:
        return [[build_command(table, scale, seeds, extra, rows)]]
    specs = {r: tables.compose_row(r, one_point(extra)) for r in rows}
    base = [r for r in rows if (specs[r].grad, specs[r].fwd) == ("fp32", "fp32")
            and not specs[r].fnt_epochs]
    rest = [r for r in rows if r not in base]
    w = {r: cost(specs[r]) for r in rows}
    phases = []
    if base and len(seeds) >= jobs:
        phases.append([build_command(table, scale, seeds[i::jobs], extra, base)
                       for i in range(min(jobs, len(seeds)))])
    elif base:
        phases.append([build_command(table, scale, seeds, extra, part)
                       for part in deal(base, w, jobs)])
    if rest:
        phases.append([build_command(table, scale, seeds, extra, part)
                       for part in deal(rest, w, jobs)])
    return phases


def _run_parallel(phases, env, logdir, table) -> int:
    rc = 0
    for k, cmds in enumerate(phases):
        procs = []
        for i, cmd in enumerate(cmds):
            log = logdir / f"reproduce_{table}_{k}_{i}.log"
            print(f"phase {k} job {i}: {shlex.join(cmd)}  > {log}", flush=True)
            f = open(log, "w")
            procs.append((subprocess.Popen([sys.executable, *cmd[1:]], cwd=tables.REPO, env=env,
                                           stdout=f, stderr=subprocess.STDOUT), f))
        for p, f in procs:
            rc = p.wait() or rc
            f.close()
    return rc


def one_point(extra: list[str]) -> list[str]:
    """`extra` with every sweep override (k=a,b) cut to its first value: what composing a row
    for its output root, index and cost needs (the sweep itself goes to the multirun as given)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    out = []
    for text, o in zip(extra, OverridesParser.create().parse_overrides(extra)):
        out.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
                   if o.is_sweep_override() else text)
    return out


def missing(rows: list[str], seeds: list[int], extra: list[str]) -> list[tuple[list[int], list[str]]]:
    """The (row, seed) pairs not yet in each row's index, as (seeds, rows) groups of rows that
    miss the same seeds (one multirun each); groups holding an fp32/fp32 row first, so a later
    group finds its baselines instead of training them. Rows with nothing missing are dropped."""
    groups: dict[tuple[int, ...], list[str]] = {}
    base: set[tuple[int, ...]] = set()
    for r in rows:
        spec = tables.compose_row(r, one_point(extra))
        done = {x["seed"] for x in tables.matching_runs(
            spec, tables.index_rows(tables.REPO / spec.index))}
        todo = tuple(s for s in seeds if s not in done)
        if not todo:
            print(f"skip {r}: seeds {seeds} already in {spec.index}", file=sys.stderr)
            continue
        if len(todo) < len(seeds):
            print(f"{r}: seeds {sorted(done & set(seeds))} already in {spec.index}, "
                  f"running {list(todo)}", file=sys.stderr)
        groups.setdefault(todo, []).append(r)
        if (spec.grad, spec.fwd) == ("fp32", "fp32") and not spec.fnt_epochs:
            base.add(todo)
    return [(list(s), rs) for s, rs in sorted(groups.items(), key=lambda g: g[0] not in base)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", help="folder under conf/experiment/<scale>/ (e.g. luq_table, mvue_table)")
    p.add_argument("--scale", choices=tables.SCALES, default="small")
    p.add_argument("--seeds", default=None, help="comma list (default: small 0,1; full 0,1,2)")
    p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    p.add_argument("--skip-done", action="store_true",
                   help="run only the (row, seed) pairs not yet in the index")
    p.add_argument("--rows", default=None,
                   help="comma list of row names (file stems) to run, a subset of the table's")
    p.add_argument("--jobs", type=int, default=1,
                   help="processes in parallel (fp32 rows first); use trainer.threads=1 rows")
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
    if a.rows is not None:
        want = a.rows.split(",")
        names = {r.rsplit("/", 1)[1]: r for r in rows}
        bad = [w for w in want if w not in names]
        if bad:
            print(f"error: --rows {','.join(bad)}: not rows of {a.table} (have "
                  f"{','.join(names)})", file=sys.stderr)
            return 2
        rows = [names[w] for w in want]
    groups = missing(rows, seeds, a.extra) if a.skip_done else [(seeds, rows)]
    if not groups:
        print("nothing to run", file=sys.stderr)
        return 0
    rows = [r for _, rs in groups for r in rs]
    phases = [ph for s, rs in groups for ph in plan(a.table, a.scale, s, a.extra, rs, a.jobs)]
    cmds = [c for ph in phases for c in ph]
    if a.jobs <= 1:
        for c in cmds:
            print(shlex.join(c), flush=True)
    else:
        for k, ph in enumerate(phases):
            for c in ph:
                print(f"phase {k}: {shlex.join(c)}", flush=True)
    if a.dry_run:
        return 0
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    if a.scale == "small":
        env.setdefault("OMP_NUM_THREADS", "1")
    spec = tables.compose_row(rows[0], one_point(a.extra))
    me = ["python", "scripts/reproduce.py", *argv]
    rec = {"table": a.table, "scale": a.scale, "seeds": seeds,
           "command": shlex.join(cmds[0] if len(cmds) == 1 else me),
           "commit": git_commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "env": {k: env[k] for k in ("OMP_NUM_THREADS", "WANDB_MODE") if k in env}}
    if a.jobs > 1:
        rec["jobs"] = a.jobs
    if len(cmds) > 1:
        rec["commands"] = [shlex.join(c) for c in cmds]
    out_root = tables.REPO / spec.out_root
    log_launch(out_root, rec)
    t0 = time.time()
    if a.jobs <= 1:
        rc = 0
        for c in cmds:  # one multirun per group of missing seeds, in turn
            rc = subprocess.call([sys.executable, *c[1:]], cwd=tables.REPO, env=env) or rc
    else:
        rc = _run_parallel(phases, env, out_root, a.table)
    log_launch(out_root, {**rec, "wall_s": time.time() - t0, "rc": rc,
                          "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return rc


if __name__ == "__main__":
    sys.exit(main())
