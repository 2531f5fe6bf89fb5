"""Triton twins of :mod:`lowprec.fp4`: NVFP4, MXFP4 and block-scaled LUQ in one kernel.

The input is viewed, without a copy, as ``[outer, length, inner]`` around the block dimension
(2-D NVFP4 tiles: ``[shape[0], rest]``, ``inner = 1``, 16 rows per tile). One program handles
``BLOCK`` blocks ``g = (ob, b, i)`` (``i`` fastest, so for ``inner > 1`` the loads of one tile
column are coalesced) and loads each block as one row of a ``[BLOCK, ROWS*SIZE]`` tile; tails are
masked (zero), as the reference pads. Per block: the max (``tl.max`` over the row), the scale, the
E2M1 (or LUQ) rounding, the store, all in fp32 and op for op as the reference (``div_rn``, no FMA,
exact power-of-two scalings), so given the same uniforms (``tl.rand(seed, flat index)``, the
reference's ``noise`` of ``x``'s shape) the outputs are bit-identical. E4M3 rounding is done with
float/integer ops, not a cast (the interpreter's fp8 casts round ties up and flush subnormals).

NVFP4's tensor max comes from the LUQ kernel's ``amax`` pass (two reads in all; the hardware recipe
needs the same). Non-finite inputs set a flag (atomic max): 'raise' checks it on the host,
'skip' zeroes the output on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._common import check_float, check_nonfinite_mode, nonfinite_guard
from ..hadamard import block_rht
from ..fp4 import E8M0_EMAX, E8M0_EMIN, FP32_MAX, MXFP4_BLOCK, NVFP4_BLOCK, block_dims, check_block, check_rounding
from ..luq import luq_levels
from . import draw_seed
from .common import (LAUNCH_OPTS, block_for, cast_out, check_launchable, copysign, floor_log2, load_f32, luq_elem,
                     pow2)
from .luq import amax as tensor_amax

FORMATS = {"nvfp4": 0, "mxfp4": 1, "block_luq": 2}
GPU_TILE_ELEMS = 2048  # elements per program on a GPU; untuned (no GPU in the session that wrote this)
GPU_WARPS = 4


@triton.jit
def _round_half_even(r):
    f = tl.math.floor(r)
    d = r - f
    odd = (f.to(tl.int32) & 1) == 1
    return f + ((d > 0.5) | ((d == 0.5) & odd)).to(tl.float32)


@triton.jit
def e2m1(y, u, SR: tl.constexpr):
    """E2M1 magnitude of y >= 0 (saturating at 6); mirrors lowprec.fp4.e2m1_round."""
    y = tl.minimum(y, 6.0)
    step = tl.where(y < 2.0, 0.5, tl.where(y < 4.0, 1.0, 2.0))
    inv = tl.where(y < 2.0, 2.0, tl.where(y < 4.0, 1.0, 0.5))
    r = y * inv
    if SR:
        f = tl.math.floor(r)
        q = f + (u < r - f).to(tl.float32)
    else:
        q = _round_half_even(r)
    return q * step


@triton.jit
def e4m3(t, UP: tl.constexpr):
    """E4M3 value of t in [0, 448], nearest-even or rounded up; mirrors lowprec.fp4.e4m3_round."""
    e = tl.maximum(floor_log2(tl.where(t > 0.0, t, 1.0)), -6)
    r = t * pow2(3 - e)
    if UP:
        q = tl.math.ceil(r)
    else:
        q = _round_half_even(r)
    return q * pow2(e - 3)


@triton.jit(do_not_specialize=["seed"])
def block_fp4_kernel(x_ptr, out_ptr, amax_ptr, flag_ptr, seed, outer, length, inner, nb, total,
                     FMT: tl.constexpr, SR: tl.constexpr, L_MINUS_1: tl.constexpr, ROWS: tl.constexpr,
                     SIZE: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = g < total
    i = g % inner
    ob_b = g // inner
    b = ob_b % nb
    ob = ob_b // nb
    k = tl.arange(0, ROWS * SIZE)
    o = ob[:, None] * ROWS + (k // SIZE)[None, :]
    ln = b[:, None] * SIZE + (k % SIZE)[None, :]
    mask = valid[:, None] & (o < outer) & (ln < length)
    offs = (o * length + ln) * inner + i[:, None]
    x = load_f32(x_ptr, offs, mask)
    a = tl.abs(x)
    bad = tl.max(tl.max(tl.where(a < float("inf"), 0, 1), 1), 0)  # NaN or Inf anywhere in the tile
    tl.atomic_max(flag_ptr, bad, mask=bad > 0)
    m = tl.max(a, 1)[:, None]
    u = tl.rand(seed, offs)
    if FMT == 0:  # NVFP4
        amax_t = tl.load(amax_ptr)
        s_enc = tl.minimum(tl.math.div_rn(tl.full(m.shape, 2688.0, tl.float32), amax_t), 3.4028234663852886e38)
        s_dec = tl.math.div_rn(tl.full(m.shape, 1.0, tl.float32), s_enc)
        t = tl.minimum(tl.math.div_rn(m, tl.full(m.shape, 6.0, tl.float32)) * s_enc, 448.0)
        s_b = e4m3(t, SR)
        ok = s_b > 0.0
        d_b = s_b * s_dec
        y = tl.where(ok, tl.math.div_rn(a, tl.where(ok, d_b, 1.0)), 0.0)
        q = e2m1(y, u, SR)
        mag = tl.where(ok, (q * s_b) * s_dec, 0.0)
    elif FMT == 1:  # MXFP4
        e = tl.maximum(floor_log2(tl.where(m > 0.0, m, 1.0)) - 2, -126)
        if SR:
            e = e + (m * pow2(-e) > 6.0).to(tl.int32)
        e = tl.minimum(e, 127)
        q = e2m1(a * pow2(-e), u, SR)
        mag = tl.where(m > 0.0, q * pow2(e), 0.0)
    else:  # block-scaled LUQ
        ok = m > 0.0
        alpha = tl.where(ok, m * (0.5 ** L_MINUS_1), 1.0)
        lm, _ = luq_elem(x, u, m, alpha)
        mag = tl.where(ok, lm, 0.0)
    tl.store(out_ptr + offs, cast_out(copysign(mag, x), out_ptr.dtype.element_ty), mask=mask)


def _layout(x: Tensor, dim: int, size: int, rows: int):
    if rows > 1:
        outer, length, inner = x.shape[0], x.numel() // x.shape[0], 1
    else:
        outer, length, inner = block_dims(x, dim)
    nob, nb = triton.cdiv(outer, rows), triton.cdiv(length, size)
    return outer, length, inner, nb, nob * nb * inner


def _run(x: Tensor, fmt: str, *, dim: int, sr: bool, size: int, rows: int = 1, levels_minus_1: int = 0,
         seed: int | None, generator, nonfinite: str, who: str) -> Tensor:
    check_float(x, who)
    check_nonfinite_mode(nonfinite)
    check_launchable(x, who)
    if x.numel() == 0:
        return x.clone()
    xc = x.detach().contiguous()
    outer, length, inner, nb, total = _layout(xc, dim, size, rows)
    out = torch.empty_like(xc)
    flag = torch.zeros(1, dtype=torch.int32, device=x.device)
    amax_t = tensor_amax(xc) if fmt == "nvfp4" else flag.view(torch.float32)
    if seed is None:
        seed = draw_seed(generator) if sr or fmt == "block_luq" else 0
    width = rows * size
    block = (max(1, GPU_TILE_ELEMS // width) if xc.is_cuda
             else max(1, block_for(total * width, False, 1024) // width))
    block_fp4_kernel[(triton.cdiv(total, block),)](
        xc, out, amax_t, flag, int(seed), outer, length, inner, nb, total, FMT=FORMATS[fmt], SR=sr,
        L_MINUS_1=levels_minus_1, ROWS=rows, SIZE=size, BLOCK=block, num_warps=GPU_WARPS, **LAUNCH_OPTS)
    if nonfinite == "raise":
        if bool(flag.item() > 0):
            nonfinite_guard(x, torch.tensor(float("inf")), nonfinite, who)
        return out
    return torch.where(flag.bool(), torch.zeros((), dtype=out.dtype, device=out.device), out)


def nvfp4(x: Tensor, *, dim: int = -1, rounding: str = "rtn", block_2d: bool = False, seed: int | None = None,
          generator: torch.Generator | None = None, nonfinite: str = "raise") -> Tensor:
    """Kernel twin of :func:`lowprec.fp4.nvfp4` (``seed`` instead of ``noise``)."""
    check_rounding(rounding)
    return _run(x, "nvfp4", dim=dim, sr=rounding == "sr", size=NVFP4_BLOCK, rows=NVFP4_BLOCK if block_2d else 1,
                seed=seed, generator=generator, nonfinite=nonfinite, who="nvfp4")


def rht_nvfp4(x: Tensor, signs: Tensor, dim: int, *, rounding: str = "rtn", seed: int | None = None,
              generator: torch.Generator | None = None, nonfinite: str = "raise") -> Tensor:
    """:func:`nvfp4` after :func:`lowprec.hadamard.block_rht` (the rotation in torch: it has no kernel)."""
    return nvfp4(block_rht(x, signs, dim), dim=dim, rounding=rounding, seed=seed, generator=generator,
                 nonfinite=nonfinite)


def mxfp4(x: Tensor, *, dim: int = -1, rounding: str = "rtn", seed: int | None = None,
          generator: torch.Generator | None = None, nonfinite: str = "raise") -> Tensor:
    """Kernel twin of :func:`lowprec.fp4.mxfp4`."""
    check_rounding(rounding)
    assert (E8M0_EMIN, E8M0_EMAX) == (-126, 127) and FP32_MAX > 3.4e38  # constants inlined in the kernel
    return _run(x, "mxfp4", dim=dim, sr=rounding == "sr", size=MXFP4_BLOCK, seed=seed, generator=generator,
                nonfinite=nonfinite, who="mxfp4")


def block_luq(x: Tensor, bits: int = 4, *, block: int = 16, dim: int = -1, levels: int | None = None,
              seed: int | None = None, generator: torch.Generator | None = None, nonfinite: str = "raise") -> Tensor:
    """Kernel twin of :func:`lowprec.fp4.block_luq`."""
    check_block(block)
    L = luq_levels(bits, levels)
    if L - 1 > 126:
        raise ValueError(f"block_luq: the kernel supports at most 127 levels, got {L} (use backend='reference')")
    return _run(x, "block_luq", dim=dim, sr=True, size=block, levels_minus_1=L - 1, seed=seed, generator=generator,
                nonfinite=nonfinite, who="block_luq")
