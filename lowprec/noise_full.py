"""The paper's whole-model ratio r_full, measured during training (the math: lowprec.noise,
`full_terms`, `full_ratio`, `ratio_se`; driven by lowprec.adapt at the monitor's steps).

At a measured step (`trainer.noise_every = k > 0`, `trainer.noise_window = W > 0`):

1. `start` (before the step's forward): a deep copy of the model as it is then (weights, buffers,
   every layer's estimator state and counters) and the global RNG state.
2. The step's own forward and quantized backward: ĝ₁ = the parameters' .grad (under DDP already
   averaged over the ranks).
3. `measure` (after that backward, before clipping and the optimizer step), on the copy only and
   inside `torch.random.fork_rng` (the global RNG is put back afterwards):
   - the same forward again from the step's RNG state (the same dropout masks and forward draws,
     the same weights), then the global RNG reseeded from (trainer.seed, rank, step) and the
     quantized backward: ĝ₂, a draw of the backward estimators independent of ĝ₁'s from the same
     estimator state (the copy's state is the one before the step's backward);
   - the copy's grad recipes set to fp32 (exact δ and update; the forward recipe is kept: the
     gradient wanted is that of the loss being trained), one backward per half of the batch's
     mean loss: g_A, g_B (under DDP each averaged over the ranks, so the halves are halves of the
     global batch and ĝ₂ is the global batch's estimate, like ĝ₁);
   - `noise.full_terms(g_A, g_B, ĝ₁, ĝ₂)` over every trainable parameter.
   The copy is then dropped; the training model, its .grad, its estimator state and the RNG are
   untouched, so the trained weights equal those of the run with the monitor off.
4. The last W terms form the window; r_full = `full_ratio(window)`, its s.e. `ratio_se(window)`.

Logged with the monitor's record: `noise/global/r_full`, `noise/global/r_full_se`, and the
measurement's own terms `noise/global/full_signal2`, `noise/global/full_noise2` (to re-window
offline). The window is part of the controller's checkpoint state (an exact resume).

DDP: every rank measures on its share of the batch and the three extra gradients are averaged
over the ranks (all-reduce) before `full_terms`, so all ranks hold the same terms (checked with
two gloo ranks: same weights with the monitor on and off). Like the step's own non-finite check,
a gradient that turns non-finite on one rank only is not coordinated (that rank would skip the
measurement's all-reduce and hang).

Caveats: the halves use train-mode BatchNorm on half the batch (its statistics differ from the
full batch's; part of what g_A, g_B estimate); the loss mirrors train.py's
`F.cross_entropy(model(x).float(), y)`. Cost per measurement: one model copy (memory: the
weights and buffers once more), three more forwards and backwards (one at the batch size, two at
half of it), the parameter gradients three more times, in float64 inside `full_terms`.
"""

from __future__ import annotations

import copy
from collections import deque
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .convert import set_recipes
from .distributed import Dist
from .noise import full_ratio, full_terms, ratio_se

__all__ = ["FullMonitor"]


def _grads(model: nn.Module) -> list[torch.Tensor]:
    """Every trainable parameter's gradient (zeros for one that got none), detached copies."""
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for p in model.parameters() if p.requires_grad]


def _mean_over_ranks(gs: list[torch.Tensor], d: Dist | None) -> list[torch.Tensor]:
    if d is None or d.world <= 1:
        return gs
    import torch.distributed as tdist

    for g in gs:  # as DDP averages the training gradient
        tdist.all_reduce(g)
        g /= d.world
    return gs


class FullMonitor:
    """r_full over a window of `window` measurements (module docstring)."""

    def __init__(self, window: int, seed: int = 0, rank: int = 0):
        self.window: deque[dict[str, float]] = deque(maxlen=max(int(window), 1))
        self.on = window > 0
        self.seed, self.rank = seed, rank
        self._pending: dict[str, Any] | None = None
        self.last: dict[str, float] | None = None  # the terms measured at the current step

    def start(self, model: nn.Module, step: int, x, y, bf16: bool = False) -> None:
        """Before step `step`'s forward: copy the model and keep the batch and the RNG state."""
        if not self.on:
            return
        if x.shape[0] < 2:
            raise ValueError(f"trainer.noise_window={self.window.maxlen}: r_full splits each rank's batch in "
                             f"halves and needs at least 2 examples per rank (got {x.shape[0]})")
        clone = copy.deepcopy(model)
        for p in clone.parameters():
            p.grad = None
        cuda = x.device.type == "cuda"
        self._pending = {"model": clone, "step": step, "x": x, "y": y, "bf16": bf16,
                         "rng": torch.get_rng_state(),
                         "cuda_rng": torch.cuda.get_rng_state(x.device) if cuda else None}
        self.last = None

    def _loss(self, m: nn.Module, x, y, bf16: bool) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            return F.cross_entropy(m(x).float(), y)  # train.py's loss

    def measure(self, model: nn.Module, d: Dist | None = None) -> dict[str, float] | None:
        """After the step's backward (its .grad = ĝ₁): the four gradients and one `full_terms`."""
        pend, self._pending = self._pending, None
        if pend is None:
            return None
        m, x, y, bf16, dev = pend["model"], pend["x"], pend["y"], pend["bf16"], pend["x"].device
        g_hat1 = _grads(model)
        devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(pend["rng"])
            if pend["cuda_rng"] is not None:
                torch.cuda.set_rng_state(pend["cuda_rng"], dev)
            loss = self._loss(m, x, y, bf16)
            torch.manual_seed(((self.seed * 1_000_033 + self.rank) * 1_000_033 + pend["step"]) * 7 % 2 ** 63)
            loss.backward()
            g_hat2 = _mean_over_ranks(_grads(m), d)
            set_recipes(m, grad="fp32", reset_state=True)
            halves = []
            h = x.shape[0] // 2
            for sl in (slice(0, h), slice(h, 2 * h)):
                for p in m.parameters():
                    p.grad = None
                self._loss(m, x[sl], y[sl], bf16).backward()
                halves.append(_mean_over_ranks(_grads(m), d))
        self.last = full_terms(halves[0], halves[1], g_hat1, g_hat2)
        self.window.append(self.last)
        return self.last

    def drop(self) -> None:
        """A step that was not measured (skipped): forget the copy."""
        self._pending = None

    def record(self) -> dict[str, float]:
        """The metrics of the current step's measurement ({} when none)."""
        if self.last is None:
            return {}
        w = list(self.window)
        return {"noise/global/r_full": full_ratio(w), "noise/global/r_full_se": ratio_se(w),
                "noise/global/full_signal2": self.last["signal2"], "noise/global/full_noise2": self.last["noise2"]}

    def state_dict(self) -> list[dict[str, float]]:
        return [dict(t) for t in self.window]

    def load_state_dict(self, window: list[dict[str, float]] | None) -> None:
        self.window.clear()
        self.window.extend(dict(t) for t in window or [])
