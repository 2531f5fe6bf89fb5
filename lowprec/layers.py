"""Linear / conv2d layers with per-GEMM control of the neural gradient, and `convert()`.

A layer computes three GEMMs (spec/algorithms.md):

    forward   z = W a          W, a quantized by `fwd.weight` / `fwd.act` (round-to-nearest, STE)
    backward  g = Wᵀ δ_b       δ_b = grad.backward(δ)   (exact δ when None)
    update    ∂C/∂W = δ_u aᵀ   δ_u = mean of grad.samples draws of grad.update(δ)  (SMP)

Routing rules (one place: `_QMixin._route`):
- `grad.shared` (backward == update, e.g. LUQ): the FIRST update draw is δ_b, so one quantized δ
  feeds both GEMMs; with samples == 1 the conv backward is one fused `convolution_backward` call.
- Estimators with `elementwise == False` (N:M) get δ as a 2-D [C_out, tokens] matrix
  (conv: permute(1,0,2,3).reshape(C, -1); linear: reshape(-1, out).t()); the result is mapped back.
- Each layer owns `lp_state = {"backward": {}, "update": {}}`, passed as `state=` to the estimator
  of that slot (a shared recipe uses the "update" slot only). SMP draws 2..s get a copy of the
  update state as it was before draw 1, so a stateful estimator (LUQ in-hindsight max) advances
  its state once per step and every draw uses the same scale.
- Bias gradient comes from δ_u (it is part of the update GEMM). Straight-through estimator: the
  gradients w.r.t. the unquantized W and a are those w.r.t. the quantized ones; the backward GEMMs
  see the quantized (and N:M-masked) W and the quantized a, which is what is saved for backward.
- dtype: under torch.autocast the layer casts the (already quantized) operands to the autocast
  dtype itself and runs the GEMMs, estimators and backward GEMMs in that dtype; gradients are
  returned in the dtypes of x, W, b.

Weight N:M masks (`weight_nm=(N, M)`, spec §4.5; transposable by default, see nm_weight_mask): magnitude top-N in every block of M consecutive
weights along the flattened input-feature dimension (linear: `in_features`; conv: C_in/groups·kh·kw
in PyTorch's weight layout), recomputed on the first forward and then every `weight_nm_every`-th
forward in training mode (and on the first forward after `load_state_dict`). The forward and the
backward GEMM use `W ⊙ mask` (quantized after masking when a weight quantizer is on); the weight
gradient is dense (straight-through), so pruned weights keep learning and can re-enter at the next
recompute. The mask is a non-persistent buffer: state_dict keys are unchanged by `convert()`.

Statistics (`stats_every=k > 0`): every k-th backward of a layer appends one record (see
`_record_stats`; keys `rel_error`, `cosine`, `zero_frac`, `nnz_in` for δ_u vs δ; `bwd_*` for δ_b vs
δ when δ_b is a separate estimate; `gw_*` for the weight gradient vs the exact one; `absmax` =
max|δ|; `state_update_*` for scalar entries of the update state, e.g. LUQ's in-hindsight max).
`collect_stats(model)` averages and clears them. With stats_every=0 backward does no extra work.

`convert()` swaps the class of eligible nn.Linear / nn.Conv2d modules in place (the module object,
its Parameters, buffers and hooks are kept; state_dict keys are unchanged). Converting a model that
already holds converted layers is a ValueError; use `set_recipes()` to change recipes in place
(e.g. for FNT) or `unconvert()` first.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "QLinear",
    "QConv2d",
    "convert",
    "unconvert",
    "set_recipes",
    "ConvertReport",
    "collect_stats",
    "nm_weight_mask",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- recipes


def _resolve_fwd(fwd: Any):
    if fwd is None:
        fwd = "fp32"
    if isinstance(fwd, str):
        from .recipes import fwd_recipe

        return fwd_recipe(fwd)
    for attr in ("weight", "act"):
        if not hasattr(fwd, attr):
            raise ValueError(f"fwd must be a FwdRecipe or a registry name, got {fwd!r} (no .{attr})")
    return fwd


def _resolve_grad(grad: Any):
    if grad is None:
        grad = "fp32"
    if isinstance(grad, str):
        from .recipes import grad_recipe

        return grad_recipe(grad)
    for attr in ("backward", "update", "samples", "shared", "identity"):
        if not hasattr(grad, attr):
            raise ValueError(f"grad must be a GradRecipe or a registry name, got {grad!r} (no .{attr})")
    if int(grad.samples) < 1:
        raise ValueError(f"grad.samples must be >= 1, got {grad.samples!r}")
    return grad


def _fwd_identity(fwd) -> bool:
    return fwd.weight is None and fwd.act is None


def _name(recipe) -> str:
    return str(getattr(recipe, "name", type(recipe).__name__))


# ----------------------------------------------------------------------------- N:M weight masks


@functools.lru_cache(maxsize=None)
def _transposable_patterns(n: int, m: int) -> torch.Tensor:
    """Every m×m 0/1 matrix with exactly n ones in each row and each column, as [count, m*m]."""
    rows = [r for r in itertools.product((0, 1), repeat=m) if sum(r) == n]
    pats = [p for p in itertools.product(rows, repeat=m) if all(sum(col) == n for col in zip(*p))]
    return torch.tensor(pats, dtype=torch.float32).reshape(len(pats), m * m)


def nm_weight_mask(weight: torch.Tensor, n: int, m: int, transposable: bool = False) -> torch.Tensor:
    """Bool mask, same shape as `weight`: the `n` largest |w| of every block of `m` consecutive
    entries of `weight.reshape(out, -1)` (the input-feature / C_in·kh·kw dimension). A tail shorter
    than `m` is padded with entries that are never preferred to a real one and then dropped.

    transposable: N:M along both dimensions of `weight.reshape(out, -1)`, so that W (forward GEMM)
    and Wᵀ (backward GEMM) are both N:M (spec §4.5). Per m×m tile, the pattern with n ones per row
    and per column that keeps the most |w| (exact: all patterns are scored; 90 for 2:4)."""
    if transposable:
        return _transposable_mask(weight, n, m)
    w = weight.detach().reshape(weight.shape[0], -1).abs()
    k = w.shape[1]
    pad = (-k) % m
    if pad:
        w = F.pad(w, (0, pad), value=-1.0)
    blocks = w.reshape(w.shape[0], -1, m)
    idx = blocks.topk(n, dim=-1).indices
    mask = torch.zeros(blocks.shape, dtype=torch.bool, device=w.device).scatter_(-1, idx, True)
    return mask.reshape(w.shape[0], -1)[:, :k].reshape(weight.shape)


def _transposable_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    w = weight.detach().reshape(weight.shape[0], -1).abs().float()
    rows, cols = w.shape
    w = F.pad(w, (0, (-cols) % m, 0, (-rows) % m))  # padding is dropped below
    R, C = w.shape[0] // m, w.shape[1] // m
    tiles = w.reshape(R, m, C, m).permute(0, 2, 1, 3).reshape(R, C, m * m)
    pats = _transposable_patterns(n, m).to(w.device)
    best = (tiles @ pats.t()).argmax(-1)
    mask = pats[best].reshape(R, C, m, m).permute(0, 2, 1, 3).reshape(R * m, C * m)
    return mask[:rows, :cols].bool().reshape(weight.shape)


def _check_nm(weight_nm, transposable: bool = False) -> tuple[int, int, bool] | None:
    """(N, M, transposable) from (N, M) or (N, M, transposable)."""
    if weight_nm is None:
        return None
    try:
        vals = tuple(weight_nm)
        n, m = int(vals[0]), int(vals[1])
        if len(vals) == 3:
            transposable = bool(vals[2])
        elif len(vals) != 2:
            raise ValueError
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"weight_nm must be None or a pair (N, M), got {weight_nm!r}") from None
    if not (0 < n <= m):
        raise ValueError(f"weight_nm=(N, M) needs 0 < N <= M, got {weight_nm!r}")
    if transposable and m > 4:
        raise ValueError(f"transposable weight masks enumerate every M×M pattern and support M <= 4, "
                         f"got weight_nm={n}:{m}; set weight_nm_transposable=false")
    return n, m, bool(transposable)


def _nm_str(nm) -> str:
    return "none" if nm is None else f"{nm[0]}:{nm[1]}" + (" transposable" if nm[2] else "")


# ----------------------------------------------------------------------------- helpers


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def _no_autocast(x: torch.Tensor, active: bool):
    return torch.autocast(device_type=x.device.type, enabled=False) if active else contextlib.nullcontext()


def _prep_forward(layer, x, weight, bias, mask):
    """Quantize/mask W and a, cast to the autocast dtype if one is active. Returns (a, w, b, cast)."""
    fwd = layer.fwd_recipe
    w = weight if mask is None else weight * mask
    if fwd.weight is not None:
        w = fwd.weight(w)
        if mask is not None:  # a quantizer must not revive pruned weights
            w = w * mask
    a = x if fwd.act is None else fwd.act(x)
    cdt = _autocast_dtype(x)
    b = bias
    if cdt is not None:
        a, w = a.to(cdt), w.to(cdt)
        b = None if b is None else b.to(cdt)
    return a, w, b, cdt is not None


def _cast(g, dtype):
    return g if g is None or g.dtype == dtype else g.to(dtype)


def _accumulate_mean(first: torch.Tensor, more: Callable[[], torch.Tensor], s: int) -> torch.Tensor:
    acc = first.float() if first.dtype in _LOW_PRECISION else first.clone()
    for _ in range(s - 1):
        acc.add_(more())
    return acc.div_(s).to(first.dtype)


def _scalar(v) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1 and v.dtype != torch.bool:
        return float(v)
    return None


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

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", fwd={_name(self.fwd_recipe)}, grad={_name(self.grad_recipe)}"
        if self.weight_nm is not None:
            s += f", weight_nm={_nm_str(self.weight_nm)}/{self.weight_nm_every}"
        if self.stats_every:
            s += f", stats_every={self.stats_every}"
        return s

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
            w = self.weight if mask is None else self.weight * mask
            if self.fwd_recipe.weight is not None:
                w = self.fwd_recipe.weight(w)
                if mask is not None:
                    w = w * mask
        return w.detach()

    # ---- backward helpers
    def _estimate(self, est, delta, state, to2d, from2d):
        if getattr(est, "elementwise", True):
            return est(delta, state=state)
        return from2d(est(to2d(delta), state=state))

    def _route(self, delta, need_b: bool, need_u: bool, to2d, from2d):
        """Return (δ_b, δ_u); either may be `delta` itself (exact), both may be the same object."""
        g = self.grad_recipe
        st = self.lp_state
        d_b = d_u = delta
        s = int(g.samples)
        if g.shared and g.update is not None:
            if not (need_b or need_u):
                return d_b, d_u
            est = g.update
            snap = copy.deepcopy(st["update"]) if (need_u and s > 1) else None
            first = self._estimate(est, delta, st["update"], to2d, from2d)
            d_b = first
            if need_u:
                d_u = first if s == 1 else _accumulate_mean(
                    first, lambda: self._estimate(est, delta, copy.deepcopy(snap), to2d, from2d), s)
            return d_b, d_u
        if need_b and g.backward is not None:
            d_b = self._estimate(g.backward, delta, st["backward"], to2d, from2d)
        if need_u and g.update is not None:
            snap = copy.deepcopy(st["update"]) if s > 1 else None
            first = self._estimate(g.update, delta, st["update"], to2d, from2d)
            d_u = first if s == 1 else _accumulate_mean(
                first, lambda: self._estimate(g.update, delta, copy.deepcopy(snap), to2d, from2d), s)
        return d_b, d_u

    def _stats_due(self) -> bool:
        # only called when stats_every > 0
        self._lp_bwd_calls += 1
        return self._lp_bwd_calls % self.stats_every == 0

    def _record_stats(self, delta, d_b, d_u, need_b, need_u, gw_hat, exact_gw: Callable[[], torch.Tensor]):
        from .stats import compare

        d = delta.float()
        rec: dict[str, float] = {"absmax": float(d.abs().max())}
        if need_u:
            rec.update({k: float(v) for k, v in compare(d, d_u.float()).items()})
            if gw_hat is not None and d_u is not delta:
                rec.update({f"gw_{k}": float(v) for k, v in compare(exact_gw().float(), gw_hat.float()).items()})
        if need_b and d_b is not delta and d_b is not d_u:
            rec.update({f"bwd_{k}": float(v) for k, v in compare(d, d_b.float()).items()})
        for k, v in self.lp_state["update"].items():
            f = _scalar(v)
            if f is not None:
                rec[f"state_update_{k}"] = f
        self._lp_stats.append(rec)


# ----------------------------------------------------------------------------- linear


def _save(ctx, layer, a, w, x, weight, bias) -> None:
    """Keep what the backward GEMMs must see: the quantized (and masked) a and W."""
    ctx.save_for_backward(a, w)
    ctx.layer = layer
    ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)


def _unsave(ctx, grad_out):
    """(a, W, layer, δ in the operands' dtype, need grad-input, need grad-weight, need grad-bias)."""
    a, w = ctx.saved_tensors
    delta = grad_out if grad_out.dtype == a.dtype else grad_out.to(a.dtype)
    return (a, w, ctx.layer, delta, *ctx.needs_input_grad[:3])


class _QLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, mask):
        a, w, b, cast = _prep_forward(layer, x, weight, bias, mask)
        with _no_autocast(x, cast):
            z = F.linear(a, w, b)
        _save(ctx, layer, a, w, x, weight, bias)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        a, w, layer, delta, need_x, need_w, need_b = _unsave(ctx, grad_out)
        need_u = need_w or need_b
        out, inp = w.shape
        shape = delta.shape

        def to2d(t):
            return t.reshape(-1, out).t().contiguous()

        def from2d(t):
            return t.t().reshape(shape)

        d_b, d_u = layer._route(delta, need_x, need_u, to2d, from2d)
        gx = gw = gb = None
        if need_x:
            gx = d_b.reshape(-1, out).mm(w).reshape(a.shape)
        a2 = a.reshape(-1, inp)
        if need_u:
            du2 = d_u.reshape(-1, out)
            if need_w:
                gw = du2.t().mm(a2)
            if need_b:
                gb = du2.sum(0)
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
        _swap(lin, cls, _resolve_fwd(fwd), _resolve_grad(grad), _check_nm(weight_nm), weight_nm_every, stats_every)
        return lin  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QLinearFn.apply(x, self.weight, self.bias, self, self._current_mask())


