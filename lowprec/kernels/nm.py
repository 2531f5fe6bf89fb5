"""Triton N:M pruning (twin of :func:`lowprec.nm.nm_prune`): mvue (any N:M), mvue_approx (N <= 2), mse.

The input is viewed, without a copy, as ``[outer, length, inner]`` with the blocks along ``length``
(the pruned dimension): ``dim=-1`` of a ``[C, tokens]`` matrix is ``inner = 1``, ``dim=0`` is
``outer = 1, inner = tokens``. One program handles ``BLOCK`` consecutive N:M blocks in memory
order ``(outer, block, inner)`` and loads the M columns of its blocks as M vectors (for ``dim=0``
each vector is a contiguous run of tokens: coalesced, no transpose). The tail block is zero-padded
by masked loads. All arithmetic mirrors :mod:`lowprec.nm` op for op (left-to-right column sums,
``div_rn``), so given the same uniforms the output is bit-identical.

Uniform of block ``(o, b, i)``, draw ``r``: ``tl.rand(seed, ((o*inner + i)*nblocks + b)*K + r)``,
the flat index into the reference's ``noise`` of shape :func:`lowprec.nm.nm_noise_shape`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._common import check_float, check_nonfinite_mode, nonfinite_guard
from ..nm import check_nm, nm_noise_shape
from . import draw_seed
from .common import LAUNCH_OPTS, block_for, cast_out, check_launchable

METHOD_IDS = {"mvue": 0, "mvue_approx": 1, "mse": 2}
MAX_M = 8
GPU_ELEMS = 2048  # elements per program on a GPU (BLOCK = GPU_ELEMS // M blocks); untuned, no GPU here
GPU_WARPS = 4


@triton.jit
def _colsum(cols, M: tl.constexpr):
    s = cols[0]
    for j in tl.static_range(1, M):
        s = s + cols[j]
    return s


@triton.jit
def _mvue_probs(a, N: tl.constexpr, M: tl.constexpr):
    """Water-filling p_i = min(1, c|x_i|) with sum N; mirrors lowprec.nm.mvue_probs."""
    capped = ()
    for j in tl.static_range(M):
        capped = capped + (a[j] < 0.0,)  # all False
    shares = a
    for _r in tl.static_range(N + 1):
        free = tl.where(capped[0], 0.0, a[0])
        cnt = capped[0].to(tl.float32)
        for j in tl.static_range(1, M):
            free = free + tl.where(capped[j], 0.0, a[j])
            cnt = cnt + capped[j].to(tl.float32)
        budget = N - cnt
        c_scale = tl.math.div_rn(budget, tl.where(free > 0.0, free, 1.0))
        shares = ()
        new_capped = ()
        for j in tl.static_range(M):
            s = a[j] * c_scale
            shares = shares + (s,)
            new_capped = new_capped + (capped[j] | (s >= 1.0),)
        capped = new_capped
    p = ()
    for j in tl.static_range(M):
        p = p + (tl.where(capped[j], 1.0, tl.minimum(shares[j], 1.0)),)
    return p


@triton.jit
def _systematic(p, u, N: tl.constexpr, M: tl.constexpr):
    """Keep mask of systematic sampling (points u, u+1, ..., u+N-1 on [0, N)); mirrors lowprec.nm._systematic."""
    keep = ()
    lo = tl.zeros_like(u)
    below_lo = tl.zeros_like(u)
    for j in tl.static_range(M):
        if j < M - 1:
            hi = lo + p[j]
        else:
            hi = tl.zeros_like(u) + N
        below_hi = tl.minimum(tl.maximum(tl.math.ceil(hi - u), 0.0), N)
        keep = keep + (below_hi > below_lo,)
        lo = hi
        below_lo = below_hi
    return keep


@triton.jit
def _approx_draw(a, seed, noise_base, N: tl.constexpr, M: tl.constexpr):
    """N sequential draws prop. to |x| without replacement + exact inclusion probs; mirrors lowprec.nm._approx_draw."""
    S = _colsum(a, M)
    keep = ()
    for j in tl.static_range(M):
        keep = keep + (a[j] < 0.0,)  # all False
    for r in tl.static_range(N):
        w = ()
        for j in tl.static_range(M):
            w = w + (tl.where(keep[j], 0.0, a[j]),)
        target = tl.rand(seed, noise_base + r) * _colsum(w, M)
        run = tl.zeros_like(S)
        chosen = a[0] < 0.0
        new_keep = ()
        for j in tl.static_range(M):
            run = run + w[j]
            hit = (chosen == 0) & (target < run) & (w[j] > 0.0)
            new_keep = new_keep + (keep[j] | hit,)
            chosen = chosen | hit
        keep = new_keep
    t = ()
    for j in tl.static_range(M):
        t = t + (tl.math.div_rn(a[j], S),)
    if N == 1:
        p = t
    else:
        rest = ()
        for j in tl.static_range(M):
            rest = rest + (tl.math.div_rn(t[j], S - a[j]),)
        p = ()
        for i in tl.static_range(M):
            acc = tl.zeros_like(S)
            first = True
            for j in tl.static_range(M):
                if j != i:
                    if first:
                        acc = rest[j]
                        first = False
                    else:
                        acc = acc + rest[j]
            p = p + (t[i] + a[i] * acc,)
    return keep, p


@triton.jit
def _mse_keep(a, N: tl.constexpr, M: tl.constexpr):
    """Top-N |x| per block, ties to the lower index; mirrors lowprec.nm._mse_mask (integer ranks)."""
    keep = ()
    for i in tl.static_range(M):
        rank = tl.zeros(a[i].shape, dtype=tl.int32)
        for j in tl.static_range(M):
            if j < i:
                rank = rank + (a[j] >= a[i]).to(tl.int32)
            elif j > i:
                rank = rank + (a[j] > a[i]).to(tl.int32)
        keep = keep + (rank < N,)
    return keep


@triton.jit
def _nm_compute(x_ptr, flag_ptr, seed, g, length, nblocks, inner, total,
                N: tl.constexpr, M: tl.constexpr, METHOD: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
    """Pruned values (fp32, one vector per column), column masks and element offsets of blocks ``g``."""
    valid = g < total
    i = g % inner
    ob = g // inner
    b = ob % nblocks
    o = ob // nblocks
    base = (o * length + b * M) * inner + i
    xs = ()
    a = ()
    masks = ()
    offs = ()
    nnz = tl.zeros((BLOCK,), dtype=tl.int32)
    bad = tl.zeros((BLOCK,), dtype=tl.int32)
    for j in tl.static_range(M):
        mj = valid & (b * M + j < length)
        xj = tl.load(x_ptr + base + j * inner, mask=mj, other=0.0).to(tl.float32)
        aj = tl.abs(xj)
        xs = xs + (xj,)
        a = a + (aj,)
        masks = masks + (mj,)
        offs = offs + (base + j * inner,)
        nnz = nnz + (aj > 0.0).to(tl.int32)
        bad = bad | tl.where(aj < float("inf"), 0, 1)  # NaN or Inf
    any_bad = tl.max(bad, 0)
    tl.atomic_max(flag_ptr, any_bad, mask=any_bad > 0)
    q = ()
    if METHOD == 2:
        keep = _mse_keep(a, N, M)
        for j in tl.static_range(M):
            q = q + (tl.where(keep[j], xs[j], 0.0),)
    else:
        noise_base = ((o * inner + i) * nblocks + b) * K
        if METHOD == 0:
            p = _mvue_probs(a, N, M)
            keep = _systematic(p, tl.rand(seed, noise_base), N, M)
        else:
            keep, p = _approx_draw(a, seed, noise_base, N, M)
        sparse_enough = nnz <= N
        for j in tl.static_range(M):
            qj = tl.where(keep[j], tl.math.div_rn(xs[j], tl.where(keep[j], p[j], 1.0)), 0.0)
            q = q + (tl.where(sparse_enough, xs[j], qj),)
    return q, masks, offs


@triton.jit(do_not_specialize=["seed"])
def _nm_kernel(x_ptr, out_ptr, flag_ptr, seed, length, nblocks, inner, total,
               N: tl.constexpr, M: tl.constexpr, METHOD: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # block id in memory order (o, b, i)
    q, masks, offs = _nm_compute(x_ptr, flag_ptr, seed, g, length, nblocks, inner, total, N, M, METHOD, K, BLOCK)
    for j in tl.static_range(M):
        tl.store(out_ptr + offs[j], cast_out(q[j], out_ptr.dtype.element_ty), mask=masks[j])


def _layout(x: Tensor, m: int, dim: int) -> tuple[int, int, int, int, int]:
    """(outer, length, inner, nblocks, total blocks) of the contiguous view of x with blocks along dim."""
    d = dim % x.dim()
    outer, length, inner = math.prod(x.shape[:d]), x.shape[d], math.prod(x.shape[d + 1:])
    nblocks = triton.cdiv(length, m)
    return outer, length, inner, nblocks, outer * nblocks * inner


def _check_args(x: Tensor, n: int, m: int, method: str, dim: int, nonfinite: str, who: str) -> None:
    check_float(x, who)
    check_nm(n, m, method)
    check_nonfinite_mode(nonfinite)
    if x.dim() == 0:
        raise ValueError(f"{who}: a 0-d tensor has no dimension to form blocks along")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{who}: dim={dim} out of range for a {x.dim()}-d tensor")
    if m > MAX_M:
        raise ValueError(f"{who}: the kernel supports M <= {MAX_M}, got M={m} (use backend='reference')")
    check_launchable(x, who)


def nm_prune(x: Tensor, n: int, m: int, *, method: str = "mvue", dim: int = -1, seed: int | None = None,
             generator: torch.Generator | None = None, nonfinite: str = "raise") -> Tensor:
    """Kernel twin of :func:`lowprec.nm.nm_prune` (``seed`` instead of ``noise``).

    The uniforms are ``lowprec.kernels.common.uniforms(seed, nm_noise_shape(x.shape, n, m, method, dim))``.
    """
    _check_args(x, n, m, method, dim, nonfinite, "nm_prune")
    if x.numel() == 0 or n == m:
        return x.clone()
    xc = x.detach().contiguous()
    _, length, inner, nblocks, total = _layout(x, m, dim)
    out = torch.empty_like(xc)
    flag = torch.zeros(1, dtype=torch.int32, device=x.device)
    k = nm_noise_shape(x.shape, n, m, method, dim)[-1]
    if seed is None and method != "mse":
        seed = draw_seed(generator)
    block = block_for(total, xc.is_cuda, max(32, GPU_ELEMS // m))
    _nm_kernel[(triton.cdiv(total, block),)](
        xc, out, flag, int(seed or 0), length, nblocks, inner, total,
        N=n, M=m, METHOD=METHOD_IDS[method], K=max(k, 1), BLOCK=block, num_warps=GPU_WARPS, **LAUNCH_OPTS)
    bad = torch.where(flag.reshape(()) > 0, float("inf"), 0.0)
    if nonfinite_guard(x, bad, nonfinite, "nm_prune"):
        return torch.zeros_like(x)
    return out
