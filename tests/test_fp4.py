"""Block-scaled FP4 references (lowprec.fp4) and the block Hadamard transform (lowprec.hadamard)."""

from __future__ import annotations

import pytest
import torch

import lowprec as lp
from lowprec.fp4 import (E2M1_GRID, block_luq, block_luq_variance, e2m1_round, e4m3_round, fp4_scaled, mxfp4,
                         mxfp4_exponents, nvfp4, nvfp4_scales, scale_clip_stats)
from lowprec.hadamard import block_rht, hadamard_matrix, random_signs
from stat_utils import assert_unbiased, heavy_tailed

E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
E4M3_VALUES = E4M3_VALUES[torch.isfinite(E4M3_VALUES) & (E4M3_VALUES >= 0)].unique()
GRID = torch.tensor(E2M1_GRID)


def lognormal(shape, seed=0):
    x = heavy_tailed(shape, sigma=2.0, seed=seed)
    x.view(-1)[::23] = 0.0
    return x


# ----------------------------------------------------------------------------- element formats


def test_e2m1_round_to_nearest_even_and_saturation():
    y = torch.tensor([0.0, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 6.0, 7.9, 100.0])
    want = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, 6.0])
    assert torch.equal(e2m1_round(y), want)


def test_e2m1_sr_rounds_between_neighbours_with_the_right_probability():
    y = torch.tensor([0.3, 1.2, 2.75, 5.0, 6.0])
    u = torch.linspace(0, 1, 10001)[:-1, None].expand(-1, 5)
    q = e2m1_round(y.expand_as(u), u)
    lo, hi = torch.tensor([0.0, 1.0, 2.0, 4.0, 6.0]), torch.tensor([0.5, 1.5, 3.0, 6.0, 6.0])
    assert bool(((q == lo) | (q == hi)).all())
    assert torch.allclose(q.mean(0), y, atol=1e-3)


def test_e4m3_emulation_equals_torch_float8_on_all_of_its_range():
    mids = (E4M3_VALUES[1:] + E4M3_VALUES[:-1]) / 2
    g = torch.Generator().manual_seed(0)
    t = torch.cat([E4M3_VALUES, mids, torch.nextafter(mids, torch.zeros(())), torch.nextafter(mids, torch.full((), 1e3)),
                   torch.rand(200000, generator=g) * 448, torch.exp(4 * torch.randn(200000, generator=g)),
                   torch.tensor([1e-40, 2.0 ** -10, 2.0 ** -11, 3 * 2.0 ** -11])]).clamp(0, 448)
    assert torch.equal(e4m3_round(t), t.to(torch.float8_e4m3fn).float())
    up = e4m3_round(t, up=True)
    assert bool((up >= t).all()) and bool(torch.isin(up, E4M3_VALUES).all())
    # the smallest E4M3 value >= t: the next one down is below t
    idx = torch.searchsorted(E4M3_VALUES, up)
    below = E4M3_VALUES[(idx - 1).clamp(min=0)]
    assert bool(((below < t) | (up == 0) | (up == t)).all())


# ----------------------------------------------------------------------------- NVFP4 / MXFP4 structure


@pytest.mark.parametrize("rounding", ["rtn", "sr"])
@pytest.mark.parametrize("block_2d,dim,shape", [(False, -1, (37, 45)), (False, 0, (37, 45)), (True, -1, (37, 45)),
                                                (False, 1, (3, 50, 7))])
