"""The noise-to-signal ratio of a layer's weight gradient (spec/formats.md, "The noise criterion").

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
"""

from __future__ import annotations

import math

import torch

__all__ = ["noise_terms", "ratio", "layer_ratios", "global_ratios", "TAU"]

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
