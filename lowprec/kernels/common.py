"""Shared Triton pieces: launch options, block sizes, bit-exact helpers and the uniforms kernel, and the
device math more than one kernel runs: LUQ of one element (:func:`luq_elem`, used by the LUQ and the
fused N:M-then-LUQ kernels) and one N:M block (:func:`nm_block`, used by the N:M and the fused kernels).

N:M blocks: the input is viewed, without a copy, as ``[outer, length, inner]`` with the blocks along
``length`` (the pruned dimension): ``dim=-1`` of a ``[C, tokens]`` matrix is ``inner = 1``, ``dim=0``
is ``outer = 1, inner = tokens``. One program handles ``BLOCK`` consecutive N:M blocks in memory
order ``(outer, block, inner)`` and loads the M columns of its blocks as M vectors (for ``dim=0``
each vector is a contiguous run of tokens: coalesced, no transpose). The tail block is zero-padded
by masked loads. All arithmetic mirrors :mod:`lowprec.nm` op for op (left-to-right column sums,
``div_rn``), so given the same uniforms the output is bit-identical. Uniform of block
``(o, b, i)``, draw ``r``: ``tl.rand(seed, ((o*inner + i)*nblocks + b)*K + r)``, the flat index
into the reference's ``noise`` of shape :func:`lowprec.nm.nm_noise_shape`.

``noise=`` (tests): every kernel can also read its uniforms from a tensor laid out as the
reference's ``noise`` (``HAS_NOISE``), so boundary uniforms (0, a level exactly, 1 - 2^-24) can be
fed to both twins. Range handling mirrors the references: LUQ's ``α`` cut to the output dtype's
normals (:func:`luq_alpha`), N:M blocks rescaled by ``2^-E`` (:func:`block_normalize`), outputs
clamped to the dtype's largest finite value (``DMAX``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._common import check_float, check_nonfinite_mode
from ..nm import check_nm
from . import interpreter_enabled

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP32_TINY = torch.finfo(torch.float32).tiny  # 2^-126: the kernels compute in fp32
MAX_NUMEL = 2 ** 31 - 1  # kernels index with int32

# Every launch: no a*b+c -> FMA contraction (the references round after each op).
LAUNCH_OPTS = {"enable_fp_fusion": False}

# Interpreter: the cost is per op, not per element, so one big block is 50-100x faster than
# BLOCK=1024 (install notes: 0.2-1.4 M el/s at 1024, ~7 M el/s at 65536).
INTERP_BLOCK = 1 << 16


def check_launchable(x: torch.Tensor, who: str) -> None:
    """Raise a clear error when ``x`` cannot go through a kernel."""
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{who}: the Triton kernel takes fp32/fp16/bf16, got {x.dtype} (use backend='reference')")
    if x.numel() > MAX_NUMEL:
        raise ValueError(f"{who}: {x.numel()} elements exceed the kernels' int32 indexing ({MAX_NUMEL})")
    if x.is_cuda:
        return
    if not interpreter_enabled():
        raise RuntimeError(
            f"{who}: the Triton kernel got a {x.device} tensor; kernels run on CUDA tensors, or on CPU "
            "tensors only under TRITON_INTERPRET=1 (set before triton is first imported)"
        )


def block_for(n: int, cuda: bool, gpu_block: int) -> int:
    """Elements (or N:M blocks) per program: ``gpu_block`` on a GPU, one large block in the interpreter."""
    if cuda:
        return gpu_block
    return max(16, min(INTERP_BLOCK, triton.next_power_of_2(max(int(n), 1))))


def dtype_consts(dtype: torch.dtype) -> dict:
    """Constexprs of an output dtype: ``E_TINY`` (log2 of its smallest normal) and ``DMAX`` (largest finite)."""
    from .._common import tiny_exponent

    return {"E_TINY": tiny_exponent(dtype), "DMAX": torch.finfo(dtype).max}


def noise_arg(noise: Tensor | None, shape, x: Tensor, who: str) -> tuple[Tensor, bool]:
    """(pointer tensor, HAS_NOISE) for a kernel: the checked fp32 ``noise`` or a dummy (x itself)."""
    if noise is None:
        return x, False
    shape = torch.Size(shape)
    if not isinstance(noise, Tensor) or noise.shape != shape:
        got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
        raise ValueError(f"{who}: noise has shape {got}, expected {tuple(shape)}")
    return noise.to(device=x.device, dtype=torch.float32).contiguous(), True


def num_programs_cap(x: torch.Tensor) -> int:
    """Grid cap for grid-stride reductions (bounds the number of atomics on one address)."""
    if x.is_cuda:
        return 8 * torch.cuda.get_device_properties(x.device).multi_processor_count
    return 1 << 30


@triton.jit
def pow2(e):
    """2^e as fp32 for int32 e in [-126, 127], exactly (built from the exponent field)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def floor_log2(y):
    """floor(log2 y) for positive normal fp32 y, exactly (the exponent field), as lowprec._common.floor_log2."""
    return ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def copysign(mag, x):
    """mag (>= 0, fp32) with the sign bit of x (fp32), bit for bit like torch.copysign."""
    bits = (mag.to(tl.int32, bitcast=True) & 0x7FFFFFFF) | (x.to(tl.int32, bitcast=True) & -2147483648)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def draw(seed, noise_ptr, idx, mask, HAS_NOISE: tl.constexpr):
    """The uniform at flat index ``idx``: ``tl.rand(seed, idx)``, or read from ``noise`` (tests)."""
    if HAS_NOISE:
        return tl.load(noise_ptr + idx, mask=mask, other=0.0)
    else:
        return tl.rand(seed, idx)