def test_nvfp4_elements_on_the_grid_with_e4m3_block_scales(rounding, block_2d, dim, shape):
    x = lognormal(shape)
    blocks, y, s_b, s_dec, unview = nvfp4_scales(x, dim=dim, rounding=rounding, block_2d=block_2d)
    assert bool(torch.isin(s_b, E4M3_VALUES).all()), "block scales must be E4M3 values"
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    out = nvfp4(x, dim=dim, rounding=rounding, block_2d=block_2d, noise=u if rounding == "sr" else None)
    # out = ±(q·s_b)·s_dec with q on the E2M1 grid: q·s_b is exact, so q = round(out/s_dec)/s_b exactly
    q_scaled = torch.where(s_b > 0, (unview_inv(out, dim, block_2d) / s_dec).abs(), 0.0)
    q = torch.where(s_b > 0, q_scaled / torch.where(s_b > 0, s_b, 1.0), 0.0)
    assert bool(torch.isin(torch.round(q * 2) / 2, GRID).all())
    assert torch.allclose(q, torch.round(q * 2) / 2, rtol=1e-6, atol=0)
    if rounding == "sr":
        assert float(y.max()) <= 6.0 * (1 + 2 ** -22), "sr scale rounded up: nothing clips"
    if block_2d and rounding == "rtn":  # a 16x16 tile has one scale: the tiles of W and Wᵀ are the same
        assert torch.equal(nvfp4(x.t().contiguous(), block_2d=True), out.t())


def unview_inv(out, dim, block_2d):
    from lowprec.fp4 import block_view
    if block_2d:
        return block_view(out.reshape(out.shape[0], -1), -1, 16, 16)[0]
    return block_view(out, dim, 16)[0]


@pytest.mark.parametrize("rounding", ["rtn", "sr"])
def test_mxfp4_power_of_two_scales_and_grid(rounding):
    x = lognormal((19, 70))
    from lowprec.fp4 import block_view
    blocks, _ = block_view(x, -1, 32)
    e = mxfp4_exponents(blocks.abs().amax(1, keepdim=True), rounding)
    out = block_view(mxfp4(x, rounding=rounding, noise=torch.rand(x.shape)), -1, 32)[0]
    q = (out / torch.ldexp(torch.ones(e.shape), e)).abs()
    assert bool(torch.isin(q, GRID).all())
    y, _ = fp4_scaled(x, "mxfp4", rounding=rounding)
    if rounding == "rtn":  # OCP: amax/X in [4, 8)
        m = y.amax(1)
        assert bool(((m >= 4) & (m < 8) | (m == 0)).all())
    else:
        assert float(y.max()) <= 6.0


@pytest.mark.parametrize("fn", [lambda x: nvfp4(x), lambda x: nvfp4(x, block_2d=True), lambda x: mxfp4(x, dim=0)])
def test_rtn_is_deterministic_and_draws_nothing(fn):
    x = lognormal((33, 40))
    torch.manual_seed(5)
    a = fn(x)
    state = torch.get_rng_state()
    assert torch.equal(a, fn(x)) and torch.equal(state, torch.get_rng_state())


def test_rtn_scale_rules_clip_and_sr_rules_do_not():
    x = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0))
    nv, mx = scale_clip_stats(x, "nvfp4"), scale_clip_stats(x, "mxfp4")
    assert nv["clip_frac"] > 0.01 and mx["clip_frac"] > 0.01
    assert nv["clip_rel_bias"] > 1e-3 and mx["clip_rel_bias"] > 1e-3
    for fmt in ("nvfp4", "mxfp4"):  # the sr rules: no scaled magnitude above 6 (up to one fp32 ulp)
        y, _ = fp4_scaled(x, fmt, rounding="sr")
        assert float(y.max()) <= 6.0 * (1 + 2 ** -22)


@pytest.mark.parametrize("est", [lp.NVFP4("sr", dim=-1), lp.NVFP4("sr", dim=0), lp.NVFP4("sr", block_2d=True),
                                 lp.MXFP4("sr", dim=-1), lp.MXFP4("sr", dim=0)], ids=lambda e: f"{e.name}_{e.dim}")
def test_sr_variants_are_unbiased_with_closed_form_variance(est):
    x = lognormal((40, 50), seed=3)
    assert_unbiased(est, x, k=300, variance=est.expected_variance(x))


@pytest.mark.parametrize("est", [lp.NVFP4("rtn"), lp.MXFP4("rtn")], ids=lambda e: e.name)
def test_rtn_variants_fail_the_unbiasedness_check(est):
    x = lognormal((40, 50), seed=3)
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(est, x, k=50)


