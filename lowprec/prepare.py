"""Run preparation: from a command line to a trained, recorded run (what run.py calls).

`Session` is one process's run preparation, with the state that lives as long as the process
(the run dirs whose lock it holds, those that existed before it started, whether it is training):

1. `preflight(argv)` before Hydra creates a run dir: unknown `group=option`s, every override
   composed once (an unknown key or a bad value is one line), a creatable and writable out_root,
   `trainer.resume=<dir>` expanded, and (rank 0, explicit run dir) the run dir's lock taken.
2. `run(cfg, ...)` inside Hydra's job: the config validated into frozen objects once
   (`config.experiment_from_cfg`), the run dir locked and checked (`check_run_dir`), the data
   and the model built once (`train.build`; an impossible model option is an input error here)
   and handed to training, the index proven usable, the baseline found or trained first
   (`find_or_train_baseline`), then the run trained and recorded (`train_and_record`).
3. `main(cfg, ...)` maps the outcome to the exit status: 0 ok; 2 an input error (one `error:`
   line naming the key, nothing written); 3 a run that diverged or failed on a non-finite value
   (`RunFailed`); anything else a bug with its traceback.

Baselines (trainer.baseline): auto looks the fp32/fp32 run of the same experiment identity up in
the index and, when there is none, trains it first into <out_root>/baselines/<name>/ under a
per-key flock, so concurrent jobs train it once (run.py's docstring tells the whole story).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import runs
from .checkpoint import atomic_write_text, kill_point
from .config import Experiment, experiment_from_cfg, trainer_defaults
from .distributed import Dist, broadcast, setup_distributed, teardown_distributed
from .preflight import (TRUE, check_env, check_group_options, compose_checked, resume_form,
                        user_error, value_of)
from .summary import ordered, summarize, summary_lines
from .train import build, check_task, check_world, train

MAX_BLOCK = 8192  # the largest context length a language model may ask for


class RunFailed(Exception):
    """A run ended diverged, or failed on a non-finite value: exit 3 with one line naming it."""


@dataclass
class Session:
    """One process's run preparation (module docstring)."""
    held: set[Path] = field(default_factory=set)        # run dirs (resolved) whose lock we hold
    existed: set[Path] = field(default_factory=set)     # explicit run dirs that existed before
    keep: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # held to the end
    training: bool = False  # an exception now is a bug (traceback) unless it is RunFailed

    # ------------------------------------------------------------------ entry points
    def main(self, cfg, *, names: dict[str, str], run_dir, name: str | None = None) -> float:
        """`run`, with its outcome as an exit status (module docstring); returns final top-1."""
        try:
            return self.run(cfg, names=names, run_dir=run_dir, name=name)
        except RunFailed as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(3)
        except Exception as e:
            msg = None if self.training else user_error(e)
            if msg is None or os.environ.get("LOWPREC_DEBUG"):
                raise
            self.drop_new_run_dir(run_dir)
            print(f"error: {msg}", file=sys.stderr, flush=True)
            sys.exit(2)

    def run(self, cfg, *, names: dict[str, str], run_dir, name: str | None = None) -> float:
        exp = experiment_from_cfg(cfg, names=names, run_dir=run_dir, name=name)
        if exp.trainer.dry_run:  # synthetic inputs at the real shapes; reads no data, writes nothing
            from .dry_run import dry_run
            try:
                return dry_run(exp)["final_loss"]
            finally:
                self.drop_new_run_dir(run_dir)  # Hydra's own files only: no run dir is left
        d = setup_distributed(exp.trainer.device)  # the one DDP set-up of this process
        try:
            # Every rank uses rank 0's run dir (their ${now:} may differ by a second).
            own_dir, exp.run_dir = exp.run_dir, broadcast(exp.run_dir, d)
            if own_dir != exp.run_dir:
                drop_stray_dir(own_dir)
            with contextlib.ExitStack() as held:
                if d.main:  # checked before anything is trained or written
                    if exp.run_dir.resolve() not in self.held:
                        held.enter_context(self.hold_run_dir(exp.run_dir))
                    check_run_dir(exp)
                    held.enter_context(tee_log(exp.run_dir / "run.log"))
                done = broadcast(finished_summary(exp) if d.main else None, d)
                if done is not None:  # a finished run's dir and row are never rewritten
                    return self.report_finished(exp, done, d)
                datasets, built = prepare_inputs(exp, d)
                if d.main:
                    runs.check_index(exp.index)  # last: an input error above leaves no index behind
                baseline, status = self.find_or_train_baseline(exp, cfg, datasets, d)
                # The fp32/fp32 run holds its key's lock while training: concurrent runs wait.
                lock = key_lock(exp) if exp.is_baseline and d.main else contextlib.nullcontext()
                with lock:
                    summary = self.training_phase(
                        f"run ({describe_run(exp)})", exp, lambda: train_and_record(
                            exp, datasets, baseline=baseline, baseline_status=status, dist=d,
                            model=built))
                if d.main:
                    print("\n".join(summary_lines(summary)), flush=True)
                return summary["final_top1"]
        finally:
            teardown_distributed(d)

    # ------------------------------------------------------------------ pieces
    def report_finished(self, exp: Experiment, summary: dict, d: Dist) -> float:
        """Resume of a run that finished (ok or diverged): nothing is trained or rewritten; its
        index row is added only if a kill came between summary.json and the row."""
        if d.main:
            runs.check_index(exp.index)
            if not runs.rows(exp.index, run_dir=str(exp.run_dir)):
                runs.insert(exp.index, summary)
                print(f"resume: {exp.run_dir} had finished; its index row was missing and is "
                      "now added", flush=True)
            else:
                print(f"resume: {exp.run_dir} had finished (status {summary.get('status')}); "
                      "nothing to do, its result is unchanged", flush=True)
            print("\n".join(summary_lines(summary)), flush=True)
        if summary.get("status", "ok") != "ok":
            raise RunFailed(f"run ({describe_run(exp)}) {summary['status']}: "
                            f"{summary.get('status_reason')}; recorded in {exp.index}")
        return summary["final_top1"]

    def training_phase(self, role: str, exp: Experiment, fn):
        """Run `fn` (a train_and_record call) as the training phase: a non-finite failure or a
        diverged result becomes RunFailed naming `role`; any other exception is a bug."""
        from ._common import NonFiniteError

        self.training = True  # stays set if fn raises: main() then shows the traceback
        try:
            summary = fn()
        except (FloatingPointError, NonFiniteError) as e:
            raise RunFailed(f"{role} failed: {str(e).strip().splitlines()[0]}; recorded in "
                            f"{exp.index} with status failed") from e
        self.training = False
        if summary.get("status", "ok") != "ok":
            raise RunFailed(f"{role} {summary['status']}: {summary.get('status_reason')}; "
                            f"recorded in {exp.index} with status {summary['status']}")
        return summary

    @contextlib.contextmanager
    def hold_run_dir(self, run_dir: Path):
        with runs.run_dir_lock(run_dir):
            self.held.add(Path(run_dir).resolve())
            try:
                yield
            finally:
                self.held.discard(Path(run_dir).resolve())

    def drop_new_run_dir(self, run_dir) -> None:
        """After an input error: remove the run dir Hydra made for this run if it holds only
        Hydra's own files (nothing was trained; a dir that existed before, e.g. to resume, is kept)."""
        path = Path(run_dir).resolve()
        if path not in self.existed:
            drop_stray_dir(path)
            with contextlib.suppress(OSError):  # the <date>/ folder, if this was its only run
                path.parent.rmdir()

    def find_or_train_baseline(self, exp: Experiment, cfg, datasets, d: Dist):
        """(baseline index row or None, status) for trainer.baseline = auto | skip | require."""
        t = exp.trainer
        if exp.is_baseline:
            return None, "self"
        if t.baseline == "skip":
            return None, "skipped"

        def find():
            return broadcast(runs.find_baseline(exp.index, **exp.baseline_match) if d.main else None, d)

        row = find()
        if row is not None:
            return row, "found"
        if t.baseline == "require":
            raise ValueError(f"no fp32/fp32 baseline in {exp.index} for {exp.baseline_match}; "
                             "run it first or use trainer.baseline=auto")
        with key_lock(exp) if d.main else contextlib.nullcontext():
            row = find()  # someone may have finished it while we waited for the lock
            if row is not None:
                return row, "found"
            bexp = baseline_experiment(exp, cfg)
            if d.main:
                print(f"baseline: no fp32/fp32 run in the index; training it first in "
                      f"{bexp.run_dir}", flush=True)
                check_run_dir(bexp)  # under the key's lock: stale tmp files, a corrupt checkpoint
            self.training_phase(
                f"baseline run (fp32/fp32, trained first in {bexp.run_dir}, before grad="
                f"{exp.names['grad']} fwd={exp.names['fwd']})", bexp,
                lambda: train_and_record(bexp, datasets, baseline_status="self", dist=d))
            row = find()
        if row is None:
            raise RuntimeError(f"baseline trained in {bexp.run_dir} but not found in {exp.index}")
        return row, "trained"

    def preflight(self, argv: list[str]) -> list[str]:
        """Checks before Hydra creates a run dir (ValueError -> one line, exit 2, nothing
        written): the group options, every override (composed once, so an unknown key or a bad
        value is one line instead of Hydra's dozen), a creatable and writable out_root, and
        (rank 0, explicit run dir) the run dir's lock, held from here for the process's life.
        Returns argv with trainer.resume=<dir> expanded."""
        check_env()
        bad = check_group_options(argv)
        if bad:
            raise ValueError(bad)
        argv = resume_form(argv)
        if any(a.startswith("-") for a in argv):
            return argv  # sweeps and Hydra's own flags (--help, --cfg, ...): Hydra checks each job
        cfg = compose_checked(argv)
        out_root, index = Path(str(cfg.out_root)), Path(str(cfg.index))
        for key, path in (("out_root", out_root), ("index", index.parent)):
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(f"{key}={path}: cannot create it ({e.strerror})") from e
            if not os.access(path, os.W_OK | os.X_OK):
                raise ValueError(f"{key}={path}: not writable by this user")
        run_dir = value_of(argv, "hydra.run.dir")
        if run_dir is not None and os.environ.get("RANK", "0") == "0":
            run_dir = Path(run_dir).absolute()
            if run_dir.exists():
                self.existed.add(run_dir.resolve())
            resume = (value_of(argv, "trainer.resume") or "").lower() in TRUE
            if (run_dir / "summary.json").exists() and not resume:
                raise ValueError(f"hydra.run.dir={run_dir}: holds a finished run (summary.json); "
                                 "add trainer.resume=true to redo its summary, or use another run dir")
            # Taken now, before Hydra writes .hydra/ into it; released when the process ends.
            self.keep.enter_context(self.hold_run_dir(run_dir))
        return argv


