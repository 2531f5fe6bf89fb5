"""The noise-to-signal ratio of a layer's weight gradient (docs/noise.md).

FP4 All the Way (arXiv 2505.19115): training with stochastically rounded gradients stops making
progress once ‖∇L‖ falls below about √3 times the quantization noise. Per converted layer we
measure, for the weight gradient of one step,

    r = ‖g‖ / ‖ĝ − g‖,

g = δ aᵀ the update GEMM with the exact δ that reaches the layer, ĝ the estimated one the step
applied (the SMP mean when the recipe averages draws). Two estimators:

(a) exact: one extra high-precision update GEMM gives g; r from ‖g‖² and ‖ĝ − g‖².
(b) two-draw (what hardware without an exact δ can do): ĝ₁ = the applied ĝ and ĝ₂ an independent
    draw of the same estimator (same SMP count, same estimator state), then

        E ‖ĝ₁ − ĝ₂‖² / 2 = tr Var ĝ          (noise²),
        E ⟨ĝ₁, ĝ₂⟩        = ‖E ĝ‖²           (signal²),

    both exact identities for independent identically distributed draws. For an unbiased
    estimator (E ĝ = g) they are unbiased estimates of ‖g‖² and E‖ĝ − g‖². For a biased one
    (E ĝ = g + b) the noise term sees only the variance, not ‖b‖², and the signal term is
    ‖g + b‖²: the bias counts as signal, so r₂ overestimates the r that matters (the error ĝ − g
    includes b) and a controller reading r₂ acts later than it should. ⟨ĝ₁, ĝ₂⟩ can be negative
    when the noise dominates; r₂ is then 0.

Whole model: the sums over all converted layers of the signal² and noise² terms, then one ratio
(a layer whose update GEMM is exact adds signal and no noise).

What "exact" leaves out: δ itself, as it reaches the layer, already carries the noise that the
estimated backward GEMMs of the layers above put into it (route `both`/`backward`); that part
would need a second, exact backward pass. Both estimators measure the layer's own update
estimate given that δ.

The paper's ratio, whole model (`full_terms`, `full_ratio`). FP4 All the Way's criterion is

    r_full = ‖∇L‖ / (σ_q·√d),   stall when r_full < √3,

∇L the full-data gradient (not a minibatch's), σ_q²·d = tr Var(ĝ | batch) the total
quantization noise of the whole model's gradient over its d parameters, including the noise δ
carries into every earlier layer. Two estimates per measurement, over one list of parameter
gradients (every trainable parameter, the same list for all four):

(c) signal², ‖∇L‖²: S = ⟨g_A, g_B⟩, g_A and g_B the gradients of two disjoint halves of the
    batch. With independent sampling E[g_A] = E[g_B] = ∇L and g_A ⊥ g_B, so E S = ‖∇L‖²: the
    minibatch's own noise cancels (‖g‖² of one batch would add tr Var(g) to it). Its variance is
    exactly Var S = tr(Σ_A Σ_B) + ∇Lᵀ(Σ_A + Σ_B)∇L (Σ_A, Σ_B the halves' covariances, no
    distribution assumed): with a small batch and a small ‖∇L‖ it is large, hence the window.
    Halves drawn without replacement from a finite set of n examples are slightly negatively
    correlated: E S = ‖∇L‖² − tr(Σ₁)/(n − 1), Σ₁ the per-example gradient covariance (population
    divisor n); negligible when n ≫ 1 (Shakespeare: n ≈ 4.5 M windows). Exact (fp32) halves give
    the lowest variance; quantized halves with independent draws are also unbiased for an
    unbiased estimator (their quantization noise is independent and mean zero) at a larger
    variance, and biased for a biased one.
(d) noise², σ_q²·d: Q = ‖ĝ₁ − ĝ₂‖²/2, ĝ₁, ĝ₂ two quantized backward passes of the whole model on
    the same batch with independent draws (the step's own ĝ can be ĝ₁). E Q = tr Var(ĝ | batch)
    exactly, for any estimator; a biased estimator's ‖bias‖² is not in it (as for r₂). Var Q =
    2·tr(Σ_q²) for Gaussian noise (plus a fourth-cumulant term otherwise): relative error about
    √(2/d_eff), tiny for a whole model.
r_full = √(ΣS / ΣQ) over a window of W measurements (ratio of sums: each sum is unbiased, the
ratio consistent; its bias is O(1/W) from the curvature of √ and the ratio, delta method).
`ratio_se` gives the delta-method standard error from the window's spread. Cost per
measurement: two half-batch backward passes (one batch's worth, exact) and one more quantized
backward pass (if ĝ₁ is the step's), forward reused; no extra optimizer step.
"""

