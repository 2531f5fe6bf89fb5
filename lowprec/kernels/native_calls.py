"""Typed calls into the C twins' library (:mod:`lowprec.kernels.native` builds, checks and loads it): each
``run_*`` lays out its tensors for one C function of :data:`lowprec.kernels.native.SIGNATURES` (pointers,
strides as loops or uniform-index steps, the thread count), allocates the output and returns it with
the C status; :mod:`lowprec.kernels.cpu` checks the arguments and picks the call."""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

_I64x3 = ctypes.c_int64 * 3
_I64x5 = ctypes.c_int64 * 5


def nest(t: Tensor, m: int):
    """``t``'s blocks of ``m`` along its last dim as three loops (outermost first) of (count, x offset
    step, uniform-index step in blocks), and the element step inside a block; None when the layout
    needs more than three loops (the caller copies ``t`` to contiguous first). The uniform index is
    the block's position in C order of ``t``'s logical shape, as the references lay out ``noise=``."""
    return _nest(tuple(t.shape), t.stride(), m)


@functools.lru_cache(maxsize=1024)  # a model has a few dozen (shape, layout) pairs; this runs every call
def _nest(shape: tuple, stride: tuple, m: int):
    nb = shape[-1] // m
    dims, ustep = [(nb, stride[-1] * m, 1)], nb
    for size, s in zip(reversed(shape[:-1]), reversed(stride[:-1])):
        dims.append((size, s, ustep))
        ustep *= size
    dims = sorted((d for d in dims if d[0] != 1), key=lambda d: -abs(d[1]))
    merged: list[tuple[int, int, int]] = []
    for d in dims:  # an outer loop that continues the inner one exactly folds into it
        if merged and merged[-1][1] == d[1] * d[0] and merged[-1][2] == d[2] * d[0]:
            o = merged.pop()
            d = (o[0] * d[0], d[1], d[2])
        merged.append(d)
    if len(merged) > 3:
        return None
    merged = [(1, 0, 0)] * (3 - len(merged)) + merged
    return tuple(zip(*merged)), stride[-1]


def _nested(t: Tensor, m: int):
    loops = nest(t, m)
    if loops is None:
        t = t.contiguous()
        loops = nest(t, m)
    (size, xs, us), es = loops
    return t, (_I64x3(*size), _I64x3(*xs), _I64x3(*us)), es


