#!/usr/bin/env python
"""lowprec: train with low-precision neural gradients and compare with the fp32 baseline.

    python run.py                                   # resnet20 on digits, grad=luq4, vs fp32
    python run.py model=resnet50 grad=mvue24 fwd=int4 trainer.epochs=4
    python run.py -m grad=fp32,luq4,mvue24          # sweep; every job finds its baseline
    python run.py ... trainer.resume=true hydra.run.dir=<dir of a killed run>
    torchrun --nproc_per_node=2 run.py ...          # DDP (gloo on CPU, nccl on CUDA)
    python run.py -m hydra/launcher=slurm ...       # SLURM via hydra-submitit-launcher

Each run dir gets .hydra/, resolved_config.yaml, metrics.jsonl, summary.json and
checkpoints/last.pt; every finished run appends a row to <out_root>/runs.sqlite.

Baselines (trainer.baseline): every run is compared with the fp32/fp32 run of the same model,
data, epochs (incl. FNT), seed, batch size and every other training setting (the experiment
identity, lowprec.config.Experiment.identity; its hash is the index's `key`). `auto` looks it up in the index and, when there is none, trains it first (in this
process, into <out_root>/baselines/<name>/) and then the requested run. Concurrent jobs (a
parallel sweep, SLURM arrays) coordinate through one flock per key: the job holding it either
is the fp32 run or trains the baseline; the others block on the lock, then find the row. A
holder that dies releases the lock (the kernel does it), and the next job resumes the
half-trained baseline from its checkpoint. So a luq4 job that starts before the fp32 job has
finished always gets a baseline, and the baseline is trained once.

Configuration errors (unknown option, N > M, bits < 2, a missing dataset path, ...) print one
`error: ...` line and exit with status 2 before any training; LOWPREC_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, open_dict

from lowprec.config import register_resolvers

register_resolvers()  # before @hydra.main composes conf/ (it uses ${lowprec_or:...})


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)
    except Exception as e:
        msg = user_error(e)
        if msg is None or os.environ.get("LOWPREC_DEBUG"):
            raise
        print(f"error: {msg}", file=sys.stderr, flush=True)
        sys.exit(2)


def user_error(e: BaseException) -> str | None:
    """The one-line message for an error the user caused, or None for a bug (traceback)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    chain = e
    while chain is not None:  # unwrap InstantiationException etc.
        if isinstance(chain, (ValueError, FileNotFoundError, FloatingPointError)):
            lines = str(chain).strip().splitlines()
            return lines[0] if lines else type(chain).__name__
        chain = chain.__cause__  # `raise ... from e` (Hydra's InstantiationException does)
    if isinstance(e, (HydraException, OmegaConfBaseException)):
        return str(e).strip().splitlines()[0]
    return None


