"""The one skeleton of every converted layer: its per-GEMM state and its autograd Function.

A converted layer computes three GEMMs (docs/algorithms.md#notation-the-three-gemms; routes: docs/routes.md):

    forward   z = W a          W, a quantized by `fwd.weight` / `fwd.act` (round-to-nearest, STE)
    backward  g = Wᵀ δ_b       δ_b = grad.backward(δ)   (exact δ when None)
    update    ∂C/∂W = δ_u aᵀ   δ_u = mean of grad.samples draws of grad.update(δ)  (SMP)

Layer kinds differ only in how the two backward GEMMs are spelled: a `GemmOp` (`LinearOp`,
`ConvOp`) names the forward product and, for one backward, a `Gemms` object with the grad-input
product (`grad_input(d, W)`), the grad-weight product (`grad_weight(d)`, and `grads(...)`: both at
once with the bias, fused where the op can), the token view of δ (`to2d`/`from2d`: δ as
[C_out, tokens]), the update GEMM's activation operand (`act2d`: [tokens, K]) and the token count.
`QGemmFn` is the one autograd Function; `backward_gemms` is the one backward (routing, SMP, custom
update operands, noise monitor, statistics: lowprec.backward's pure functions), written once for
QLinear, QConv1d/2d, transformers' Conv1D and the projections of nn.MultiheadAttention.

`GemmState` is the per-GEMM state: `fwd_recipe`, `grad_recipe`, `lp_state = {"backward": {},
"update": {}}` (the estimators' state per slot), the weight N:M mask and its schedule, statistics
records, the noise monitor's arming and record, `update_macs`. A layer module mixes it in (its GEMM
weight is `self.weight`, or the transposed view for transformers' Conv1D: `gemm_weight()` is always
[C_out, K...]); a projection of nn.MultiheadAttention is a `GemmSlot`, the same state on a plain
object that names its owner's parameter. Run-time state that is not in state_dict goes through
`lp_state_dict()` / `load_lp_state_dict()`.

- Save for backward what the backward GEMMs must see: the quantized (and N:M-masked) a and W, and
  the high-precision W, a where a backward slot re-quantizes them (grad.weight_bwd, grad.act_upd).
- With one δ for both GEMMs a convolution's backward is one fused `convolution_backward` call;
  different δ (or W) per GEMM: two half calls (~1.3x one fused call on the CPU).
- Bias gradient comes from δ_u (it is part of the update GEMM). Straight-through estimator: the
  gradients w.r.t. the unquantized W and a are those w.r.t. the quantized ones.
- dtype: under torch.autocast the GEMMs, estimators and backward GEMMs run in the autocast dtype;
  gradients are returned in the dtypes of x, W, b.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .backward import custom_update, im2col_of, noise_record, route, stats_record, update_operands
from .forward import forward_weight, no_autocast, prep_forward, quant_weight
from .hadamard import random_signs
from .recipes import fwd_recipe, grad_recipe
from .weight_nm import format_weight_nm, nm_weight_mask

__all__ = ["resolve_fwd", "resolve_grad", "recipe_name", "GemmState", "GemmSlot", "GemmOp", "LinearOp", "ConvOp",
           "QGemmFn", "backward_gemms", "swap_class", "LP_STATE_KEYS"]

LP_STATE_KEYS = ("lp_state", "_lp_nm_calls", "weight_mask", "_lp_bwd_calls")


# ----------------------------------------------------------------------------- recipes


def resolve_fwd(fwd: Any):
    """A FwdRecipe from a FwdRecipe-like object, a registry name, or None (= "fp32")."""
    if fwd is None:
        fwd = "fp32"
    if isinstance(fwd, str):
        return fwd_recipe(fwd)
    for attr in ("weight", "act"):
        if not hasattr(fwd, attr):
            raise ValueError(f"fwd must be a FwdRecipe or a registry name, got {fwd!r} (no .{attr})")
    return fwd


def resolve_grad(grad: Any):
    """A GradRecipe from a GradRecipe-like object, a registry name, or None (= "fp32")."""
    if grad is None:
        grad = "fp32"
    if isinstance(grad, str):
        return grad_recipe(grad)
    for attr in ("backward", "update", "samples", "shared", "identity"):
        if not hasattr(grad, attr):
            raise ValueError(f"grad must be a GradRecipe or a registry name, got {grad!r} (no .{attr})")
    if int(grad.samples) < 1:
        raise ValueError(f"grad.samples must be >= 1, got {grad.samples!r}")
    return grad


def recipe_name(recipe) -> str:
    return str(getattr(recipe, "name", type(recipe).__name__))


def _to_device(obj, dev):
    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if isinstance(obj, dict):
        return {k: _to_device(v, dev) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, dev) for v in obj)
    return obj


# ----------------------------------------------------------------------------- per-GEMM state


class GemmState:
    """Per-GEMM state and its public methods (module docstring); set up by `_lp_init`."""

    fwd_recipe: Any
    grad_recipe: Any
    _LP_ATTRS = ("fwd_recipe", "grad_recipe", "lp_state", "weight_nm", "weight_nm_every", "_lp_nm_calls",
                 "stats_every", "_lp_bwd_calls", "_lp_stats", "_lp_orig_class", "_lp_noise_arm",
                 "_lp_noise_rec", "update_macs")

    def _lp_init(self, fwd, grad, *, weight_nm, weight_nm_every, stats_every, orig_class):
        self.fwd_recipe = fwd
        self.grad_recipe = grad
        self.lp_state = {"backward": {}, "update": {}}
        self.weight_nm = weight_nm
        self.weight_nm_every = int(weight_nm_every)
        self._lp_nm_calls = 0
        if isinstance(self, nn.Module):
            self.register_buffer("weight_mask", None, persistent=False)
        else:
            self.weight_mask = None
        self.stats_every = int(stats_every)
        self._lp_bwd_calls = 0
        self._lp_stats: list[dict[str, float]] = []
        self._lp_orig_class = orig_class
        self._lp_noise_arm: dict[str, Any] | None = None
        self._lp_noise_rec: dict[str, float] | None = None
        self.update_macs = 0

    def gemm_weight(self) -> torch.Tensor:
        """The weight as the GEMMs see it, [C_out, K...] (nn.Linear / nn.Conv layout)."""
        return self.weight

    def lp_repr(self) -> str:
        s = f"fwd={recipe_name(self.fwd_recipe)}, grad={recipe_name(self.grad_recipe)}"
        if self.weight_nm is not None:
            s += f", weight_nm={format_weight_nm(self.weight_nm)}/{self.weight_nm_every}"
        if self.stats_every:
            s += f", stats_every={self.stats_every}"
        return s

    # ---- public run-time state (what state_dict does not hold)
    def lp_state_dict(self) -> dict[str, Any]:
        """Run-time state that shapes later steps but is not in state_dict: the estimators' state
        (e.g. LUQ's in-hindsight max), the weight mask and the forward count that schedules its
        recomputation, and the backward count that schedules the statistics (stats_every), so a
        resumed run records its statistics at the same steps. The live objects, not copies (save
        them before the next step). Keys are those of the checkpoint format: "lp_state",
        "_lp_nm_calls", "weight_mask", "_lp_bwd_calls"."""
        return {"lp_state": self.lp_state, "_lp_nm_calls": self._lp_nm_calls,
                "weight_mask": self.weight_mask, "_lp_bwd_calls": self._lp_bwd_calls}

    def load_lp_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of lp_state_dict(), tensors moved to the weight's device; call it after
        load_state_dict (which resets the weight mask to be recomputed). A missing key keeps
        the current value (checkpoints written before "_lp_bwd_calls" existed still load)."""
        unknown = sorted(set(state) - set(LP_STATE_KEYS))
        if unknown:
            raise ValueError(f"load_lp_state_dict: unknown key {unknown[0]!r}; "
                             "expected 'lp_state', '_lp_nm_calls', 'weight_mask', '_lp_bwd_calls'")
        dev = self.gemm_weight().device
        if "lp_state" in state:
            self.lp_state = _to_device(state["lp_state"], dev)
        if "_lp_nm_calls" in state:
            self._lp_nm_calls = _to_device(state["_lp_nm_calls"], dev)
        if "weight_mask" in state:
            self.weight_mask = _to_device(state["weight_mask"], dev)
        if "_lp_bwd_calls" in state:
            self._lp_bwd_calls = int(state["_lp_bwd_calls"])

    def reset_lp_state(self) -> None:
        """Forget the estimators' state (e.g. after a recipe change)."""
        self.lp_state = {"backward": {}, "update": {}}

    def pop_stats(self) -> list[dict[str, float]]:
        """The statistics records since the last call; clears them."""
        recs, self._lp_stats = self._lp_stats, []
        return recs

    # ---- noise monitor (lowprec.noise, driven by lowprec.adapt)
    def arm_noise(self, generator: torch.Generator) -> None:
        """Measure the weight-gradient noise in the next backward; the extra draw uses `generator`."""
        self._lp_noise_arm = {"generator": generator, "state": copy.deepcopy(self.lp_state["update"])}
        self._lp_noise_rec = None

    @property
    def noise_armed(self) -> bool:
        return self._lp_noise_arm is not None

    def pop_noise(self) -> dict[str, float] | None:
        """The noise sums of the armed backward (None if none ran); disarms and clears."""
        rec, self._lp_noise_rec, self._lp_noise_arm = self._lp_noise_rec, None, None
        return rec

    def pop_update_macs(self) -> int:
        """Update-GEMM multiply-accumulates since the last call; resets the count."""
        n, self.update_macs = self.update_macs, 0
        return n

    # ---- forward helpers
    def current_mask(self) -> torch.Tensor | None:
        """The weight N:M mask for this forward ([C_out, K...]), recomputed on schedule (training)."""
        if self.weight_nm is None:
            return None
        w = self.gemm_weight()
        if self.weight_mask is None or (self.training and self._lp_nm_calls % self.weight_nm_every == 0):
            with torch.no_grad():
                self.weight_mask = nm_weight_mask(w, *self.weight_nm)
        elif self.weight_mask.device != w.device:
            self.weight_mask = self.weight_mask.to(w.device)
        if self.training:
            self._lp_nm_calls += 1
        return self.weight_mask

    def effective_weight(self) -> torch.Tensor:
        """The weight the GEMMs use (masked, quantized; [C_out, K...]) in the weight's own dtype;
        no side effects."""
        w, mask = self.gemm_weight(), None
        if self.weight_nm is not None:
            mask = self.weight_mask if self.weight_mask is not None else nm_weight_mask(w, *self.weight_nm)
        with torch.no_grad():
            w = forward_weight(self.fwd_recipe, w, mask)[1]
        return w.detach()

    # ---- backward helpers (the computation: lowprec.backward)
    def _backward_weight(self, ctx, w):
        """W for the backward GEMM: the saved one, or grad.weight_bwd of the high-precision W."""
        est = getattr(self.grad_recipe, "weight_bwd", None)
        return w if est is None else quant_weight(est, ctx.saved_tensors[2])

    def _update_act(self, ctx, a2_of):
        """The update GEMM's [T, K] activation operand: of the high-precision a when act_upd is set."""
        return a2_of(ctx.saved_tensors[3] if self.grad_recipe.act_upd is not None else ctx.saved_tensors[0])

    def _rht_signs(self, device, generator=None):
        """This backward's RHT signs (None without update_rht); drawn here, the one call site."""
        n = self.grad_recipe.update_rht
        return None if n is None else random_signs(n, device=device, generator=generator)

    def _update_operands(self, ctx, delta, d_u, a2_of, to2d, from2d):
        """backward.update_operands with the saved activation, fresh signs and the live update state."""
        a2 = self._update_act(ctx, a2_of)
        return update_operands(self.grad_recipe, delta, d_u, a2, self._rht_signs(delta.device), to2d, from2d,
                               state=self.lp_state["update"])

    def _record_noise(self, ctx, delta, gw_hat, gemm, a2_of, to2d, from2d) -> None:
        """The armed measurement (backward.noise_record); disarms."""
        arm, self._lp_noise_arm = self._lp_noise_arm, None
        g, gen = self.grad_recipe, arm["generator"]
        a2 = signs = None
        if custom_update(g):
            a2, signs = self._update_act(ctx, a2_of), self._rht_signs(delta.device, gen)
        self._lp_noise_rec = noise_record(g, delta, gw_hat, gemm, a2, signs, to2d, from2d,
                                          state=copy.deepcopy(arm["state"]), generator=gen)

    def _stats_due(self) -> bool:
        # only called when stats_every > 0
        self._lp_bwd_calls += 1
        return self._lp_bwd_calls % self.stats_every == 0

    def _record_stats(self, delta, d_b, d_u, need_b, need_u, gw_hat, exact_gw) -> None:
        self._lp_stats.append(stats_record(delta, d_b, d_u, need_b, need_u, gw_hat, exact_gw, self.lp_state["update"]))


class GemmSlot(GemmState):
    """The state of one GEMM whose weight is a parameter of another module (`owner.<param>`), e.g.
    the input projection of a converted nn.MultiheadAttention. Not a module: the owner's
    state_dict is unchanged; `training` is the owner's."""

    def __init__(self, owner: nn.Module, param: str, fwd, grad, *, weight_nm, weight_nm_every, stats_every):
        self._owner, self.param = owner, param
        self._lp_init(fwd, grad, weight_nm=weight_nm, weight_nm_every=weight_nm_every, stats_every=stats_every,
                      orig_class=None)

    @property
    def training(self) -> bool:
        return self._owner.training

    def gemm_weight(self) -> torch.Tensor:
        return getattr(self._owner, self.param)

    def __repr__(self) -> str:
        return f"GemmSlot({self.param}, {self.lp_repr()})"


# ----------------------------------------------------------------------------- GEMM ops


class GemmOp:
    """A layer kind's forward product; `gemms` spells its two backward GEMMs for one backward."""

    channels_first = False  # activation layout for block quantizers: [N, C, ...] (conv) or [..., C]

    def forward(self, a, w, b):
        raise NotImplementedError

    def gemms(self, a, w, delta, has_bias: bool):
        raise NotImplementedError


class _Gemms:
    """The two backward GEMMs of one backward (defaults: separate products)."""

    def grads(self, d_b, d_u, w_b, w, need_x, need_w, need_b):
        gx = self.grad_input(d_b, w_b) if need_x else None
        gw = self.grad_weight(d_u) if need_w else None
        gb = self.grad_bias(d_u) if need_b else None
        return gx, gw, gb

    def check_custom(self, g) -> None:
        """Raise if the update-GEMM operand slots (act_upd, update_rht) cannot apply here."""


class LinearOp(GemmOp):
    """z = a Wᵀ + b over the last dim of a (nn.Linear; transformers' Conv1D with W its transposed
    view, `grad_weight_t=True`: the weight gradient computed as (aᵀ δ)ᵀ, the orientation autograd
    uses for a row-major [in, out] parameter, so an fp32 recipe is bit-identical)."""

    def __init__(self, grad_weight_t: bool = False):
        self.grad_weight_t = grad_weight_t

    def forward(self, a, w, b):
        return F.linear(a, w, b)

    def gemms(self, a, w, delta, has_bias):
        return _LinearGemms(a, w, delta, self.grad_weight_t)


class _LinearGemms(_Gemms):
    def __init__(self, a, w, delta, grad_weight_t):
        self.a, self.shape, self.t = a, delta.shape, grad_weight_t
        self.out, self.inp = w.shape
        self.a2 = a.reshape(-1, self.inp)
        self.tokens = self.a2.shape[0]

    def to2d(self, t, view=False):
        t = t.reshape(-1, self.out).t()
        return t if view else t.contiguous()

    def from2d(self, t):
        return t.t().reshape(self.shape)

    def act2d(self, t):
        return t.reshape(-1, self.inp)

    def grad_input(self, d, w):
        return d.reshape(-1, self.out).mm(w).reshape(self.a.shape)

    def grad_weight(self, d):
        d2 = d.reshape(-1, self.out)
        return self.a2.t().mm(d2).t() if self.t else d2.t().mm(self.a2)

    def grad_bias(self, d):
        if self.a.dim() > 2 and not (self.a.dim() == 3 and self.a.is_contiguous()):
            # F.linear is matmul + add here (addmm only for 2-d and contiguous 3-d input); the
            # add's gradient sums δ over the leading dims, in that order
            return d.sum(tuple(range(d.dim() - 1)))
        return d.reshape(-1, self.out).sum(0)


class ConvOp(GemmOp):
    """N-d convolution (1-d, 2-d) with the module's stride, (numeric) padding, dilation, groups."""

    channels_first = True

    def __init__(self, stride, padding, dilation, groups):
        nd = len(stride)
        self.conv = (list(stride), list(padding), list(dilation), False, [0] * nd, groups)
        self.fn = {1: F.conv1d, 2: F.conv2d}[nd]

    def forward(self, a, w, b):
        s, p, d, _, _, g = self.conv
        return self.fn(a, w, b, tuple(s), tuple(p), tuple(d), g)

    def gemms(self, a, w, delta, has_bias):
        return _ConvGemms(a, w, delta, self.conv, has_bias)


class _ConvGemms(_Gemms):
    def __init__(self, a, w, delta, conv, has_bias):
        self.a, self.w, self.conv = a, w, conv
        self.n, self.c = delta.shape[:2]
        self.spatial = delta.shape[2:]
        self.tokens = delta.numel() // self.c
        self.bias_sizes = [self.c] if has_bias else None
        self.act2d = im2col_of(w, conv)

    def to2d(self, t, view=False):
        t = t.transpose(0, 1)
        return t.reshape(self.c, self.n, -1) if view else t.reshape(self.c, -1)

    def from2d(self, t):
        return t.reshape(self.c, self.n, *self.spatial).transpose(0, 1)

    def _cb(self, d, w, bias_sizes, mask):
        return torch.ops.aten.convolution_backward(d, self.a, w, bias_sizes, *self.conv, mask)

    def grad_input(self, d, w):
        return self._cb(d, w, None, [True, False, False])[0]

    def grad_weight(self, d):
        return self._cb(d, self.w, None, [False, True, False])[1]

    def grads(self, d_b, d_u, w_b, w, need_x, need_w, need_b):
        need_u = need_w or need_b
        if not need_x or not need_u or (d_b is d_u and w_b is w):  # one fused call
            d = d_b if need_x else d_u
            return self._cb(d, w_b if need_x else w, self.bias_sizes, [need_x, need_w, need_b])
        # different δ (or W) per GEMM: two half calls
        gx = self._cb(d_b, w_b, None, [True, False, False])[0]
        _, gw, gb = self._cb(d_u, w, self.bias_sizes, [False, need_w, need_b])
        return gx, gw, gb

    def check_custom(self, g):
        if self.conv[5] != 1:
            raise ValueError(f"grad recipe {recipe_name(g)!r}: act_upd/update_rht on a grouped "
                             f"convolution (groups={self.conv[5]}) is not supported")


# ----------------------------------------------------------------------------- the Function


class QGemmFn(torch.autograd.Function):
    """z = op(a, W, b) with the operands of `layer`'s forward recipe; backward: `backward_gemms`."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, mask, op):
        a, w, b, cast, hp = prep_forward(layer.fwd_recipe, layer.grad_recipe, x, weight, bias, mask,
                                         conv=op.channels_first)
        with no_autocast(x, cast):
            z = op.forward(a, w, b)
        if z._base is not None:
            # F.linear folds >2-d input and views its result back, but an output that is a view
            # made inside a Function cannot be written in place (wav2vec2's SpecAugment does);
            # _unsafe_view: the same storage and shape, not tracked as a view (no copy)
            z = torch.ops.aten._unsafe_view(z, z.shape) if z.is_contiguous() else z.clone()
        # what the backward GEMMs must see: the quantized (and masked) a and W, and the
        # high-precision W, a where a backward slot re-quantizes them (else None)
        ctx.save_for_backward(a, w, *hp)
        ctx.layer, ctx.op = layer, op
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return z

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # create_graph: once_differentiable refuses a double backward
            return _backward_once(ctx, grad_out)
        # grad mode is off already: once_differentiable's no_grad and checks would cost µs per layer
        return (*backward_gemms(ctx, grad_out), None, None, None)


_backward_once = once_differentiable(lambda ctx, grad_out: (*backward_gemms(ctx, grad_out), None, None, None))


def backward_gemms(ctx, grad_out):
    """(grad x, grad W, grad b) of one QGemmFn backward: δ routed to the two GEMMs of ctx.op."""
    a, w = ctx.saved_tensors[:2]
    layer = ctx.layer
    delta = grad_out if grad_out.dtype == a.dtype else grad_out.to(a.dtype)
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_u = need_w or need_b
    G = ctx.op.gemms(a, w, delta, ctx.dtypes[2] is not None)
    g = layer.grad_recipe
    custom = need_u and custom_update(g)
    rht = custom and g.update_rht is not None
    d_b, d_u = route(g, layer.lp_state, delta, need_x, need_u and not rht, G.to2d, G.from2d)
    gx = gw = gb = None
    w_b = layer._backward_weight(ctx, w) if need_x else w
    if custom:  # the update GEMM on [C_out, tokens] @ [tokens, K] (conv: the im2col matrix)
        G.check_custom(g)
        if need_x:
            gx = G.grad_input(d_b, w_b)
        d_u2, a_u, ones, unrot = layer._update_operands(ctx, delta, d_u, G.act2d, G.to2d, G.from2d)
        gw = d_u2.mm(a_u).reshape(w.shape) if need_w else None
        if need_b:
            gb = d_u2.sum(1) if ones is None else d_u2.mm(ones).squeeze(1)
        if rht and layer.stats_every and layer._lp_bwd_calls % layer.stats_every == layer.stats_every - 1:
            d_u = unrot()
    else:
        gx, gw, gb = G.grads(d_b, d_u, w_b, w, need_x, need_w, need_b)
    if need_w:
        # a plain int attribute: nn.Module.__setattr__'s parameter/buffer checks cost more than the sum
        object.__setattr__(layer, "update_macs", layer.update_macs + w.numel() * G.tokens)
        if layer.noise_armed:
            layer._record_noise(ctx, delta, gw, G.grad_weight, G.act2d, G.to2d, G.from2d)
    if layer.stats_every and layer._stats_due():
        layer._record_stats(delta, d_b, d_u, need_x, need_u, gw, lambda: G.grad_weight(delta))
    return tuple(t if t is None or t.dtype == dt else t.to(dt) for t, dt in zip((gx, gw, gb), ctx.dtypes))


def swap_class(mod: nn.Module, qcls: type, fwd, grad, weight_nm, weight_nm_every, stats_every) -> None:
    """Turn `mod` into `qcls` in place (its Parameters, buffers and hooks are kept)."""
    if isinstance(mod, GemmState) or getattr(mod, "lp_converted", False):
        raise ValueError(f"{type(mod).__name__} is already converted; use set_recipes() or unconvert()")
    orig = type(mod)
    mod.__class__ = qcls
    mod._lp_init(fwd, grad, weight_nm=weight_nm, weight_nm_every=weight_nm_every,
                 stats_every=stats_every, orig_class=orig)
