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