# ----------------------------------------------------------------------------- one run


def prepare_inputs(exp: Experiment, d: Dist):
    """The data and the model, built once (input errors here, before any training)."""
    from .data import build_datasets

    check_world(exp, d)
    if exp.data.name == "digits" and exp.data.root is not None:
        raise ValueError(f"data.root={exp.data.root}: data=digits takes no root (the data "
                         "ships with scikit-learn); drop data.root or choose another data=")
    block = (getattr(exp.model, "kwargs", None) or {}).get("block_size")
    if isinstance(block, int) and block > MAX_BLOCK:
        raise ValueError(f"model.kwargs.block_size={block}: at most {MAX_BLOCK} (attention keeps "
                         "batch x heads x block_size^2 scores; this many would not fit in memory)")
    datasets = build_datasets(exp.data)  # missing paths fail here, before any training
    check_task(exp, datasets)  # a language model needs text data, and vice versa
    try:
        built = build(exp, datasets)
    except Exception as e:  # ZeroDivisionError for patch_size=0, shape errors, ...
        kw = getattr(exp.model, "kwargs", None)
        raise ValueError(f"model={exp.names['model']} model.kwargs={kw}: cannot build the model "
                         f"({type(e).__name__}: {str(e).strip()[:200]})") from e
    return datasets, built


