"""Block-scaled FP4: the E2M1 element grid, NVFP4 and MXFP4 block scales, block-scaled LUQ.

**E2M1** (1 sign, 2 exponent, 1 mantissa bit): magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}. The spacing
is ``step = 0.5`` below 2, 1 on [2, 4), 2 on [4, 6]; with ``r = y/step`` (exact: step is a power of
two) round-to-nearest-even is ``round_half_even(r)·step`` (1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4,
5 -> 4) and stochastic rounding is ``(floor(r) + [u < r - floor(r)])·step``: up with probability
``(y - lo)/(hi - lo)``, unbiased for ``y <= 6``. Magnitudes above 6 saturate to 6 (both roundings).

**Block layout** (:func:`block_view`): ``x`` is viewed as ``[outer, length, inner]`` around ``dim``;
a block is ``size`` consecutive elements along ``length`` (times ``rows`` consecutive ``outer``
indices for 2-D tiles); tails are zero-padded (zeros change no block max). Uniforms (``noise=``)
have ``x``'s shape: element ``i`` of the flattened ``x`` uses ``noise.view(-1)[i]``.

**NVFP4** (blocks of 16, or 16x16 tiles of a 2-D tensor): with ``A = max|x|`` (whole tensor)
``s_enc = 2688/A`` (448·6; capped at the largest fp32), ``s_dec = 1/s_enc``; per block
``t = min(amax_b/6·s_enc, 448)``, ``s_b = E4M3(t)``, ``y = |x|/(s_b·s_dec)`` clamped to 6,
output ``(E2M1(y)·s_b)·s_dec`` (``E2M1(y)·s_b`` is exact; one fp32 rounding for ``s_dec``, as a
GEMM that applies the tensor scale to its fp32 accumulator). ``rtn``: ``s_b`` rounded to the
nearest E4M3 (the published rule; ``s_b < t`` pushes the block max above 6, where it clips: biased,
see :func:`scale_clip_stats`); a block whose ``t`` rounds to 0 becomes zeros. ``sr``: ``s_b`` is
``t`` rounded *up* to the next E4M3 value, so ``y <= 6`` (up to one fp32 ulp, clamped) and the
stochastic rounding is unbiased; this is our choice, not the hardware's.

**MXFP4** (OCP MX v1.0, blocks of 32, E8M0 scale ``X = 2^e``): ``rtn`` uses the spec's
``e = floor(log2 amax_b) - 2``, so ``amax_b/X`` is in [4, 8) and values in (6, 8)·X clip to 6
(biased); ``sr`` uses ``e = ceil(log2(amax_b/6))`` (``floor(log2 amax_b) - 2``, plus one when
``amax_b/2^e > 6``), so nothing clips. ``e`` is clamped to [-126, 127]: E8M0's 2^-127 is not an
fp32 normal (only blocks with ``amax_b < 2^-124`` see the difference).

**E4M3** (:func:`e4m3_round`): 4 exponent bits (bias 7), 3 mantissa bits, no infinities, largest
448, subnormals ``k·2^-9``. For ``0 <= t <= 448``: ``e = max(floor(log2 t), -6)``, ``step = 2^(e-3)``,
``round(t/step)·step``. Emulated with exact float ops (bit-equal to ``torch.float8_e4m3fn`` casts on
all of [0, 448], a test checks) so a Triton kernel can do the same ops.

**Block-scaled LUQ** (ours): :func:`lowprec.luq.luq` with ``m = max|x|`` per block instead of per
tensor: ``α_b = m_b·2^-(L-1)``, stochastic underflow below α_b, stochastic rounding between powers
of two; unbiased in every block; variance :func:`block_luq_variance` (LUQ's per-element formula with
the block's α). Blocks of zeros stay zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import check_float, check_nonfinite_mode, floor_log2, nonfinite_guard, pow2, uniforms
from .luq import luq_levels

E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
FP32_MAX = torch.finfo(torch.float32).max
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
ROUNDINGS = ("rtn", "sr")
E8M0_EMIN, E8M0_EMAX = -126, 127


def check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r}: expected one of {ROUNDINGS}")


def check_block(block: int, allowed=(16, 32)) -> None:
    if isinstance(block, bool) or block not in allowed:
        raise ValueError(f"block={block!r}: expected one of {allowed}")


# ----------------------------------------------------------------------------- element formats


def _round_half_even(r: Tensor) -> Tensor:
    f = torch.floor(r)
    d = r - f
    odd = torch.remainder(f, 2.0) == 1.0
    return f + ((d > 0.5) | ((d == 0.5) & odd)).float()


def e2m1_step(y: Tensor) -> tuple[Tensor, Tensor]:
    """(step, 1/step) of the E2M1 grid around magnitudes ``y`` in [0, 6] (both powers of two)."""
    step = torch.where(y < 2.0, 0.5, torch.where(y < 4.0, 1.0, 2.0))
    inv = torch.where(y < 2.0, 2.0, torch.where(y < 4.0, 1.0, 0.5))
    return step, inv


def e2m1_round(y: Tensor, u: Tensor | None = None) -> Tensor:
    """E2M1 magnitude of fp32 magnitudes ``y >= 0`` (saturating at 6): round-to-nearest-even when
    ``u`` is None, else stochastic rounding with uniforms ``u`` (same shape)."""
    y = torch.clamp(y, max=E2M1_MAX)
    step, inv = e2m1_step(y)
    r = y * inv
    if u is None:
        q = _round_half_even(r)
    else:
        f = torch.floor(r)
        q = f + (u < r - f).float()
    return q * step


def e4m3_round(t: Tensor, up: bool = False) -> Tensor:
    """E4M3 value of fp32 ``t`` in [0, 448]: nearest (ties to even) or, with ``up``, the smallest
    E4M3 value ``>= t``."""
    e = torch.clamp(floor_log2(torch.where(t > 0, t, 1.0)), min=-6)
    r = t * pow2(3 - e)
    q = torch.ceil(r) if up else _round_half_even(r)
    return q * pow2(e - 3)


# ----------------------------------------------------------------------------- block layout


def block_dims(x: Tensor, dim: int) -> tuple[int, int, int]:
    """``x`` seen as ``[outer, length, inner]`` with blocks along ``length`` (= ``x.shape[dim]``)."""
    if x.dim() == 0:
        raise ValueError("block formats: a 0-d tensor has no dimension to form blocks along")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} out of range for a {x.dim()}-d tensor")
    d = dim % x.dim()
    return math.prod(x.shape[:d]), x.shape[d], math.prod(x.shape[d + 1:])


def block_view(x: Tensor, dim: int, size: int, rows: int = 1):
    """``(blocks [n_blocks, rows*size] fp32, unview)``; ``unview(b)`` maps a tensor of the blocks'
    shape back to ``x``'s shape (padding dropped). See the module docstring for the layout."""
    outer, length, inner = block_dims(x, dim)
    po, pl = -outer % rows, -length % size
    x3 = x.detach().float().reshape(outer, length, inner)
    if po or pl:
        x3 = F.pad(x3, (0, 0, 0, pl, 0, po))
    O, Lp = outer + po, length + pl
    nob, nb = O // rows, Lp // size
    blocks = x3.reshape(nob, rows, nb, size, inner).permute(0, 2, 4, 1, 3).reshape(-1, rows * size)

    def unview(b: Tensor) -> Tensor:
        y = b.reshape(nob, nb, inner, rows, size).permute(0, 3, 1, 4, 2).reshape(O, Lp, inner)
        return y[:outer, :length].reshape(x.shape)

    return blocks, unview


