"""Linear / conv2d layers with per-GEMM control of the neural gradient.

A layer computes three GEMMs (spec/algorithms.md):

    forward   z = W a          W, a quantized by `fwd.weight` / `fwd.act` (round-to-nearest, STE)
    backward  g = Wᵀ δ_b       δ_b = grad.backward(δ)   (exact δ when None)
    update    ∂C/∂W = δ_u aᵀ   δ_u = mean of grad.samples draws of grad.update(δ)  (SMP)

The backward side (which estimate of δ feeds which GEMM, SMP, the update-GEMM operands, the noise
monitor's extra draw, the statistics records) is lowprec.backward, pure functions of the recipe, the
layer's state and tensors; its docstring carries that math. Here: the modules, their autograd
Functions and their state.
- Each layer owns `lp_state = {"backward": {}, "update": {}}`, the estimators' state per slot.
- With samples == 1 and one δ for both GEMMs (`grad.shared`) the conv backward is one fused
  `convolution_backward` call; different δ (or W) per GEMM: two half calls.
- The forward GEMM's operands (quantized, masked, cast to the autocast dtype) are lowprec.forward's.
- Bias gradient comes from δ_u (it is part of the update GEMM). Straight-through estimator: the
  gradients w.r.t. the unquantized W and a are those w.r.t. the quantized ones; the backward GEMMs
  see the quantized (and N:M-masked) W and the quantized a, which is what is saved for backward.
- dtype: under torch.autocast the GEMMs, estimators and backward GEMMs run in the autocast dtype;
  gradients are returned in the dtypes of x, W, b.

Operand slots (issue 11): the six operands are fwd.weight / fwd.act (forward GEMM), grad.backward /
grad.weight_bwd (δ and W in the backward GEMM), grad.update / grad.act_upd (δ and a in the update
GEMM). Estimators with `elementwise == False` (block formats) see 2-D views whose `dim` is chosen
by the recipe: W as [C_out, K] (K = C_in·kh·kw; forward reduction dim -1, backward dim 0), a as
[tokens, C_in] in the forward (conv: channels last; blocks along C approximate im2col blocks) and
as [tokens, K] in the update GEMM (conv: the im2col matrix, so blocks along tokens are exact; groups
must be 1), δ as [C_out, tokens]. `weight_bwd` re-quantizes the high-precision (masked) W and
`act_upd` the high-precision a, not their forward-quantized copies (both saved for backward only
when the slot is set; zero-preserving quantizers keep pruned weights pruned). `update_rht = n`:
the layer draws n random signs per backward from torch's RNG (`random_signs`, after δ_b) and
lowprec.backward rotates both update-GEMM operands with them. With the new slots None the layers
run exactly the code paths they ran before.

Weight N:M masks (`weight_nm=(N, M)`, spec §4.5; transposable by default; the search is
lowprec.weight_nm): magnitude top-N in every block of M consecutive weights along the flattened
input-feature dimension (linear: `in_features`; conv: C_in/groups·kh·kw in PyTorch's weight
layout), recomputed on the first forward and then every `weight_nm_every`-th
forward in training mode (and on the first forward after `load_state_dict`). The forward and the
backward GEMM use `W ⊙ mask` (quantized after masking when a weight quantizer is on); the weight
gradient is dense (straight-through), so pruned weights keep learning and can re-enter at the next
recompute. The mask is a non-persistent buffer: state_dict keys are unchanged by `convert()`.

Statistics (`stats_every=k > 0`): every k-th backward of a layer appends one record
(`backward.stats_record`: δ_u, δ_b and the weight gradient vs exact, max|δ|, scalar update state).
`lowprec.convert.collect_stats(model)` averages and clears them. With stats_every=0 backward does no extra work.

Noise monitor (lowprec.noise, driven by lowprec.adapt): `arm_noise(generator)` makes the next
backward that computes a weight gradient also compute the exact one and a second, independent
estimate (`backward.noise_record`) from `generator` and a copy of the update state as it was when
armed, so training is the same as with the monitor off; `pop_noise()` returns the four sums of
`noise.noise_terms`. Unarmed, backward only tests one attribute. A layer applied several times in
one step measures its first backward. `update_macs` counts the update-GEMM multiply-accumulates
(weight elements × tokens) of the backwards since `pop_update_macs()` (lowprec.adapt's cost).

Layers are made by `lowprec.convert.convert()` (a class swap of an existing nn.Linear / nn.Conv2d:
the module object, its Parameters, buffers and hooks are kept; state_dict keys are unchanged) or
`QLinear.from_linear` / `QConv2d.from_conv`. Run-time state that is not in state_dict (estimator
state, weight mask and its schedule) goes through `lp_state_dict()` / `load_lp_state_dict()`.
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
from .weight_nm import check_weight_nm, format_weight_nm, nm_weight_mask

__all__ = ["QLinear", "QConv2d", "resolve_fwd", "resolve_grad", "recipe_name"]


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


# ----------------------------------------------------------------------------- helpers


def _cast(g, dtype):
    return g if g is None or g.dtype == dtype else g.to(dtype)


def _to_device(obj, dev):
    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if isinstance(obj, dict):
        return {k: _to_device(v, dev) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, dev) for v in obj)
    return obj


# ----------------------------------------------------------------------------- module mixin


class _QMixin:
    """Per-layer state shared by QLinear and QConv2d (set by `_lp_init`)."""

    fwd_recipe: Any
    grad_recipe: Any

    def _lp_init(self, fwd, grad, *, weight_nm, weight_nm_every, stats_every, orig_class):
        self.fwd_recipe = fwd
        self.grad_recipe = grad
        self.lp_state = {"backward": {}, "update": {}}
        self.weight_nm = weight_nm
        self.weight_nm_every = int(weight_nm_every)
        self._lp_nm_calls = 0
        self.register_buffer("weight_mask", None, persistent=False)
        self.stats_every = int(stats_every)
        self._lp_bwd_calls = 0
        self._lp_stats: list[dict[str, float]] = []
        self._lp_orig_class = orig_class
        self._lp_noise_arm: dict[str, Any] | None = None
        self._lp_noise_rec: dict[str, float] | None = None
        self.update_macs = 0

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", fwd={recipe_name(self.fwd_recipe)}, grad={recipe_name(self.grad_recipe)}"
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
        unknown = sorted(set(state) - {"lp_state", "_lp_nm_calls", "weight_mask", "_lp_bwd_calls"})
        if unknown:
            raise ValueError(f"load_lp_state_dict: unknown key {unknown[0]!r}; "
                             "expected 'lp_state', '_lp_nm_calls', 'weight_mask', '_lp_bwd_calls'")
        dev = self.weight.device
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
        """The statistics records since the last call (see module docstring); clears them."""
        recs, self._lp_stats = self._lp_stats, []
        return recs

    # ---- noise monitor (module docstring)
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

    def restore_class(self) -> None:
        """Turn this layer back into the class it was converted from, in place (inverse of the
        class swap: Parameters, persistent buffers and hooks are kept)."""
        orig = self._lp_orig_class
        if hasattr(self, "weight_mask"):
            del self.weight_mask  # nn.Module.__delattr__ unregisters the buffer
        for attr in ("fwd_recipe", "grad_recipe", "lp_state", "weight_nm", "weight_nm_every", "_lp_nm_calls",
                     "stats_every", "_lp_bwd_calls", "_lp_stats", "_lp_orig_class", "_lp_noise_arm",
                     "_lp_noise_rec", "update_macs"):
            self.__dict__.pop(attr, None)
        self.__class__ = orig

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.weight_mask = None  # recompute from the loaded weights at the next forward

    # ---- forward helpers
    def _current_mask(self) -> torch.Tensor | None:
        if self.weight_nm is None:
            return None
        if self.weight_mask is None or (self.training and self._lp_nm_calls % self.weight_nm_every == 0):
            with torch.no_grad():
                self.weight_mask = nm_weight_mask(self.weight, *self.weight_nm)
        if self.training:
            self._lp_nm_calls += 1
        return self.weight_mask

    def effective_weight(self) -> torch.Tensor:
        """The weight the GEMMs use (masked, quantized) in the weight's own dtype; no side effects."""
        mask = None
        if self.weight_nm is not None:
            mask = self.weight_mask if self.weight_mask is not None else nm_weight_mask(self.weight, *self.weight_nm)
        with torch.no_grad():
            w = forward_weight(self.fwd_recipe, self.weight, mask)[1]
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


