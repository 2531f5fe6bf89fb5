"""Forward INT quantization of weights and activations (round-to-nearest, SAWB clip).

Deterministic round-to-nearest (the LUQ paper shows it beats stochastic rounding on the forward
side), per tensor or per output channel; in training the layers use a straight-through estimator.

Clip value ``c``: for 4 bits SAWB's ``c = k1·sqrt(E[x²]) - k2·E|x|`` with ``k1 = 12.1, k2 = 12.2``
(the coefficients of a public reimplementation). The formula can go non-positive for tensors whose
magnitudes are nearly constant (``E|x| ≈ sqrt(E[x²])``); there, and whenever it exceeds ``max|x|``,
``max|x|`` is used. Other bit-widths have no published coefficients: their clip is the one that
minimises the quantization MSE of the tensor, searched over ``max|x|·t`` (computed, not hard-coded).

Grid: signed symmetric ``[-(2^(b-1)-1), 2^(b-1)-1]·c/(2^(b-1)-1)``; unsigned ``[0, 2^b-1]·c/(2^b-1)``
when the tensor is non-negative (after a ReLU). Rounding is ``floor(x/s + 0.5)`` (a kernel can
reproduce it exactly): exact ties, which bf16/fp16 inputs do produce, round up (toward +inf:
``2.5·s -> 3·s``, ``-2.5·s -> -2·s``), and so does the largest float below one half.

Range: computed in fp32 (fp64 for fp64 inputs). A given ``clip`` must be finite and > 0. The step
``s = c/qmax`` of a clip so small that it underflows becomes the smallest positive float (never 0);
outputs beyond the dtype's largest finite value (a ``clip`` above it) are clamped to it.
"""

from __future__ import annotations

import torch
from torch import Tensor

import math

from ._common import check_float, clamp_finite, work_dtype

SAWB_COEFFS = {4: (12.1, 12.2)}
CLIP_METHODS = ("sawb", "mse", "max")


def int_qmax(bits: int, signed: bool) -> int:
    """Largest grid index: ``2^(b-1)-1`` signed, ``2^b-1`` unsigned."""
    return 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1