def _prepare(x: Tensor, who: str, nonfinite: str):
    """(skip: bool) after the dtype and non-finite checks."""
    check_float(x, who)
    check_nonfinite_mode(nonfinite)
    if x.numel() == 0:
        return True
    return nonfinite_guard(x, x.detach().abs().amax().float(), nonfinite, who)


def _noise_blocks(x, dim, size, rows, generator, noise, who):
    u = uniforms(x.shape, x.device, generator, noise, who)
    return block_view(u, dim, size, rows)[0]


# ----------------------------------------------------------------------------- NVFP4 and MXFP4


def _nv_view(t: Tensor, dim: int, block_2d: bool):
    if block_2d:  # 16x16 tiles of the 2-D view [shape[0], -1]; the same tiles serve t and tᵀ
        blocks, unview2 = block_view(t.reshape(t.shape[0], -1), -1, NVFP4_BLOCK, NVFP4_BLOCK)
        return blocks, (lambda b: unview2(b).reshape(t.shape))
    return block_view(t, dim, NVFP4_BLOCK)


def nvfp4_scales(x: Tensor, *, dim: int = -1, rounding: str = "rtn", block_2d: bool = False):
    """``(blocks, y, s_b, s_dec, unview)``: the blocks of ``x`` ``[n, B]`` (fp32), the scaled
    magnitudes ``|x|/(s_b·s_dec)`` (not yet clamped), the E4M3 block scales ``[n, 1]`` and the fp32
    tensor decode scale (0-d). ``block_2d``: 16x16 tiles of ``x`` viewed as ``[shape[0], -1]``
    (``dim`` is then irrelevant)."""
    check_rounding(rounding)
    blocks, unview = _nv_view(x, dim, block_2d)
    a = blocks.abs()
    amax_t = a.amax()
    s_enc = torch.clamp(torch.tensor(6.0 * E4M3_MAX, device=x.device) / amax_t, max=FP32_MAX)
    s_dec = torch.ones_like(s_enc) / s_enc
    amax_b = a.amax(1, keepdim=True)
    t = torch.clamp(amax_b / 6.0 * s_enc, max=E4M3_MAX)
    s_b = e4m3_round(t, up=(rounding == "sr"))
    d_b = s_b * s_dec
    y = torch.where(s_b > 0, a / torch.where(s_b > 0, d_b, 1.0), 0.0)
    return blocks, y, s_b, s_dec, unview


