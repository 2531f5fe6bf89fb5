"""The gradient-noise monitor (lowprec.noise, QLinear/QConv2d.arm_noise): the two-draw estimator
agrees with the exact one and both with LUQ's closed-form variance; arming changes nothing in
training; a biased estimator's bias is invisible to the two-draw estimator (as documented)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lowprec.convert import convert
from lowprec.estimators import LUQ
from lowprec.luq import luq_scale
from lowprec.noise import global_ratios, layer_ratios, noise_terms, ratio

from stat_utils import heavy_tailed


def _linear(grad, seed=0, i=12, o=6):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(i, o))
    convert(m, grad=grad, skip=None)
    return m, m[0]


def _step(m, x, delta, *, seed, arm=None):
    """One backward with the training draws seeded by `seed`; returns (weight grad, noise record)."""
    layer = m[0]
    if arm is not None:
        layer.arm_noise(torch.Generator().manual_seed(arm))
    m.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    m(x).backward(delta)
    return layer.weight.grad.clone(), layer.pop_noise()


def test_ratio_math():
    assert ratio(4.0, 1.0) == 2.0 and ratio(-1.0, 1.0) == 0.0 and ratio(1.0, 0.0) == math.inf
    g = torch.tensor([3.0, 4.0])
    t = noise_terms(g, g + torch.tensor([1.0, 0.0]), g - torch.tensor([1.0, 0.0]))
    assert t == {"signal2": 25.0, "err2": 1.0, "dot": 24.0, "diff2": 4.0}
    assert layer_ratios(t) == {"r": 5.0, "r2": math.sqrt(24.0 / 2.0)}
    # whole model: sums first, then one ratio
    t2 = {"signal2": 0.0, "err2": 3.0, "dot": 0.0, "diff2": 6.0}
    assert global_ratios({"a": t, "b": t2}) == {"r": 2.5, "r2": math.sqrt(24.0 / 5.0)}


def _luq_elem_variance(x, bits=4):
    """Per-element Var of LUQ (the terms of lowprec.luq.luq_variance): below α the stochastic
    underflow, |x|(α − |x|); above, SR between the powers of two lo ≤ |x| < 2lo, (|x| − lo)(2lo − |x|)."""
    _, alpha = luq_scale(x, bits)
    a, alpha = x.double().abs(), alpha.double()
    y = a / alpha
    lo = alpha * torch.pow(2.0, torch.floor(torch.log2(torch.clamp(y, min=1.0))))
    return torch.where(y < 1.0, a * (alpha - a), (a - lo) * (2 * lo - a))


def test_two_draw_agrees_with_exact_and_luq_closed_form():
    """Synthetic layer with known variance: LUQ-4 on a fixed δ, fixed a. E‖ĝ − g‖² =
    Σ_{t,i} Var(δ̂_ti)·‖a_t‖² (independent elements). Over N steps the exact noise² and the
    two-draw noise² (‖ĝ₁ − ĝ₂‖²/2) both match it, and ⟨ĝ₁, ĝ₂⟩ matches ‖g‖², within 4 standard
    errors of their means."""
    m, layer = _linear("luq4")
    tokens = 48
    x = torch.randn(tokens, 12, generator=torch.Generator().manual_seed(1))
    delta = heavy_tailed((tokens, 6), sigma=1.0, seed=2) + 0.5  # a mean part so that ‖g‖ is not tiny
    a = x  # fwd fp32: the update GEMM sees x itself
    closed = float((_luq_elem_variance(delta) * a.double().square().sum(1, keepdim=True)).sum())
    assert float(_luq_elem_variance(delta).sum()) == pytest.approx(float(LUQ(4).expected_variance(delta)))
    signal2 = float((delta.t() @ a).double().square().sum())
    recs = [_step(m, x, delta, seed=100 + k, arm=10_000 + k)[1] for k in range(300)]
    err2 = torch.tensor([r["err2"] for r in recs], dtype=torch.float64)
    half = torch.tensor([r["diff2"] / 2 for r in recs], dtype=torch.float64)
    dot = torch.tensor([r["dot"] for r in recs], dtype=torch.float64)
    sig = torch.tensor([r["signal2"] for r in recs], dtype=torch.float64)
    n = len(recs)
    assert torch.allclose(sig, torch.full_like(sig, signal2), rtol=1e-5)
    for name, v, target in (("exact noise²", err2, closed), ("two-draw noise²", half, closed),
                            ("two-draw signal²", dot, signal2)):
        se = float(v.std()) / math.sqrt(n)
        assert abs(float(v.mean()) - target) < 4 * se, (name, float(v.mean()), target, se)
    # the two estimators of the noise agree with each other (paired difference)
    diff = err2 - half
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(n)
    # and the ratios built from the means agree
    r_exact = layer_ratios({"signal2": signal2, "err2": float(err2.mean()), "dot": 0, "diff2": 1})["r"]
    r_two = layer_ratios({"signal2": 0, "err2": 1, "dot": float(dot.mean()), "diff2": float(2 * half.mean())})["r2"]
    # r = sqrt(signal²/noise²): its relative s.e. is half the quadrature sum of the relative s.e. of
    # the two means it is built from (the exact r's signal is exact; its noise mean has the same s.e.)
    rel = 0.5 * math.hypot(float(dot.std()) / math.sqrt(n) / float(dot.mean()),
                           float(half.std()) / math.sqrt(n) / float(half.mean()),
                           float(err2.std()) / math.sqrt(n) / float(err2.mean()))
    assert r_two == pytest.approx(r_exact, rel=4 * rel), (r_two, r_exact, rel)


@pytest.mark.parametrize("grad", ["luq4", "luq4_smp2", "nvfp4_sr", "nvfp4_sr_rht", "mvue24", "fp32"])
def test_arming_does_not_change_training(grad):
    """The armed backward applies the same weight gradient (same draws from torch's RNG) and
    leaves the same estimator state as an unarmed one; the record is sensible."""
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(3))
    delta = torch.randn(32, 8, generator=torch.Generator().manual_seed(4))
    m0, _ = _linear(grad, i=16, o=8)
    m1, _ = _linear(grad, i=16, o=8)
    g0, none = _step(m0, x, delta, seed=7)
    g1, rec = _step(m1, x, delta, seed=7, arm=99)
    assert none is None and torch.equal(g0, g1)
    assert repr(m0[0].lp_state) == repr(m1[0].lp_state)
    assert rec["signal2"] > 0
    if grad == "fp32":
        assert rec["err2"] == rec["diff2"] == 0 and layer_ratios(rec)["r"] == math.inf
    else:
        assert rec["err2"] > 0 and rec["diff2"] > 0
    # a second, unarmed step records nothing
    assert _step(m1, x, delta, seed=8)[1] is None


def test_arming_keeps_stateful_estimator_state():
    """LUQ with an in-hindsight max: the extra draw uses a copy of the state, so the live state
    advances exactly as without the monitor."""
    from lowprec.recipes import GradRecipe

    rec = GradRecipe("luq4_h", backward=LUQ(4, hindsight=0.5), update=LUQ(4, hindsight=0.5))
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(5))
    m0, _ = _linear(rec)
    m1, _ = _linear(rec)
    for k in range(3):
        d = torch.randn(16, 6, generator=torch.Generator().manual_seed(10 + k)) * (k + 1)
        g0, _ = _step(m0, x, d, seed=k)
        g1, r = _step(m1, x, d, seed=k, arm=k)
        assert torch.equal(g0, g1) and r is not None
        assert repr(m0[0].lp_state) == repr(m1[0].lp_state)


def test_conv_layer_is_measured_and_unchanged():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    recs = []
    grads = []
    for arm in (None, 5):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
        convert(m, grad="luq4", skip=None)
        m[0].arm_noise(torch.Generator().manual_seed(arm)) if arm is not None else None
        torch.manual_seed(1)
        m(x).square().sum().backward()
        grads.append(m[0].weight.grad.clone())
        recs.append(m[0].pop_noise())
        assert m[0].pop_update_macs() == 4 * 3 * 3 * 3 * (2 * 6 * 6)
    assert torch.equal(grads[0], grads[1]) and recs[0] is None and recs[1]["err2"] > 0


def test_biased_estimator_two_draw_misses_the_bias():
    """fp4_rdn is deterministic round-to-nearest: two draws are equal, so the two-draw noise is 0
    and r2 = inf, while the exact r sees the rounding error (module docstring of lowprec.noise)."""
    m, _ = _linear("fp4_rdn")
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(1))
    d = heavy_tailed((16, 6), seed=3)
    _, rec = _step(m, x, d, seed=0, arm=1)
    r = layer_ratios(rec)
    assert rec["diff2"] == 0 and r["r2"] == math.inf and math.isfinite(r["r"]) and rec["err2"] > 0
