"""Optimizers and the learning-rate schedule.

Weight decay applies to weights only: biases and norm parameters (ndim <= 1), ``nn.Embedding``
weights and what a model lists in ``no_weight_decay()`` get none.

LR multiplier at optimizer step t (0-based), with T = max_steps (or epochs × steps_per_epoch) and
W warm-up steps: (t + 1)/W for t < W; then constant, step (γ per milestone) or cosine
r + (1 − r)·½(1 + cos(π·(t − W)/(T − W))). The FNT phase after T (LUQ's fine-tuning) ramps
linearly from the final factor up to 1 over its first half, then linearly down to 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig, SchedConfig


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameters without weight decay: biases and norm parameters (ndim <= 1), nn.Embedding
    weights, and what the model names in `no_weight_decay()` (chargpt: its one-hot token
    embedding, an nn.Linear on one-hot inputs)."""
    names = {n for n, p in model.named_parameters() if p.ndim <= 1}
    for mn, m in model.named_modules():
        if isinstance(m, nn.Embedding):
            names |= {f"{mn}.{pn}" if mn else pn for pn, _ in m.named_parameters(recurse=False)}
    extra = getattr(model, "no_weight_decay", None)
    return names | (set(extra()) if callable(extra) else set())


def make_optimizer(model: nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    skip = no_decay_names(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if n not in skip]
    no_decay = [p for n, p in params if n in skip]
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)


def lr_factor(s: SchedConfig, step: int, *, steps_per_epoch: int, epochs: int,
              fnt_epochs: int, max_steps: int = 0, fnt_steps: int = 0) -> float:
    """LR multiplier at optimizer step `step` (0-based). The low-precision phase (epochs ×
    steps_per_epoch steps, or max_steps when > 0) follows `s`; the FNT phase (fnt_epochs ×
    steps_per_epoch, or fnt_steps) ramps linearly from the final factor up to 1 over its first
    half, then linearly down to 0 (LUQ's fine-tuning schedule)."""
    main = max_steps or epochs * steps_per_epoch
    if step >= main:
        total = fnt_steps if max_steps else fnt_epochs * steps_per_epoch
        half = total / 2
        i = step - main
        end = main_factor(s, main, main, steps_per_epoch)
        if i < half:
            return end + (1 - end) * i / half
        return max(0.0, 1 - (i - half) / (total - half))
    return main_factor(s, step, main, steps_per_epoch)


def main_factor(s: SchedConfig, step: int, main: int, spe: int) -> float:
    warm = s.warmup_steps or round(s.warmup_epochs * spe)
    if step < warm:
        return (step + 1) / warm
    if s.name == "constant":
        return 1.0
    if s.name == "step":
        return s.gamma ** sum(step >= m * main for m in s.milestones)
    progress = min(1.0, (step - warm) / max(1, main - warm))
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
