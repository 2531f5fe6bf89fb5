"""N:M weight masks (docs/algorithms.md#weight-nm-masks): which weights the forward and backward GEMMs keep.

Plain mask: in every block of M consecutive entries of `W.reshape(out, -1)` (linear:
`in_features`; conv: C_in/groups·kh·kw in PyTorch's weight layout) keep the N of largest |w|.

Transposable mask: W and Wᵀ both N:M, so the backward GEMM (Wᵀ δ) is N:M-sparse too. Per M×M tile
T of |W| (zero-padded to whole tiles) pick the 0/1 pattern P with N ones in every row and every
column that maximises Σ P ⊙ T. The search is exact: every such pattern is scored (90 for 2:4),
which is why M <= 4 (for M = 8 there are ~10^8 patterns per tile).

A reference-level module: imports torch only.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F

__all__ = ["nm_weight_mask", "check_weight_nm", "format_weight_nm"]


@functools.lru_cache(maxsize=None)
def _transposable_patterns(n: int, m: int) -> torch.Tensor:
    """Every m×m 0/1 matrix with exactly n ones in each row and each column, as [count, m*m]."""
    rows = [r for r in itertools.product((0, 1), repeat=m) if sum(r) == n]
    pats = [p for p in itertools.product(rows, repeat=m) if all(sum(col) == n for col in zip(*p))]
    return torch.tensor(pats, dtype=torch.float32).reshape(len(pats), m * m)


def nm_weight_mask(weight: torch.Tensor, n: int, m: int, transposable: bool = False) -> torch.Tensor:
    """Bool mask, same shape as `weight`: the `n` largest |w| of every block of `m` consecutive
    entries of `weight.reshape(out, -1)` (the input-feature / C_in·kh·kw dimension). A tail shorter
    than `m` is padded with entries that are never preferred to a real one and then dropped.

    transposable: N:M along both dimensions of `weight.reshape(out, -1)`, so that W (forward GEMM)
    and Wᵀ (backward GEMM) are both N:M (docs/algorithms.md#weight-nm-masks). Per m×m tile, the pattern with n ones per row
    and per column that keeps the most |w| (exact: all patterns are scored; 90 for 2:4)."""
    if transposable:
        return _transposable_mask(weight, n, m)
    w = weight.detach().reshape(weight.shape[0], -1).abs()
    k = w.shape[1]
    pad = (-k) % m
    if pad:
        w = F.pad(w, (0, pad), value=-1.0)
    blocks = w.reshape(w.shape[0], -1, m)
    idx = blocks.topk(n, dim=-1).indices
    mask = torch.zeros(blocks.shape, dtype=torch.bool, device=w.device).scatter_(-1, idx, True)
    return mask.reshape(w.shape[0], -1)[:, :k].reshape(weight.shape)


def _transposable_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    w = weight.detach().reshape(weight.shape[0], -1).abs().float()
    rows, cols = w.shape
    w = F.pad(w, (0, (-cols) % m, 0, (-rows) % m))  # padding is dropped below
    R, C = w.shape[0] // m, w.shape[1] // m
    tiles = w.reshape(R, m, C, m).permute(0, 2, 1, 3).reshape(R, C, m * m)
    pats = _transposable_patterns(n, m).to(w.device)
    best = (tiles @ pats.t()).argmax(-1)
    mask = pats[best].reshape(R, C, m, m).permute(0, 2, 1, 3).reshape(R * m, C * m)
    return mask[:rows, :cols].bool().reshape(weight.shape)


def check_weight_nm(weight_nm, transposable: bool = False) -> tuple[int, int, bool] | None:
    """(N, M, transposable) from None, (N, M) or (N, M, transposable); ValueError otherwise."""
    if weight_nm is None:
        return None
    try:
        vals = tuple(weight_nm)
        n, m = int(vals[0]), int(vals[1])
        if len(vals) == 3:
            transposable = bool(vals[2])
        elif len(vals) != 2:
            raise ValueError
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"weight_nm must be None or a pair (N, M), got {weight_nm!r}") from None
    if not (0 < n <= m):
        raise ValueError(f"weight_nm=(N, M) needs 0 < N <= M, got {weight_nm!r}")
    if transposable and m > 4:
        raise ValueError(f"transposable weight masks enumerate every M×M pattern and support M <= 4, "
                         f"got weight_nm={n}:{m}; set weight_nm_transposable=false")
    return n, m, bool(transposable)


def format_weight_nm(nm: tuple[int, int, bool] | None) -> str:
    """'none', '2:4' or '2:4 transposable' (for reprs and reports)."""
    return "none" if nm is None else f"{nm[0]}:{nm[1]}" + (" transposable" if nm[2] else "")
