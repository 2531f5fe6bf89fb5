"""Triton N:M pruning (twin of :func:`lowprec.nm.nm_prune`): mvue (any N:M), mvue_approx (N <= 2), mse.

Blocks, layout and uniforms: :mod:`lowprec.kernels.common` (``nm_block``, shared with the fused
N:M-then-LUQ kernel). Given the same uniforms the output is bit-identical to the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._common import nonfinite_guard
from ..nm import nm_noise_shape
from . import draw_seed
from .common import (LAUNCH_OPTS, NM_GPU_ELEMS, NM_GPU_WARPS, NM_METHOD_IDS, block_for, cast_out, check_nm_args,
                     dtype_consts, nm_block, nm_layout, noise_arg)


@triton.jit(do_not_specialize=["seed"])
def nm_kernel(x_ptr, out_ptr, flag_ptr, noise_ptr, seed, length, nblocks, inner, total,
              N: tl.constexpr, M: tl.constexpr, METHOD: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr,
              HAS_NOISE: tl.constexpr, DMAX: tl.constexpr):
    g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # block id in memory order (o, b, i)
    q, masks, offs = nm_block(x_ptr, flag_ptr, noise_ptr, seed, g, length, nblocks, inner, total, N, M, METHOD, K,
                              BLOCK, HAS_NOISE, DMAX)
    for j in tl.static_range(M):
        tl.store(out_ptr + offs[j], cast_out(q[j], out_ptr.dtype.element_ty), mask=masks[j])


def nm_prune(x: Tensor, n: int, m: int, *, method: str = "mvue", dim: int = -1, seed: int | None = None,
             generator: torch.Generator | None = None, noise: Tensor | None = None, nonfinite: str = "raise") -> Tensor:
    """Kernel twin of :func:`lowprec.nm.nm_prune`.

    The uniforms are ``lowprec.kernels.common.uniforms(seed, nm_noise_shape(x.shape, n, m, method, dim))``,
    or ``noise`` of that shape when given (tests: boundary uniforms).
    """
    check_nm_args(x, n, m, method, dim, nonfinite, "nm_prune")
    if x.numel() == 0 or n == m:
        return x.clone()
    xc = x.detach().contiguous()
    _, length, inner, nblocks, total = nm_layout(x, m, dim)
    out = torch.empty_like(xc)
    flag = torch.zeros(1, dtype=torch.int32, device=x.device)
    shape = nm_noise_shape(x.shape, n, m, method, dim)
    k = shape[-1]
    nz, has_noise = noise_arg(noise if method != "mse" else None, shape, xc, "nm_prune")
    if seed is None and method != "mse" and not has_noise:
        seed = draw_seed(generator)
    block = block_for(total, xc.is_cuda, max(32, NM_GPU_ELEMS // m))
    nm_kernel[(triton.cdiv(total, block),)](
        xc, out, flag, nz, int(seed or 0), length, nblocks, inner, total,
        N=n, M=m, METHOD=NM_METHOD_IDS[method], K=max(k, 1), BLOCK=block, HAS_NOISE=has_noise,
        DMAX=dtype_consts(x.dtype)["DMAX"], num_warps=NM_GPU_WARPS, **LAUNCH_OPTS)
    bad = torch.where(flag.reshape(()) > 0, float("inf"), 0.0)
    if nonfinite_guard(x, bad, nonfinite, "nm_prune"):
        return torch.zeros_like(x)
    return out