from __future__ import annotations

import math

import torch

__all__ = ["noise_terms", "ratio", "layer_ratios", "global_ratios", "TAU", "full_terms",
           "full_ratio", "ratio_se"]

TAU = math.sqrt(3.0)  # the published threshold on r


def noise_terms(g: torch.Tensor, g_hat: torch.Tensor, g_hat2: torch.Tensor) -> dict[str, float]:
    """{"signal2": ‖g‖², "err2": ‖ĝ − g‖², "dot": ⟨ĝ₁, ĝ₂⟩, "diff2": ‖ĝ₁ − ĝ₂‖²} in float64
    (g exact, ĝ = ĝ₁ the applied estimate, ĝ₂ an independent draw)."""
    g, g1, g2 = (t.detach().double().reshape(-1) for t in (g, g_hat, g_hat2))
    return {"signal2": float(g.dot(g)), "err2": float((g1 - g).square().sum()),
            "dot": float(g1.dot(g2)), "diff2": float((g1 - g2).square().sum())}


def ratio(signal2: float, noise2: float) -> float:
    """sqrt(max(signal², 0) / noise²); inf when there is no noise (an exact gradient)."""
    if noise2 <= 0:
        return math.inf
    return math.sqrt(max(signal2, 0.0) / noise2)


def layer_ratios(t: dict[str, float]) -> dict[str, float]:
    """{"r": exact ratio, "r2": two-draw ratio} from one layer's `noise_terms`."""
    return {"r": ratio(t["signal2"], t["err2"]), "r2": ratio(t["dot"], t["diff2"] / 2)}


def global_ratios(terms: dict[str, dict[str, float]]) -> dict[str, float]:
    """The whole-model {"r", "r2"}: the terms summed over the layers, then one ratio."""
    s = {k: sum(t[k] for t in terms.values()) for k in ("signal2", "err2", "dot", "diff2")}
    return layer_ratios(s)


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.detach().double().reshape(-1) for t in ts])


def full_terms(g_a, g_b, g_hat1, g_hat2) -> dict[str, float]:
    """One measurement of the paper's ratio (module docstring, (c) and (d)): {"signal2":
    ⟨g_A, g_B⟩, "noise2": ‖ĝ₁ − ĝ₂‖²/2} in float64. Each argument is a tensor or a list of
    tensors (the whole model's parameter gradients, the same parameters in the same order)."""
    a, b, h1, h2 = (_flat(x if isinstance(x, (list, tuple)) else [x]) for x in (g_a, g_b, g_hat1, g_hat2))
    if not (a.numel() == b.numel() == h1.numel() == h2.numel()):
        raise ValueError(f"full_terms: gradients of different sizes {a.numel()}, {b.numel()}, "
                         f"{h1.numel()}, {h2.numel()}")
    return {"signal2": float(a.dot(b)), "noise2": float((h1 - h2).square().sum() / 2)}


def full_ratio(window: list[dict[str, float]]) -> float:
    """r_full = √(Σ signal² / Σ noise²) over a window of `full_terms` (0 when Σ signal² ≤ 0;
    inf with no noise)."""
    return ratio(sum(t["signal2"] for t in window), sum(t["noise2"] for t in window))


def ratio_se(window: list[dict[str, float]]) -> float:
    """Delta-method standard error of `full_ratio` from the window's own spread: with means S̄, Q̄
    and their sample (co)variances over the W measurements, r = √(S̄/Q̄) and
    Var r ≈ r²/4 · (Var S̄/S̄² + Var Q̄/Q̄² − 2 Cov(S̄, Q̄)/(S̄ Q̄)); nan with W < 2 or S̄ ≤ 0."""
    w = len(window)
    if w < 2:
        return math.nan
    s = torch.tensor([t["signal2"] for t in window], dtype=torch.float64)
    q = torch.tensor([t["noise2"] for t in window], dtype=torch.float64)
    sm, qm = float(s.mean()), float(q.mean())
    if sm <= 0 or qm <= 0:
        return math.nan
    vs, vq = float(s.var()) / w, float(q.var()) / w
    c = float(((s - sm) * (q - qm)).sum()) / (w - 1) / w
    r = math.sqrt(sm / qm)
    return r / 2 * math.sqrt(max(vs / sm ** 2 + vq / qm ** 2 - 2 * c / (sm * qm), 0.0))
