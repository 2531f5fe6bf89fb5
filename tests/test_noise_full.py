"""The paper's whole-model ratio (lowprec.noise.full_terms, full_ratio, ratio_se) on linear
regression over a fixed dataset, where the full gradient and the per-example gradient covariance
are known exactly: the half-batch inner product is unbiased for ‖∇L‖² up to the documented
finite-population term, its variance is the documented formula, the two-pass noise term is
unbiased for tr Var, and r_full lands within its delta-method standard error of the true ratio,
which matches the spread of r_full over independent windows. Fast: vectorised over repetitions."""

from __future__ import annotations

import math

import pytest
import torch

from lowprec.noise import full_ratio, full_terms, ratio_se

N, P, H = 4000, 20, 32  # examples, parameters, half-batch size


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, P, generator=g, dtype=torch.float64)
    w_star = torch.randn(P, generator=g, dtype=torch.float64)
    y = X @ w_star + 0.5 * torch.randn(N, generator=g, dtype=torch.float64)
    w = w_star + 0.3 * torch.randn(P, generator=g, dtype=torch.float64)  # away from the optimum
    G = X * (X @ w - y)[:, None]  # per-example gradients of ½(xᵀw − y)²
    mu = G.mean(0)  # the full gradient
    S = (G - mu).T @ (G - mu) / N  # per-example covariance, population divisor
    return G, mu, S


def _halves(G, reps, seed, replace=False):
    """(g_A, g_B) for `reps` batches of 2H examples: disjoint halves of a batch drawn without
    replacement (the training loop's sampling), or independent halves (replace=True)."""
    g = torch.Generator().manual_seed(seed)
    if replace:
        idx = torch.randint(0, N, (reps, 2 * H), generator=g)
    else:
        idx = torch.stack([torch.randperm(N, generator=g)[: 2 * H] for _ in range(reps)])
    return G[idx[:, :H]].mean(1), G[idx[:, H:]].mean(1)


def test_half_batch_inner_product_is_unbiased_for_the_full_gradient_norm(problem):
    """Guards the signal estimate: mean ⟨g_A, g_B⟩ over 4000 batches is within 4 s.e. of
    ‖∇L‖² − tr(Σ₁)/(n − 1) (the finite-population term, docstring). One half's own ‖g_A‖² (the
    minibatch-noise-inflated quantity, a plausible wrong estimator) is many s.e. above it."""
    G, mu, S = problem
    a, b = _halves(G, 4000, seed=1)
    s = torch.tensor([full_terms(a[i], b[i], a[i], a[i])["signal2"] for i in range(len(a))])
    want = float(mu @ mu) - float(torch.trace(S)) / (N - 1)
    se = float(s.std()) / math.sqrt(len(s))
    assert abs(float(s.mean()) - want) < 4 * se
    own = (a * a).sum(1)
    assert float(own.mean()) - want > 20 * se  # ≈ tr(Σ₁)/H: the noise ⟨g_A, g_B⟩ removes


def test_half_batch_inner_product_variance_is_the_documented_formula(problem):
    """Var⟨g_A, g_B⟩ = tr(Σ_A Σ_B) + ∇Lᵀ(Σ_A + Σ_B)∇L with Σ_A = Σ_B = Σ₁/H for independent
    halves: the empirical variance over 20000 batches within 10%."""
    G, mu, S = problem
    a, b = _halves(G, 20000, seed=2, replace=True)
    s = (a * b).sum(1)
    Sa = S / H
    want = float(torch.trace(Sa @ Sa)) + 2 * float(mu @ Sa @ mu)
    assert float(s.var()) == pytest.approx(want, rel=0.1)


def _quantize(g, sigma, gen):
    """A stand-in quantized backward pass: ĝ = g + σ·ε (unbiased, tr Var = σ²·d)."""
    return g + sigma * torch.randn(g.shape, generator=gen, dtype=g.dtype)


def test_two_pass_noise_term_is_unbiased_for_the_total_quantization_variance():
    """Guards the noise estimate (and its ½): mean ‖ĝ₁ − ĝ₂‖²/2 over 2000 pairs within 4 s.e. of
    tr Var = Σ Δ²f(1 − f) for stochastic rounding to a grid of step Δ (f the fractional part)."""
    gen = torch.Generator().manual_seed(3)
    g = [torch.randn(50, generator=gen, dtype=torch.float64), torch.randn(7, 3, generator=gen,
                                                                          dtype=torch.float64)]
    delta = 0.25

    def sr(t):
        lo = torch.floor(t / delta)
        return delta * (lo + (torch.rand(t.shape, generator=gen, dtype=t.dtype) < t / delta - lo))

    f = [t / delta - torch.floor(t / delta) for t in g]
    want = sum(float((delta ** 2 * x * (1 - x)).sum()) for x in f)
    q = torch.tensor([full_terms(g, g, [sr(t) for t in g], [sr(t) for t in g])["noise2"]
                      for _ in range(2000)])
    assert abs(float(q.mean()) - want) < 4 * float(q.std()) / math.sqrt(len(q))


def test_r_full_within_its_standard_error_of_the_true_ratio(problem):
    """Windows of measurements (new batch each, two halves, two independent quantized passes of
    the batch gradient): r_full from a 2000-measurement window is within 4 ratio_se of the true
    √((‖∇L‖² − tr Σ₁/(n − 1)) / (σ²d)); and ratio_se of 50-measurement windows matches the spread
    of r_full over 200 such windows (within 25%)."""
    G, mu, S = problem
    sigma = 0.4
    true = math.sqrt((float(mu @ mu) - float(torch.trace(S)) / (N - 1)) / (sigma ** 2 * P))
    gen = torch.Generator().manual_seed(4)
    a, b = _halves(G, 12000, seed=5)
    batch = (a + b) / 2
    terms = [full_terms(a[i], b[i], _quantize(batch[i], sigma, gen), _quantize(batch[i], sigma, gen))
             for i in range(len(a))]
    big = terms[:2000]
    assert abs(full_ratio(big) - true) < 4 * ratio_se(big)
    windows = [terms[2000 + 50 * k: 2000 + 50 * (k + 1)] for k in range(200)]
    rs = torch.tensor([full_ratio(w) for w in windows])
    ses = torch.tensor([ratio_se(w) for w in windows])
    assert float(ses.mean()) == pytest.approx(float(rs.std()), rel=0.25)
    assert 0.5 < true < 5  # the problem sits near the √3 threshold, where the ratio matters


def test_full_terms_refuses_mismatched_gradients():
    with pytest.raises(ValueError, match="different sizes"):
        full_terms(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(4))
    assert math.isnan(ratio_se([{"signal2": 1.0, "noise2": 1.0}]))