def train_and_record(exp: Experiment, datasets=None, *, baseline: dict[str, Any] | None = None,
                     baseline_status: str = "no baseline", dist: Dist | None = None,
                     model=None) -> dict[str, Any]:
    """Train, then (rank 0) write resolved_config.yaml, summary.json and the index row."""
    from omegaconf import OmegaConf

    d = dist if dist is not None else setup_distributed(exp.trainer.device)
    if d.main:
        exp.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(OmegaConf.to_yaml(OmegaConf.create(exp.config)),
                          exp.run_dir / "resolved_config.yaml")
    try:
        summary = train(exp, datasets, dist=d, model=model,
                        finalize=lambda result: summarize(exp, result, baseline, baseline_status))
    except Exception as e:  # the run failed: record it (status failed), then let it propagate
        if d.main:
            record(exp, summarize(exp, {"final_top1": None, "best_top1": None, "wall_time": None,
                                        "status": "failed",
                                        "error": f"{type(e).__name__}: {str(e).strip()[:500]}"},
                                  None, "no baseline"))
        raise
    if d.main:
        record(exp, summary)
    return summary


def record(exp: Experiment, summary: dict[str, Any]) -> None:
    """summary.json (strict JSON) and the index row, in that order (a kill between them is
    repaired by resuming: the row is written again)."""
    atomic_write_text(runs.dumps(ordered(summary), indent=2) + "\n",
                      exp.run_dir / "summary.json")
    kill_point("summary_written")
    runs.insert(exp.index, summary)
    kill_point("indexed")


