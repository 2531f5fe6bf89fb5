"""Block random Hadamard transform (RHT) along a GEMM's reduction dimension.

``H_n``: the Sylvester Hadamard matrix of size n (16 or 32) divided by √n, so ``H_nᵀ H_n = I``.
``R = H_n · diag(s)`` with random signs ``s ∈ {±1}^n`` (one vector, shared by every block and by both
operands of the GEMM). :func:`block_rht` splits ``dim`` into blocks of n (the tail zero-padded: the
output is longer along ``dim`` when n does not divide it) and maps each block ``v`` (a row vector
along ``dim``) to ``v R``. For a GEMM ``A B`` with reduction dimension k (``A``'s last, ``B``'s
first): ``block_rht(A, s, -1) @ block_rht(B, s, 0) = Σ_blocks (A_k R)(Rᵀ B_k) = A B`` in exact
arithmetic (padding contributes zero products); ``inverse=True`` applies ``Rᵀ`` and undoes it
(then trim the padding). Quantize after rotating: the rotation spreads an outlier over n elements.

Computed in fp32 with the fast Walsh–Hadamard transform (FWHT), returned in the input's dtype:
``x`` is viewed without a copy as ``[outer, length, inner]`` around ``dim`` and each block of n
rows goes through log2(n) butterfly stages (h = 1, 2, 4, …: ``(a, b) -> (a + b, a - b)`` for
rows h apart), then the scaling by ``c = fp32(1/√n)``, then the signs (exact). ``inverse`` multiplies
by the signs first, then transforms and scales. n·log2(n) additions per block instead of the n²
multiply-adds of a dense matmul, and no transpose for a ``dim`` other than the last. These
operations in this order define the numbers: the C twin (:func:`lowprec.kernels.cpu.block_rht`)
repeats them bit for bit. Against the dense product ``blocks @ (H/√n)·diag(s)``
(:func:`block_rht_dense`) only the rounding differs: both are sums of the same n terms in another
order (and for n = 32 one rounding of c·Σ instead of n roundings of the products x·c), so each output
differs by at most ``2n·2^-24·c·Σ_j |x_j|`` (the forward error bound of the two summations,
``tests/test_hadamard_fwht.py``). Signs come from torch's RNG (:func:`random_signs`): a layer draws
once per backward.
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


def rht_dims(x: Tensor, dim: int) -> tuple[int, int, int]:
    """``x`` as ``[outer, length, inner]`` around ``dim`` (C order)."""
    d = dim % x.dim()
    outer = math.prod(x.shape[:d])
    return outer, x.shape[d], math.prod(x.shape[d + 1:])


def fwht_scale(n: int) -> float:
    """``c = 1/√n`` rounded to fp32 (exact for n = 16)."""
    return float(torch.tensor(1.0 / math.sqrt(n), dtype=torch.float32))


def block_rht(x: Tensor, signs: Tensor, dim: int, *, inverse: bool = False) -> Tensor:
    """Rotate ``x`` blockwise along ``dim`` by ``R = H·diag(signs)`` (``Rᵀ`` with ``inverse``), by the
    FWHT (module docstring). The output is contiguous, ``dim`` padded to a multiple of n."""
    check_float(x, "block_rht")
    n = signs.numel()
    check_rht_size(n)
    outer, length, inner = rht_dims(x, dim)
    pad = -length % n
    v = x.float().contiguous().view(outer, length, inner)
    if pad:
        v = torch.cat([v, v.new_zeros(outer, pad, inner)], 1)
    nb = (length + pad) // n
    s = signs.to(device=x.device, dtype=torch.float32).view(1, 1, n, 1)
    v = v.view(outer, nb, n, inner)
    if inverse:
        v = v * s
    bufs = torch.empty_like(v), torch.empty_like(v)  # ping-pong: x itself is never written
    h, k = 1, 0
    while h < n:  # stage h: rows i and i + h of every 2h-group -> (a + b, a - b)
        w = v.view(outer, nb, n // (2 * h), 2, h, inner)
        o = bufs[k].view(w.shape)
        torch.add(w[:, :, :, 0], w[:, :, :, 1], out=o[:, :, :, 0])
        torch.sub(w[:, :, :, 0], w[:, :, :, 1], out=o[:, :, :, 1])
        v, h, k = bufs[k], 2 * h, 1 - k
    v = v * fwht_scale(n)
    if not inverse:
        v = v * s
    d = dim % x.dim()
    return v.view(*x.shape[:d], length + pad, *x.shape[d + 1:]).to(x.dtype)


def block_rht_dense(x: Tensor, signs: Tensor, dim: int, *, inverse: bool = False) -> Tensor:
    """The same rotation as a dense matmul with ``(H/√n)·diag(s)`` (the definition; tests compare)."""
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
