#!/usr/bin/env python
"""lowprec: train with low-precision neural gradients and compare with the fp32 baseline.

    python run.py                                   # resnet20 on digits, grad=luq4, vs fp32
    python run.py model=resnet50 grad=mvue24 fwd=int4 trainer.epochs=4
    python run.py -m grad=fp32,luq4,mvue24          # sweep; every job finds its baseline
    python run.py ... trainer.resume=<dir of a killed run>      # = trainer.resume=true hydra.run.dir=<dir>
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

Every run gets its own directory (the seed and a per-process tag are in its name) and holds an
exclusive lock on it (<run dir>/.lock) for its life: a second process finding it locked, or
finding a finished summary.json there without trainer.resume, stops before touching anything.

Exit status: 0 the run finished with status ok; 2 an input error (unknown option or key, a value
out of range, N > M, a missing dataset path, a corrupt checkpoint or index, an unwritable
out_root, a run dir in use...), one `error: ...` line naming the key or file, before any training
(LOWPREC_DEBUG=1 shows the traceback); 3 a run (the fp32 baseline trained first, or the requested
run) diverged (more than trainer.max_skip_frac of its steps skipped as non-finite) or failed on a
non-finite value: one `error:` line naming which, the index row has status diverged/failed;
1 anything else during training, with its traceback (a bug).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, open_dict

from lowprec.config import register_resolvers

register_resolvers()  # before @hydra.main composes conf/ (it uses ${lowprec_or:...})


class RunFailed(Exception):
    """A run ended diverged, or failed on a non-finite value: exit 3 with one line naming it."""


# Set while a run trains: an exception then is a bug (traceback, exit 1) unless it is RunFailed.
_TRAINING = [False]
# Run dirs (resolved) whose lock this process holds; _KEEP keeps the one taken before Hydra
# starts (explicit hydra.run.dir) held until the process ends.
_HELD: set[Path] = set()
_KEEP: list[contextlib.ExitStack] = []
_EXISTED: set[Path] = set()  # explicit run dirs that existed before this process started


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    except Exception as e:
        msg = None if _TRAINING[0] else user_error(e)
        if msg is None or os.environ.get("LOWPREC_DEBUG"):
            raise
        _drop_new_run_dir()
        print(f"error: {msg}", file=sys.stderr, flush=True)
        sys.exit(2)


def _drop_new_run_dir() -> None:
    """After an input error: remove the run dir Hydra made for this run if it holds only Hydra's
    own files (nothing was trained; a dir that existed before, e.g. to resume, is kept)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        path = Path(HydraConfig.get().runtime.output_dir).resolve()
    except Exception:  # no Hydra context: nothing to clean
        return
    if path not in _EXISTED:
        _drop_stray_dir(path)
        with contextlib.suppress(OSError):  # the <date>/ folder, if this was its only run
            path.parent.rmdir()


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
    from lowprec.train import check_task, train_and_record

    hc = HydraConfig.get()
    exp = experiment_from_cfg(cfg, names=dict(hc.runtime.choices), run_dir=hc.runtime.output_dir,
                              name=hc.runtime.choices.get("experiment"))
    d = setup_distributed(exp.trainer.device)  # the one DDP set-up of this process
    try:
        # Every rank uses rank 0's run dir (their ${now:} may differ by a second).
        own_dir, exp.run_dir = exp.run_dir, broadcast(exp.run_dir, d)
        if own_dir != exp.run_dir:
            _drop_stray_dir(own_dir)
        with contextlib.ExitStack() as held:
            if d.main:  # checked before anything is trained or written
                if exp.run_dir.resolve() not in _HELD:
                    held.enter_context(_hold_run_dir(exp.run_dir))
                check_run_dir(exp)
            if exp.trainer.batch_size % d.world:
                raise ValueError(f"trainer.batch_size={exp.trainer.batch_size} is not divisible "
                                 f"by {d.world} ranks")
            if exp.data.name == "digits" and exp.data.root is not None:
                raise ValueError(f"data.root={exp.data.root}: data=digits takes no root (the data "
                                 "ships with scikit-learn); drop data.root or choose another data=")
            datasets = build_datasets(exp.data)  # missing paths fail here, before any training
            check_task(exp, datasets)  # a language model needs text data, and vice versa
            check_model(exp, datasets)
            if d.main:
                from lowprec import runs
                runs.check_index(exp.index)  # last: an input error above leaves no index behind
            baseline, status = find_or_train_baseline(exp, cfg, datasets, d)
            # The fp32/fp32 run holds its key's lock while training: concurrent runs needing it wait.
            lock = _lock(exp) if exp.is_baseline and d.main else contextlib.nullcontext()
            with lock:
                summary = _training(f"run ({_describe(exp)})", exp, lambda: train_and_record(
                    exp, datasets, baseline=baseline, baseline_status=status, dist=d))
            if d.main:
                print_result(summary)
            return summary["final_top1"]
    finally:
        teardown_distributed(d)


