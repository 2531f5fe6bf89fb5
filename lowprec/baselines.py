"""Baseline gradient quantizers that LUQ is compared against.

- ``radix4`` (Ultra-low, Sun et al. 2020): radix-4 FP4, levels ``α·4^k`` (k < L, ``α·4^(L-1) = m``),
  round-to-nearest in the log domain (the midpoint between ``4^k`` and ``4^(k+1)`` is their geometric
  mean ``2·4^k``); magnitudes below ``α/2`` flush to zero. Biased. Two-phase rounding is not
  implemented.
- ``fp4_rdn``: LUQ's radix-2 grid with deterministic round-to-nearest (midpoint ``1.5·2^e·α``) and
  flush-to-zero underflow. Biased; the paper shows it diverges.
- ``int4_sr``: uniform symmetric INT grid ``k·m/(2^(b-1)-1)`` with stochastic rounding. Unbiased,
  yet it fails: the uniform grid wastes its levels on the rare large gradients.

Exponents come from ``frexp`` (exact), as in :mod:`lowprec.luq`. Computed in fp32 (fp64 for fp64
inputs). Like LUQ, radix-4 cuts its grid from below rather than let ``α`` leave the dtype's normal
range (``α = m·4^-i``, ``i <= levels - 1``; at most 64 levels, so ``4^-(levels-1)`` is an fp32
normal); ``int_sr`` takes 2 to 16 bits (wider grids lose the fraction ``u`` is added to).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import (check_float, check_nonfinite_mode, floor_log2, nonfinite_guard, pow2, tiny_exponent,
                      uniforms, work_dtype)
from .intq import check_bits, int_step
from .luq import luq_levels, luq_scale

RADIX4_MAX_LEVELS = 64


def check_radix4_levels(levels) -> None:
    if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= RADIX4_MAX_LEVELS:
        raise ValueError(f"levels={levels!r}: radix-4 needs an integer in [1, {RADIX4_MAX_LEVELS}] "
                         "(4^-(levels-1) must stay an fp32 normal)")


def _prepare(x: Tensor, who: str, nonfinite: str):
    check_float(x, who)
    check_nonfinite_mode(nonfinite)
    a = x.detach().to(work_dtype(x.dtype)).abs()
    if x.numel() == 0:
        return a, None
    amax = a.amax()
    if nonfinite_guard(x, amax, nonfinite, who):
        return a, None
    return a, amax


def radix4(x: Tensor, *, levels: int = 7, nonfinite: str = "raise") -> Tensor:
    """Radix-4 FP4 with log-domain round-to-nearest (see module docstring)."""
    check_radix4_levels(levels)
    a, m = _prepare(x, "radix4", nonfinite)
    if m is None or not bool(m > 0):
        return torch.zeros_like(x)
    wt = a.dtype
    i = torch.clamp(torch.div(floor_log2(m) - tiny_exponent(x.dtype), 2, rounding_mode="floor"), 0, levels - 1)
    alpha = m * pow2(-2 * i, wt)
    y = a / alpha
    # log4(y) rounded: k = floor(log2(y)/2 + 1/2) = floor((e + 1)/2) with e = floor(log2 y), exactly.
    e = floor_log2(torch.clamp(y, min=torch.finfo(wt).tiny))
    k = torch.clamp(torch.div(e + 1, 2, rounding_mode="floor"), max=levels - 1)
    mag = torch.where(k >= 0, alpha * pow2(2 * k, wt), torch.zeros_like(a))
    mag = torch.where(a > 0, mag, torch.zeros_like(a))
    return torch.copysign(mag, x.detach().to(wt)).to(x.dtype)


def fp4_rdn(x: Tensor, bits: int = 4, *, levels: int | None = None, nonfinite: str = "raise") -> Tensor:
    """LUQ's grid, deterministic rounding to nearest, flush-to-zero below α."""
    luq_levels(bits, levels)
    a, amax = _prepare(x, "fp4_rdn", nonfinite)
    if amax is None or not bool(amax > 0):
        return torch.zeros_like(x)
    m, alpha = luq_scale(x, bits, levels=levels, max_abs=amax)
    y = a / alpha
    lo = alpha * pow2(floor_log2(torch.clamp(y, min=1.0)), a.dtype)
    mag = torch.where(a >= 1.5 * lo, 2 * lo, lo)
    mag = torch.where(y < 1.0, torch.zeros_like(a), torch.minimum(mag, m))
    return torch.copysign(mag, x.detach().to(a.dtype)).to(x.dtype)


def int_sr(
    x: Tensor,
    bits: int = 4,
    *,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    nonfinite: str = "raise",
) -> Tensor:
    """Uniform symmetric INT grid scaled to ``max|x|``, stochastic rounding (unbiased)."""
    check_bits(bits)
    a, m = _prepare(x, "int_sr", nonfinite)
    if m is None or not bool(m > 0):
        return torch.zeros_like(x)
    u = uniforms(x.shape, x.device, generator, noise, "int_sr")
    s = int_step(m, 2 ** (bits - 1) - 1)
    y = a / s
    q = torch.clamp(torch.floor(y + u), max=2 ** (bits - 1) - 1)
    return torch.copysign(q * s, x.detach().to(a.dtype)).to(x.dtype)


def int_sr_variance(x: Tensor, bits: int = 4) -> Tensor:
    a = x.detach().double().abs()
    if x.numel() == 0 or not bool(a.max() > 0):
        return torch.zeros((), dtype=torch.float64, device=x.device)
    s = int_step(x.detach().abs().amax().to(work_dtype(x.dtype)), 2 ** (bits - 1) - 1).double()
    f = a / s - torch.floor(a / s)
    return (f * (1 - f) * s * s).sum()

