"""The forward side of a converted layer (lowprec.qgemm): the operands of the forward GEMM z = W a (pure functions).

W and a are quantized by `fwd.weight` / `fwd.act` (round-to-nearest; straight-through: the
gradients w.r.t. the unquantized W and a are those w.r.t. the quantized ones). Estimators with
`elementwise == False` (block formats) see 2-D views whose `dim` is chosen by the recipe: W as
[C_out, K] (K = C_in·kh·kw; forward reduction dim -1, backward dim 0), a as [tokens, C_in]
(linear: a.reshape(-1, in); conv (1-d, 2-d): channels last, so blocks along C approximate im2col
blocks).

Weight N:M mask (lowprec.weight_nm): the GEMMs use `W ⊙ mask`, quantized after masking and masked
again, since a quantizer must not revive pruned weights.

dtype: under torch.autocast the (already quantized) operands are cast to the autocast dtype, and the
layer runs its GEMMs with autocast off (`no_autocast`), so every GEMM and estimator sees that dtype.

For the backward slots that re-quantize an operand (grad.weight_bwd: W, grad.act_upd: a), the
high-precision (masked) operand is kept too, in the GEMM dtype; without a forward quantizer it is
the forward operand itself (no copy).
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_dtype", "no_autocast", "quant_weight", "quant_act", "forward_weight", "prep_forward"]


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The active autocast dtype of x's device, or None (also for non-float x)."""
    if not torch._C._is_any_autocast_enabled():
        # one global flag first: x.device makes a new torch.device on every call, ~8x the flag's
        # cost, and this runs in every converted layer's forward
        return None
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def no_autocast(x: torch.Tensor, active: bool):
    """A context with autocast off on x's device when ``active``, else a null context."""
    return torch.autocast(device_type=x.device.type, enabled=False) if active else contextlib.nullcontext()


def quant_weight(est, w):
    """``est(W)``; a block estimator (``elementwise == False``) sees W as ``[C_out, K]``."""
    if getattr(est, "elementwise", True):
        return est(w)
    return est(w.reshape(w.shape[0], -1)).reshape(w.shape)


def quant_act(est, x, conv: bool):
    """``est(a)`` for the forward GEMM; a block estimator sees a as ``[tokens, C_in]`` (conv: channels last)."""
    if getattr(est, "elementwise", True):
        return est(x)
    if conv:  # [N, C, *spatial] -> channels last [tokens, C] and back
        cl = x.movedim(1, -1)
        return est(cl.reshape(-1, x.shape[1])).reshape(cl.shape).movedim(-1, 1)
    return est(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def forward_weight(fwd, weight, mask):
    """(masked high-precision W, the forward GEMM's W: masked, quantized by fwd.weight, masked again)."""
    w_hp = w = weight if mask is None else weight * mask
    if fwd.weight is not None:
        w = quant_weight(fwd.weight, w)
        if mask is not None:  # a quantizer must not revive pruned weights
            w = w * mask
    return w_hp, w


def prep_forward(fwd, g, x, weight, bias, mask, conv: bool):
    """Quantize/mask W and a for recipes ``fwd`` (forward) and ``g`` (grad), cast to the autocast
    dtype if one is active. Returns (a, w, b, cast, hp): hp = (high-precision W, a) for the backward
    slots that need them (None where the slot is empty)."""
    w_hp, w = forward_weight(fwd, weight, mask)
    a = x if fwd.act is None else quant_act(fwd.act, x, conv)
    cdt = autocast_dtype(x)
    b = bias
    if cdt is not None:
        a, w = a.to(cdt), w.to(cdt)
        b = None if b is None else b.to(cdt)
    # (no copy when the forward slot is empty: the saved operand is then the high-precision one)
    w_hp = None if getattr(g, "weight_bwd", None) is None else (w if fwd.weight is None else w_hp.detach().to(w.dtype))
    a_hp = None if getattr(g, "act_upd", None) is None else (a if fwd.act is None else x.detach().to(a.dtype))
    return a, w, b, cdt is not None, (w_hp, a_hp)