def _describe(exp) -> str:
    n = exp.names
    return f"grad={n['grad']} fwd={n['fwd']} in {exp.run_dir}"


def _training(role: str, exp, fn):
    """Run `fn` (a train_and_record call) as the training phase: a non-finite failure or a
    diverged result becomes RunFailed naming `role`; any other exception is a bug (traceback)."""
    from lowprec import NonFiniteError

    _TRAINING[0] = True  # stays set if fn raises: main() then shows the traceback
    try:
        summary = fn()
    except (FloatingPointError, NonFiniteError) as e:
        raise RunFailed(f"{role} failed: {str(e).strip().splitlines()[0]}; recorded in "
                        f"{exp.index} with status failed") from e
    _TRAINING[0] = False
    if summary.get("status", "ok") != "ok":
        raise RunFailed(f"{role} {summary['status']}: {summary['skipped_steps']} of "
                        f"{summary['steps']} steps skipped as non-finite (more than "
                        f"trainer.max_skip_frac={exp.trainer.max_skip_frac}); recorded in "
                        f"{exp.index} with status {summary['status']}")
    return summary


@contextlib.contextmanager
def _hold_run_dir(run_dir: Path):
    from lowprec import runs

    with runs.run_dir_lock(run_dir):
        _HELD.add(Path(run_dir).resolve())
        try:
            yield
        finally:
            _HELD.discard(Path(run_dir).resolve())


def check_run_dir(exp) -> None:
    """Before training, holding the run dir's lock: refuse a finished run without
    trainer.resume, remove a checkpoint write a kill left behind, and (resume) prove the
    checkpoint readable and written by this configuration."""
    from lowprec import checkpoint

    if (exp.run_dir / "summary.json").exists() and not exp.trainer.resume:
        raise ValueError(f"hydra.run.dir={exp.run_dir}: holds a finished run (summary.json); "
                         "add trainer.resume=true to redo its summary, or use another run dir")
    ckpt_dir = exp.run_dir / "checkpoints"
    for p in checkpoint.remove_stale_tmp(ckpt_dir):
        print(f"removed {p.name}: a checkpoint write cut short by a kill", file=sys.stderr)
    if exp.trainer.resume and (ckpt_dir / "last.pt").exists():
        ck = checkpoint.read_checkpoint(ckpt_dir / "last.pt")
        if ck["key"] != exp.key or ck["names"] != exp.names:
            raise ValueError(f"{ckpt_dir / 'last.pt'} was written by a different configuration "
                             f"({ck['names']}); use another hydra.run.dir or trainer.resume=false")


def check_model(exp, datasets) -> None:
    """Build the model once (and drop it) so impossible model options are an input error."""
    from lowprec.models import build_model

    try:
        build_model(exp.model, num_classes=datasets.num_classes,
                    in_channels=datasets.in_channels, image_size=datasets.image_size)
    except Exception as e:  # ZeroDivisionError for patch_size=0, shape errors, ...
        kw = getattr(exp.model, "kwargs", None)
        raise ValueError(f"model={exp.names['model']} model.kwargs={kw}: cannot build the model "
                         f"({type(e).__name__}: {str(e).strip()[:200]})") from e


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
            check_run_dir(bexp)  # under the key's lock: stale tmp files, a corrupt checkpoint
        _training(f"baseline run (fp32/fp32, trained first in {bexp.run_dir}, before grad="
                  f"{exp.names['grad']} fwd={exp.names['fwd']})", bexp,
                  lambda: train_and_record(bexp, datasets, baseline_status="self", dist=d))
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
    """Remove a run dir that holds only Hydra's own files (and our lock file): the one Hydra made
    for a non-zero rank whose name differs from rank 0's, or one whose run stopped at an input
    error."""
    if path.is_dir() and all(p.name in (".hydra", ".lock") or p.suffix == ".log"
                             for p in path.iterdir()):
        shutil.rmtree(path, ignore_errors=True)


