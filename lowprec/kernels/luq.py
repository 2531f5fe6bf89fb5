"""Triton LUQ (twin of :func:`lowprec.luq.luq`), with the packed 4-bit output and its decoder.

Two passes by default: (1) ``m = max|x|`` (grid-stride ``tl.max`` + one ``tl.atomic_max`` per
program on the fp32 bits, or ``torch.linalg.vector_norm(x, inf)`` with ``amax="torch"``),
(2) quantize with ``u = tl.rand(seed, i)`` for element ``i`` of the flattened (contiguous) input.
With ``max_abs`` given (LUQ's in-hindsight max) it is one pass, which also returns the current
``max|x|`` for the next step's estimate. ``m`` stays on the device: no host sync unless a
non-finite check must raise. ``α`` is derived from ``m`` on the device as the reference's
:func:`lowprec.luq.luq_alpha` does (``common.luq_alpha``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._common import check_float, check_nonfinite_mode, check_scalar, nonfinite_guard
from ..luq import luq_alpha, luq_levels
from . import draw_seed
from ..packing import MAX_PACKED_LEVELS
from .common import (LAUNCH_OPTS, block_for, cast_out, check_launchable, copysign, draw, dtype_consts, load_f32,
                     luq_alpha as luq_alpha_dev, luq_elem, nan_to_inf_abs, noise_arg, num_programs_cap, pow2)

GPU_BLOCK = 1024  # untuned (no GPU in the session that wrote this); elementwise, 4 warps
GPU_WARPS = 4
AMAX_GPU_BLOCK = 4096


@triton.jit
def amax_kernel(x_ptr, amax_ptr, n, iters, BLOCK: tl.constexpr):
    """amax_ptr (int32 view of an fp32 >= 0) <- max(|x|) with NaN counted as +inf."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for it in range(iters):
        offs = (pid + it * nprog) * BLOCK + tl.arange(0, BLOCK)
        x = load_f32(x_ptr, offs, offs < n)
        acc = tl.maximum(acc, nan_to_inf_abs(x))
    # non-negative floats order like their int32 bit patterns: an integer atomic max is exact
    tl.atomic_max(amax_ptr, tl.max(acc, 0).to(tl.int32, bitcast=True))


@triton.jit
def _code(x, k):
    """4-bit code: sign << 3 | (k + 1); 0 for zero."""
    neg = (x.to(tl.int32, bitcast=True) < 0).to(tl.int32)
    return tl.where(k >= 0, (neg << 3) | tl.minimum(k + 1, 7), 0)