def nvfp4(x: Tensor, *, dim: int = -1, rounding: str = "rtn", block_2d: bool = False,
          generator: torch.Generator | None = None, noise: Tensor | None = None, nonfinite: str = "raise") -> Tensor:
    """NVFP4 quantize-dequantize of ``x`` (same shape and dtype); see the module docstring."""
    check_rounding(rounding)
    if _prepare(x, "nvfp4", nonfinite):
        return x.clone() if x.numel() == 0 else torch.zeros_like(x)
    blocks, y, s_b, s_dec, unview = nvfp4_scales(x, dim=dim, rounding=rounding, block_2d=block_2d)
    u = None
    if rounding == "sr":
        u = _nv_view(uniforms(x.shape, x.device, generator, noise, "nvfp4"), dim, block_2d)[0]
    q = e2m1_round(y, u)
    mag = torch.where(s_b > 0, (q * s_b) * s_dec, 0.0)
    return unview(torch.copysign(mag, blocks)).to(x.dtype)


def mxfp4_exponents(amax_b: Tensor, rounding: str) -> Tensor:
    """E8M0 exponents (int32) of blocks with max ``amax_b`` (see the module docstring)."""
    e = torch.clamp(floor_log2(torch.where(amax_b > 0, amax_b, 1.0)) - 2, min=E8M0_EMIN)
    if rounding == "sr":
        e = e + (amax_b * pow2(-e) > E2M1_MAX).to(torch.int32)
    return torch.clamp(e, max=E8M0_EMAX)


def mxfp4(x: Tensor, *, dim: int = -1, rounding: str = "rtn", generator: torch.Generator | None = None,
          noise: Tensor | None = None, nonfinite: str = "raise") -> Tensor:
    """MXFP4 quantize-dequantize of ``x`` (same shape and dtype); see the module docstring."""
    check_rounding(rounding)
    if _prepare(x, "mxfp4", nonfinite):
        return x.clone() if x.numel() == 0 else torch.zeros_like(x)
    blocks, unview = block_view(x, dim, MXFP4_BLOCK)
    a = blocks.abs()
    amax_b = a.amax(1, keepdim=True)
    e = mxfp4_exponents(amax_b, rounding)
    u = _noise_blocks(x, dim, MXFP4_BLOCK, 1, generator, noise, "mxfp4") if rounding == "sr" else None
    q = e2m1_round(a * pow2(-e), u)
    mag = torch.where(amax_b > 0, q * pow2(e), 0.0)
    return unview(torch.copysign(mag, blocks)).to(x.dtype)