def check_bits(bits) -> None:
    """ValueError unless ``bits`` is an integer bit-width in [2, 16]."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits={bits!r}: INT quantization needs an integer bit-width in [2, 16]")


def _rows(x: Tensor, per_channel: bool) -> Tensor:
    xw = x.detach().to(work_dtype(x.dtype))
    return xw.reshape(x.shape[0], -1) if per_channel else xw.reshape(1, -1)


def int_step(c: Tensor, qmax: int) -> Tensor:
    """Grid step ``c/qmax`` per row (1 where ``c = 0``; the smallest positive float where it underflows)."""
    s = c / qmax
    smallest = torch.finfo(c.dtype).smallest_normal * torch.finfo(c.dtype).eps  # the smallest subnormal
    return torch.where(c > 0, torch.clamp(s, min=smallest), torch.ones_like(c))


def check_clip(clip, rows: int, device, dtype) -> Tensor:
    """``clip`` as a ``[rows or 1, 1]`` tensor in ``dtype``; ValueError unless every value is finite and > 0."""
    if isinstance(clip, bool) or not isinstance(clip, (int, float, Tensor)):
        raise ValueError(f"int_quant: clip={clip!r}: expected a number or a tensor of numbers")
    if not isinstance(clip, Tensor) and not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"int_quant: clip={clip!r}: expected a finite number > 0")
    c = torch.as_tensor(clip, device=device).to(dtype).reshape(-1, 1)
    if c.shape[0] not in (1, rows):
        raise ValueError(f"int_quant: {c.shape[0]} clip values for {rows} row(s)")
    if isinstance(clip, Tensor) and not bool((torch.isfinite(c) & (c > 0)).all()):
        bad = c[~(torch.isfinite(c) & (c > 0))].reshape(-1)[0].item()
        raise ValueError(f"int_quant: clip contains {bad!r}: every clip value must be finite and > 0")
    return c


def _round_clamp(y: Tensor, qmax: int, signed: bool) -> Tensor:
    return torch.clamp(torch.floor(y + 0.5), -qmax if signed else 0, qmax)


def sawb_clip(x: Tensor, bits: int = 4, *, per_channel: bool = False, signed: bool = True) -> Tensor:
    """Clip value(s): SAWB where coefficients exist, else the MSE-optimal clip. Shape [rows, 1]."""
    check_bits(bits)
    r = _rows(x, per_channel)
    amax = r.abs().amax(1, keepdim=True)
    if bits not in SAWB_COEFFS:
        return mse_clip(x, bits, per_channel=per_channel, signed=signed)
    k1, k2 = SAWB_COEFFS[bits]
    c = k1 * r.square().mean(1, keepdim=True).sqrt() - k2 * r.abs().mean(1, keepdim=True)
    return torch.where((c > 0) & (c < amax), c, amax)


def mse_clip(x: Tensor, bits: int, *, per_channel: bool = False, signed: bool = True, grid: int = 64,
             max_samples: int = 1 << 16) -> Tensor:
    """Clip minimising ``‖Q_c(x) - x‖²`` over ``c = max|x|·t``, t on a grid in (0, 1]. Shape [rows, 1].

    Rows longer than ``max_samples`` are searched on a fixed strided subsample (cost bound for
    large activations; the optimum of a smooth objective barely moves).
    """
    r = _rows(x, per_channel)
    if r.shape[1] > max_samples:
        r = r[:, :: -(-r.shape[1] // max_samples)]
    amax = r.abs().amax(1, keepdim=True)
    qmax = int_qmax(bits, signed)
    best_c, best_err = amax.clone(), torch.full_like(amax, float("inf"))
    for t in torch.linspace(1.0 / grid, 1.0, grid).tolist():
        c = amax * t
        s = int_step(c, qmax)
        err = (_round_clamp(r / s, qmax, signed) * s - r).square().sum(1, keepdim=True)
        better = err < best_err
        best_c, best_err = torch.where(better, c, best_c), torch.where(better, err, best_err)
    return best_c


def check_int_quant_args(x: Tensor, bits: int, per_channel: bool, clip_method: str) -> None:
    check_float(x, "int_quant")
    check_bits(bits)
    if clip_method not in CLIP_METHODS:
        raise ValueError(f"clip_method={clip_method!r}: expected one of {CLIP_METHODS}")
    if per_channel and x.dim() < 1:
        raise ValueError("int_quant: per_channel needs at least one dimension")


def int_quant(
    x: Tensor,
    bits: int = 4,
    *,
    signed: bool | None = None,
    per_channel: bool = False,
    clip: float | Tensor | None = None,
    clip_method: str = "sawb",
) -> Tensor:
    """Round-to-nearest INT quantization of ``x`` onto a (per-tensor or per-row) uniform grid.

    ``signed=None``: unsigned when ``x`` is non-negative, else signed. ``clip`` overrides the clip
    value (scalar, or one per row when ``per_channel``); ``clip_method`` in ``sawb``/``mse``/``max``.
    """
    check_int_quant_args(x, bits, per_channel, clip_method)
    if x.numel() == 0:
        return x.clone()
    r = _rows(x, per_channel)
    if not bool(torch.isfinite(r).all()):
        raise ValueError("int_quant: input has NaN/Inf elements")
    if signed is None:
        signed = not bool(r.min() >= 0)
    qmax = int_qmax(bits, signed)
    if clip is not None:
        c = check_clip(clip, r.shape[0], x.device, r.dtype)
    elif clip_method == "max":
        c = r.abs().amax(1, keepdim=True)
    elif clip_method == "mse":
        c = mse_clip(x, bits, per_channel=per_channel, signed=signed)
    else:
        c = sawb_clip(x, bits, per_channel=per_channel, signed=signed)
    s = int_step(c, qmax)
    q = clamp_finite(_round_clamp(r / s, qmax, signed) * s, x.dtype)
    return q.reshape(x.shape).to(x.dtype)