# ----------------------------------------------------------------------------- conv2d


class _QConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, mask, stride, padding, dilation, groups):
        a, w, b, cast = _prep_forward(layer, x, weight, bias, mask)
        with _no_autocast(x, cast):
            z = F.conv2d(a, w, b, stride, padding, dilation, groups)
        _save(ctx, layer, a, w, x, weight, bias)
        ctx.conv = (list(stride), list(padding), list(dilation), False, [0, 0], groups)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        a, w, layer, delta, need_x, need_w, need_b = _unsave(ctx, grad_out)
        need_u = need_w or need_b
        n, c, h, wd_ = delta.shape

        def to2d(t):
            return t.permute(1, 0, 2, 3).reshape(c, -1)

        def from2d(t):
            return t.reshape(c, n, h, wd_).permute(1, 0, 2, 3)

        d_b, d_u = layer._route(delta, need_x, need_u, to2d, from2d)
        conv = ctx.conv
        bias_sizes = [c] if ctx.dtypes[2] is not None else None
        cb = torch.ops.aten.convolution_backward
        gx = gw = gb = None
        if d_b is d_u or not need_x or not need_u:
            d = d_b if need_x else d_u
            gx, gw, gb = cb(d, a, w, bias_sizes, *conv, [need_x, need_w, need_b])
        else:  # different δ per GEMM: two half calls (~1.3x one fused call on CPU)
            gx = cb(d_b, a, w, None, *conv, [True, False, False])[0]
            _, gw, gb = cb(d_u, a, w, bias_sizes, *conv, [False, need_w, need_b])
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
        _swap(conv, cls, _resolve_fwd(fwd), _resolve_grad(grad), _check_nm(weight_nm), weight_nm_every, stats_every)
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