def run(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    from lowprec.config import experiment_from_cfg
    from lowprec.data import build_datasets
    from lowprec.distributed import broadcast, setup_distributed, teardown_distributed
    from lowprec.train import train_and_record

    hc = HydraConfig.get()
    exp = experiment_from_cfg(cfg, names=dict(hc.runtime.choices), run_dir=hc.runtime.output_dir,
                              name=hc.runtime.choices.get("experiment"))
    d = setup_distributed(exp.trainer.device)  # the one DDP set-up of this process
    try:
        # Every rank uses rank 0's run dir (their ${now:} may differ by a second).
        own_dir, exp.run_dir = exp.run_dir, broadcast(exp.run_dir, d)
        if own_dir != exp.run_dir:
            _drop_stray_dir(own_dir)
        datasets = build_datasets(exp.data)  # missing paths fail here, before any training
        baseline, status = find_or_train_baseline(exp, cfg, datasets, d)
        # The fp32/fp32 run holds its key's lock while training: concurrent runs needing it wait.
        lock = _lock(exp) if exp.is_baseline and d.main else contextlib.nullcontext()
        with lock:
            summary = train_and_record(exp, datasets, baseline=baseline, baseline_status=status,
                                       dist=d)
        if d.main:
            print_result(summary)
        return summary["final_top1"]
    finally:
        teardown_distributed(d)


def find_or_train_baseline(exp, cfg: DictConfig, datasets, d):
    """(baseline index row or None, status) for trainer.baseline = auto | skip | require."""
    from lowprec import runs
    from lowprec.distributed import broadcast
    from lowprec.train import train_and_record

    t = exp.trainer
    if exp.is_baseline:
        return None, "self"
    if t.baseline == "skip":
        return None, "skipped"

    def find():
        row = None
        if d.main:
            row = runs.find_baseline(exp.index, **exp.baseline_match)
        return broadcast(row, d)

    row = find()
    if row is not None:
        return row, "found"
    if t.baseline == "require":
        raise ValueError(f"no fp32/fp32 baseline in {exp.index} for {exp.baseline_match}; "
                         "run it first or use trainer.baseline=auto")
    with _lock(exp) if d.main else contextlib.nullcontext():
        row = find()  # someone may have finished it while we waited for the lock
        if row is not None:
            return row, "found"
        bexp = baseline_experiment(exp, cfg)
        if d.main:
            print(f"baseline: no fp32/fp32 run in the index; training it first in {bexp.run_dir}",
                  flush=True)
        train_and_record(bexp, datasets, baseline_status="self", dist=d)
        row = find()
    if row is None:
        raise RuntimeError(f"baseline trained in {bexp.run_dir} but not found in {exp.index}")
    return row, "trained"


def baseline_experiment(exp, cfg: DictConfig):
    """`cfg` with the fp32 grad and fwd recipes (from conf/grad/fp32.yaml, conf/fwd/fp32.yaml),
    everything else equal, in <out_root>/baselines/<name>/ (resumed if a previous try died)."""
    from hydra import compose
    from lowprec.config import experiment_from_cfg

    ref = compose(config_name="config", overrides=["grad=fp32", "fwd=fp32"])
    bcfg = cfg.copy()
    with open_dict(bcfg):
        bcfg.grad, bcfg.fwd = ref.grad, ref.fwd
        bcfg.trainer.resume = True
        bcfg.trainer.baseline = "skip"
    names = {**exp.names, "grad": "fp32", "fwd": "fp32"}
    bexp = experiment_from_cfg(bcfg, names=names, run_dir=_baseline_dir(exp))
    assert bexp.is_baseline and bexp.key == exp.key, (bexp.names, bexp.key, exp.key)
    return bexp


def _baseline_dir(exp) -> Path:
    m = exp.baseline_match
    name = (f"{m['model']}_{m['data']}_e{m['epochs']}+{m['fnt_epochs']}_b{m['batch_size']}"
            f"_s{m['seed']}_{m['key'][:8]}")
    return exp.index.parent / "baselines" / name


def _lock(exp):
    from lowprec import runs

    d = _baseline_dir(exp)
    return runs.file_lock(d.parent / (d.name + ".lock"))


def _drop_stray_dir(path: Path) -> None:
    """Remove the run dir Hydra made for a non-zero rank whose ${now:} differed from rank 0's,
    if it holds only Hydra's own files."""
    if path.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in path.iterdir()):
        shutil.rmtree(path, ignore_errors=True)


def print_result(s: dict) -> None:
    def pct(v):
        return "   n/a" if v is None else f"{v:6.2f}%"

    base = {"self": "this run", "found": f"from the index: {s['baseline_run']}",
            "trained": f"trained first: {s['baseline_run']}"}
    print(f"== {s['model']} on {s['data']}, fwd={s['fwd']} grad={s['grad']}, "
          f"{s['epochs']} epochs + {s['fnt_epochs']} FNT, seed {s['seed']}")
    print(f"top-1          {pct(s['final_top1'])}   (best {s['best_top1']:.2f}%)")
    print(f"fp32 baseline  {pct(s['baseline_top1'])}   ({base.get(s['baseline'], 'no baseline')})")
    deg = "n/a" if s["degradation"] is None else f"{s['degradation']:+.2f} points"
    print(f"degradation    {deg}   (baseline - top-1)")
    print(f"run dir        {s['run_dir']}", flush=True)


# Config groups whose options are files under conf/<group>/ (Hydra's own groups are left to Hydra).
_OUR_GROUPS = ("model", "data", "fwd", "grad", "optim", "sched", "trainer", "logger", "experiment")


def check_group_options(argv: list[str], conf: Path = Path(__file__).resolve().parent / "conf") -> str | None:
    """One line naming an unknown `group=option` on the command line (with the valid options and
    the closest match), or None. Hydra would also refuse it, but in a dozen lines."""
    import difflib

    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.lstrip("+~").split("=", 1)
        if key not in _OUR_GROUPS or any(c in value for c in "()[]{}$*"):
            continue  # a field override (grad.update.n=5), or Hydra sweep syntax: Hydra checks it
        valid = sorted(str(p.relative_to(conf / key))[:-5] for p in (conf / key).rglob("*.yaml")
                       if not p.name.startswith("_"))
        for v in value.split(","):
            if v in ("null", "") or v in valid:
                continue
            close = difflib.get_close_matches(v, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            shown = ", ".join(valid) if len(valid) <= 20 else ", ".join(valid[:20]) + ", ..."
            return f"unknown {key} option {v!r}{hint}; valid: {shown}"
    return None


if __name__ == "__main__":
    bad = check_group_options(sys.argv[1:])
    if bad:
        print(f"error: {bad}", file=sys.stderr, flush=True)
        sys.exit(2)
    main()