# ----------------------------------------------------------------------------- block LUQ


@pytest.mark.parametrize("block,dim", [(16, -1), (32, -1), (16, 0), (32, 0)])
def test_block_luq_unbiased_and_variance_closed_form(block, dim):
    x = lognormal((45, 37), seed=block + dim)
    est = lp.BlockLUQ(4, block=block, dim=dim)
    v = est.expected_variance(x)
    assert_unbiased(est, x, k=300, variance=v)
    g = torch.Generator().manual_seed(9)
    d = torch.stack([est(x, generator=g).double() for _ in range(400)])
    measured = float(d.var(0).sum())
    assert abs(measured / float(v) - 1) < 0.1


def test_block_luq_levels_are_powers_of_two_of_the_block_alpha():
    x = lognormal((4, 32))
    q = block_luq(x, block=16, noise=torch.rand(x.shape))
    from lowprec.fp4 import block_view
    qb, xb = block_view(q, -1, 16)[0], block_view(x, -1, 16)[0]
    alpha = xb.abs().amax(1, keepdim=True) * 2.0 ** -6
    k = torch.log2(qb.abs() / alpha)
    nz = qb != 0
    assert torch.equal(k[nz], torch.round(k[nz])) and float(k[nz].max()) <= 6 and float(k[nz].min()) >= 0
    assert float(block_luq_variance(torch.zeros(3, 16))) == 0 and torch.equal(block_luq(torch.zeros(3, 16)),
                                                                            torch.zeros(3, 16))


def test_nonfinite_inputs():
    x = lognormal((4, 32))
    x[1, 3] = float("nan")
    for f in (nvfp4, mxfp4, block_luq):
        with pytest.raises(lp.NonFiniteError):
            f(x)
        assert torch.equal(f(x, nonfinite="skip"), torch.zeros_like(x))


def test_bad_options_are_value_errors():
    with pytest.raises(ValueError, match="rounding"):
        lp.NVFP4("nearest")
    with pytest.raises(ValueError, match="block"):
        lp.BlockLUQ(block=8)
    with pytest.raises(ValueError, match="dim"):
        mxfp4(torch.ones(3, 4), dim=2)


# ----------------------------------------------------------------------------- Hadamard


@pytest.mark.parametrize("n", [16, 32])
def test_hadamard_is_orthogonal(n):
    h = hadamard_matrix(n, dtype=torch.float64)
    assert torch.allclose(h @ h.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    s = random_signs(n)
    r = h * s[None, :].double()
    assert torch.allclose(r.t() @ r, torch.eye(n, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("n,t", [(16, 16), (16, 45), (32, 100)])
def test_block_rht_preserves_the_product_within_fp32_rounding(n, t):
    g = torch.Generator().manual_seed(n + t)
    a, b = torch.randn(7, t, generator=g), torch.randn(t, 5, generator=g)
    s = random_signs(n, generator=g)
    ar, br = block_rht(a, s, -1), block_rht(b, s, 0)
    assert ar.shape[1] == br.shape[0] == -(-t // n) * n
    exact = a.double() @ b.double()
    assert torch.allclose((ar @ br).double(), exact, rtol=0, atol=1e-5 * float(exact.abs().max()) + 1e-6)
    # different signs on the two operands break it; the inverse undoes the rotation
    other = -s
    other[0] = s[0]
    assert not torch.allclose((block_rht(a, s, -1) @ block_rht(b, other, 0)).double(), exact, atol=1e-3)
    assert torch.allclose(block_rht(ar, s, -1, inverse=True)[:, :t], a, atol=1e-5)


def test_random_signs_fresh_per_draw_from_torchs_rng():
    torch.manual_seed(0)
    s1, s2 = random_signs(16), random_signs(16)
    assert not torch.equal(s1, s2) and set(s1.tolist()) <= {-1.0, 1.0}
    torch.manual_seed(0)
    assert torch.equal(random_signs(16), s1)
