"""Checkpoints, RNG state and atomic file writes.

A checkpoint (run_dir/checkpoints/last.pt, written at epoch ends) holds everything later steps
depend on: model, optimizer, schedule position (the optimizer step), the training progress
(epoch, skipped steps, best and last top-1, elapsed time), the converted layers' run-time state
(`convert.layer_state`: estimator state such as LUQ's in-hindsight max, the weight-N:M mask and
its recomputation counter) and every RNG state (torch, numpy, python, cuda; one per DDP rank).
Restoring all of it makes a resumed run end with the same weights as an uninterrupted one.
Files are written to a temporary name, fsynced and renamed: a kill leaves the old or the new
file, never a torn one; the temporary file a kill leaves behind is removed by the next run in
that directory (`remove_stale_tmp`, called while the run directory's lock is held).

Safety: a checkpoint holds only tensors, plain containers, numbers and strings (RNG states as
tensors), and is read with `torch.load(weights_only=True)`: a file planted in a run directory
cannot execute code. Checkpoints written before RNG states were tensors hold numpy arrays; those
(and only those) extra types are admitted for them. A file that cannot be read, or holds
anything else, is a ValueError naming the file (one `error:` line from run.py).

Test hook: LOWPREC_TEST_KILL_AT=<point> makes the process SIGKILL itself when it reaches the named
point (`kill_point`), so crash-safety tests kill at exact places (mid-epoch, during the
checkpoint write, between summary and index row) instead of by timing; LOWPREC_TEST_RAISE_AT=
<point> raises a ValueError there instead (a planted bug: run.py must show its traceback).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import random
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .convert import layer_state, load_layer_state
from .distributed import Dist, all_gather


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def kill_point(point: str) -> None:
    """SIGKILL this process if LOWPREC_TEST_KILL_AT names `point`; raise a ValueError (a planted
    bug) if LOWPREC_TEST_RAISE_AT does (crash-safety and error-reporting tests only)."""
    if os.environ.get("LOWPREC_TEST_RAISE_AT") == point:
        raise ValueError(f"test hook: planted error at {point}")
    if os.environ.get("LOWPREC_TEST_KILL_AT") == point:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def rng_state() -> dict:
    """Every RNG state as tensors and plain data (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(),
          "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                    float(gauss)],
          "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    kind, keys, *rest = st["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), *rest))
    v, internal, gauss = st["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def weights_hash(model: nn.Module) -> str:
    """sha256 of every parameter and buffer (names and bytes): equal hashes = equal weights."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if isinstance(v, torch.Tensor):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, fsync, then os.replace: a kill leaves the old or the new
    file, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        kill_point("ckpt_write")  # the temporary file written, not yet synced or renamed
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    kill_point("ckpt_replaced")


def remove_stale_tmp(directory: Path) -> list[Path]:
    """Delete the *.tmp<pid> files a killed write left in `directory` (call it only while
    holding the directory's run lock: another live writer's file would go too)."""
    gone = []
    if directory.is_dir():
        for p in directory.glob("*.tmp*"):
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Progress:
    """Where a run stands; saved in and restored from the checkpoint."""
    epoch: int = 0                     # epochs done
    step: int = 0                      # optimizer steps taken (incl. skipped ones)
    skipped: int = 0                   # steps skipped for a non-finite loss or gradient
    best: float = -1.0                 # best top-1 so far
    last: dict[str, float] | None = None  # {"top1", "top5"} of the last evaluated epoch
    elapsed: float = 0.0               # training seconds before this process started
    resumed: bool = False
    # {component: state} of other run-time components, plain containers/tensors only (e.g.
    # "adapt": lowprec.adapt.Controller.state_dict()); checkpoints without it load as {}
    extra: dict = dataclasses.field(default_factory=dict)


def save_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    progress: Progress, elapsed: float, key: str, names: dict[str, str],
                    d: Dist) -> None:
    """Collective (every rank's RNG state is gathered); rank 0 writes `path`."""
    rngs = all_gather(rng_state(), d)
    if d.main:
        atomic_save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": {"step": progress.step}, "epoch": progress.epoch,
            "skipped": progress.skipped, "best_top1": progress.best, "last": progress.last,
            "rng": rngs, "layer_state": layer_state(model),
            "elapsed": elapsed, "key": key, "names": names, "extra": progress.extra,
        }, path)


# The types a checkpoint may hold besides tensors and plain data: only the numpy RNG state of
# checkpoints written before RNG states were stored as tensors.
_LEGACY_NUMPY = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype,
                 "numpy._core.multiarray._reconstruct": np._core.multiarray._reconstruct,
                 "numpy.core.multiarray._reconstruct": np._core.multiarray._reconstruct,
                 "numpy.dtypes.UInt32DType": type(np.dtype(np.uint32))}
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "skipped", "best_top1", "last",
                   "rng", "layer_state", "elapsed", "key", "names")


def read_checkpoint(path: Path) -> dict:
    """The checkpoint at `path`, read with weights_only=True; ValueError (naming the file and
    what to do) when it is unreadable, holds code or other objects, or lacks a field."""
    what = ("delete it to train from scratch, or point hydra.run.dir at another run directory")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            extra = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # not even a zip archive
            extra = None
        if not extra or not extra <= set(_LEGACY_NUMPY):
            found = f" ({', '.join(sorted(extra))})" if extra else ""
            raise ValueError(f"{path}: refused: the checkpoint holds objects other than tensors "
                             f"and plain data{found}; it was not written by lowprec or was "
                             f"altered: {what}") from e
        try:
            with torch.serialization.safe_globals(list(set(_LEGACY_NUMPY.values()))):
                ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e2:
            raise ValueError(f"{path}: not a readable checkpoint ({type(e2).__name__}); "
                             f"{what}") from e2
    except Exception as e:  # truncated, zero bytes, random bytes, not a zip, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first[:120]}); "
                         f"{what}") from e
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise ValueError(f"{path}: not a lowprec checkpoint (missing {', '.join(missing)}); {what}")
    return ck


def load_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    key: str, names: dict[str, str], d: Dist,
                    before_layer_state: Callable[[int, int, dict], Any] | None = None) -> Progress:
    """Restore `path` into `model` and `optimizer` (and this rank's RNG state) and return the
    progress. `before_layer_state(epoch, step, extra)` runs after the weights are loaded and before
    the layer state is (it may change the recipes, e.g. to enter FNT, which resets that state)."""
    ck = read_checkpoint(path)
    if ck["key"] != key or ck["names"] != names:
        raise ValueError(f"{path} was written by a different configuration "
                         f"({ck['names']}); use another hydra.run.dir or trainer.resume=false")
    model.load_state_dict(ck["model"])
    if before_layer_state is not None:
        before_layer_state(ck["epoch"], ck["scheduler"]["step"], ck.get("extra") or {})
    load_layer_state(model, ck["layer_state"])
    optimizer.load_state_dict(ck["optimizer"])
    rngs = ck["rng"]
    if len(rngs) == d.world:
        set_rng_state(rngs[d.rank])
    elif d.main:
        print(f"resume: checkpoint from {len(rngs)} ranks, now {d.world}: RNG reseeded",
              file=sys.stderr)
    return Progress(epoch=ck["epoch"], step=ck["scheduler"]["step"], skipped=ck["skipped"],
                    best=ck["best_top1"], last=ck["last"], elapsed=ck["elapsed"], resumed=True,
                    extra=ck.get("extra") or {})
