"""DDP set-up (torchrun): the process group from RANK / WORLD_SIZE / LOCAL_RANK (gloo on CPU,
nccl on CUDA), set up once per process by the entry point (run.py) and passed down as a `Dist`.
With one process nothing is initialized and every collective here is a no-op."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Read torchrun's environment, pick the device, init the process group once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={device!r} but CUDA is not available")
    if device == "cuda":
        device = f"cuda:{local}"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def teardown_distributed(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj, d: Dist):
    """rank 0's `obj` on every rank."""
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj, d: Dist) -> list:
    """[`obj` of rank 0, of rank 1, ...] on every rank."""
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(x: float, d: Dist) -> float:
    """The mean of a float over the ranks (the loss is averaged like the gradient)."""
    if d.world == 1:
        return x
    t = torch.tensor([x], device=d.device)
    dist.all_reduce(t)
    return t.item() / d.world


def all_true(ok: torch.Tensor, d: Dist) -> torch.Tensor:
    """Elementwise min over the ranks of a 0/1 float tensor: every rank gets the same verdict."""
    if d.world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return ok