# ----------------------------------------------------------------------------- convert


_Q_CLASS = {nn.Linear: QLinear, nn.Conv2d: QConv2d}


def _swap(mod, qcls, fwd, grad, weight_nm, weight_nm_every, stats_every):
    if isinstance(mod, _QMixin):
        raise ValueError(f"{type(mod).__name__} is already converted; use set_recipes() or unconvert()")
    orig = type(mod)
    mod.__class__ = qcls
    mod._lp_init(fwd, grad, weight_nm=weight_nm, weight_nm_every=weight_nm_every,
                 stats_every=stats_every, orig_class=orig)


def _ineligible_reason(mod: nn.Module, parent: nn.Module | None) -> tuple[type | None, str | None]:
    """(base class, None) if convertible, else (base or None, reason)."""
    base = nn.Linear if isinstance(mod, nn.Linear) else nn.Conv2d if isinstance(mod, nn.Conv2d) else None
    if base is None:
        return None, f"unsupported layer type {type(mod).__name__}"
    if type(mod).forward is not base.forward:
        return base, f"{type(mod).__name__} overrides forward"
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(mod):
        return base, "parametrized module"
    if isinstance(mod.weight, nn.parameter.UninitializedParameter):
        return base, "uninitialized (lazy) module"
    if isinstance(parent, nn.MultiheadAttention):
        return base, "inside nn.MultiheadAttention (weights used functionally)"
    return base, None