class _Tee:
    """A text stream that also appends what it is given to a file."""

    def __init__(self, stream, f):
        self.stream, self.f = stream, f

    def write(self, text: str) -> int:
        self.f.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.f.flush()
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(self.stream, name)


@contextlib.contextmanager
def tee_log(path: Path):
    """While the block runs, everything printed (stdout and stderr) is also appended to `path`
    (the run dir's run.log, so it holds the run's whole log, not only Hydra's logging records)."""
    with open(path, "a", buffering=1) as f:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, f), _Tee(err, f)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err


def finished_summary(exp: Experiment) -> dict | None:
    """The run dir's summary.json when it records a finished run (status ok or diverged), else
    None (none, unreadable, or a failed run, which a resume may redo)."""
    import json

    try:
        s = json.loads((exp.run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) and s.get("status", "ok") in ("ok", "diverged") else None


def describe_run(exp: Experiment) -> str:
    n = exp.names
    return f"grad={n['grad']} fwd={n['fwd']} in {exp.run_dir}"


def check_run_dir(exp: Experiment) -> None:
    """Before training, holding the run dir's lock: refuse a finished run without
    trainer.resume, remove a checkpoint write a kill left behind, and (resume) prove the
    checkpoint readable and written by this configuration."""
    from . import checkpoint

    if (exp.run_dir / "summary.json").exists() and not exp.trainer.resume:
        raise ValueError(f"hydra.run.dir={exp.run_dir}: holds a finished run (summary.json); "
                         "add trainer.resume=true to redo its summary, or use another run dir")
    ckpt_dir = exp.run_dir / "checkpoints"
    for p in checkpoint.remove_stale_tmp(ckpt_dir):
        print(f"removed {p.name}: a checkpoint write cut short by a kill", file=sys.stderr)
    if exp.trainer.resume and (ckpt_dir / "last.pt").exists():
        ck = checkpoint.read_checkpoint(ckpt_dir / "last.pt")
        saved = (ck.get("extra") or {}).get("config")  # checkpoints before it: key and names only
        changed = config_changes(saved, exp.config) if isinstance(saved, dict) else []
        if not changed and (ck["key"] != exp.key or ck["names"] != exp.names):
            raise ValueError(f"{ckpt_dir / 'last.pt'} was written by a different configuration "
                             f"({ck['names']}); use another hydra.run.dir or trainer.resume=false")
        if changed:
            raise ValueError(
                f"trainer.resume: {ckpt_dir / 'last.pt'} was written with another configuration: "
                + ", ".join(f"{k}={_short(a)} (now {_short(b)})" for k, a, b in changed[:6])
                + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
                + "; resume with the run's own options, or start a new run")


# Keys that say how this invocation runs, not what the run is: a resume may change them.
RUN_LOCAL_KEYS = frozenset({"trainer.resume", "trainer.dry_run", "trainer.dry_run_batch"})


def config_changes(saved: dict, now: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) for every resolved-config key whose value differs
    between a checkpoint and this run, RUN_LOCAL_KEYS aside, and a trainer key the checkpoint predates
    when it is at its default."""
    def flat(d, pre=""):
        out = {}
        for k, v in (d or {}).items():
            if isinstance(v, dict) and v:
                out.update(flat(v, f"{pre}{k}."))
            else:
                out[f"{pre}{k}"] = v
        return out

    a, b = flat(saved), flat(now)
    missing = object()
    # A trainer key newer than the checkpoint, now at its default, is the behaviour the run had.
    newer = {f"trainer.{k}" for k, v in trainer_defaults().items() if f"trainer.{k}" not in a
             and b.get(f"trainer.{k}", missing) == v}
    return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
            if k not in RUN_LOCAL_KEYS and k not in newer and a.get(k, missing) != b.get(k, missing)]


def _short(v) -> str:
    return "(unset)" if not isinstance(v, (str, int, float, bool, list, tuple, type(None))) \
        else str(v)[:60]


# ----------------------------------------------------------------------------- baselines


def baseline_experiment(exp: Experiment, cfg) -> Experiment:
    """`cfg` with the fp32 grad and fwd recipes (the registry in lowprec.recipes),
    everything else equal, in <out_root>/baselines/<name>/ (resumed if a previous try died)."""
    from hydra import compose
    from omegaconf import open_dict

    # The fp32 recipe nodes from wherever conf/ keeps them (files or a ConfigStore).
    ref = compose(config_name="config", overrides=["grad=fp32", "fwd=fp32"])
    bcfg = cfg.copy()
    with open_dict(bcfg):
        bcfg.grad, bcfg.fwd = ref.grad, ref.fwd
        bcfg.trainer.resume = True
        bcfg.trainer.baseline = "skip"
    names = {**exp.names, "grad": "fp32", "fwd": "fp32"}
    bexp = experiment_from_cfg(bcfg, names=names, run_dir=baseline_dir(exp))
    assert bexp.is_baseline and bexp.key == exp.key, (bexp.names, bexp.key, exp.key)
    return bexp


def baseline_dir(exp: Experiment) -> Path:
    m, t = exp.baseline_match, exp.trainer
    length = (f"steps{t.max_steps}+{t.fnt_steps}" if t.max_steps  # a step budget says steps
              else f"e{m['epochs']}+{m['fnt_epochs']}")
    name = f"{m['model']}_{m['data']}_{length}_b{m['batch_size']}_s{m['seed']}_{m['key'][:8]}"
    return exp.index.parent / "baselines" / name


def key_lock(exp: Experiment):
    """The flock of `exp`'s experiment key: held while its fp32 baseline trains."""
    d = baseline_dir(exp)
    return runs.file_lock(d.parent / (d.name + ".lock"))


def drop_stray_dir(path: Path) -> None:
    """Remove a run dir that holds only Hydra's own files (and our lock file): the one Hydra made
    for a non-zero rank whose name differs from rank 0's, or one whose run stopped at an input
    error."""
    if path.is_dir() and all(p.name in (".hydra", ".lock") or p.suffix == ".log"
                             for p in path.iterdir()):
        shutil.rmtree(path, ignore_errors=True)