# ----------------------------------------------------------------------------- linear


def _save(ctx, layer, a, w, x, weight, bias, hp=(None, None)) -> None:
    """Keep what the backward GEMMs must see: the quantized (and masked) a and W, and the
    high-precision W, a where a backward slot re-quantizes them (else None)."""
    ctx.save_for_backward(a, w, *hp)
    ctx.layer = layer
    ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)


def _unsave(ctx, grad_out):
    """(a, W, layer, δ in the operands' dtype, need grad-input, need grad-weight, need grad-bias)."""
    a, w = ctx.saved_tensors[:2]
    delta = grad_out if grad_out.dtype == a.dtype else grad_out.to(a.dtype)
    return (a, w, ctx.layer, delta, *ctx.needs_input_grad[:3])


class _QLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, mask):
        a, w, b, cast, hp = prep_forward(layer.fwd_recipe, layer.grad_recipe, x, weight, bias, mask, conv=False)
        with no_autocast(x, cast):
            z = F.linear(a, w, b)
        _save(ctx, layer, a, w, x, weight, bias, hp)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        a, w, layer, delta, need_x, need_w, need_b = _unsave(ctx, grad_out)
        need_u = need_w or need_b
        out, inp = w.shape
        shape = delta.shape

        def to2d(t, view=False):
            t = t.reshape(-1, out).t()
            return t if view else t.contiguous()

        def from2d(t):
            return t.t().reshape(shape)

        custom = need_u and custom_update(layer.grad_recipe)
        rht = custom and layer.grad_recipe.update_rht is not None
        d_b, d_u = route(layer.grad_recipe, layer.lp_state, delta, need_x, need_u and not rht, to2d, from2d)
        gx = gw = gb = None
        if need_x:
            gx = d_b.reshape(-1, out).mm(layer._backward_weight(ctx, w)).reshape(a.shape)
        a2 = a.reshape(-1, inp)
        if custom:
            d_u2, a_u, ones, unrot = layer._update_operands(ctx, delta, d_u, lambda t: t.reshape(-1, inp),
                                                            to2d, from2d)
            gw = d_u2.mm(a_u) if need_w else None
            if need_b:
                gb = d_u2.sum(1) if ones is None else d_u2.mm(ones).squeeze(1)
            if rht and layer.stats_every and layer._lp_bwd_calls % layer.stats_every == layer.stats_every - 1:
                d_u = unrot()
        elif need_u:
            du2 = d_u.reshape(-1, out)
            if need_w:
                gw = du2.t().mm(a2)
            if need_b:
                gb = du2.sum(0)
        if need_w:
            layer.update_macs += w.numel() * a2.shape[0]
            if layer.noise_armed:
                layer._record_noise(ctx, delta, gw, lambda d: d.reshape(-1, out).t().mm(a2),
                                    lambda t: t.reshape(-1, inp), to2d, from2d)
        if layer.stats_every and layer._stats_due():
            layer._record_stats(delta, d_b, d_u, need_x, need_u, gw,
                                lambda: delta.reshape(-1, out).t().mm(a2))
        xd, wd, bd = ctx.dtypes
        return _cast(gx, xd), _cast(gw, wd), _cast(gb, bd), None, None


