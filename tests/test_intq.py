import pytest
import torch

import lowprec as lp
from stat_utils import heavy_tailed


def on_grid(y, scale, qmin, qmax):
    k = y.double() / scale
    kr = torch.round(k)
    return torch.allclose(k, kr, atol=1e-4, rtol=0) and float(kr.min()) >= qmin and float(kr.max()) <= qmax


def test_sawb_clip_formula_and_signed_grid():
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    c = float(12.1 * w.square().mean().sqrt() - 12.2 * w.abs().mean())
    assert 0 < c < float(w.abs().max())
    assert float(lp.sawb_clip(w, 4)) == pytest.approx(c, rel=1e-6)
    y = lp.int_quant(w, 4, signed=True)
    scale = torch.tensor(c / 7, dtype=torch.float64)
    assert on_grid(y, float(lp.sawb_clip(w, 4)) / 7, -7, 7)
    assert len(torch.unique(y)) <= 15
    # Round-to-nearest: inside the clip range the error is at most half a step.
    inside = w.abs() <= c
    assert float((y - w)[inside].abs().max()) <= float(scale) / 2 + 1e-6


def test_unsigned_for_nonnegative_and_saturation():
    a = torch.relu(torch.randn(1000, generator=torch.Generator().manual_seed(1)))
    c = float(lp.sawb_clip(a, 4, signed=False))
    y = lp.int_quant(a, 4)
    assert float(y.min()) >= 0
    assert on_grid(y, c / 15, 0, 15)
    assert float(y.max()) == pytest.approx(c, rel=1e-6), "values above the clip saturate at it"


def test_degenerate_sawb_falls_back_to_max():
    x = torch.tensor([1.0, -1.0, 1.0, -1.0])  # E|x| = sqrt(E x²): SAWB formula is negative
    assert float(lp.sawb_clip(x, 4)) == 1.0
    assert torch.equal(lp.int_quant(x, 4), x)


def test_mse_clip_is_computed_and_beats_max_for_8_and_2_bits():
    x = heavy_tailed(5000, sigma=1.0, seed=2)
    for bits in (2, 3, 8):
        c = lp.mse_clip(x, bits)
        err_opt = float((lp.int_quant(x, bits, clip=c) - x).square().sum())
        err_max = float((lp.int_quant(x, bits, clip_method="max") - x).square().sum())
        err_half = float((lp.int_quant(x, bits, clip=float(c) * 0.5) - x).square().sum())
        assert err_opt <= err_max and err_opt <= err_half