def fp4_scaled(x: Tensor, fmt: str, *, dim: int = -1, rounding: str = "rtn", block_2d: bool = False):
    """``(y [n, B] scaled magnitudes before clamping, dequant scale [n, 1] fp64)`` for ``fmt`` in
    ``nvfp4``/``mxfp4``: output element = E2M1(min(y, 6)) · scale (up to the last fp32 rounding)."""
    if fmt == "nvfp4":
        _, y, s_b, s_dec, _ = nvfp4_scales(x, dim=dim, rounding=rounding, block_2d=block_2d)
        return y, s_b.double() * s_dec.double()
    if fmt == "mxfp4":
        blocks, _ = block_view(x, dim, MXFP4_BLOCK)
        a = blocks.abs()
        amax_b = a.amax(1, keepdim=True)
        e = mxfp4_exponents(amax_b, rounding)
        return torch.where(amax_b > 0, a * pow2(-e), 0.0), torch.where(amax_b > 0, pow2(e), 0.0).double()
    raise ValueError(f"fmt={fmt!r}: expected 'nvfp4' or 'mxfp4'")


def fp4_sr_variance(x: Tensor, fmt: str, *, dim: int = -1, block_2d: bool = False) -> Tensor:
    """Closed-form total variance ``Σ Var`` of the ``sr`` variant (fp64 0-d):
    ``(y - lo)(hi - y)·scale²`` per element."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=x.device)
    y, scale = fp4_scaled(x, fmt, dim=dim, rounding="sr", block_2d=block_2d)
    y = torch.clamp(y, max=E2M1_MAX).double()
    step, inv = e2m1_step(y.float())
    lo = torch.floor(y * inv.double()) * step.double()
    return ((y - lo) * (lo + step.double() - y) * scale.square()).sum()


def scale_clip_stats(x: Tensor, fmt: str, *, dim: int = -1, block_2d: bool = False) -> dict[str, float]:
    """How the published (``rtn``) scale rule clips ``x``: the fraction of elements with scaled
    magnitude above 6, and the relative bias ``‖E[Q(x)] - x‖/‖x‖`` that clipping alone adds
    (clipped part ``(y - 6)·scale``, the rounding being deterministic)."""
    y, scale = fp4_scaled(x, fmt, dim=dim, rounding="rtn", block_2d=block_2d)
    over = y > E2M1_MAX
    clip = (torch.clamp(y.double() - E2M1_MAX, min=0) * scale).square().sum().sqrt()
    return {"clip_frac": float(over.double().mean()),
            "clip_rel_bias": float(clip / x.double().norm().clamp_min(1e-300))}


# ----------------------------------------------------------------------------- block-scaled LUQ


def block_luq(x: Tensor, bits: int = 4, *, block: int = 16, dim: int = -1, levels: int | None = None,
              generator: torch.Generator | None = None, noise: Tensor | None = None,
              nonfinite: str = "raise") -> Tensor:
    """LUQ with one max per ``block`` consecutive elements along ``dim`` (see the module docstring)."""
    check_block(block)
    L = luq_levels(bits, levels)
    if _prepare(x, "block_luq", nonfinite):
        return x.clone() if x.numel() == 0 else torch.zeros_like(x)
    blocks, unview = block_view(x, dim, block)
    u = _noise_blocks(x, dim, block, 1, generator, noise, "block_luq")
    a = blocks.abs()
    m = a.amax(1, keepdim=True)
    alpha = torch.ldexp(m, torch.tensor(-(L - 1), device=x.device))
    ok = m > 0
    alpha_s = torch.where(ok, alpha, 1.0)
    # lowprec.luq.luq, element by element, with the block's m and α
    y = a / alpha_s
    under = torch.where(u < y, alpha_s, 0.0)
    e = floor_log2(torch.clamp(y, min=1.0))
    lo = torch.ldexp(alpha_s.expand_as(a), e)
    level = torch.where(u < (a - lo) / lo, lo + lo, lo)
    mag = torch.where(ok, torch.where(y < 1.0, under, level), 0.0)
    return unview(torch.copysign(mag, blocks)).to(x.dtype)


def block_luq_variance(x: Tensor, bits: int = 4, *, block: int = 16, dim: int = -1,
                       levels: int | None = None) -> Tensor:
    """Closed-form total variance of :func:`block_luq` (fp64 0-d)."""
    L = luq_levels(bits, levels)
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=x.device)
    blocks, _ = block_view(x, dim, block)
    a = blocks.double().abs()
    m = a.amax(1, keepdim=True)
    alpha = torch.where(m > 0, m * 2.0 ** -(L - 1), 1.0)
    y = a / alpha
    e = floor_log2(torch.clamp(y, min=1.0).float())
    lo = alpha * torch.ldexp(torch.ones_like(a), e)
    inside = (a - lo) * (2 * lo - a)
    below = a * (alpha - a)
    return torch.where(y < 1.0, below, inside).sum()
