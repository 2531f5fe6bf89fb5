"""N:M structured sparsity of neural gradients (Chmiel et al., ICLR 2023, "minimum variance unbiased").

Blocks of ``M`` consecutive elements along ``dim`` keep at most ``N`` non-zeros. A length that is
not a multiple of M is padded with zeros (a zero is never chosen) and the padding dropped.

``method="mse"`` keeps the N largest ``|x|`` unchanged (ties: lower index first). Minimum squared
error for a fixed support, but biased: the dropped entries are lost. It fails on gradients.

``method="mvue"`` is the unbiased minimum-variance estimator for any N:M. Inclusion probabilities
minimise ``Σ x_i²/p_i - ‖x‖²`` under ``Σ p_i = N, 0 ≤ p_i ≤ 1``: capped proportional
``p_i = min(1, c|x_i|)`` (water-filling). Kept entries become ``x_i/p_i`` (Horvitz-Thompson), so
``E = x`` and the block variance is ``Σ x_i²/p_i - ‖x‖²`` whatever the joint draw. The draw is
systematic sampling: lay the ``p_i`` end to end on ``[0, N)``, draw one ``u ~ U[0,1)``, keep the
indices whose intervals contain ``u, u+1, …, u+N-1`` (distinct because every ``p_i ≤ 1``).
- 1:2: keep ``sign(a)·(|a|+|b|)`` with probability ``|a|/(|a|+|b|)``; variance ``2|a||b|``.
- 2:4 with ``max|x_i| ≤ S/2``: ``p_i = 2|x_i|/S``, kept entries ``sign·S/2``; variance ``S²/2-‖x‖²``.
- 2:4 with one ``|x_k| > S/2``: ``x_k`` kept unchanged, plus one of the rest as a 1:3 MVUE.
A block with at most N non-zeros is kept unchanged.

``method="mvue_approx"`` (N ≤ 2): draw N indices one after another without replacement,
probability proportional to ``|x|``, and rescale each kept entry by its exact inclusion probability
``p_i = t_i + |x_i| Σ_{j≠i} t_j/(S - |x_j|)``, ``t_i = |x_i|/S`` (``S - |x_j|`` summed from the other
entries, never subtracted). Unbiased; variance slightly above
the exact MVUE. The name follows the paper's Table 4, whose own definition was not published.

Sums inside a block are written as explicit left-to-right loops over the M columns so that a Triton
kernel doing the same additions reproduces the reference bit for bit given the same uniforms.

Range. Blocks are computed in the working precision (fp32; fp64 for fp64 inputs). Before the
probabilities, each block is multiplied by ``2^-E``, ``E = floor(log2 max_i |x_i|)`` clamped to the
normal exponents (±126 in fp32): an exact power-of-two rescaling that changes no probability
(every result is bit-identical to the unscaled computation whenever that one stays in range) but
keeps block sums of values near the dtype's maximum finite and blocks of subnormals at full
precision. The water-filling scale ``budget/free`` divides by ``max(free, N·tiny)``, so it cannot
overflow; the shares then sum to at most the budget, so at most N entries are ever capped.

Systematic sampling counts the points ``u + k`` below a cumulative sum ``c = I + F`` (integer part,
fraction in [0, 1) accumulated separately) as ``I + [u < F]``: exact comparisons, no ``ceil(c - u)``
whose fp32 rounding dropped a point for ``u`` near 1. Capped entries (``p = 1``) are kept outright
and the points ``u, …, u + N' - 1`` (``N'`` = N minus the capped count) are laid over the other
entries; the last entry with ``0 < p < 1`` closes the interval at exactly ``N'``, absorbing the
rounding of ``Σp``. So a block with more than N non-zeros keeps exactly N for every ``u`` in
[0, 1), unless rounding left that last entry's computed share of ``[0, N')`` above 1, which needs
its ``p`` within a few ulps of 1 and ``u`` within a few ulps of a boundary.

Output range: a kept value ``x_i/p_i`` can exceed the dtype's largest finite value only when the
block's ``Σ|x|/N`` does, i.e. when no unbiased N:M estimate of the block is representable in that
dtype (fp16 1:2 of ``[40000, 40000]``); such values are clamped to ``±max`` (biased for that
block, never ``inf``). ``mvue_approx`` keeps an entry whose inclusion probability underflowed to 0
(ratio to the block max below ``2^-146``) as 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (check_float, check_nonfinite_mode, exact_pow2, floor_log2_normal, nonfinite_guard,
                      tiny_exponent, uniforms, work_dtype)

METHODS = ("mvue", "mvue_approx", "mse")


def check_nm(n, m, method: str = "mvue") -> None:
    for k, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{k}={v!r}: N and M must be positive integers")
    if n > m:
        raise ValueError(f"N:M = {n}:{m}: N must not exceed M (at most N non-zeros per block of M)")
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    if method == "mvue_approx" and n > 2:
        raise ValueError(f"method='mvue_approx' is defined for N <= 2, got N={n} (use method='mvue')")


def to_blocks(x: Tensor, m: int, dim: int) -> tuple[Tensor, int]:
    """x (working precision) moved so ``dim`` is last, zero-padded to a multiple of m, as ``[..., nblocks, m]``."""
    xt = x.detach().to(work_dtype(x.dtype)).movedim(dim, -1)
    length = xt.shape[-1]
    pad = (-length) % m
    if pad:
        xt = F.pad(xt, (0, pad))
    return xt.reshape(*xt.shape[:-1], -1, m), length


def from_blocks(blocks: Tensor, x: Tensor, length: int, dim: int) -> Tensor:
    out = blocks.reshape(*blocks.shape[:-2], -1)[..., :length]
    return out.movedim(-1, dim).to(x.dtype)


def nm_noise_shape(shape, n: int, m: int, method: str = "mvue", dim: int = -1) -> tuple[int, ...]:
    """Shape of the uniforms :func:`nm_prune` consumes: one per block (mvue), N per block (approx)."""
    shape = list(shape)
    dim = dim % len(shape)
    length = shape.pop(dim)
    nblocks = -(-length // m)
    k = {"mvue": 1, "mvue_approx": n, "mse": 0}[method]
    return (*shape, nblocks, k)


def _colsum(cols) -> Tensor:
    s = cols[0]
    for c in cols[1:]:
        s = s + c
    return s


def block_normalize(a: Tensor) -> Tensor:
    """Blocks ``a = |x|`` ``[..., M]`` times ``2^-E``, ``E = floor(log2 max)`` clamped to the normal
    exponents of ``a.dtype``: exact, and the largest entry lands in [1, 2) (see module docstring)."""
    return torch.stack(_normalize_cols(a.unbind(-1)), dim=-1)


def _normalize_cols(cols) -> list[Tensor]:
    bmax = cols[0]
    for c in cols[1:]:
        bmax = torch.maximum(bmax, c)
    emin = tiny_exponent(bmax.dtype)
    e = torch.clamp(floor_log2_normal(torch.clamp(bmax, min=torch.finfo(bmax.dtype).tiny)), emin, -emin)
    scale = exact_pow2(-e, bmax.dtype)
    return [c * scale for c in cols]


def mvue_probs(a: Tensor, n: int) -> Tensor:
    """Capped-proportional inclusion probabilities for blocks ``a = |x|`` of shape ``[..., M]``
    (pass them through :func:`block_normalize` first: the probabilities are the same, the range safe).

    Water-filling: cap at 1 every entry whose proportional share reaches 1, give the remaining
    budget proportionally to the rest; at most N-1 entries can be capped, so N rounds suffice.
    Only meaningful for blocks with more than N non-zeros (others are kept unchanged).
    """
    return torch.stack(_probs_cols(a.unbind(-1), n), dim=-1)


# The block functions below take and return lists of M column tensors (one entry of every block
# each): nm_core hands them contiguous columns, so every operation is a contiguous pass.


def _probs_cols(cols, n: int) -> list[Tensor]:
    capped = [torch.zeros_like(c, dtype=torch.bool) for c in cols]
    floor = n * torch.finfo(cols[0].dtype).tiny
    for _ in range(n + 1):
        free = _colsum([torch.where(k, torch.zeros_like(c), c) for c, k in zip(cols, capped)])
        budget = n - _colsum([k.to(c.dtype) for k, c in zip(capped, cols)])
        c_scale = budget / torch.clamp(free, min=floor)
        shares = [c * c_scale for c in cols]
        capped = [k | (s >= 1.0) for k, s in zip(capped, shares)]
    return [torch.where(k, torch.ones_like(s), torch.clamp(s, max=1.0)) for k, s in zip(capped, shares)]


def _systematic(p_cols, u: Tensor, n: int) -> list[Tensor]:
    """Keep masks from systematic sampling of the probabilities ``p_cols`` with one uniform ``u`` per
    block (capped entries kept, the rest counted as ``I + [u < F]``; see the module docstring)."""
    cols = p_cols
    dtype = cols[0].dtype
    capped = [pj >= 1.0 for pj in cols]
    open_ = [(pj > 0) & ~c for pj, c in zip(cols, capped)]  # entries the points can land on
    n_open = n - _colsum([c.to(dtype) for c in capped])
    # closes[j]: an open entry at or before j and none after it, so the count at j's upper end is
    # n_open exactly (no open entry at all: every share underflowed, nothing but the capped is kept)
    closes, seen = [None] * len(cols), torch.zeros_like(u, dtype=torch.bool)
    for j in range(len(cols) - 1, -1, -1):
        closes[j] = ~seen
        seen = seen | open_[j]
    opened = torch.zeros_like(seen)
    for j in range(len(cols)):
        opened = opened | open_[j]
        closes[j] = closes[j] & opened
    whole, frac, below_lo = (torch.zeros_like(cols[0]) for _ in range(3))
    keep = []
    for j, pj in enumerate(cols):
        t = frac + torch.where(capped[j], torch.zeros_like(pj), pj)
        carry = torch.floor(t)
        whole, frac = whole + carry, t - carry
        below_hi = torch.where(closes[j], n_open, torch.minimum(whole + (u < frac).to(dtype), n_open))
        keep.append(capped[j] | (below_hi > below_lo))
        below_lo = below_hi
    return keep


def _approx_draw(cols, u_cols, n: int) -> tuple[list[Tensor], list[Tensor]]:
    """Sequential draw of N indices ∝ |x| without replacement (one uniform column per draw):
    (keep masks, exact inclusion probabilities)."""
    cols = list(cols)
    S = _colsum(cols)
    keep = [torch.zeros_like(c, dtype=torch.bool) for c in cols]
    for r in range(n):
        w = [torch.where(k, torch.zeros_like(c), c) for c, k in zip(cols, keep)]
        target = u_cols[r] * _colsum(w)
        run = torch.zeros_like(S)
        chosen = torch.zeros_like(S, dtype=torch.bool)
        for j, wj in enumerate(w):
            run = run + wj
            hit = (~chosen) & (target < run) & (wj > 0)
            keep[j] = keep[j] | hit
            chosen = chosen | hit
    t = [c / S for c in cols]
    if n == 1:
        p = t
    else:
        # S - |x_j| summed directly, not subtracted: S - |x_j| cancels to 0 when the others are
        # below |x_j|·2^-24 (a gradient block [1, 1e-8, 1e-8, 0] would get p = inf)
        rest = [t[j] / _colsum([cols[k] for k in range(len(cols)) if k != j]) for j in range(len(cols))]
        p = [t[i] + cols[i] * _colsum([rest[j] for j in range(len(cols)) if j != i]) for i in range(len(cols))]
    return keep, p


def _mse_mask(a: Tensor, n: int) -> Tensor:
    """Top-N |x| per block; ties go to the lower index (deterministic, sort-free)."""
    cols = a.unbind(-1)
    keep = []
    for i, ai in enumerate(cols):
        rank = _colsum([((aj > ai) | ((aj == ai) & (j < i))).float() for j, aj in enumerate(cols) if j != i])
        keep.append(rank < n)
    return torch.stack(keep, dim=-1)


def nm_prune(
    x: Tensor,
    n: int,
    m: int,
    *,
    method: str = "mvue",
    dim: int = -1,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    nonfinite: str = "raise",
) -> Tensor:
    """N:M-sparsify ``x`` along ``dim`` (see module docstring); same shape and dtype out.

    ``noise``: fp32 uniforms of shape :func:`nm_noise_shape` used instead of drawing them.
    """
    check_float(x, "nm_prune")
    check_nm(n, m, method)
    check_nonfinite_mode(nonfinite)
    if x.dim() == 0:
        raise ValueError("nm_prune: a 0-d tensor has no dimension to form blocks along")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"nm_prune: dim={dim} out of range for a {x.dim()}-d tensor")
    if x.numel() == 0 or n == m:
        return x.clone()
    blocks, length = to_blocks(x, m, dim)
    a = blocks.abs()
    if nonfinite_guard(x, a.amax(), nonfinite, "nm_prune"):
        return torch.zeros_like(x)
    if method == "mse":
        return from_blocks(torch.where(_mse_mask(a, n), blocks, torch.zeros_like(blocks)), x, length, dim)

    k = 1 if method == "mvue" else n
    u = uniforms((*blocks.shape[:-1], k), x.device, generator, noise, "nm_prune")
    return from_blocks(nm_core(blocks, u, n, method, torch.finfo(x.dtype).max), x, length, dim)


def nm_core(blocks: Tensor, u: Tensor, n: int, method: str, big: float) -> Tensor:
    """The unbiased methods on finite blocks ``[..., M]`` (working precision) with uniforms
    ``[..., K]``: the pruned blocks, kept values clamped to ``±big`` (the output dtype's largest
    finite value). Tensor operations only (no host reads), so it can be compiled as one graph."""
    xs = list(blocks.movedim(-1, 0).contiguous().unbind(0))  # M contiguous columns
    a = [c.abs() for c in xs]
    a_s = _normalize_cols(a)
    if method == "mvue":
        p = _probs_cols(a_s, n)
        keep = _systematic(p, u[..., 0], n)
    else:
        keep, p = _approx_draw(a_s, list(u.movedim(-1, 0).contiguous().unbind(0)), n)
        keep = [k & (pj > 0) for k, pj in zip(keep, p)]
    sparse_enough = _colsum([(c > 0).to(torch.int32) for c in a]) <= n
    out = []
    for xj, kj, pj in zip(xs, keep, p):
        q = torch.where(kj, xj / torch.where(kj, pj, torch.ones_like(pj)), torch.zeros_like(xj))
        out.append(torch.where(sparse_enough, xj, torch.clamp(q, -big, big)))
    return torch.stack(out, dim=-1)


def nm_variance(x: Tensor, n: int, m: int, *, method: str = "mvue", dim: int = -1) -> Tensor | None:
    """Closed-form total variance ``Σ x_i²(1/p_i - 1)`` of the unbiased methods (fp64 0-d); None for mse."""
    check_nm(n, m, method)
    if method == "mse":
        return None
    if x.numel() == 0 or n == m:
        return torch.zeros((), dtype=torch.float64, device=x.device)
    blocks, _ = to_blocks(x, m, dim)
    a = blocks.abs()
    a_s = block_normalize(a)
    if method == "mvue":
        p = mvue_probs(a_s, n)
    else:
        cols = a_s.unbind(-1)
        p = torch.stack(_approx_draw(cols, [torch.zeros_like(cols[0])] * n, n)[1], dim=-1)
    a, p = a.double(), p.double()
    var = torch.where(a > 0, a * a * (1 / torch.where(p > 0, p, torch.ones_like(p)) - 1), torch.zeros_like(a))
    var = torch.where((a > 0).sum(-1, keepdim=True) <= n, torch.zeros_like(var), var)
    return var.sum()

