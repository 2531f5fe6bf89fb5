"""Fused N:M prune then LUQ (twin of ``luq(nm_prune(x, ...), ...)``, the ``mvue24_luq4`` composite).

Two passes over x, nothing stored in between: pass 1 prunes (in registers) and reduces
``max|pruned|``; pass 2 prunes again with the same uniforms and LUQ-quantizes the survivors.
The pruned values are rounded to x's dtype before LUQ sees them, as the chained references do
(``nm_prune`` returns x's dtype). Bit-identical to
``luq(nm_prune(x, n, m, method=, dim=, noise=U1), bits, levels=, noise=U2)`` with
``U1 = uniforms(seed, nm_noise_shape(...))`` and ``U2 = uniforms(seed_luq, x.shape)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._common import nonfinite_guard
from ..luq import luq_levels
from ..nm import nm_noise_shape
from . import draw_seed
from .common import (LAUNCH_OPTS, NM_GPU_ELEMS, NM_GPU_WARPS, NM_METHOD_IDS, block_for, cast_out, check_nm_args,
                     copysign, draw, dtype_consts, luq_alpha, luq_elem, nan_to_inf_abs, nm_block, nm_layout, noise_arg,
                     round_to)
from .luq import luq


@triton.jit(do_not_specialize=["seed", "seed_luq"])
def nm_luq_kernel(x_ptr, out_ptr, flag_ptr, m_ptr, noise_ptr, noise_luq_ptr, seed, seed_luq, length, nblocks, inner,
                  total, N: tl.constexpr, M: tl.constexpr, METHOD: tl.constexpr, K: tl.constexpr,
                  L_MINUS_1: tl.constexpr, PASS: tl.constexpr, BLOCK: tl.constexpr, HAS_NOISE: tl.constexpr,
                  E_TINY: tl.constexpr, DMAX: tl.constexpr):
    g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    q, masks, offs = nm_block(x_ptr, flag_ptr, noise_ptr, seed, g, length, nblocks, inner, total, N, M, METHOD, K,
                              BLOCK, HAS_NOISE, DMAX)
    dtype = out_ptr.dtype.element_ty
    if PASS == 1:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in tl.static_range(M):
            acc = tl.maximum(acc, nan_to_inf_abs(round_to(q[j], dtype)))
        tl.atomic_max(m_ptr, tl.max(acc, 0).to(tl.int32, bitcast=True))
    else:
        ok, m, alpha = luq_alpha(tl.load(m_ptr).to(tl.float32, bitcast=True), L_MINUS_1, E_TINY, DMAX)
        for j in tl.static_range(M):
            qj = round_to(q[j], dtype)
            mag, _ = luq_elem(qj, draw(seed_luq, noise_luq_ptr, offs[j], masks[j], HAS_NOISE), m, alpha)
            tl.store(out_ptr + offs[j], cast_out(tl.where(ok, copysign(mag, qj), 0.0), dtype), mask=masks[j])


def nm_luq(x: Tensor, n: int, m: int, *, method: str = "mvue", dim: int = -1, bits: int = 4,
           levels: int | None = None, seed: int | None = None, seed_luq: int | None = None,
           generator: torch.Generator | None = None, noise: Tensor | None = None, noise_luq: Tensor | None = None,
           nonfinite: str = "raise") -> Tensor:
    """N:M-prune ``x`` along ``dim`` then LUQ-quantize it, in one fused kernel (two passes over x).

    ``noise``/``noise_luq`` (tests, both or neither): the two stages' uniforms instead of ``seed``/``seed_luq``."""
    check_nm_args(x, n, m, method, dim, nonfinite, "nm_luq")
    luq_levels(bits, levels)
    if (noise is None) != (noise_luq is None):
        raise ValueError("nm_luq: give both noise and noise_luq, or neither")
    if x.numel() == 0:
        return x.clone()
    if n == m:
        return luq(x, bits, levels=levels, seed=seed_luq, generator=generator, noise=noise_luq, nonfinite=nonfinite)
    xc = x.detach().contiguous()
    _, length, inner, nblocks, total = nm_layout(x, m, dim)
    out = torch.empty_like(xc)
    flag = torch.zeros(1, dtype=torch.int32, device=x.device)
    mbuf = torch.zeros(1, dtype=torch.int32, device=x.device)
    shape = nm_noise_shape(x.shape, n, m, method, dim)
    nz, has_noise = noise_arg(noise if method != "mse" else None, shape, xc, "nm_luq")
    nzl, has_noise_luq = noise_arg(noise_luq, x.shape, xc, "nm_luq")
    if not has_noise_luq:
        seed = draw_seed(generator) if seed is None else seed
        seed_luq = draw_seed(generator) if seed_luq is None else seed_luq
    k = max(shape[-1], 1)
    block = block_for(total, xc.is_cuda, max(32, NM_GPU_ELEMS // m))
    grid = (triton.cdiv(total, block),)
    args = (xc, out, flag, mbuf, nz, nzl, int(seed or 0), int(seed_luq or 0), length, nblocks, inner, total)
    kw = dict(N=n, M=m, METHOD=NM_METHOD_IDS[method], K=k, L_MINUS_1=luq_levels(bits, levels) - 1, BLOCK=block,
              HAS_NOISE=has_noise_luq, **dtype_consts(x.dtype), num_warps=NM_GPU_WARPS, **LAUNCH_OPTS)
    nm_luq_kernel[grid](*args, PASS=1, **kw)
    if nonfinite == "raise":  # one sync; in 'skip' mode pass 2 writes zeros for a non-finite max on its own
        bad = torch.where(flag.reshape(()) > 0, float("inf"), 0.0)
        nonfinite_guard(x, bad, nonfinite, "nm_prune")
        nonfinite_guard(x, mbuf.view(torch.float32).reshape(()), nonfinite, "luq")
    else:
        mbuf = torch.where(flag > 0, torch.full_like(mbuf, 0x7F800000), mbuf)  # NaN/Inf in x -> zeros
    nm_luq_kernel[grid](*args[:3], mbuf, *args[4:], PASS=2, **kw)
    return out
