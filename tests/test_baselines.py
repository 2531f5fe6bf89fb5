import math

import pytest
import torch

import lowprec as lp
from stat_utils import assert_unbiased, grid_mean, heavy_tailed


def test_radix4_grid_and_log_domain_rounding():
    m = 4.0 ** 6
    x = torch.tensor([m, 1.0, 0.49, 0.5, 1.9, 2.0, 7.9, 8.0, -100.0, 0.0])
    y = lp.radix4(x)
    # α = 1: levels 4^k; midpoint between 4^k and 4^(k+1) is 2·4^k; below α/2 flushes to zero.
    assert y.tolist() == [m, 1.0, 0.0, 1.0, 1.0, 4.0, 4.0, 16.0, -64.0, 0.0]
    x = heavy_tailed(5000, seed=1)
    y = lp.radix4(x)
    alpha = float(x.abs().max()) / 4 ** 6
    k = torch.log(y.abs()[y != 0].double() / alpha) / math.log(4)
    assert torch.allclose(k, torch.round(k), atol=1e-9) and k.min() >= 0 and k.max() <= 6


def test_fp4_rdn_grid_flush_and_nearest():
    x = torch.tensor([64.0, 0.99, 1.0, 1.49, 1.5, 2.9, 3.0, 47.0, 48.0, -5.9])
    assert lp.fp4_rdn(x).tolist() == [64.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 32.0, 64.0, -4.0]


def test_int_sr_unbiased_exact_grid_and_variance():
    x = torch.tensor([7.0, 0.3, -2.5, 6.99, 0.0])
    mean = grid_mean(lambda xb, U: lp.int_sr(xb, noise=U.view(-1, 1).expand(xb.shape).contiguous()), x, 2048)
    assert torch.allclose(mean, x.double(), atol=1 / 2048)
    y = lp.int_sr(heavy_tailed(3000, seed=3), generator=torch.Generator().manual_seed(0))
    s = float(y.abs().max()) / 7
    k = y.double() / s
    assert torch.allclose(k, torch.round(k), atol=1e-6) and k.abs().max() <= 7
    x = heavy_tailed(3000, sigma=1.0, seed=4)
    assert_unbiased(lp.IntSR(4), x, k=300, variance=lp.baselines.int_sr_variance(x))


def test_biased_baselines_are_deterministic_and_biased():
    x = heavy_tailed(2000, seed=5)
    for est in (lp.Radix4(), lp.FP4RDN()):
        assert not est.unbiased
        assert torch.equal(est(x), est(x))
        assert float((est(x) - x).abs().sum()) > 0


def test_errors_and_edges():
    for f in (lp.radix4, lp.fp4_rdn, lp.int_sr):
        assert torch.equal(f(torch.zeros(4)), torch.zeros(4))
        assert f(torch.empty(0)).shape == (0,)
        with pytest.raises(ValueError, match="NaN/Inf"):
            f(torch.tensor([1.0, float("inf")]))
        y = f(torch.randn(6, 4).to(torch.bfloat16))
        assert y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="bits"):
        lp.IntSR(1)
    with pytest.raises(ValueError, match="levels"):
        lp.Radix4(levels=0)


def test_parameters_that_cannot_be_represented_are_refused():
    for bad in (0, 65, 100):
        with pytest.raises(ValueError, match="levels"):
            lp.Radix4(levels=bad)
    for bad in (1, 17, 40):
        with pytest.raises(ValueError, match="bits"):
            lp.IntSR(bad)
        with pytest.raises(ValueError, match="bits"):
            lp.int_sr(torch.ones(3), bad)
    assert lp.Radix4(levels=64)(torch.tensor([1.0, 2.0 ** -126])).tolist()[0] == 1.0


def test_wide_and_subnormal_inputs():
    sub = torch.tensor([1e-44, -2e-44, 3e-45])
    for f in (lp.radix4, lp.fp4_rdn, lp.int_sr):
        assert f(sub).ne(0).any(), f
    for scale in (1e-300, 1e300):
        x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) * scale
        for f in (lp.radix4, lp.fp4_rdn, lp.int_sr):
            y = f(x)
            assert y.dtype == torch.float64 and bool(torch.isfinite(y).all()) and float(y[1]) == -2.0 * scale, f
    mean = grid_mean(lambda xb, U: lp.int_sr(xb, noise=U.expand(xb.shape).contiguous()), sub, 1024)
    assert torch.allclose(mean, sub.double(), rtol=0, atol=2e-44 / 1024)
