"""Block random Hadamard transform (RHT) along a GEMM's reduction dimension.

``H_n``: the Sylvester Hadamard matrix of size n (16 or 32) divided by √n, so ``H_nᵀ H_n = I``.
``R = H_n · diag(s)`` with random signs ``s ∈ {±1}^n`` (one vector, shared by every block and by both
operands of the GEMM). :func:`block_rht` splits ``dim`` into blocks of n (the tail zero-padded: the
output is longer along ``dim`` when n does not divide it) and maps each block ``v`` (a row vector
along ``dim``) to ``v R``. For a GEMM ``A B`` with reduction dimension k (``A``'s last, ``B``'s
first): ``block_rht(A, s, -1) @ block_rht(B, s, 0) = Σ_blocks (A_k R)(Rᵀ B_k) = A B`` in exact
arithmetic (padding contributes zero products); ``inverse=True`` applies ``Rᵀ`` and undoes it
(then trim the padding). Quantize after rotating: the rotation spreads an outlier over n elements.

Computed in fp32 (a matmul; no kernel twin, the bit pattern follows torch's GEMM), returned in the
input's dtype. Signs come from torch's RNG (:func:`random_signs`): a layer draws once per backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import check_float

RHT_SIZES = (16, 32)


def check_rht_size(n) -> None:
    if isinstance(n, bool) or n not in RHT_SIZES:
        raise ValueError(f"rht size={n!r}: expected one of {RHT_SIZES}")


def hadamard_matrix(n: int, *, device=None, dtype=torch.float32) -> Tensor:
    """Orthonormal Sylvester Hadamard matrix of size ``n`` (a power of two)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n & (n - 1):
        raise ValueError(f"hadamard size={n!r}: expected a power of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(device=device, dtype=dtype)


def random_signs(n: int, *, device=None, generator: torch.Generator | None = None) -> Tensor:
    """``n`` independent ±1 (fp32) from ``generator`` (None: torch's global RNG)."""
    check_rht_size(n)
    if generator is None:
        bits = torch.randint(0, 2, (n,), device=device)
    else:
        bits = torch.randint(0, 2, (n,), device=device, generator=generator)
    return (2 * bits - 1).float()


def block_rht(x: Tensor, signs: Tensor, dim: int, *, inverse: bool = False) -> Tensor:
    """Rotate ``x`` blockwise along ``dim`` by ``R = H·diag(signs)`` (``Rᵀ`` with ``inverse``)."""
    check_float(x, "block_rht")
    n = signs.numel()
    check_rht_size(n)
    d = dim % x.dim()
    xt = x.float().movedim(d, -1)
    pad = -xt.shape[-1] % n
    if pad:
        xt = F.pad(xt, (0, pad))
    h = hadamard_matrix(n, device=x.device)
    s = signs.to(device=x.device, dtype=torch.float32)
    r = s[:, None] * h if inverse else h * s[None, :]  # Rᵀ = diag(s)·H (H symmetric)
    blocks = xt.reshape(*xt.shape[:-1], -1, n)
    y = torch.matmul(blocks, r).reshape(xt.shape)
    return y.movedim(-1, d).to(x.dtype)
