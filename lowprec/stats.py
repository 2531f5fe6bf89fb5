"""Statistics of a gradient estimate: pure functions (docs/algorithms.md#statistics-of-an-estimate).

``compare`` is cheap (one estimate) and runs inside training at a cadence; ``estimator_stats``
draws K estimates of the same δ and measures bias and variance, beside the closed form when the
estimator has one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .estimators import LUQ
from .luq import luq_scale


def compare(delta: Tensor, delta_hat: Tensor) -> dict[str, float]:
    """Relative error ‖δ̂-δ‖²/‖δ‖², cosine, zero fraction of δ̂, non-zero fraction of δ."""
    d = delta.detach().double().reshape(-1)
    h = delta_hat.detach().double().reshape(-1)
    nd, nh = d.norm(), h.norm()
    n = max(d.numel(), 1)
    return {
        "rel_error": float((h - d).square().sum() / nd.square()) if nd > 0 else float("nan"),
        "cosine": float(torch.dot(d, h) / (nd * nh)) if nd > 0 and nh > 0 else float("nan"),
        "zero_frac": float((h == 0).sum()) / n,
        "nnz_in": float((d != 0).sum()) / n,
    }


def estimator_stats(delta: Tensor, est, *, ks=(1, 16, 256), generator: torch.Generator | None = None) -> dict:
    """Bias and variance statistics (docs/algorithms.md#statistics-of-an-estimate) of ``est`` on
    ``delta`` from ``max(ks)`` independent draws.

    ``bias@K`` = ‖mean of the first K draws - δ‖/‖δ‖ (falls like 1/√K for an unbiased estimator;
    stays for a biased one), with ``bias_floor@K`` = sqrt(measured total variance / K)/‖δ‖, the value
    an unbiased estimator with this variance would show. ``rel_var`` = measured Σ Var/‖δ‖²,
    ``rel_var_theory`` the closed form where one exists.
    """
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks={ks}: expected positive sample counts")
    d = delta.detach().double()
    norm = float(d.norm())
    if norm == 0:
        raise ValueError("estimator_stats: δ is all zeros; relative statistics are undefined")
    out: dict = {"name": getattr(est, "name", type(est).__name__), "numel": delta.numel(),
                 "unbiased": bool(getattr(est, "unbiased", False))}
    total = torch.zeros_like(d)
    sq = torch.zeros_like(d)
    first = None
    for k in range(1, ks[-1] + 1):
        h = est(delta, generator=generator).double()
        if first is None:
            first = h
        total += h
        sq += h * h
        if k in ks:
            out[f"bias@{k}"] = float((total / k - d).norm()) / norm
    kmax = ks[-1]
    mean = total / kmax
    var = ((sq - kmax * mean * mean) / max(kmax - 1, 1)).clamp_min(0).sum()
    out.update(compare(delta, first))
    out["rel_var"] = float(var) / norm**2
    for k in ks:
        out[f"bias_floor@{k}"] = math.sqrt(float(var) / k) / norm
    theory = est.expected_variance(delta) if hasattr(est, "expected_variance") else None
    out["rel_var_theory"] = None if theory is None else float(theory) / norm**2
    if isinstance(est, LUQ):
        m, alpha = luq_scale(delta, est.bits, levels=est.levels)
        a = delta.detach().abs()
        nz = (a > 0).sum().clamp_min(1)
        out.update(max_abs=float(m), alpha=float(alpha), underflow_frac=float(((a > 0) & (a < alpha)).sum() / nz))
    return out
