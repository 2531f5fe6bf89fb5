"""Model-zoo coverage of ``convert``: which weight GEMMs of a model run in low precision, and does
one training step work (scripts/check_zoo.py -> results/zoo_coverage.md).

Weight-GEMM FLOPs. Per module, counted by forward hooks on an unconverted copy during one step:

- ``nn.Linear``, transformers' ``Conv1D`` (y = x·W + b, W [in, out]): 2·in·out per token;
- ``nn.Conv{1,2,3}d`` / ``ConvTranspose``: 2·(C_in/groups)·prod(kernel) per output element (per
  input element for the transposed ones);
- ``nn.MultiheadAttention``, whose projections are used functionally (its ``out_proj`` Linear is
  never called as a module): the input projections 2·E·(E·L_q + kdim·L_k + vdim·L_k) under the
  module's own name, the output projection 2·E·E·L_q under ``<name>.out_proj``.

Attention's score and value products have no weight and are not counted. A unit is *converted*
when its name or an enclosing module's name is in ``ConvertReport.converted``; otherwise its reason
is the report's (e.g. "first layer (skip='first_last')") or "not handled by convert (<type>)" for a
type convert does not list. ``frac_all`` = converted FLOPs / all weight-GEMM FLOPs;
``frac_rule`` = converted / (all - the first and last layers that skip='first_last' keeps).

The step: the same weights and inputs, one forward/backward on the unconverted model and one on the
converted one (torch's RNG reseeded before each forward, so dropout masks agree). Checked: finite
loss and gradients; for each converted unit, its weight gradients differ from the unconverted
model's (where those are non-zero). ``grad="fp32"`` must give identical gradients instead.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .convert import convert

__all__ = ["Coverage", "weight_gemm_flops", "check_model", "default_loss"]


@dataclass
class Coverage:
    """One model's row (see the module docstring)."""
    flops: dict[str, float] = field(default_factory=dict)          # unit -> weight-GEMM FLOPs
    converted: list[str] = field(default_factory=list)             # units in low precision
    skipped: dict[str, str] = field(default_factory=dict)          # unit -> reason
    frac_all: float = 0.0
    frac_rule: float = 0.0
    loss: float = float("nan")
    finite: bool = False
    grads_differ: int = 0                                          # converted units whose weight grads differ
    grads_compared: int = 0                                        # converted units with non-zero fp32 grads
    params: int = 0
    seconds: float = 0.0
    note: str = ""

    def reasons(self) -> dict[str, int]:
        """reason -> number of units (first/last merged per kind)."""
        out: dict[str, int] = {}
        for r in self.skipped.values():
            out[r] = out.get(r, 0) + 1
        return out