def test_per_channel_scales():
    w = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(3))
    w[0] *= 100
    y = lp.int_quant(w, 4, signed=True, per_channel=True)
    clips = lp.sawb_clip(w, 4, per_channel=True).reshape(-1)
    for i in range(8):
        assert on_grid(y[i], float(clips[i]) / 7, -7, 7)
    # Per-tensor would flush the small channels; per-channel keeps them.
    assert float((lp.int_quant(w, 4, signed=True) - w)[1:].square().sum()) > float((y - w)[1:].square().sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_edges_errors(dtype):
    x = torch.randn(7, 5).to(dtype).t()
    y = lp.IntQuant(4)(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, lp.IntQuant(4)(x)), "deterministic"
    assert torch.equal(lp.int_quant(torch.zeros(3)), torch.zeros(3))
    assert lp.int_quant(torch.empty(0)).shape == (0,)
    with pytest.raises(ValueError, match="bits"):
        lp.IntQuant(1)
    with pytest.raises(ValueError, match="clip_method"):
        lp.IntQuant(4, clip_method="percentile")
    with pytest.raises(ValueError, match="NaN/Inf"):
        lp.int_quant(torch.tensor([1.0, float("nan")]))


# ----------------------------------------------------------------------------- ties and range (issue 14)

import math  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from stat_utils import RANGE_DTYPES, full_range_values  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_exact_ties_round_up(dtype):
    """floor(x/s + 0.5): a tie goes toward +inf (bf16 inputs produce exact ties; the kernel must agree)."""
    x = torch.tensor([2.5, -2.5, 0.5, -0.5, 3.5, -3.5, 6.5, -6.5, 1.0], dtype=dtype)
    y = lp.int_quant(x, 4, signed=True, clip=7.0)  # s = 1
    assert y.float().tolist() == [3.0, -2.0, 1.0, 0.0, 4.0, -3.0, 7.0, -6.0, 1.0]
    below_half = torch.tensor([0.49999997])  # + 0.5 rounds to 1.0 in fp32: documented, kept
    assert lp.int_quant(below_half, 4, signed=True, clip=7.0).tolist() == [1.0]


@pytest.mark.parametrize("bad", [0, -1, 0.0, float("nan"), float("inf"), -float("inf"), "1", True,
                                 torch.tensor([1.0, float("nan")]), torch.tensor(0.0)])
def test_bad_clip_is_one_line(bad):
    with pytest.raises(ValueError, match="clip") as e:
        lp.int_quant(torch.randn(2, 8), 4, clip=bad)
    assert "\n" not in str(e.value)


def _check_full_range(x, dtype, bits, method):
    y = lp.int_quant(x, bits, signed=True, clip_method=method)
    assert y.dtype == dtype and bool(torch.isfinite(y).all())
    c = float(lp.sawb_clip(x, bits, signed=True) if method == "sawb" else x.double().abs().max())
    if c == 0 or not math.isfinite(c):
        return
    qmax = int(2 ** (bits - 1) - 1)
    step = c / qmax
    # the grid step s = c/qmax is a number of the working precision (fp64 for fp64, else fp32): below
    # its normal range it is rounded to the subnormal spacing, and k·s (k <= qmax) carries k times that
    sub = qmax * (2.0 ** -1075 if dtype == torch.float64 else 2.0 ** -150)
    ulp = torch.finfo(dtype).eps * c + torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps + sub
    inside = x.double().abs() <= c
    err = (y.double() - x.double()).abs()[inside]
    assert bool((err <= step / 2 * (1 + 1e-6) + 2 * ulp).all()), (x, y, c)
    assert float(y.double().abs().max()) <= c * (1 + 1e-6) + ulp


@pytest.mark.parametrize("dtype", RANGE_DTYPES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), bits=st.integers(2, 8), method=st.sampled_from(["sawb", "max"]))
def test_full_range_on_grid_and_finite(dtype, data, bits, method):
    _check_full_range(data.draw(full_range_values(dtype, min_size=2, max_size=12)), dtype, bits, method)


def test_subnormal_clip_grid():
    """A clip at the bottom of fp32's normal range gives a subnormal step (hypothesis found it):
    the top grid point exceeds the clip by the step's rounding times qmax, no more."""
    _check_full_range(torch.tensor([-0.0, -1.1754944e-38]), torch.float32, 7, "sawb")


def test_wide_and_narrow_extremes():
    x = torch.tensor([1e-300, -3e-300, 2e-300], dtype=torch.float64)  # fp64 in fp64: s = 3e-300/7
    assert torch.allclose(lp.int_quant(x, 4, clip_method="max"), torch.tensor([2, -7, 5], dtype=torch.float64) * 3e-300 / 7)
    big = torch.tensor([1e300, -3e300], dtype=torch.float64)
    assert bool(torch.isfinite(lp.int_quant(big, 4)).all())  # no false NaN/Inf error
    sub = torch.tensor([1e-44, -2e-44, 3e-45])  # fp32 subnormals keep their values on the grid
    assert lp.int_quant(sub, 4, clip_method="max").ne(0).sum() >= 2
    h = torch.tensor([65504.0, -3.0], dtype=torch.float16)
    y = lp.int_quant(h, 4, signed=True, clip=65504.0 * 1.01)  # 7 steps > 65504: clamped, not inf
    assert y.tolist() == [65504.0, -0.0] or y.tolist() == [65504.0, 0.0]