def _ptr(t: Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _threads() -> int:
    return max(1, torch.get_num_threads())


def run_luq(lib, x: Tensor, u: Tensor | None, key: int, max_abs: float | None, fmax: float, levels: int,
            e_tiny: int, *, top: float | None = None, inplace: bool = False) -> tuple[int, Tensor]:
    """``(status, out)``: LUQ of fp32 ``x`` (dense) as :func:`lowprec.kernels.cpu.luq` computes it, into a
    tensor with ``x``'s strides (a contiguous one when they need more than three loops). ``u``:
    contiguous uniforms in ``x``'s logical order, or None to draw them from ``key``; ``max_abs``: the
    given top level (None: max|x|); ``fmax``/``e_tiny``: the input dtype's largest finite value and
    smallest normal exponent. Status 0: done; 1: x holds a NaN/Inf; 2: the top level is 0. ``top``:
    max|x| already known (x finite): no pass for it. ``inplace``: written over x (or its contiguous copy)."""
    x, (size, xs, us), _ = _nested(x, 1)
    out = x if inplace else torch.empty_like(x)
    if top is not None:
        return lib.lp_luq_top_f32(_ptr(x), _ptr(out), _ptr(u), key, size, xs, us, top, fmax, levels, e_tiny,
                                  _threads()), out
    rc = lib.lp_luq_auto_f32(_ptr(x), _ptr(out), _ptr(u), key, size, xs, us, -1.0 if max_abs is None else max_abs,
                             fmax, levels, e_tiny, _threads())
    return rc, out


def run_nm(lib, blocks: Tensor, u: Tensor | None, key: int, n: int, m: int, approx: bool,
           big: float, out_max: bool = False):
    """``(status, out)``: N:M of fp32 ``blocks`` (dense, last dim a multiple of m) into a tensor with its
    strides; status 1 when a NaN/Inf was read (``out`` is then not meaningful). ``out_max``: also
    max|out| (a float, read in the same pass), as a third item."""
    blocks, (size, xs, us), es = _nested(blocks, m)
    out = torch.empty_like(blocks)
    omax = ctypes.c_uint32(0) if out_max else None
    rc = lib.lp_nm_f32(_ptr(blocks), _ptr(out), _ptr(u), key, size, xs, us, es, n, m, int(approx), big, _threads(),
                       None if omax is None else ctypes.byref(omax))
    if rc < 0:
        raise ValueError(f"lp_nm_f32: unsupported n={n}, m={m}")
    if omax is None:
        return rc, out
    return rc, out, ctypes.c_float.from_buffer_copy(omax).value


def run_mse(lib, blocks: Tensor, n: int, m: int) -> tuple[int, Tensor]:
    """``(status, out)``: the MSE (keep the n largest) mask of fp32 ``blocks`` as in :func:`run_nm`."""
    blocks, (size, xs, _), es = _nested(blocks, m)
    out = torch.empty_like(blocks)
    rc = lib.lp_mse_f32(_ptr(blocks), _ptr(out), size, xs, es, n, m, _threads())
    if rc < 0:
        raise ValueError(f"lp_mse_f32: unsupported n={n}, m={m}")
    return rc, out


FP4_FORMATS = {"nvfp4": 0, "mxfp4": 1, "block_luq": 2}


def run_fp4(lib, x: Tensor, u: Tensor | None, key: int, fmt: str, outer: int, length: int, inner: int,
            size: int, rows: int = 1, sr: bool = False, levels_minus_1: int = 0,
            ustrides: tuple[int, int, int] | None = None) -> tuple[int, Tensor]:
    """``(status, out)``: a block FP4 format of :mod:`lowprec.fp4` on fp32 ``x`` (its memory one dense
    ``[outer, length, inner]`` block, blocks of ``size`` along length, ``rows`` > 1: 2-D tiles) into a
    tensor with x's strides; status 1 when x holds a NaN/Inf. ``ustrides``: the uniform index of element
    (o, l, i) is row_u(o) + l·us[1] + i·us[2], row_u(o) = (o // us[3])·us[4] + (o % us[3])·us[0] (None:
    x contiguous, C order); ``u``: contiguous uniforms in x's logical order, or None to draw them from ``key``."""
    out = torch.empty_like(x)
    us = _I64x5(*(ustrides or (length * inner, inner, 1, max(outer, 1), outer * length * inner)))
    rc = lib.lp_fp4_f32(_ptr(x), _ptr(out), _ptr(u), key, us, outer, length, inner, size, rows, FP4_FORMATS[fmt],
                        int(sr), levels_minus_1, _threads())
    return rc, out


def run_rht_nvfp4(lib, x: Tensor, signs: Tensor, u: Tensor | None, key: int, outer: int, n_in: int, inner: int,
                  n: int, sr: bool, ustrides: tuple[int, int, int]) -> tuple[int, Tensor]:
    """``(status, out)``: NVFP4 (blocks along the middle dim) of :func:`run_fwht`'s rotation of fp32 ``x``
    (contiguous ``[outer, n_in, inner]``, inner > 1) in one C call, the rotated tensor never written;
    ``out`` contiguous ``[outer, ceil(n_in/n)·n, inner]``, ``ustrides`` its elements' uniform strides;
    status 1 when the rotation holds a NaN/Inf."""
    out = torch.empty((outer, -(-n_in // n) * n, inner), dtype=torch.float32)
    rc = lib.lp_rht_nvfp4_f32(_ptr(x), _ptr(out), _ptr(signs), _ptr(u), key, _I64x5(*ustrides), outer, n_in, inner, n,
                              int(sr), _threads())
    if rc < 0:
        raise ValueError(f"lp_rht_nvfp4_f32: unsupported block size {n} or inner {inner}")
    return rc, out


ELEM_KINDS = {"radix4": 0, "fp4_rdn": 1, "int_sr": 2}


def run_elem(lib, kind: str, x: Tensor, u: Tensor | None, key: int, param: int, fmax: float,
             e_tiny: int) -> tuple[int, Tensor]:
    """``(status, out)``: a per-tensor-scaled baseline of :mod:`lowprec.baselines` on fp32 ``x`` (dense)
    into a tensor with its strides (``param``: radix4's levels, fp4_rdn's L, int_sr's qmax). Status 0:
    done; 1: x holds a NaN/Inf; 2: max|x| = 0 (the caller returns zeros)."""
    x, (size, xs, us), _ = _nested(x, 1)
    out = torch.empty_like(x)
    rc = lib.lp_elem_f32(_ptr(x), _ptr(out), _ptr(u), key, size, xs, us, ELEM_KINDS[kind], param, fmax, e_tiny,
                         _threads())
    if rc < 0:
        raise ValueError(f"lp_elem_f32: unknown kind {kind!r}")
    return rc, out


def run_fwht(lib, x: Tensor, signs: Tensor, outer: int, n_in: int, inner: int, n: int, inverse: bool) -> Tensor:
    """The block RHT of :func:`lowprec.hadamard.block_rht` on fp32 ``x`` (contiguous, seen as
    ``[outer, n_in, inner]``, rotated along the middle dim in blocks of ``n``, the tail zero-padded)
    into a new contiguous ``[outer, ceil(n_in/n)·n, inner]`` tensor."""
    out = torch.empty((outer, -(-n_in // n) * n, inner), dtype=torch.float32)
    rc = lib.lp_fwht_f32(_ptr(x), _ptr(out), _ptr(signs), outer, n_in, inner, n, int(inverse), _threads())
    if rc < 0:
        raise ValueError(f"lp_fwht_f32: unsupported block size {n}")
    return out


def run_im2col(lib, x: Tensor, kernel, stride, padding, dilation) -> Tensor:
    """The im2col matrix ``[N·Ho·Wo, C·kh·kw]`` of fp32 ``x`` (contiguous ``[N, C, H, W]``) for a 2-d
    convolution (``kernel``, ``stride``, ``padding``, ``dilation``: pairs), as
    ``F.unfold(x, ...).transpose(1, 2).reshape(-1, C·kh·kw)`` in one pass."""
    n, c, h, w = x.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    out = torch.empty((n * ho * wo, c * kernel[0] * kernel[1]), dtype=torch.float32)
    g = (ctypes.c_int64 * 14)(n, c, h, w, *kernel, *stride, *padding, *dilation, ho, wo)
    lib.lp_im2col_f32(_ptr(x), _ptr(out), g, _threads())
    return out


def im2col_geometry(x: Tensor, kernel, stride, padding, dilation, m: int):
    """(the im2col geometry as lp_im2col_f32 reads it, the rotated matrix's [K, ceil(T/m)·m] shape)."""
    n, c, h, w = x.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    t = n * ho * wo
    g = (ctypes.c_int64 * 14)(n, c, h, w, *kernel, *stride, *padding, *dilation, ho, wo)
    return g, (c * kernel[0] * kernel[1], -(-t // m) * m)


def run_im2col_fwht(lib, x: Tensor, kernel, stride, padding, dilation, signs: Tensor) -> Tensor:
    """``run_fwht`` along dim 0 of ``run_im2col``'s matrix (the same numbers) in one pass: a
    ``[ceil(T/n)·n, C·kh·kw]`` view of a new contiguous ``[C·kh·kw, ceil(T/n)·n]`` tensor (each block of
    tokens contiguous, as the block formats along tokens read it), n = ``signs.numel()``."""
    m = signs.numel()
    g, shape = im2col_geometry(x, kernel, stride, padding, dilation, m)
    out = torch.empty(shape, dtype=torch.float32)
    if lib.lp_im2col_fwht_f32(_ptr(x), _ptr(out), g, _ptr(signs), m, _threads()) < 0:
        raise ValueError(f"lp_im2col_fwht_f32: unsupported block size {m}")
    return out.t()


def run_im2col_rht_nvfp4(lib, x: Tensor, kernel, stride, padding, dilation, signs: Tensor, u: Tensor | None,
                         key: int, sr: bool, ustrides) -> tuple[int, Tensor]:
    """``(status, out)``: NVFP4 (blocks along tokens) of :func:`run_im2col_fwht`'s matrix, the same view,
    in one call that never gathers or reads back the rotated matrix; ``ustrides`` the uniform strides of its
    rows (as :func:`run_fp4`'s); status 1 when it holds a NaN/Inf. The geometry: n = 16, stride 1, Wo = W,
    whole blocks of tokens per image (the caller checks)."""
    m = signs.numel()
    g, shape = im2col_geometry(x, kernel, stride, padding, dilation, m)
    out = torch.empty(shape, dtype=torch.float32)
    rc = lib.lp_im2col_rht_nvfp4_f32(_ptr(x), _ptr(out), g, _ptr(signs), _ptr(u), key, _I64x5(*ustrides), m, int(sr),
                                     _threads())
    if rc < 0:
        raise (MemoryError if rc == -2 else ValueError)(f"lp_im2col_rht_nvfp4_f32: status {rc} (n = {m}, geometry {list(g)})")
    return rc, out.t()


def run_transpose(lib, x: Tensor) -> Tensor:
    """``x.t().contiguous()`` of fp32 ``x`` (contiguous ``[R, C]``) in one pass."""
    out = torch.empty((x.shape[1], x.shape[0]), dtype=torch.float32)
    lib.lp_transpose_f32(_ptr(x), _ptr(out), x.shape[0], x.shape[1], _threads())
    return out


def fill_uniforms(lib, key: int, shape) -> Tensor:
    """The C twin's uniforms ``U(key, i)`` for ``i`` in C order of ``shape`` (tests compare them with torch's)."""
    out = torch.empty(shape, dtype=torch.float32)
    lib.lp_uniforms(key, out.numel(), _ptr(out))
    return out