@triton.jit(do_not_specialize=["seed"])
def _uniforms_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.rand(seed, offs), mask=offs < n)


def uniforms(seed: int, shape, device="cpu") -> torch.Tensor:
    """``tl.rand(seed, flat_index)`` laid out in ``shape``: exactly the uniforms a kernel launched with
    ``seed`` draws for the reference's ``noise=`` tensor of that shape (tests feed them back)."""
    shape = torch.Size(shape if isinstance(shape, (tuple, list, torch.Size)) else (shape,))
    out = torch.empty(shape, dtype=torch.float32, device=device)
    n = out.numel()
    if n:
        if not out.is_cuda and not interpreter_enabled():
            raise RuntimeError("uniforms: CPU tensors need TRITON_INTERPRET=1")
        block = block_for(n, out.is_cuda, 1024)
        _uniforms_kernel[(triton.cdiv(n, block),)](out, seed, n, BLOCK=block)
    return out


@triton.jit
def load_f32(base_ptr, offs, mask):
    """``base_ptr[offs]`` as fp32 (0 where masked). bf16 is widened by a bit shift (exact, as a GPU's
    ``cvt``), because the interpreter's bf16 -> fp32 cast flushes bf16 subnormals to wrong values."""
    if base_ptr.dtype.element_ty == tl.bfloat16:
        bits = tl.load(base_ptr.to(tl.pointer_type(tl.uint16)) + offs, mask=mask, other=0)
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def cast_out(v, dtype: tl.constexpr):
    """fp32 -> ``dtype`` with round-to-nearest-even, identically on GPU and in the interpreter.

    The interpreter's fp32->bf16 cast truncates (a GPU's ``cvt.rn.bf16.f32`` rounds to nearest
    even, as torch does), so bf16 is rounded here with integer ops: add ``0x7FFF + lsb`` to the fp32
    bits and keep the top 16 (torch's c10::BFloat16 rounding; exact for finite values and overflow).
    """
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """fp32 ``v`` rounded to ``dtype`` (as :func:`cast_out`) and widened back to fp32, exactly on GPU and
    in the interpreter: bf16 by keeping the top 16 bits of the rounded pattern (the interpreter's
    bf16 -> fp32 cast flushes bf16 subnormals, which made the fused N:M-then-LUQ kernel drop them)."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        return v.to(dtype).to(tl.float32)


# ----------------------------------------------------------------------------- LUQ, per element


@triton.jit
def nan_to_inf_abs(x):
    a = tl.abs(x)
    return tl.where(a == a, a, float("inf"))


@triton.jit
def luq_alpha(m_raw, L_MINUS_1: tl.constexpr, E_TINY: tl.constexpr, DMAX: tl.constexpr):
    """(ok, m, α) from the loaded max, as lowprec.luq.luq_scale: m clamped to DMAX, α = m·2^-j with
    j = min(L-1, max(0, floor(log2 m) - E_TINY)); ok = 0 < m_raw < inf (else the output is zeros)."""
    ok = (m_raw > 0) & (m_raw < float("inf"))
    m = tl.minimum(m_raw, DMAX)
    j = tl.minimum(tl.maximum(floor_log2(m) - E_TINY, 0), L_MINUS_1)
    return ok, m, m * pow2(-j)


@triton.jit
def luq_elem(x, u, m, alpha):
    """LUQ of fp32 x with uniform u: (magnitude, level index k or -1 for zero). Mirrors lowprec.luq.luq."""
    a = tl.minimum(tl.abs(x), m)
    y = tl.math.div_rn(a, alpha)
    is_under = y < 1.0
    under = tl.where(u < y, alpha, 0.0)
    e = floor_log2(tl.maximum(y, 1.0))
    lo = alpha * pow2(e)
    up = u < tl.math.div_rn(a - lo, lo)
    level = tl.where(up, lo + lo, lo)
    mag = tl.where(is_under, under, level)
    k = tl.where(is_under, 0, e + up.to(tl.int32))
    return mag, tl.where(mag > 0, k, -1)


# ----------------------------------------------------------------------------- N:M, per block

NM_METHOD_IDS = {"mvue": 0, "mvue_approx": 1, "mse": 2}
NM_MAX_M = 8
NM_GPU_ELEMS = 2048  # elements per program on a GPU (BLOCK = NM_GPU_ELEMS // M blocks); untuned, no GPU here
NM_GPU_WARPS = 4


@triton.jit
def _colsum(cols, M: tl.constexpr):
    s = cols[0]
    for j in tl.static_range(1, M):
        s = s + cols[j]
    return s


@triton.jit
def _sum_except(cols, i: tl.constexpr, M: tl.constexpr):
    """cols[0] + ... + cols[M-1] without cols[i], left to right from the first term (as lowprec.nm sums)."""
    s = cols[1] if i == 0 else cols[0]
    for j in tl.static_range(2 if i == 0 else 1, M):
        if j != i:
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
        c_scale = tl.math.div_rn(budget, tl.maximum(free, N * 1.1754943508222875e-38))  # N·FP32_TINY
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
    """Keep mask of systematic sampling (capped kept, the rest counted as I + [u < F]); mirrors lowprec.nm._systematic."""
    capped = ()
    n_open = tl.zeros_like(u) + N
    for j in tl.static_range(M):
        capped = capped + (p[j] >= 1.0,)
        n_open = n_open - capped[j].to(tl.float32)
    keep = ()
    whole = tl.zeros_like(u)
    frac = tl.zeros_like(u)
    below_lo = tl.zeros_like(u)
    opened = u != u  # all False: an open entry (0 < p < 1) at or before j
    for j in tl.static_range(M):
        opened = opened | ((p[j] > 0.0) & (capped[j] == 0))
        closes = opened  # ... and none after j
        for k in tl.static_range(j + 1, M):
            closes = closes & ((p[k] <= 0.0) | capped[k])
        t = frac + tl.where(capped[j], 0.0, p[j])
        carry = tl.math.floor(t)
        whole = whole + carry
        frac = t - carry
        below_hi = tl.where(closes, n_open, tl.minimum(whole + (u < frac).to(tl.float32), n_open))
        keep = keep + (capped[j] | (below_hi > below_lo),)
        below_lo = below_hi
    return keep


@triton.jit
def _approx_draw(a, seed, noise_ptr, noise_base, valid, N: tl.constexpr, M: tl.constexpr, HAS_NOISE: tl.constexpr):
    """N sequential draws prop. to |x| without replacement + exact inclusion probs; mirrors lowprec.nm._approx_draw."""
    S = _colsum(a, M)
    keep = ()
    for j in tl.static_range(M):
        keep = keep + (a[j] < 0.0,)  # all False
    for r in tl.static_range(N):
        w = ()
        for j in tl.static_range(M):
            w = w + (tl.where(keep[j], 0.0, a[j]),)
        target = draw(seed, noise_ptr, noise_base + r, valid, HAS_NOISE) * _colsum(w, M)
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
            rest = rest + (tl.math.div_rn(t[j], _sum_except(a, j, M)),)
        p = ()
        for i in tl.static_range(M):
            p = p + (t[i] + a[i] * _sum_except(rest, i, M),)
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
def block_normalize(a, M: tl.constexpr):
    """a·2^-E, E = floor(log2 max a) clamped to [-126, 126]; mirrors lowprec.nm.block_normalize."""
    bmax = a[0]
    for j in tl.static_range(1, M):
        bmax = tl.maximum(bmax, a[j])
    e = tl.minimum(tl.maximum(floor_log2(tl.maximum(bmax, 1.1754943508222875e-38)), -126), 126)
    scale = pow2(-e)
    out = ()
    for j in tl.static_range(M):
        out = out + (a[j] * scale,)
    return out


@triton.jit
def nm_block(x_ptr, flag_ptr, noise_ptr, seed, g, length, nblocks, inner, total,
             N: tl.constexpr, M: tl.constexpr, METHOD: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr,
             HAS_NOISE: tl.constexpr, DMAX: tl.constexpr):
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
        xj = load_f32(x_ptr, base + j * inner, mj)
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
        a_s = block_normalize(a, M)
        if METHOD == 0:
            p = _mvue_probs(a_s, N, M)
            keep = _systematic(p, draw(seed, noise_ptr, noise_base, valid, HAS_NOISE), N, M)
        else:
            keep0, p = _approx_draw(a_s, seed, noise_ptr, noise_base, valid, N, M, HAS_NOISE)
            keep = ()
            for j in tl.static_range(M):
                keep = keep + (keep0[j] & (p[j] > 0.0),)
        sparse_enough = nnz <= N
        for j in tl.static_range(M):
            qj = tl.where(keep[j], tl.math.div_rn(xs[j], tl.where(keep[j], p[j], 1.0)), 0.0)
            qj = tl.minimum(tl.maximum(qj, -DMAX), DMAX)
            q = q + (tl.where(sparse_enough, xs[j], qj),)
    return q, masks, offs


def nm_layout(x: Tensor, m: int, dim: int) -> tuple[int, int, int, int, int]:
    """(outer, length, inner, nblocks, total blocks) of the contiguous view of x with blocks along dim."""
    d = dim % x.dim()
    outer, length, inner = math.prod(x.shape[:d]), x.shape[d], math.prod(x.shape[d + 1:])
    nblocks = triton.cdiv(length, m)
    return outer, length, inner, nblocks, outer * nblocks * inner


def check_nm_args(x: Tensor, n: int, m: int, method: str, dim: int, nonfinite: str, who: str) -> None:
    check_float(x, who)
    check_nm(n, m, method)
    check_nonfinite_mode(nonfinite)
    if x.dim() == 0:
        raise ValueError(f"{who}: a 0-d tensor has no dimension to form blocks along")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{who}: dim={dim} out of range for a {x.dim()}-d tensor")
    if m > NM_MAX_M:
        raise ValueError(f"{who}: the kernel supports M <= {NM_MAX_M}, got M={m} (use backend='reference')")
    check_launchable(x, who)
