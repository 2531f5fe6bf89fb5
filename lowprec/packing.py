"""Packed 4-bit LUQ format, plain-torch reference (no Triton needed).

A LUQ output is 0 or ``±α·2^k`` with ``0 <= k < L <= 7``. Code per element (4 bits):
``sign << 3 | (k + 1)``, and ``0`` for zero (the sign of a zero is not kept). Two codes per byte:
element ``2i`` in the low nibble, ``2i+1`` in the high nibble; an odd tail leaves the last high
nibble 0. The tensor is carried as ``(codes: uint8[ceil(numel/2)], alpha: fp32 0-d)``.
Decoding: ``e = code & 7``; value ``= 0`` if ``e == 0`` else ``±ldexp(α, e-1)`` (exact).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import floor_log2

MAX_PACKED_LEVELS = 7


def luq_pack_reference(q: Tensor, alpha: Tensor | float) -> Tensor:
    """Codes (uint8, two per byte) of a LUQ output ``q`` (fp32 values 0 or ``±α·2^k``) with scale ``alpha``."""
    alpha = torch.as_tensor(alpha, dtype=torch.float32, device=q.device).reshape(())
    qf = q.detach().float().reshape(-1)
    a = qf.abs()
    nz = a > 0
    ratio = torch.where(nz, a / torch.where(alpha > 0, alpha, torch.ones_like(alpha)), torch.ones_like(a))
    k = floor_log2(ratio)
    if bool(((k < 0) | (k >= MAX_PACKED_LEVELS))[nz].any()):
        raise ValueError("luq_pack_reference: values are not of the form ±alpha·2^k with 0 <= k < 7")
    code = torch.where(nz, (k + 1) | torch.where(qf < 0, 8, 0).to(torch.int32), torch.zeros_like(k))
    if code.numel() % 2:
        code = torch.cat([code, code.new_zeros(1)])
    code = code.reshape(-1, 2)
    return (code[:, 0] | (code[:, 1] << 4)).to(torch.uint8)


def luq_unpack_reference(codes: Tensor, alpha: Tensor | float, shape, dtype: torch.dtype = torch.float32) -> Tensor:
    """Decode ``codes`` (uint8, two per byte) with scale ``alpha`` into a tensor of ``shape`` and ``dtype``."""
    shape = torch.Size(shape)
    numel = shape.numel()
    if codes.numel() != -(-numel // 2):
        raise ValueError(f"luq_unpack: {codes.numel()} bytes cannot hold {numel} codes (need {-(-numel // 2)})")
    alpha = torch.as_tensor(alpha, dtype=torch.float32, device=codes.device).reshape(())
    c = codes.reshape(-1).to(torch.int32)
    nib = torch.stack([c & 15, c >> 4], dim=-1).reshape(-1)[:numel]
    e = nib & 7
    mag = torch.where(e > 0, torch.ldexp(alpha.expand(numel), (e - 1).clamp(min=0)), torch.zeros((), device=codes.device))
    return torch.where((nib & 8) > 0, -mag, mag).reshape(shape).to(dtype)
