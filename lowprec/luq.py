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

One uniform ``u`` per element decides both the underflow and the rounding, so a Triton kernel that
draws the same ``u`` reproduces this reference bit for bit. The exponent comes from the float's own
exponent field (``frexp``), never from ``log2``, which may differ in the last ulp between backends.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import check_float, check_nonfinite_mode, floor_log2, nonfinite_guard, uniforms


def luq_levels(bits: int = 4, levels: int | None = None) -> int:
    """Number of non-zero magnitudes for ``bits`` (validated)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 2:
        raise ValueError(f"bits={bits!r}: LUQ needs an integer bit-width >= 2 (sign + exponent)")
    if levels is None:
        return 2 ** (bits - 1) - 1
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels={levels!r}: expected a positive integer")
    if levels > 2 ** bits:
        raise ValueError(f"levels={levels} do not fit in {bits} bits (at most {2 ** bits})")
    return levels


def luq_scale(x: Tensor, bits: int = 4, *, levels: int | None = None, max_abs=None) -> tuple[Tensor, Tensor]:
    """``(m, α)``: the top level and the underflow threshold LUQ uses for ``x`` (fp32 0-d tensors)."""
    L = luq_levels(bits, levels)
    if max_abs is None:
        m = x.detach().abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
    else:
        m = torch.as_tensor(max_abs, dtype=torch.float32, device=x.device).reshape(())
    return m, torch.ldexp(m, torch.tensor(-(L - 1), device=x.device))


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

    ``max_abs`` replaces ``max|x|`` (the in-hindsight estimate); elements above it are clamped to
    it, which is biased for those elements: that is the price of the one-pass variant.
    ``noise``: fp32 uniforms in [0, 1) of x's shape, used instead of drawing from ``generator``.
    ``nonfinite``: 'raise' (ValueError) or 'skip' (return zeros: this gradient contributes nothing).
    """
    check_float(x, "luq")
    check_nonfinite_mode(nonfinite)
    L = luq_levels(bits, levels)
    if x.numel() == 0:
        return x.clone()
    a = x.detach().float().abs()
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
    lo = torch.ldexp(alpha.expand_as(a), e)
    level = torch.where(u < (a - lo) / lo, lo + lo, lo)
    mag = torch.where(y < 1.0, under, level)
    return torch.copysign(mag, x.detach().float()).to(x.dtype)


def luq_variance(x: Tensor, bits: int = 4, *, levels: int | None = None) -> Tensor:
    """Closed-form total variance ``Σ Var[Q(x_i)]`` of :func:`luq` (fp64 0-d)."""
    a = x.detach().double().abs()
    m, alpha = luq_scale(x, bits, levels=levels)
    if x.numel() == 0 or not bool(m > 0):
        return torch.zeros((), dtype=torch.float64, device=x.device)
    alpha = alpha.double()
    y = a / alpha
    e = floor_log2(torch.clamp(y, min=1.0).float())
    lo = torch.ldexp(alpha.expand_as(a), e)
    inside = (a - lo) * (2 * lo - a)
    below = a * (alpha - a)
    return torch.where(y < 1.0, below, inside).sum()

