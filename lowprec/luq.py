"""LUQ: logarithmic unbiased quantization of neural gradients (Chmiel et al., ICLR 2023).

Radix-2 FP4 ``[sign, exponent, mantissa] = [1, 3, 0]``: every output is 0 or ``±α·2^k``.
Per tensor, with ``m = max|x|`` and ``L`` non-zero magnitudes ``α, 2α, …, 2^(L-1)α = m``:

- stochastic underflow: ``|x| < α`` becomes ``sign(x)·α`` with probability ``|x|/α``, else 0;
- stochastic rounding in the linear domain between the two powers of two around ``|x|``:
  for ``l = 2^e·α ≤ |x| < u = 2l``, round up with probability ``(|x| - l)/l``.

Both are unbiased: ``E[Q(x)] = x`` element by element. Per-element variance is
``(|x| - l)(u - |x|)`` inside a bin and ``|x|(α - |x|)`` below α.

Levels: for ``bits=b`` we use ``L = 2^(b-1) - 1`` (b=4: 7 magnitudes, 15 values with zero and sign,
which fit a 4-bit code). ``levels=`` overrides it (8 is the other reading of the paper's formula).

Range (all in the working precision, :func:`lowprec._common.work_dtype`): ``L <= 127``
(:data:`MAX_LEVELS`, i.e. ``bits <= 8``), so ``2^-(L-1)`` is a normal fp32 and every tensor with
``m >= 1`` gets its full grid; ``bits = 9`` (255 levels spanning 2^254, wider than fp32's whole
exponent range) is refused at configuration time. For small maxima the grid is cut from below
rather than let ``α`` leave the normal range of the output dtype: ``α = m·2^-j`` with
``j = min(L-1, max(0, floor(log2 m) - e_tiny))`` (``e_tiny`` = -126 fp32/bf16, -14 fp16, -1022
fp64), so ``α`` and every level are exact normals (or ``α = m`` itself when ``m`` is subnormal).
Fewer levels is still LUQ and still unbiased; flushing to a zero ``α`` (what ``2^-(L-1)``
underflowing did) was not. A ``max_abs`` above the dtype's largest finite value is clamped to it
(the top level would round to ``inf``); every element of the tensor is below it, so this stays
unbiased.

One uniform ``u`` per element decides both the underflow and the rounding, so a Triton kernel that
draws the same ``u`` reproduces this reference bit for bit. The exponent comes from the float's own
exponent field (``frexp``), never from ``log2``, which may differ in the last ulp between backends.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import (check_float, check_nonfinite_mode, check_scalar, floor_log2, nonfinite_guard, tiny_exponent,
                      uniforms, work_dtype)

MAX_LEVELS = 127


def luq_levels(bits: int = 4, levels: int | None = None) -> int:
    """Number of non-zero magnitudes for ``bits`` (validated, at most :data:`MAX_LEVELS`)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 2:
        raise ValueError(f"bits={bits!r}: LUQ needs an integer bit-width >= 2 (sign + exponent)")
    if levels is None:
        if bits > 8:
            raise ValueError(f"bits={bits}: LUQ's {2 ** (bits - 1) - 1} levels would span 2^{2 ** (bits - 1) - 2}, "
                             f"wider than fp32's exponent range; at most bits=8 ({MAX_LEVELS} levels)")
        return 2 ** (bits - 1) - 1
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels={levels!r}: expected a positive integer")
    if levels > 2 ** bits:
        raise ValueError(f"levels={levels} do not fit in {bits} bits (at most {2 ** bits})")
    if levels > MAX_LEVELS:
        raise ValueError(f"levels={levels}: α = max·2^-{levels - 1} leaves fp32's normal range for every max "
                         f"below 2^{levels - MAX_LEVELS}; at most {MAX_LEVELS} levels")
    return levels


def luq_alpha(m: Tensor, L: int, dtype: torch.dtype) -> Tensor:
    """``α = m·2^-j``, ``j = min(L-1, max(0, floor(log2 m) - e_tiny(dtype)))``: the smallest level,
    kept a normal of ``dtype`` (see module docstring). ``m``: a 0-d tensor in the working precision."""
    j = torch.clamp(floor_log2(m) - tiny_exponent(dtype), 0, L - 1)
    return torch.ldexp(m, -j) if m.dtype != torch.float64 else m * torch.pow(2.0, -j.double())