class QLinear(_QMixin, nn.Linear):
    """nn.Linear whose GEMMs follow `fwd_recipe` / `grad_recipe`. Made by `convert()` (class swap
    of an existing nn.Linear: same Parameters) or `QLinear.from_linear(lin, fwd=..., grad=...)`."""

    @classmethod
    def from_linear(cls, lin: nn.Linear, *, fwd="fp32", grad="fp32", weight_nm=None,
                    weight_nm_every: int = 100, stats_every: int = 0) -> "QLinear":
        _swap(lin, cls, resolve_fwd(fwd), resolve_grad(grad), check_weight_nm(weight_nm), weight_nm_every, stats_every)
        return lin  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QLinearFn.apply(x, self.weight, self.bias, self, self._current_mask())


# ----------------------------------------------------------------------------- conv2d


class _QConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, mask, stride, padding, dilation, groups):
        a, w, b, cast, hp = prep_forward(layer.fwd_recipe, layer.grad_recipe, x, weight, bias, mask, conv=True)
        with no_autocast(x, cast):
            z = F.conv2d(a, w, b, stride, padding, dilation, groups)
        _save(ctx, layer, a, w, x, weight, bias, hp)
        ctx.conv = (list(stride), list(padding), list(dilation), False, [0, 0], groups)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        a, w, layer, delta, need_x, need_w, need_b = _unsave(ctx, grad_out)
        need_u = need_w or need_b
        n, c, h, wd_ = delta.shape

        def to2d(t, view=False):
            t = t.permute(1, 0, 2, 3)
            return t.reshape(c, n, h * wd_) if view else t.reshape(c, -1)

        def from2d(t):
            return t.reshape(c, n, h, wd_).permute(1, 0, 2, 3)

        custom = need_u and custom_update(layer.grad_recipe)
        rht = custom and layer.grad_recipe.update_rht is not None
        d_b, d_u = route(layer.grad_recipe, layer.lp_state, delta, need_x, need_u and not rht, to2d, from2d)
        conv = ctx.conv
        bias_sizes = [c] if ctx.dtypes[2] is not None else None
        cb = torch.ops.aten.convolution_backward
        gx = gw = gb = None
        w_b = layer._backward_weight(ctx, w) if need_x else w
        if custom:  # the update GEMM on the im2col matrix: [C_out, tokens] @ [tokens, C_in·kh·kw]
            if conv[5] != 1:
                raise ValueError(f"grad recipe {recipe_name(layer.grad_recipe)!r}: act_upd/update_rht on a grouped "
                                 f"convolution (groups={conv[5]}) is not supported")
            if need_x:
                gx = cb(d_b, a, w_b, None, *conv, [True, False, False])[0]

            d_u2, a_u, ones, unrot = layer._update_operands(ctx, delta, d_u, im2col_of(w, conv), to2d, from2d)
            gw = d_u2.mm(a_u).reshape(w.shape) if need_w else None
            if need_b:
                gb = d_u2.sum(1) if ones is None else d_u2.mm(ones).squeeze(1)
            if rht and layer.stats_every and layer._lp_bwd_calls % layer.stats_every == layer.stats_every - 1:
                d_u = unrot()
        elif not need_x or not need_u or (d_b is d_u and w_b is w):
            d = d_b if need_x else d_u
            gx, gw, gb = cb(d, a, w_b if need_x else w, bias_sizes, *conv, [need_x, need_w, need_b])
        else:  # different δ (or W) per GEMM: two half calls (~1.3x one fused call on CPU)
            gx = cb(d_b, a, w_b, None, *conv, [True, False, False])[0]
            _, gw, gb = cb(d_u, a, w, bias_sizes, *conv, [False, need_w, need_b])
        if need_w:
            layer.update_macs += w.numel() * n * h * wd_
            if layer.noise_armed:
                layer._record_noise(ctx, delta, gw, lambda d: cb(d, a, w, None, *conv, [False, True, False])[1],
                                    im2col_of(w, conv), to2d, from2d)
        if layer.stats_every and layer._stats_due():
            layer._record_stats(delta, d_b, d_u, need_x, need_u, gw,
                                lambda: cb(delta, a, w, None, *conv, [False, True, False])[1])
        xd, wdt, bd = ctx.dtypes
        return _cast(gx, xd), _cast(gw, wdt), _cast(gb, bd), None, None, None, None, None, None


