"""Checkpoints, RNG state and atomic file writes.

A checkpoint (run_dir/checkpoints/last.pt, written at epoch ends) holds everything later steps
depend on: model, optimizer, schedule position (the optimizer step), the training progress
(epoch, skipped steps, best and last top-1, elapsed time), the converted layers' run-time state
(`convert.layer_state`: estimator state such as LUQ's in-hindsight max, the weight-N:M mask and
its recomputation counter) and every RNG state (torch, numpy, python, cuda; one per DDP rank).
Restoring all of it makes a resumed run end with the same weights as an uninterrupted one.
Files are written to a temporary name, fsynced and renamed: a kill leaves the old or the new
file, never a torn one.
"""

from __future__ import annotations

import hashlib
import os
import random
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


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
          "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
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
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
            "elapsed": elapsed, "key": key, "names": names,
        }, path)


def load_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    key: str, names: dict[str, str], d: Dist,
                    before_layer_state: Callable[[int], Any] | None = None) -> Progress:
    """Restore `path` into `model` and `optimizer` (and this rank's RNG state) and return the
    progress. `before_layer_state(epoch)` runs after the weights are loaded and before the layer
    state is (it may change the recipes, e.g. to enter FNT, which resets that state)."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if ck["key"] != key or ck["names"] != names:
        raise ValueError(f"{path} was written by a different configuration "
                         f"({ck['names']}); use another hydra.run.dir or trainer.resume=false")
    model.load_state_dict(ck["model"])
    if before_layer_state is not None:
        before_layer_state(ck["epoch"])
    load_layer_state(model, ck["layer_state"])
    optimizer.load_state_dict(ck["optimizer"])
    rngs = ck["rng"]
    if len(rngs) == d.world:
        set_rng_state(rngs[d.rank])
    elif d.main:
        print(f"resume: checkpoint from {len(rngs)} ranks, now {d.world}: RNG reseeded",
              file=sys.stderr)
    return Progress(epoch=ck["epoch"], step=ck["scheduler"]["step"], skipped=ck["skipped"],
                    best=ck["best_top1"], last=ck["last"], elapsed=ck["elapsed"], resumed=True)
