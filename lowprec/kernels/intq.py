"""Triton INT quantization (twin of :func:`lowprec.intq.int_quant`): round-to-nearest, per tensor or
per row (output channel), with the clip given or computed.

Quantize pass: ``q = clamp(floor(div_rn(x, s) + 0.5), lo, hi) * s`` with ``s = where(c > 0, c/qmax, 1)``
computed by the same torch ops as the reference, so given the same clip ``c`` the output is
bit-identical. Clip pass (when ``clip`` is None, or ``signed`` is None): one reduction kernel writes
per-(row, chunk) partials (Σx², Σ|x|, max|x|, min x) and torch finishes them (deterministic: no
float atomics). SAWB from these sums matches :func:`lowprec.intq.sawb_clip` to ~1e-6 relative (the
summation order differs), ``clip_method='max'`` exactly; ``'mse'`` calls the reference search.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._common import check_float
from ..intq import SAWB_COEFFS, check_bits, check_clip, check_int_quant_args, int_qmax, int_step, mse_clip
from .common import LAUNCH_OPTS, block_for, cast_out, check_launchable, dtype_consts, load_f32

GPU_BLOCK = 1024  # untuned (no GPU in the session that wrote this)
STATS_GPU_BLOCK = 4096


@triton.jit
def intq_kernel(x_ptr, out_ptr, s_ptr, flag_ptr, row_len, nchunks, qlo, qhi, BLOCK: tl.constexpr, DMAX: tl.constexpr):
    pid = tl.program_id(0)
    row = pid // nchunks
    offs = (pid % nchunks) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < row_len
    ptr = row * row_len + offs
    x = load_f32(x_ptr, ptr, mask)
    s = tl.load(s_ptr + row)
    q = tl.minimum(tl.maximum(tl.math.floor(tl.math.div_rn(x, s) + 0.5), qlo), qhi) * s
    q = tl.minimum(tl.maximum(q, -DMAX), DMAX)  # a clip above the dtype's range: largest finite, not inf
    tl.store(out_ptr + ptr, cast_out(q, out_ptr.dtype.element_ty), mask=mask)
    bad = tl.max(tl.where(tl.abs(x) < float("inf"), 0, 1), 0)
    tl.atomic_max(flag_ptr, bad, mask=bad > 0)


@triton.jit
def stats_kernel(x_ptr, part_ptr, row_len, nchunks, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = pid // nchunks
    offs = (pid % nchunks) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < row_len
    x = load_f32(x_ptr, row * row_len + offs, mask)
    a = tl.abs(x)
    tl.store(part_ptr + pid * 4 + 0, tl.sum(x * x, 0))
    tl.store(part_ptr + pid * 4 + 1, tl.sum(a, 0))
    tl.store(part_ptr + pid * 4 + 2, tl.max(tl.where(a == a, a, float("inf")), 0))  # NaN counts as +inf
    tl.store(part_ptr + pid * 4 + 3, tl.min(tl.where(mask, x, float("inf")), 0))


def _rows(x: Tensor, per_channel: bool) -> Tensor:
    xc = x.detach().contiguous()
    return xc.view(x.shape[0], -1) if per_channel else xc.view(1, -1)


def row_stats(x: Tensor, per_channel: bool = False) -> dict[str, Tensor]:
    """Per-row ``sumsq, sumabs, amax, min`` (fp32 ``[rows]``), one read of ``x``."""
    check_launchable(x, "int_quant stats")
    r = _rows(x, per_channel)
    rows, row_len = r.shape
    block = block_for(row_len, r.is_cuda, STATS_GPU_BLOCK)
    nchunks = triton.cdiv(row_len, block)
    part = torch.empty(rows * nchunks, 4, dtype=torch.float32, device=x.device)
    stats_kernel[(rows * nchunks,)](r, part, row_len, nchunks, BLOCK=block, num_warps=8 if r.is_cuda else 4,
                                    **LAUNCH_OPTS)
    part = part.view(rows, nchunks, 4)
    return {"sumsq": part[..., 0].sum(1), "sumabs": part[..., 1].sum(1), "amax": part[..., 2].amax(1),
            "min": part[..., 3].amin(1), "len": row_len}


def _sawb(st: dict, bits: int) -> Tensor:
    k1, k2 = SAWB_COEFFS[bits]
    n = st["len"]
    c = k1 * (st["sumsq"] / n).sqrt() - k2 * (st["sumabs"] / n)
    amax = st["amax"]
    return torch.where((c > 0) & (c < amax), c, amax).reshape(-1, 1)


def sawb_clip(x: Tensor, bits: int = 4, *, per_channel: bool = False, signed: bool = True) -> Tensor:
    """Kernel twin of :func:`lowprec.intq.sawb_clip` (same ``[rows, 1]`` result up to summation order)."""
    check_float(x, "sawb_clip")
    check_bits(bits)
    if bits not in SAWB_COEFFS:
        return mse_clip(x, bits, per_channel=per_channel, signed=signed)
    return _sawb(row_stats(x, per_channel), bits)


def int_quant(x: Tensor, bits: int = 4, *, signed: bool | None = None, per_channel: bool = False,
              clip: float | Tensor | None = None, clip_method: str = "sawb") -> Tensor:
    """Kernel twin of :func:`lowprec.intq.int_quant` (same arguments and checks)."""
    check_int_quant_args(x, bits, per_channel, clip_method)
    check_launchable(x, "int_quant")
    if x.numel() == 0:
        return x.clone()
    r = _rows(x, per_channel)
    rows, row_len = r.shape
    st = None
    if signed is None or (clip is None and clip_method != "mse"):
        st = row_stats(x, per_channel)
        finite, nonneg = torch.stack([torch.isfinite(st["amax"]).all(), st["min"].amin() >= 0]).tolist()
        if not finite:
            raise ValueError("int_quant: input has NaN/Inf elements")
        if signed is None:
            signed = not nonneg
    qmax = int_qmax(bits, signed)
    if clip is not None:
        c = check_clip(clip, rows, x.device, torch.float32)
    elif clip_method == "max":
        c = st["amax"].reshape(-1, 1)
    elif clip_method == "mse" or bits not in SAWB_COEFFS:
        c = mse_clip(x, bits, per_channel=per_channel, signed=signed)
    else:
        c = _sawb(st, bits)
    s = int_step(c, qmax).expand(rows, 1).contiguous()
    out = torch.empty_like(r)
    flag = torch.zeros(1, dtype=torch.int32, device=x.device)
    block = block_for(row_len, r.is_cuda, GPU_BLOCK)
    nchunks = triton.cdiv(row_len, block)
    intq_kernel[(rows * nchunks,)](r, out, s, flag, row_len, nchunks, float(-qmax if signed else 0), float(qmax),
                                   BLOCK=block, DMAX=dtype_consts(x.dtype)["DMAX"], **LAUNCH_OPTS)
    if st is None and bool(flag.item()):
        raise ValueError("int_quant: input has NaN/Inf elements")
    return out.view(x.shape)
