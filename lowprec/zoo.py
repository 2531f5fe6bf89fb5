"""Model-zoo coverage of ``convert``: which weight GEMMs of a model run in low precision, and does
one training step work (scripts/check_zoo.py -> results/zoo_coverage.md).

Weight-GEMM FLOPs, counted on the unconverted model during the step by intercepting every linear,
conv, addmm and matmul call (a TorchFunctionMode) whose operand is (a view of) a parameter, and
adding it to the module that owns the parameter (a *unit*):

- linear (y = x·Wᵀ), transformers' ``Conv1D`` (addmm, W [in, out]), x @ W: 2·in·out per token;
- conv: 2·(C_in/groups)·prod(kernel) per output element (per input element when transposed);
- a parametrized layer's computed weight (weight norm) counts for that layer when it runs it;
- so ``nn.MultiheadAttention``'s packed input projection counts under the module's own name and
  its output projection under ``<name>.out_proj``, though both are used functionally, as are the
  projections of torchvision's Swin attention (which convert routes to its converted children,
  lowprec.layers_fn; an unknown module doing the same shows up below as never called).

Attention's score and value products have no weight and are not counted. A unit is *converted*
when its module, or an enclosing one, is in ``ConvertReport.converted`` and its forward ran in the
converted step (a converted Linear whose weight another module uses functionally runs in high
precision, and is listed so); otherwise its reason is the report's (e.g. "first layer
(skip='first_last')") or "not handled by convert (<type>)" for a type convert does not list. ``frac_all`` = converted FLOPs / all weight-GEMM FLOPs;
``frac_rule`` = converted / (all - the first and last layers that skip='first_last' keeps).

The step: zero-initialized weights (torchvision ViT's head, zero-init residual γ) are first set to
N(0, 0.02²) so that gradients reach every layer; then with the same weights and inputs, one forward/backward on the unconverted model and one on the
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
from torch.nn.utils import parametrize

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


_GEMMS = {F.multi_head_attention_forward, F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
          torch.addmm, torch.matmul, torch.mm, torch.Tensor.matmul, torch.Tensor.__matmul__}


def _gemm_flops(func, args, out) -> tuple[torch.Tensor | None, float]:
    """(the weight operand, FLOPs) of one GEMM call; (None, 0) when no operand is a weight."""
    if func is F.linear:
        x, w = args[0], args[1]
        return w, 2.0 * x.numel() * w.shape[0]
    if func in (F.conv1d, F.conv2d, F.conv3d):
        w = args[1]
        return w, 2.0 * out.numel() * w[0].numel()
    if func in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
        x, w = args[0], args[1]
        return w, 2.0 * x.numel() * w[0].numel()
    if func is F.multi_head_attention_forward:  # handled whole: its inner linears are not seen
        return None, 0.0
    if func is torch.addmm:  # transformers' Conv1D: addmm(b, x, W), W [in, out]
        x, w = args[1], args[2]
        return w, 2.0 * x.shape[0] * x.shape[1] * w.shape[1]
    a, b = args[0], args[1]  # matmul / mm / @: x @ W or W @ x, W 2-D
    if isinstance(b, nn.Parameter) and b.dim() == 2:
        return b, 2.0 * a.numel() * b.shape[1]
    if isinstance(a, nn.Parameter) and a.dim() == 2:
        return a, 2.0 * a.numel() * (b.numel() // b.shape[-2] if b.dim() > 1 else 1)
    return None, 0.0


def weight_gemm_flops(model: nn.Module) -> tuple[dict[str, float], Callable[[], None]]:
    """Count each unit's weight-GEMM FLOPs during forwards of ``model``: every linear, conv, addmm
    or matmul call whose operand is (a view of) a parameter is added to the module owning that
    parameter (the innermost running module that owns it, for tied weights), whether the module
    runs it in its forward or another module uses the weight functionally (nn.MultiheadAttention,
    torchvision's Swin attention). Returns (the dict, a function removing the hooks); use the
    dict after the forwards."""
    from torch.overrides import TorchFunctionMode

    flops: dict[str, float] = {}
    owners: dict[int, list[str]] = {}   # storage data_ptr -> owning module names
    for mn, m in model.named_modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(p.untyped_storage().data_ptr(), []).append(mn)
    running: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    mods = dict(model.named_modules())

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is F.multi_head_attention_forward:
                _mha(args, kwargs or {})
            elif func in _GEMMS:
                add(*_gemm_flops(func, args, out))
            return out

    def add(w: torch.Tensor | None, f: float) -> None:
        own = owners.get(w.untyped_storage().data_ptr()) if isinstance(w, torch.Tensor) else None
        if own:
            name = next((n for n in reversed(running) if n in own), own[0])
            flops[name] = flops.get(name, 0.0) + f
        elif isinstance(w, torch.Tensor) and running and parametrize.is_parametrized(mods[running[-1]], "weight"):
            # a parametrized layer (weight norm: wav2vec2's positional conv) computes its weight
            # from other parameters in its own forward: the GEMM is that layer's
            flops[running[-1]] = flops.get(running[-1], 0.0) + f

    def _mha(args, kwargs) -> None:
        """F.multi_head_attention_forward(query, key, value, E, heads, in_proj_weight, ...,
        out_proj_weight (11), ..., q_proj_weight (18)): in-projections 2·E·(E·L_q + kdim·L_k +
        vdim·L_k) to the owner of in_proj_weight (or q_proj_weight), 2·E·E·L_q to out_proj's."""
        import inspect

        bound = inspect.signature(F.multi_head_attention_forward).bind(*args, **kwargs).arguments
        q, k, v, E = bound["query"], bound["key"], bound["value"], bound["embed_dim_to_check"]
        lq, lk = q.numel() // E, k.numel() // k.shape[-1]
        w_in = bound.get("q_proj_weight") if bound.get("use_separate_proj_weight") else bound["in_proj_weight"]
        add(w_in, 2.0 * E * (E * lq + (k.shape[-1] + v.shape[-1]) * lk))
        add(bound["out_proj_weight"], 2.0 * E * E * lq)

    active: list = []

    def enter(m, a):
        if not active:  # the outermost call of the model
            active.append(Count())
            active[0].__enter__()
        running.append(names[m])

    def leave(m, a, o):
        running.pop()
        if m is model:
            active.pop().__exit__(None, None, None)

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))

    def remove() -> None:
        for h in handles:
            h.remove()
    return flops, remove


def _called(model: nn.Module, names: list[str]) -> tuple[set[str], Callable[[], None]]:
    """The names (of ``names``) whose module's forward ran; with a function removing the hooks."""
    seen: set[str] = set()
    mods = dict(model.named_modules())
    hs = [mods[n].register_forward_hook(lambda m, a, o, n=n: seen.add(n)) for n in names if n in mods]
    return seen, lambda: [h.remove() for h in hs]


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
    with torch.no_grad():  # zero-initialized weights (a zero head, zero-init residual γ) block every
        g = torch.Generator().manual_seed(seed)  # gradient below them: small random values instead
        for n, p in model.named_parameters():
            if n.rsplit(".", 1)[-1].endswith("weight") and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
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
    called, remove = _called(conv_model, report.converted)
    try:
        loss = step(conv_model)
    finally:
        remove()
    cov.flops = flops
    conv = set(report.converted)
    first_last = {n for n, r in report.skipped.items() if "skip='first_last'" in r}
    for n in flops:
        if _owner(n, called):
            cov.converted.append(n)
        elif _owner(n, conv):
            cov.skipped[n] = "converted, but its weight is used functionally (forward never called): high precision"
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
