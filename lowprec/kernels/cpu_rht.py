"""CPU twins of NVFP4 after the block random Hadamard transform (the update-GEMM operands of
``update_rht`` recipes, nvfp4_sr_rht): the same numbers and draws as :func:`lowprec.kernels.cpu.nvfp4`
of :func:`lowprec.kernels.cpu.block_rht` (a Linear's operands) or of
:func:`lowprec.kernels.cpu.im2col_rht` (a convolution's im2col matrix), in one C call that never reads
the rotated tensor back from memory: NVFP4's tensor scale is the max of the rotated tensor, so each
block (or im2col row) is rotated twice, once for that max (nothing written) and once to quantize it
while it is in cache. Else the two twins one after the other."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import hadamard
from .._common import check_nonfinite_mode
from ..fp4 import check_rounding
from . import native, native_calls
from .cpu import (blocked_view_of, block_rht, c_lib, contiguous_strides, draw, im2col_rht, is_transposed_matrix,
                  key_of, nvfp4, zeros_for_nonfinite)


def rht_nvfp4(x: Tensor, signs: Tensor, dim: int, *, rounding: str = "rtn", generator: torch.Generator | None = None,
              noise: Tensor | None = None, nonfinite: str = "raise") -> Tensor:
    """``nvfp4(block_rht(x, signs, dim), dim=dim)`` with the same numbers and draws: one C call when the
    rotated dim of fp32 ``x`` is not innermost in memory (a Linear's [tokens, C] operands along tokens,
    or their transposed views), the rotated tensor never written; else the two twins one after the other."""
    check_rounding(rounding)
    check_nonfinite_mode(nonfinite)
    t = is_transposed_matrix(x)
    m, dm = (x.t(), 1 - dim % 2) if t else (x, dim % max(x.dim(), 1))  # x in memory order
    lib = c_lib(x) if x.dtype == torch.float32 and m.is_contiguous() and x.numel() else None
    outer, n_in, inner = hadamard.rht_dims(m, dm) if lib is not None else (0, 0, 0)
    n = signs.numel()
    if inner < 2 or x.requires_grad and torch.is_grad_enabled():
        return nvfp4(block_rht(x, signs, dim), dim=dim, rounding=rounding, generator=generator, noise=noise,
                     nonfinite=nonfinite)
    hadamard.check_rht_size(n)
    shape = list(m.shape)
    shape[dm] = -(-n_in // n) * n
    stride = contiguous_strides(shape)
    lshape, lstride = (shape[::-1], stride[::-1]) if t else (shape, stride)  # block_rht's result, as nvfp4 sees it
    u, seed = draw(generator, noise, lshape, "nvfp4") if rounding == "sr" else (None, 0)
    us = blocked_view_of(tuple(lshape), tuple(lstride), dim)[1]
    s = signs.detach().to(device="cpu", dtype=torch.float32).contiguous()
    rc, out = native_calls.run_rht_nvfp4(lib, m.detach(), s, u, key_of(seed), outer, n_in, inner, n, rounding == "sr", us)
    out = out.view(shape).t() if t else out.view(shape)
    return torch.zeros_like(out) if zeros_for_nonfinite(rc, x, nonfinite, "nvfp4") else out


def im2col_rht_nvfp4(x: Tensor, kernel, stride, padding, dilation, signs: Tensor, *, rounding: str = "rtn",
                     generator: torch.Generator | None = None, noise: Tensor | None = None,
                     nonfinite: str = "raise") -> Tensor:
    """``nvfp4(im2col_rht(x, ...), dim=0)``, the same numbers and draws: for fp32 CPU tensors, n = 16,
    stride 1, Wo = W and whole blocks of tokens per image, one C call that reads each block of the rotated
    matrix straight from x (a shifted plane, masked) and quantizes it in cache (the matrix is neither
    gathered nor read back); else the two twins."""
    check_rounding(rounding)
    check_nonfinite_mode(nonfinite)
    lib = native.library() if x.dtype == torch.float32 and x.device.type == "cpu" else None
    g, (k, tp) = native_calls.im2col_geometry(x, kernel, stride, padding, dilation, signs.numel())
    if (lib is None or signs.numel() != 16 or tuple(stride) != (1, 1) or g[13] != x.shape[3] or g[12] * g[13] % 16
            or x.requires_grad and torch.is_grad_enabled()):
        return nvfp4(im2col_rht(x, kernel, stride, padding, dilation, signs), dim=0, rounding=rounding,
                     generator=generator, noise=noise, nonfinite=nonfinite)
    s = signs.detach().to(device="cpu", dtype=torch.float32).contiguous()
    u, seed = draw(generator, noise, (tp, k), "nvfp4") if rounding == "sr" else (None, 0)
    us = blocked_view_of((tp, k), (1, tp), 0)[1]  # the [T', K] view's rows of tokens, as nvfp4 reads them
    rc, out = native_calls.run_im2col_rht_nvfp4(lib, x.detach().contiguous(), kernel, stride, padding, dilation, s, u,
                                                key_of(seed), rounding == "sr", us)
    return torch.zeros_like(out) if zeros_for_nonfinite(rc, x, nonfinite, "nvfp4") else out