class QConv2d(_QMixin, nn.Conv2d):
    """nn.Conv2d whose GEMMs follow `fwd_recipe` / `grad_recipe` (any stride, padding incl.
    'same'/'valid' and non-zero padding modes, dilation, groups incl. depthwise, bias or not)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, fwd="fp32", grad="fp32", weight_nm=None,
                  weight_nm_every: int = 100, stats_every: int = 0) -> "QConv2d":
        _swap(conv, cls, resolve_fwd(fwd), resolve_grad(grad), check_weight_nm(weight_nm), weight_nm_every, stats_every)
        return conv  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        padding = self.padding
        rp = self._reversed_padding_repeated_twice  # [left_w, right_w, left_h, right_h]
        if self.padding_mode != "zeros":
            # padding outside the Function: autograd handles its backward; the activation
            # quantizer then sees the padded tensor (documented edge case)
            x = F.pad(x, rp, mode=self.padding_mode)
            padding = (0, 0)
        elif isinstance(padding, str):
            if padding == "valid" or (rp[0] == rp[1] and rp[2] == rp[3]):
                padding = (rp[2], rp[0])
            else:  # asymmetric 'same' (even effective kernel): pad explicitly, as aten does
                x = F.pad(x, rp)
                padding = (0, 0)
        z = _QConv2dFn.apply(x, self.weight, self.bias, self, self._current_mask(),
                             self.stride, padding, self.dilation, self.groups)
        return z.squeeze(0) if unbatched else z


def _swap(mod, qcls, fwd, grad, weight_nm, weight_nm_every, stats_every):
    if isinstance(mod, _QMixin):
        raise ValueError(f"{type(mod).__name__} is already converted; use set_recipes() or unconvert()")
    orig = type(mod)
    mod.__class__ = qcls
    mod._lp_init(fwd, grad, weight_nm=weight_nm, weight_nm_every=weight_nm_every,
                 stats_every=stats_every, orig_class=orig)