def _top(x: Tensor, m: Tensor) -> Tensor:
    """``m`` clamped to ``x.dtype``'s largest finite value (a hindsight max can exceed it)."""
    return torch.clamp(m, max=torch.finfo(x.dtype).max)


def luq_scale(x: Tensor, bits: int = 4, *, levels: int | None = None, max_abs=None) -> tuple[Tensor, Tensor]:
    """``(m, α)``: the top level and the underflow threshold LUQ uses for ``x`` (0-d, working precision)."""
    L = luq_levels(bits, levels)
    wt = work_dtype(x.dtype)
    if max_abs is None:
        m = x.detach().abs().amax().to(wt) if x.numel() else torch.zeros((), dtype=wt, device=x.device)
    else:
        m = torch.as_tensor(max_abs, device=x.device).to(wt).reshape(())
    m = _top(x, m)
    return m, luq_alpha(m, L, x.dtype)


def check_luq_args(x: Tensor, bits: int, levels: int | None, max_abs, nonfinite: str) -> int:
    """The argument checks every LUQ implementation makes; returns the number of levels."""
    check_float(x, "luq")
    check_nonfinite_mode(nonfinite)
    L = luq_levels(bits, levels)
    if max_abs is not None:
        check_scalar(max_abs, "max_abs", "luq", positive=False)
    return L


def luq(
    x: Tensor,
    bits: int = 4,
    *,
    levels: int | None = None,
    max_abs: float | Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    nonfinite: str = "raise",
) -> Tensor:
    """LUQ-quantize ``x`` (any shape, float dtype); same shape and dtype out.

    ``max_abs`` (a finite number >= 0) replaces ``max|x|`` (the in-hindsight estimate); elements
    above it are clamped to it, which is biased for those elements: that is the price of the
    one-pass variant. ``noise``: fp32 uniforms in [0, 1) of x's shape, used instead of drawing from
    ``generator``. ``nonfinite``: 'raise' (ValueError) or 'skip' (return zeros: this gradient
    contributes nothing).
    """
    L = check_luq_args(x, bits, levels, max_abs, nonfinite)
    if x.numel() == 0:
        return x.clone()
    wt = work_dtype(x.dtype)
    xw = x.detach().to(wt)
    a = xw.abs()
    amax = a.amax()
    if nonfinite_guard(x, amax, nonfinite, "luq"):
        return torch.zeros_like(x)
    m, alpha = luq_scale(x, bits, levels=L, max_abs=amax if max_abs is None else max_abs)
    if not bool(m > 0):
        return torch.zeros_like(x)
    u = uniforms(x.shape, x.device, generator, noise, "luq")
    a = torch.minimum(a, m)
    y = a / alpha
    # Below α: keep α with probability |x|/α.
    under = torch.where(u < y, alpha, torch.zeros_like(a))
    # Inside [l, 2l): round up with probability (|x| - l)/l.
    e = floor_log2(torch.clamp(y, min=1.0))
    lo = alpha * torch.pow(2.0, e.to(wt)) if wt == torch.float64 else torch.ldexp(alpha.expand_as(a), e)
    level = torch.where(u < (a - lo) / lo, lo + lo, lo)
    mag = torch.where(y < 1.0, under, level)
    return torch.copysign(mag, xw).to(x.dtype)


def luq_variance(x: Tensor, bits: int = 4, *, levels: int | None = None) -> Tensor:
    """Closed-form total variance ``Σ Var[Q(x_i)]`` of :func:`luq` (fp64 0-d)."""
    a = x.detach().double().abs()
    m, alpha = luq_scale(x, bits, levels=levels)
    if x.numel() == 0 or not bool(m > 0):
        return torch.zeros((), dtype=torch.float64, device=x.device)
    alpha = alpha.double()
    y = a / alpha
    e = floor_log2(torch.clamp(y, min=1.0))
    lo = alpha * torch.pow(2.0, e.double())
    inside = (a - lo) * (2 * lo - a)
    below = a * (alpha - a)
    return torch.where(y < 1.0, below, inside).sum()
