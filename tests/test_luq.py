import math

import pytest
import torch

import lowprec as lp
from lowprec.luq import luq_scale
from stat_utils import assert_unbiased, draws, grid_mean, heavy_tailed


def test_levels_decision_and_override():
    assert lp.luq_levels(4) == 7 and lp.luq_levels(3) == 3 and lp.luq_levels(2) == 1
    assert lp.luq_levels(4, 8) == 8
    for bad in (1, 0, -3, 2.5, True):
        with pytest.raises(ValueError, match="bits"):
            lp.luq_levels(bad)
    with pytest.raises(ValueError, match="levels"):
        lp.LUQ(4, levels=0)
    with pytest.raises(ValueError, match="bits=1"):
        lp.LUQ(1)


@pytest.mark.parametrize("bits,levels", [(4, None), (4, 8), (3, None)])
def test_output_grid(bits, levels):
    x = heavy_tailed(20000, seed=1)
    y = lp.luq(x, bits, levels=levels, generator=torch.Generator().manual_seed(0))
    L = lp.luq_levels(bits, levels)
    m = x.abs().max()
    alpha = m / 2 ** (L - 1)
    mag = y.abs()
    nz = mag[mag > 0]
    k = torch.log2(nz / alpha)
    assert torch.equal(k, torch.round(k)), "every non-zero output is α·2^k"
    assert int(k.min()) >= 0 and int(k.max()) <= L - 1
    assert nz.max() == m, "the top level is max|x|"
    assert len(torch.unique(nz)) <= L
    assert torch.all((y == 0) | (torch.sign(y) == torch.sign(x))), "sign is kept"


def test_grid_expectation_is_exact_for_every_element():
    # Values straddling every regime: tiny, just below α, exactly on levels, inside bins, the max.
    L = 7
    m = 64.0
    alpha = m / 2 ** (L - 1)
    x = torch.tensor([m, -m, 0.0, 1e-6, 0.3, -0.99, 1.0, 1.5, -2.0, 3.7, 5.0, 16.0, 31.9, -47.0, 63.0])
    G = 2048

    def fn(xb, U):
        return lp.luq(xb, 4, noise=U.view(-1, 1).expand(xb.shape).contiguous(), max_abs=m)

    mean = grid_mean(fn, x, G)
    # One jump per element of height ≤ bin width ≤ m/2, so the grid error is ≤ (m/2)/G.
    assert torch.allclose(mean, x.double(), atol=(m / 2) / G, rtol=0), (mean - x.double())
    assert alpha == 1.0


def test_unbiased_on_heavy_tailed_tensor():
    x = heavy_tailed(4000, seed=2)
    est = lp.LUQ(4)
    assert_unbiased(est, x, k=300, variance=lp.luq_variance(x))


def test_detects_bias_of_fp4_rdn_and_radix4_with_same_test():
    x = heavy_tailed(4000, seed=2)
    for est in (lp.FP4RDN(4), lp.Radix4()):
        with pytest.raises(AssertionError, match="biased"):
            assert_unbiased(est, x, k=50, variance=est.expected_variance(x))


def test_error_of_the_mean_falls_like_one_over_sqrt_k():
    x = heavy_tailed(3000, seed=3)
    d = draws(lp.LUQ(4), x, 1024, seed=5)
    err = [float((d[:k].mean(0) - x.double()).norm()) for k in (16, 256, 1024)]
    total_var = float(lp.luq_variance(x))
    for k, e in zip((16, 256, 1024), err):
        expected = math.sqrt(total_var / k)
        assert 0.8 * expected < e < 1.25 * expected, (k, e, expected)


def test_per_element_variance_matches_closed_form():
    # Many independent copies of each value (plus one element = m to pin the scale).
    m, n = 64.0, 40000
    for v, (lo, hi) in [(5.0, (4.0, 8.0)), (0.25, (0.0, 1.0)), (40.0, (32.0, 64.0)), (1.0, (1.0, 1.0))]:
        x = torch.full((n,), v)
        x[0] = m
        y = lp.luq(x, 4, generator=torch.Generator().manual_seed(7))[1:].double()
        expected = (v - lo) * (hi - v)
        assert set(torch.unique(y).tolist()) <= {lo, hi}
        if expected == 0:
            assert float(y.var()) == 0
            continue
        q = (v - lo) / (hi - lo)
        # sd of the sample variance of a two-point variable: (hi-lo)^2 sqrt(q(1-q)(1-4q(1-q))/n)-ish
        sd = (hi - lo) ** 2 * math.sqrt(max(q * (1 - q) * (1 - 4 * q * (1 - q)), q * (1 - q) / 10) / n)
        assert abs(float(y.var()) - expected) < 6 * sd + 1e-9, (v, float(y.var()), expected)
    x = heavy_tailed(5000, seed=4)
    d = draws(lp.LUQ(4), x, 400, seed=1)
    measured = float(d.var(0).sum())
    theory = float(lp.luq_variance(x))
    assert abs(measured / theory - 1) < 0.1, (measured, theory)


def test_zero_empty_single_and_nonfinite():
    assert torch.equal(lp.luq(torch.zeros(5, 3)), torch.zeros(5, 3))
    e = torch.empty(0, 4)
    assert lp.luq(e).shape == (0, 4)
    one = torch.tensor([-3.5])
    assert torch.equal(lp.luq(one), one), "a single element is the max: kept exactly"
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.ones(10)
        x[3] = bad
        with pytest.raises(ValueError, match="NaN/Inf"):
            lp.luq(x)
        assert torch.equal(lp.luq(x, nonfinite="skip"), torch.zeros(10))
    with pytest.raises(ValueError, match="nonfinite"):
        lp.LUQ(4, nonfinite="ignore")
    with pytest.raises(TypeError):
        lp.luq(torch.arange(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_shape_noncontiguous_and_determinism(dtype):
    x = heavy_tailed((33, 17), sigma=1.0, seed=8).to(dtype).t()  # non-contiguous
    assert not x.is_contiguous()
    y1 = lp.luq(x, generator=torch.Generator().manual_seed(3))
    y2 = lp.luq(x, generator=torch.Generator().manual_seed(3))
    assert y1.dtype == dtype and y1.shape == x.shape
    assert torch.equal(y1, y2)
    # The same as quantizing a contiguous copy with the same draws.
    assert torch.equal(y1, lp.luq(x.contiguous(), generator=torch.Generator().manual_seed(3)))
    # Levels are exact in the input dtype: α·2^k round-trips.
    m, alpha = luq_scale(x)
    nz = y1.float().abs()[y1 != 0]
    k = torch.log2(nz / alpha)
    assert torch.equal(k, torch.round(k))


def test_hindsight_uses_previous_max_and_updates_state():
    est = lp.LUQ(4, hindsight=0.5)
    state = {}
    x1 = torch.tensor([8.0, 1.0])
    x2 = torch.tensor([2.0, 0.5])
    y1 = est(x1, state=state)
    assert float(state["m_hat"]) == 8.0 and float(y1[0]) == 8.0
    y2 = est(x2, state=state)  # scale from the previous max (8): 2.0 is a level, kept exactly
    assert float(y2[0]) == 2.0
    assert float(state["m_hat"]) == 0.5 * 2.0 + 0.5 * 8.0
    x3 = torch.tensor([100.0])
    assert float(est(x3, state=state)[0]) == 5.0, "above the estimate: clamped to it"
    with pytest.raises(ValueError, match="hindsight"):
        lp.LUQ(4, hindsight=1.5)