def print_result(s: dict) -> None:
    from lowprec.train import summary_lines

    print("\n".join(summary_lines(s)), flush=True)


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


_TRUE = ("true", "yes", "on", "1")
_BOOL = (*_TRUE, "false", "no", "off", "0", "null", "")


def _value(argv: list[str], key: str) -> str | None:
    vals = [a.split("=", 1)[1] for a in argv if "=" in a and a.lstrip("+~").split("=", 1)[0] == key]
    return vals[-1] if vals else None


def resume_form(argv: list[str]) -> list[str]:
    """`trainer.resume=<run dir>` -> `trainer.resume=true hydra.run.dir=<run dir>`."""
    v = _value(argv, "trainer.resume")
    if v is None or v.strip("'\"").lower() in _BOOL:
        return argv
    path = v.strip("'\"")
    if not Path(path).is_dir():
        raise ValueError(f"trainer.resume={v}: no such run directory (true, false, or the "
                         "directory of the run to resume)")
    other = _value(argv, "hydra.run.dir")
    if other is not None and Path(other).resolve() != Path(path).resolve():
        raise ValueError(f"trainer.resume={v} and hydra.run.dir={other}: two different run dirs")
    rest = [a for a in argv if a.lstrip("+~").split("=", 1)[0] not in ("trainer.resume",
                                                                       "hydra.run.dir")]
    return [*rest, "trainer.resume=true", f"hydra.run.dir={path}"]


def compose_error(e: BaseException, argv: list[str]) -> str:
    """One line for a Hydra composition error, naming the override (key and value)."""
    lines = []
    chain = e
    while chain is not None:
        text = [ln.strip() for ln in str(chain).strip().splitlines() if ln.strip()]
        lines += [ln for ln in text if not ln.startswith(("full_key", "object_type", "To append",
                                                           "Set the environment"))][:1]
        chain = chain.__cause__ or chain.__context__
    m = re.search(r"override '([^']+)'|[Kk]ey '([^']+)'", str(e))
    key = next((g for g in (m.groups() if m else ()) if g), None)
    arg = next((a for a in argv if key and a.lstrip("+~").split("=", 1)[0] == key), None)
    msg = "; ".join(dict.fromkeys(lines)) or type(e).__name__
    return f"{arg}: {msg}" if arg else msg


def preflight(argv: list[str]) -> list[str]:
    """Checks before Hydra creates a run dir (ValueError -> one line, exit 2, nothing written):
    the group options, every override (composed once, so an unknown key or a bad value is one
    line instead of Hydra's dozen), a creatable and writable out_root, and (rank 0, explicit
    run dir) the run dir's lock, held from here for the run's life. Returns argv with
    trainer.resume=<dir> expanded."""
    bad = check_group_options(argv)
    if bad:
        raise ValueError(bad)
    argv = resume_form(argv)
    if any(a in ("-m", "--multirun") for a in argv) or any(a.startswith("-") for a in argv):
        return argv  # sweeps and Hydra's own flags (--help, --cfg, ...): Hydra checks each job
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent / "conf"),
                                   version_base="1.3"):
            cfg = compose("config", overrides=argv)
        out_root, index = Path(str(cfg.out_root)), Path(str(cfg.index))
    except Exception as e:  # Hydra/OmegaConf composition and interpolation errors
        raise ValueError(compose_error(e, argv)) from e
    finally:
        GlobalHydra.instance().clear()
    for key, path in (("out_root", out_root), ("index", index.parent)):
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"{key}={path}: cannot create it ({e.strerror})") from e
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{key}={path}: not writable by this user")
    run_dir = _value(argv, "hydra.run.dir")
    if run_dir is not None and os.environ.get("RANK", "0") == "0":
        run_dir = Path(run_dir).absolute()
        if run_dir.exists():
            _EXISTED.add(run_dir.resolve())
        resume = (_value(argv, "trainer.resume") or "").lower() in _TRUE
        if (run_dir / "summary.json").exists() and not resume:
            raise ValueError(f"hydra.run.dir={run_dir}: holds a finished run (summary.json); add "
                             "trainer.resume=true to redo its summary, or use another run dir")
        # Taken now, before Hydra writes .hydra/ into it; released when the process ends.
        stack = contextlib.ExitStack()
        stack.enter_context(_hold_run_dir(run_dir))
        _KEEP.append(stack)
    return argv


if __name__ == "__main__":
    try:
        sys.argv[1:] = preflight(sys.argv[1:])
    except ValueError as e:
        if os.environ.get("LOWPREC_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    main()