def _conv1d_hf(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def weight_gemm_flops(model: nn.Module) -> tuple[dict[str, float], Callable[[], None]]:
    """Register hooks that add each unit's weight-GEMM FLOPs of every forward to a dict; returns
    (the dict, a function removing the hooks)."""
    flops: dict[str, float] = {}
    handles = []

    def add(name: str, v: float) -> None:
        flops[name] = flops.get(name, 0.0) + float(v)

    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            def hook(mod, args, kwargs, out, name=name):
                q = args[0] if args else kwargs["query"]
                k = args[1] if len(args) > 1 else kwargs.get("key", q)
                E = mod.embed_dim
                lq, lk = q.numel() // E, k.numel() // mod.kdim
                add(name, 2 * E * (E * lq + (mod.kdim + mod.vdim) * lk))
                add(f"{name}.out_proj", 2 * E * E * lq)
            handles.append(m.register_forward_hook(hook, with_kwargs=True))
        elif isinstance(m, nn.Linear) or _conv1d_hf(m):
            def hook(mod, args, out, name=name):
                if isinstance(mod, nn.Linear):
                    fi, fo = mod.in_features, mod.out_features
                else:
                    fi, fo = mod.weight.shape
                add(name, 2 * fi * fo * (args[0].numel() // fi))
            handles.append(m.register_forward_hook(hook))
        elif isinstance(m, nn.modules.conv._ConvNd):
            def hook(mod, args, out, name=name):
                per = 2 * (mod.in_channels // mod.groups) * int(torch.tensor(mod.kernel_size).prod())
                # transposed: every input element meets C_out/groups·prod(k) weights
                n = (args[0].numel() // mod.in_channels * mod.out_channels) if mod.transposed else out.numel()
                add(name, per * n)
            handles.append(m.register_forward_hook(hook))

    def remove() -> None:
        for h in handles:
            h.remove()
    return flops, remove


def default_loss(out: Any, target_seed: int = 0) -> torch.Tensor:
    """Cross-entropy against fixed random labels for logits ([N, C] or [B, T, V]); the mean square
    for any other output (hidden states). ``out``: a tensor, a tuple (first item) or a ModelOutput
    (``logits``, else ``last_hidden_state``)."""
    if not isinstance(out, torch.Tensor):
        if hasattr(out, "logits") and out.logits is not None:
            out = out.logits
        elif hasattr(out, "last_hidden_state"):
            out = out.last_hidden_state
        else:
            out = out[0]
        if isinstance(out, tuple):
            out = out[0]
    out = out.float()
    if out.dim() in (2, 3) and out.shape[-1] > 1:
        g = torch.Generator().manual_seed(target_seed)
        y = torch.randint(0, out.shape[-1], out.shape[:-1], generator=g)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return out.square().mean()


def _owner(name: str, converted: set[str]) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:i]) in converted for i in range(len(parts), 0, -1))


def check_model(model: nn.Module, inputs: Callable[[], tuple | dict], *, grad: str = "luq4",
                loss_fn: Callable[[Any], torch.Tensor] = default_loss, seed: int = 0) -> Coverage:
    """Coverage of ``model`` (left unconverted; a deep copy is converted) on ``inputs()`` (positional
    args, or keyword args as a dict)."""
    t0 = time.time()
    cov = Coverage(params=sum(p.numel() for p in model.parameters()))
    model.train()
    conv_model = copy.deepcopy(model)
    try:
        report = convert(conv_model, grad=grad)
    except ValueError as e:  # nothing convertible: the report of an identity convert, 0% covered
        if "converted no layer" not in str(e):
            raise
        conv_model = copy.deepcopy(model)
        report = convert(conv_model, grad="fp32")
        cov.note = "convert() converted no layer"
    batch = inputs()

    def step(m: nn.Module) -> torch.Tensor:
        torch.manual_seed(seed)
        out = m(**batch) if isinstance(batch, dict) else m(*batch)
        loss = loss_fn(out)
        loss.backward()
        return loss

    flops, remove = weight_gemm_flops(model)
    try:
        ref_loss = step(model)
    finally:
        remove()
    loss = step(conv_model)
    cov.flops = flops
    conv = set(report.converted)
    first_last = {n for n, r in report.skipped.items() if "skip='first_last'" in r}
    for n in flops:
        if _owner(n, conv):
            cov.converted.append(n)
        elif n in report.skipped:
            cov.skipped[n] = report.skipped[n]
        else:
            parent = next((p for p in report.skipped if n.startswith(p + ".")), None)
            mod = dict(model.named_modules()).get(n)
            cov.skipped[n] = report.skipped[parent] if parent else \
                f"not handled by convert ({type(mod).__name__ if mod is not None else 'functional'})"
    total = sum(flops.values())
    done = sum(flops[n] for n in cov.converted)
    rule = total - sum(v for n, v in flops.items() if n in first_last)
    cov.frac_all = done / total if total else 0.0
    cov.frac_rule = done / rule if rule else 0.0
    cov.loss = float(loss.detach())
    grads = [p.grad for p in conv_model.parameters() if p.grad is not None]
    cov.finite = bool(torch.isfinite(loss).item() and torch.isfinite(ref_loss).item()
                      and all(torch.isfinite(g).all() for g in grads))
    ref_params = dict(model.named_parameters())
    for n in report.converted:
        own = [(pn, p) for pn, p in conv_model.named_parameters() if (pn == n or pn.startswith(n + "."))
               and p.ndim >= 2 and p.grad is not None]
        pairs = [(p.grad, ref_params[pn].grad) for pn, p in own if ref_params[pn].grad is not None]
        pairs = [(g, r) for g, r in pairs if r.abs().max() > 0]
        if pairs:
            cov.grads_compared += 1
            cov.grads_differ += any(not torch.equal(g, r) for g, r in pairs)
    cov.seconds = time.time() - t0
    return cov