@triton.jit(do_not_specialize=["seed"])
def luq_kernel(x_ptr, out_ptr, m_ptr, amax_ptr, noise_ptr, seed, n, iters, L_MINUS_1: tl.constexpr,
               TRACK_AMAX: tl.constexpr, PACK: tl.constexpr, BLOCK: tl.constexpr, HAS_NOISE: tl.constexpr,
               E_TINY: tl.constexpr, DMAX: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    # m = 0 -> zeros; non-finite m (nonfinite='skip') -> zeros
    ok, m, alpha = luq_alpha_dev(tl.load(m_ptr), L_MINUS_1, E_TINY, DMAX)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for it in range(iters):
        start = (pid + it * nprog) * BLOCK
        if PACK:
            p = start + tl.arange(0, BLOCK)  # byte index: elements 2p (low nibble), 2p+1 (high)
            i0 = 2 * p
            i1 = i0 + 1
            x0 = load_f32(x_ptr, i0, i0 < n)
            x1 = load_f32(x_ptr, i1, i1 < n)
            _, k0 = luq_elem(x0, draw(seed, noise_ptr, i0, i0 < n, HAS_NOISE), m, alpha)
            _, k1 = luq_elem(x1, draw(seed, noise_ptr, i1, i1 < n, HAS_NOISE), m, alpha)
            c0 = tl.where(ok, _code(x0, k0), 0)
            c1 = tl.where(ok, _code(x1, k1), 0)  # a masked lane (x1 = 0) gives code 0
            tl.store(out_ptr + p, (c0 | (c1 << 4)).to(tl.uint8), mask=i0 < n)
            if TRACK_AMAX:
                acc = tl.maximum(acc, tl.maximum(nan_to_inf_abs(x0), nan_to_inf_abs(x1)))
        else:
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            x = load_f32(x_ptr, offs, mask)
            mag, _ = luq_elem(x, draw(seed, noise_ptr, offs, mask, HAS_NOISE), m, alpha)
            q = tl.where(ok, copysign(mag, x), 0.0)
            tl.store(out_ptr + offs, cast_out(q, out_ptr.dtype.element_ty), mask=mask)
            if TRACK_AMAX:
                acc = tl.maximum(acc, nan_to_inf_abs(x))
    if TRACK_AMAX:
        tl.atomic_max(amax_ptr, tl.max(acc, 0).to(tl.int32, bitcast=True))


@triton.jit
def unpack_kernel(codes_ptr, alpha_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    byte = tl.load(codes_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    nib = (byte >> ((offs % 2) * 4)) & 15
    e = nib & 7
    alpha = tl.load(alpha_ptr)
    mag = tl.where(e > 0, alpha * pow2(tl.maximum(e - 1, 0)), 0.0)
    val = tl.where((nib & 8) > 0, -mag, mag)
    tl.store(out_ptr + offs, cast_out(val, out_ptr.dtype.element_ty), mask=mask)


def _grid(nitems: int, block: int, x: Tensor) -> tuple[int, int]:
    nblk = triton.cdiv(nitems, block)
    grid = max(1, min(nblk, num_programs_cap(x)))
    return grid, triton.cdiv(nblk, grid)


def amax(x: Tensor, impl: str = "triton") -> Tensor:
    """``max|x|`` as an fp32 0-d tensor on x's device (NaN -> +inf with the Triton pass, NaN with torch)."""
    xc = x.detach().contiguous().view(-1)
    if impl == "torch":
        return torch.linalg.vector_norm(xc, float("inf")).float() if xc.numel() else torch.zeros((), device=x.device)
    if impl != "triton":
        raise ValueError(f"amax impl={impl!r}: expected 'triton' or 'torch'")
    check_launchable(xc, "luq amax")
    buf = torch.zeros(1, dtype=torch.int32, device=x.device)
    n = xc.numel()
    if n:
        block = block_for(n, xc.is_cuda, AMAX_GPU_BLOCK)
        grid, iters = _grid(n, block, xc)
        amax_kernel[(grid,)](xc, buf, n, iters, BLOCK=block, num_warps=8 if xc.is_cuda else 4, **LAUNCH_OPTS)
    return buf.view(torch.float32).reshape(())


def _prepare(x: Tensor, bits, levels, max_abs, nonfinite, who):
    check_float(x, who)
    check_nonfinite_mode(nonfinite)
    L = luq_levels(bits, levels)  # at most 127 levels: 2^-(L-1) is a normal fp32
    if max_abs is not None:
        check_scalar(max_abs, "max_abs", who, positive=False)
    check_launchable(x, who)
    return L


def _run(x: Tensor, L: int, max_abs, seed, generator, noise, nonfinite, pack: bool, amax_impl: str, who: str):
    xc = x.detach().contiguous().view(-1)
    nz, has_noise = noise_arg(noise, x.shape, xc, who)
    nz = nz.view(-1)
    n = xc.numel()
    track = max_abs is not None
    if track:
        m = torch.as_tensor(max_abs, dtype=torch.float32, device=x.device).reshape(1)
        cur = torch.zeros(1, dtype=torch.int32, device=x.device)
    else:
        m = amax(xc, amax_impl).reshape(1)
        cur = m
    if seed is None and not has_noise:
        seed = draw_seed(generator)
    nitems = triton.cdiv(n, 2) if pack else n
    out = torch.empty(nitems, dtype=torch.uint8, device=x.device) if pack else torch.empty_like(xc)
    block = block_for(nitems, xc.is_cuda, GPU_BLOCK)
    grid, iters = _grid(nitems, block, xc)
    luq_kernel[(grid,)](xc, out, m, cur, nz, int(seed or 0), n, iters, L_MINUS_1=L - 1, TRACK_AMAX=track, PACK=pack,
                        BLOCK=block, HAS_NOISE=has_noise, **dtype_consts(x.dtype), num_warps=GPU_WARPS,
                        **LAUNCH_OPTS)
    cur = cur.view(torch.float32).reshape(()) if track else cur.reshape(())
    # With the max computed here, nonfinite='skip' already gave zeros on the device (no sync).
    if (track or nonfinite == "raise") and nonfinite_guard(x, cur, nonfinite, who):
        out.zero_()
    return out, m.reshape(()), cur


def luq(x: Tensor, bits: int = 4, *, levels: int | None = None, max_abs=None, seed: int | None = None,
        generator: torch.Generator | None = None, noise: Tensor | None = None, nonfinite: str = "raise",
        return_amax: bool = False, amax_impl: str = "triton"):
    """Kernel twin of :func:`lowprec.luq.luq`: same arguments, plus ``seed``.

    ``seed=None`` draws one from ``generator`` (torch's global RNG when None). The uniforms are
    ``lowprec.kernels.common.uniforms(seed, x.shape)``, or ``noise`` when given (tests).
    ``return_amax``: also return the current ``max|x|`` (fp32 0-d, on the device) -- with
    ``max_abs`` given, from the same single pass.
    """
    L = _prepare(x, bits, levels, max_abs, nonfinite, "luq")
    if x.numel() == 0:
        out, cur = x.clone(), torch.zeros((), device=x.device)
    else:
        out, _, cur = _run(x, L, max_abs, seed, generator, noise, nonfinite, False, amax_impl, "luq")
        out = out.view(x.shape)
    return (out, cur) if return_amax else out


def luq_pack(x: Tensor, bits: int = 4, *, levels: int | None = None, max_abs=None, seed: int | None = None,
             generator: torch.Generator | None = None, noise: Tensor | None = None, nonfinite: str = "raise",
             amax_impl: str = "triton") -> tuple[Tensor, Tensor]:
    """LUQ straight to the packed format: ``(codes uint8[ceil(numel/2)], alpha fp32 0-d)``.

    Decodes (``luq_unpack``) to exactly ``luq(x, ..., seed=seed)`` in fp32. Needs ``L <= 7``.
    """
    L = _prepare(x, bits, levels, max_abs, nonfinite, "luq_pack")
    if L > MAX_PACKED_LEVELS:
        raise ValueError(f"luq_pack: {L} levels + zero + sign do not fit a 4-bit code (at most {MAX_PACKED_LEVELS})")
    if x.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=x.device), torch.zeros((), device=x.device)
    codes, m, _ = _run(x, L, max_abs, seed, generator, noise, nonfinite, True, amax_impl, "luq_pack")
    return codes, luq_alpha(torch.clamp(m, max=torch.finfo(x.dtype).max), L, x.dtype)


def luq_unpack(codes: Tensor, alpha, shape, dtype: torch.dtype = torch.float32) -> Tensor:
    """Kernel twin of :func:`lowprec.packing.luq_unpack_reference`."""
    shape = torch.Size(shape)
    n = shape.numel()
    if codes.numel() != triton.cdiv(n, 2):
        raise ValueError(f"luq_unpack: {codes.numel()} bytes cannot hold {n} codes (need {triton.cdiv(n, 2)})")
    out = torch.empty(n, dtype=dtype, device=codes.device)
    check_launchable(out, "luq_unpack")
    if n:
        alpha = torch.as_tensor(alpha, dtype=torch.float32, device=codes.device).reshape(1)
        block = block_for(n, out.is_cuda, GPU_BLOCK)
        unpack_kernel[(triton.cdiv(n, block),)](codes.contiguous(), alpha, out, n, BLOCK=block, **LAUNCH_OPTS)
    return out.view(shape)