@dataclass
class ConvertReport:
    """What `convert()` did. `converted`: qualified names; `skipped`: name -> reason."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)
    fwd: str = "fp32"
    grad: str = "fp32"
    weight_nm: tuple[int, int, bool] | None = None  # (N, M, transposable)
    stats_every: int = 0

    @property
    def num_converted(self) -> int:
        return len(self.converted)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __str__(self) -> str:
        head = (f"lowprec.convert: fwd={self.fwd} grad={self.grad} weight_nm={_nm_str(self.weight_nm)} "
                f"stats_every={self.stats_every}: {self.num_converted} converted, {self.num_skipped} skipped")
        rows = [(n, self.types.get(n, ""), "converted", "") for n in self.converted]
        rows += [(n, self.types.get(n, ""), "skipped", r) for n, r in self.skipped.items()]
        order = {n: i for i, n in enumerate(self.types)}
        rows.sort(key=lambda r: order.get(r[0], len(order)))
        if not rows:
            return head + "\n(no linear/conv layers found)"
        w0 = max(5, *(len(r[0]) for r in rows))
        w1 = max(4, *(len(r[1]) for r in rows))
        lines = [head, f"{'layer':<{w0}}  {'type':<{w1}}  {'status':<9}  reason"]
        lines += [f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]:<9}  {r[3]}".rstrip() for r in rows]
        return "\n".join(lines)


def convert(
    model: nn.Module,
    *,
    fwd: Any = "fp32",
    grad: Any = "fp32",
    skip: str | Sequence[str] | None = "first_last",
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
    weight_nm: tuple[int, int] | None = None,
    weight_nm_every: int = 100,
    stats_every: int = 0,
    weight_nm_transposable: bool = True,
) -> ConvertReport:
    """Convert eligible nn.Linear / nn.Conv2d modules of `model` in place; return a report.

    fwd / grad: a FwdRecipe / GradRecipe or a registry name ("int4", "luq4", ...).
    skip: "first_last" keeps the first and last eligible layers (module order, before the filter)
        in high precision; a list of qualified names skips those (unknown names: ValueError);
        None skips none.
    module_filter_fn(module, fqn) -> bool: convert only where True.
    weight_nm=(N, M): N:M-sparse weights in forward; weight_nm_transposable (default, spec §4.5)
        makes the mask N:M along both weight dimensions so the backward GEMM's Wᵀ is N:M too.
    Eligible: nn.Linear / nn.Conv2d and subclasses that do not override forward, not
    parametrized, not lazy, not the out_proj of nn.MultiheadAttention. Other ones are reported as
    skipped with the reason. Converting nothing while a non-identity recipe (or weight_nm) was asked
    for raises ValueError. A model that already has converted layers raises ValueError
    (use set_recipes() to change recipes, or unconvert()).
    """
    fwd_r = _resolve_fwd(fwd)
    grad_r = _resolve_grad(grad)
    nm = _check_nm(weight_nm, weight_nm_transposable)
    if not isinstance(weight_nm_every, int) or weight_nm_every < 1:
        raise ValueError(f"weight_nm_every must be an int >= 1, got {weight_nm_every!r}")
    if not isinstance(stats_every, int) or stats_every < 0:
        raise ValueError(f"stats_every must be an int >= 0, got {stats_every!r}")
    if skip is not None and skip != "first_last":
        if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
            raise ValueError(f"skip must be 'first_last', None or a list of qualified names, got {skip!r}")
        skip = list(skip)

    already = [n for n, m in model.named_modules() if isinstance(m, _QMixin)]
    if already:
        raise ValueError(
            f"model already has {len(already)} converted layers (e.g. {already[0]!r}); "
            "use lowprec.layers.set_recipes(model, ...) or unconvert(model) first")

    report = ConvertReport(fwd=_name(fwd_r), grad=_name(grad_r), weight_nm=nm, stats_every=stats_every)
    candidates: list[tuple[str, nn.Module, type]] = []
    parents: dict[int, nn.Module] = {}
    for _, m in model.named_modules():
        for child in m.children():
            parents.setdefault(id(child), m)
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        report.types[name] = type(mod).__name__
        base, reason = _ineligible_reason(mod, parents.get(id(mod)))
        if reason is not None:
            report.skipped[name] = reason
        else:
            candidates.append((name, mod, base))

    if isinstance(skip, list):
        unknown = [s for s in skip if s not in report.types]
        if unknown:
            raise ValueError(f"skip names not found among linear/conv layers: {unknown}; "
                             f"layers are: {list(report.types)}")
    first_last = set()
    if skip == "first_last" and candidates:
        first_last = {candidates[0][0], candidates[-1][0]}

    for name, mod, base in candidates:
        if isinstance(skip, list) and name in skip:
            report.skipped[name] = "in skip list"
        elif name in first_last:
            report.skipped[name] = ("first" if name == candidates[0][0] else "last") + " layer (skip='first_last')"
        elif module_filter_fn is not None and not module_filter_fn(mod, name):
            report.skipped[name] = "module_filter_fn returned False"
        else:
            _swap(mod, _Q_CLASS[base], fwd_r, grad_r, nm, weight_nm_every, stats_every)
            report.converted.append(name)

    identity = grad_r.identity and _fwd_identity(fwd_r) and nm is None
    if not report.converted and not identity:
        raise ValueError(
            f"convert() converted no layer although a non-identity recipe was requested "
            f"(fwd={report.fwd}, grad={report.grad}, weight_nm={nm}); this would silently train "
            f"in full precision.\n{report}")
    return report


def _q_modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _QMixin)]


def set_recipes(model: nn.Module, *, fwd: Any = None, grad: Any = None, stats_every: int | None = None,
                reset_state: bool = True) -> int:
    """Change the recipes of every converted layer in place (None = keep); e.g. FNT switches
    grad to "fp32" while keeping the forward weight quantizer. Resets estimator state unless
    reset_state=False. Returns the number of layers updated; ValueError if none."""
    layers = _q_modules(model)
    if not layers:
        raise ValueError("set_recipes: model has no converted layers (call convert() first)")
    fwd_r = None if fwd is None else _resolve_fwd(fwd)
    grad_r = None if grad is None else _resolve_grad(grad)
    for _, m in layers:
        if fwd_r is not None:
            m.fwd_recipe = fwd_r
        if grad_r is not None:
            m.grad_recipe = grad_r
        if stats_every is not None:
            m.stats_every = int(stats_every)
        if reset_state:
            m.lp_state = {"backward": {}, "update": {}}
    return len(layers)


def unconvert(model: nn.Module) -> list[str]:
    """Turn every converted layer back into its original class in place; returns their names."""
    names = []
    for name, m in _q_modules(model):
        orig = m._lp_orig_class
        m._buffers.pop("weight_mask", None)
        m._non_persistent_buffers_set.discard("weight_mask")
        for attr in ("fwd_recipe", "grad_recipe", "lp_state", "weight_nm", "weight_nm_every", "_lp_nm_calls",
                     "stats_every", "_lp_bwd_calls", "_lp_stats", "_lp_orig_class"):
            m.__dict__.pop(attr, None)
        m.__class__ = orig
        names.append(name)
    return names


def collect_stats(model: nn.Module) -> dict[str, dict[str, float]]:
    """{layer_name: {metric: mean over the records since the last call, ..., "records": n}} for
    every converted layer that recorded something; clears the records."""
    out: dict[str, dict[str, float]] = {}
    for name, m in _q_modules(model):
        recs = m._lp_stats
        if not recs:
            continue
        keys: dict[str, list[float]] = {}
        for r in recs:
            for k, v in r.items():
                keys.setdefault(k, []).append(v)
        out[name] = {k: sum(v) / len(v) for k, v in keys.items()}
        out[name]["records"] = float(len(recs))
        m._lp_stats = []
    return out
