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
def test_output_grid(bits, levels, backend):
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


def test_grid_expectation_is_exact_for_every_element(backend):
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


def test_unbiased_on_heavy_tailed_tensor(backend):
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


def test_per_element_variance_matches_closed_form(backend):
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


# ----------------------------------------------------------------------------- range (issue 14, items 3 and 6)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lowprec._common import tiny_exponent  # noqa: E402
from stat_utils import RANGE_DTYPES, U_LAST, full_range_values  # noqa: E402


def test_every_bit_width_is_either_representable_or_refused_in_one_line():
    for bits in range(2, 9):
        L = lp.luq_levels(bits)
        assert L == 2 ** (bits - 1) - 1 and lp.LUQ(bits).num_levels == L
        x = torch.tensor([1.0, 0.5, 2.0 ** -(L - 1), 0.75 * 2.0 ** -(L - 1)])
        y = lp.luq(x, bits, generator=torch.Generator().manual_seed(0))
        assert bool(y[0] == 1.0) and bool(y[2] == x[2]), "top level and α exact, never flushed to 0"
    for bits in range(9, 17):
        with pytest.raises(ValueError, match=rf"bits={bits}:.*at most bits=8") as e:
            lp.LUQ(bits)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="levels=128"):
        lp.LUQ(8, levels=128)
    assert lp.LUQ(7, levels=127).num_levels == 127


@pytest.mark.parametrize("dtype", RANGE_DTYPES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), bits=st.integers(2, 8))
def test_full_range_grid_and_expectation(dtype, data, bits):
    """Any finite input of any dtype, subnormals included: finite output, every non-zero magnitude
    α·2^k with α a normal of the dtype (or α = m for a subnormal max), and E[Q(x)] = x on a grid of u."""
    x = data.draw(full_range_values(dtype))
    L = lp.luq_levels(bits)
    m, alpha = luq_scale(x, bits)
    G = 256
    u = (torch.arange(G, dtype=torch.float32) + 0.5) / G
    xb = x.unsqueeze(0).expand(G, -1).contiguous()
    y = lp.luq(xb, bits, noise=u[:, None].expand_as(xb).contiguous())
    assert y.dtype == dtype and bool(torch.isfinite(y).all())
    m, alpha = float(m), float(alpha)
    if m == 0:
        assert not bool(y.any())
        return
    assert alpha > 0
    if m >= 2.0 ** tiny_exponent(dtype):
        assert alpha >= 2.0 ** tiny_exponent(dtype), "α is a normal of the dtype"
    else:
        assert alpha == m
    mag = y.double().abs()
    k = torch.log2(mag[mag > 0] / alpha)
    assert torch.equal(k, torch.round(k)) and int(k.min()) >= 0 and int(k.max()) <= L - 1
    mean = (y.double() / m).mean(0)  # scaled: a sum of fp64 values near the max would overflow
    assert torch.allclose(mean, x.double() / m, rtol=1e-6, atol=1 / G), (x, mean)


def test_fp64_is_computed_in_fp64_and_fp32_subnormals_are_not_flushed():
    g = torch.Generator().manual_seed(0)
    tiny = torch.tensor([1e-300, -2e-300, 3e-301], dtype=torch.float64)
    big = torch.tensor([1e300, -2e300, 3e299], dtype=torch.float64)
    for x in (tiny, big):
        y = lp.luq(x, generator=g)
        assert y.dtype == torch.float64 and bool(y[1] == x[1]), "the max is kept exactly"
    sub = torch.tensor([1e-44, -2e-44, 3e-45])  # fp32 subnormals: α = m·2^-6 would underflow to 0
    G = 1024
    mean = grid_mean(lambda xb, U: lp.luq(xb, noise=U.expand(xb.shape).contiguous()), sub, G)
    assert torch.allclose(mean, sub.double(), rtol=0, atol=2e-44 / G), mean
    assert float(lp.luq_variance(sub)) > 0


def test_hindsight_max_above_the_dtype_range_stays_finite_and_unbiased():
    x = torch.tensor([60000.0, -3.0, 100.0], dtype=torch.float16)
    G = 512
    mean = grid_mean(lambda xb, U: lp.luq(xb, max_abs=1e6, noise=U.expand(xb.shape).contiguous()), x, G)
    assert torch.allclose(mean, x.double(), rtol=0, atol=65504 / G), mean
    y = lp.luq(x.repeat(100), max_abs=1e6, generator=torch.Generator().manual_seed(1))
    assert bool(torch.isfinite(y).all()) and float(y.abs().max()) <= 65504


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, "2", [1.0], torch.tensor(float("inf")),
                                 torch.tensor([1.0, 2.0])])
def test_bad_max_abs_is_one_line(bad):
    with pytest.raises(ValueError, match="max_abs") as e:
        lp.luq(torch.ones(4), max_abs=bad)
    assert "\n" not in str(e.value)


def test_non_tensor_input_is_one_line():
    for f in (lp.luq, lambda x: lp.nm_prune(x, 2, 4), lp.int_quant, lp.radix4):
        with pytest.raises(ValueError, match=r"x=\[1\.0, 2\.0\]: expected a torch\.Tensor, got list") as e:
            f([1.0, 2.0])
        assert "\n" not in str(e.value)
    with pytest.raises(TypeError):  # also a TypeError, as before
        lp.LUQ(4)([1.0])


def test_skipped_nonfinite_step_does_not_poison_the_hindsight_max():
    est = lp.LUQ(4, hindsight=0.5, nonfinite="skip")
    state = {}
    est(torch.tensor([8.0, 1.0]), state=state)
    assert not bool(est(torch.tensor([float("nan"), 1.0]), state=state).any())
    assert float(state["m_hat"]) == 8.0
    assert float(est(torch.tensor([4.0, 0.5]), state=state)[0]) == 4.0


def test_underflow_and_rounding_compare_boundaries(backend):
    """u equal to y (underflow) or to (|x| - l)/l (rounding) exactly: strict ``u < ·`` keeps the lower value."""
    m = 64.0  # L = 7: α = 1, levels 1, 2, 4, ..., 64
    u = torch.tensor([0.25, 0.5, 0.0, U_LAST, 2.0 ** -23 * 3, 0.75, 0.0, U_LAST])
    x = torch.tensor([0.25, 0.5, 0.0, U_LAST, 1 + 2.0 ** -23 * 3, 2 * 1.75, 1.0, 3.0])
    y = lp.luq(x, max_abs=m, noise=u)
    # u = y below α -> 0; u = 0 with y = 0 -> 0; the rounding fraction equal to u -> the lower level;
    # u = 0 at an exact level -> the level; u = 1 - 2^-24 above the fraction -> lower level.
    assert y.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 1.0, 2.0]
    y = lp.luq(torch.tensor([0.25, 1.5]), max_abs=m, noise=torch.tensor([0.0, 0.0]))
    assert y.tolist() == [1.0, 2.0], "u = 0 below the probability: always up"
