"""The C twins (lowprec.kernels.native): their uniforms, equal to the torch rendering and uniform on
[0, 1); their outputs in every layout the layers hand them, equal bit for bit to the references
given those uniforms and to the torch cores given the same generator; independent of the thread
count; the build cache and the fallback when the build fails."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from lowprec import fp4
from lowprec.kernels import cpu, native, native_calls
from lowprec.luq import luq as luq_ref
from lowprec.nm import nm_noise_shape
from lowprec.nm import nm_prune as nm_ref
from kernel_utils import grad_like, same, torch_core
from stat_utils import boundary_uniforms, heavy_tailed

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"C twins unavailable: {native.status()}")

NM = [(1, 2, "mvue"), (2, 4, "mvue"), (2, 4, "mvue_approx"), (3, 8, "mvue"), (1, 4, "mvue_approx")]


def test_uniforms_equal_torch_rendering_and_grid():
    lib = native.library()
    for seed in (0, 1, 2 ** 31 - 2):
        c = native_calls.fill_uniforms(lib, cpu.key_of(seed), (333, 7))
        same(c, cpu.uniforms(seed, (333, 7)))
        assert c.min() >= 0 and c.max() <= 1 - 2 ** -24
        assert torch.equal(c * 2 ** 24, (c * 2 ** 24).round())  # torch.rand's fp32 grid


def test_uniforms_are_uniform_and_independent():
    """2^20 draws: mean, variance, 256-bin chi-square, lag-1 and cross-seed correlation within 6 sd
    (a shifted or repeated stream, or a biased bit, fails at least one)."""
    n = 2 ** 20
    u = cpu.uniforms(12345, (n,)).double()
    assert abs(u.mean() - 0.5) < 6 * math.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 6 * math.sqrt(1 / 180 / n)
    counts = torch.bincount((u * 256).long(), minlength=256).double()
    chi2 = float(((counts - n / 256) ** 2 / (n / 256)).sum())
    assert abs(chi2 - 255) < 6 * math.sqrt(2 * 255), chi2
    c = u - 0.5
    sd = 6 / math.sqrt(n)
    assert abs(float((c[1:] * c[:-1]).mean() * 12)) < sd
    for other in (12346, 12344):  # neighbouring seeds: no correlation, no shifted copy
        v = cpu.uniforms(other, (n,)).double() - 0.5
        assert abs(float((c * v).mean() * 12)) < sd
        assert abs(float((c[1:] * v[:-1]).mean() * 12)) < sd
    assert not torch.equal(cpu.uniforms(1, (64,)), cpu.uniforms(2, (64,)))


def layouts(shape=(32, 8, 10, 12)):
    """The views the layers hand the estimators, and a few more: (name, tensor)."""
    d = grad_like(shape, seed=3)
    n, c, h, w = d.shape
    return [("contiguous", d), ("conv [C, N, HW] view", d.permute(1, 0, 2, 3).reshape(c, n, h * w)),
            ("conv [C, T] copy", d.permute(1, 0, 2, 3).reshape(c, -1)),
            ("linear [out, T] view", d.reshape(-1, w).t()), ("4-d permuted", d.permute(1, 3, 0, 2)),
            ("sliced (not dense)", d[:, :, :, :8]), ("one row of 16k + 3 blocks", grad_like((1, 4 * (16 * 64 + 3)), 4))]


@pytest.mark.parametrize("name,x", layouts(), ids=lambda v: v if isinstance(v, str) else "")
def test_luq_every_layout(name, x):
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    y = cpu.luq(x, generator=g())
    same(y, luq_ref(x, noise=cpu.uniforms(cpu.draw_seed(g()), x.shape)))
    same(y, torch_core(lambda: cpu.luq(x, generator=g())))
    u = boundary_uniforms(x.shape)
    same(cpu.luq(x, noise=u), luq_ref(x, noise=u))


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (3, 8)])
@pytest.mark.parametrize("name,x", layouts(), ids=lambda v: v if isinstance(v, str) else "")
def test_mse_every_layout(name, x, n, m):
    """The biased keep-the-largest mask (deterministic), with ties at the block max."""
    if x.shape[-1] % m:
        pytest.skip("padded blocks run the reference")
    x = x.clone()
    x[..., 1::m] = -x[..., ::m]  # equal magnitudes inside every block: ties go to the lower index
    same(cpu.nm_prune(x, n, m, method="mse"), nm_ref(x, n, m, method="mse"))
    same(cpu.nm_prune(x, n, m, method="mse"), torch_core(lambda: cpu.nm_prune(x, n, m, method="mse")))


@pytest.mark.parametrize("n,m,method", NM)
@pytest.mark.parametrize("name,x", layouts(), ids=lambda v: v if isinstance(v, str) else "")
def test_nm_every_layout(name, x, n, m, method):
    if x.shape[-1] % m:
        pytest.skip("padded blocks run the torch core")
    g = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    shape = nm_noise_shape(x.shape, n, m, method)
    y = cpu.nm_prune(x, n, m, method=method, generator=g())
    same(y, nm_ref(x, n, m, method=method, noise=cpu.uniforms(cpu.draw_seed(g()), shape)))
    same(y, torch_core(lambda: cpu.nm_prune(x, n, m, method=method, generator=g())))
    u = boundary_uniforms(shape)
    same(cpu.nm_prune(x, n, m, method=method, noise=u), nm_ref(x, n, m, method=method, noise=u))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_inputs_and_extreme_blocks(dtype):
    x = grad_like((48, 64), seed=5, dtype=dtype)
    fi = torch.finfo(dtype)
    x[0, :4] = torch.tensor([fi.max, fi.max, fi.max, fi.max / 2])  # 1:2/2:4 estimates past max: clamped
    x[1, :4] = torch.tensor([fi.tiny, fi.tiny * fi.eps, 0.0, fi.tiny])  # subnormal blocks
    x[2, :4] = torch.tensor([1.0, 1e-8, 1e-8, 0.0])  # the cancellation case of mvue_approx
    x[3, :8] = torch.tensor([6.0, 0.0, 0.0, 0.0, 5.0, 5.0, 0.0, 0.0])  # at most N non-zeros: unchanged
    # mvue_approx draws the smallest fp32 subnormal (u = 0) but its inclusion probability underflows to 0
    x[4, :4] = torch.tensor([2.0 ** -149 if dtype == torch.float32 else 0.0, 1.5, 1.5, 1.0])
    u = boundary_uniforms(x.shape)
    same(cpu.luq(x, noise=u), luq_ref(x, noise=u))
    for n, m, method in NM:
        un = boundary_uniforms(nm_noise_shape(x.shape, n, m, method))
        un[4, 0] = 0.0
        same(cpu.nm_prune(x, n, m, method=method, noise=un), nm_ref(x, n, m, method=method, noise=un))


def test_thread_count_does_not_change_results():
    x = grad_like((256, 1024), seed=6)
    before = torch.get_num_threads()
    out = []
    for t in (1, 3):
        torch.set_num_threads(t)
        g = torch.Generator().manual_seed(3)
        out.append((cpu.luq(x, generator=g), cpu.nm_prune(x, 2, 4, generator=g),
                    cpu.nm_prune(x, 2, 4, method="mvue_approx", generator=g)))
    torch.set_num_threads(before)
    for a, b in zip(*out):
        same(a, b)


def test_nest_folds_loops_and_gives_up_past_three():
    x = torch.zeros(4, 6, 8, 12)
    (size, xs, us), es = native_calls.nest(x, 4)
    assert size == (1, 1, 4 * 6 * 8 * 3) and xs[-1] == 4 and es == 1  # contiguous: one loop
    (size, xs, us), es = native_calls.nest(x.permute(1, 0, 2, 3).reshape(6, 4, 96), 4)
    assert size == (4, 6, 24) and us == (24, 96, 1)  # memory order outside, reference order in us
    assert native_calls.nest(x.permute(3, 1, 0, 2)[:, :, :, :4], 1) is None


def test_build_is_cached_and_a_failed_build_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    native.set_enabled(None)
    try:
        assert native.library() is not None
        built = list((tmp_path / "native").glob("*.so"))
        assert len(built) == 1 and not list((tmp_path / "native").glob("tmp*"))
        mtime = built[0].stat().st_mtime_ns
        native.set_enabled(None)
        assert native.library() is not None and built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt
        monkeypatch.setenv("CC", shutil.which("false") or "false")  # a compiler that always fails
        monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "other"))
        native.set_enabled(None)
        x = heavy_tailed((8, 8), seed=1)
        with pytest.warns(RuntimeWarning, match="C twins unavailable"):
            y = cpu.luq(x, generator=torch.Generator().manual_seed(0))
        assert native.library() is None and "unavailable" in native.status()
        same(y, luq_ref(x, noise=cpu.uniforms(cpu.draw_seed(torch.Generator().manual_seed(0)), x.shape)))
    finally:
        monkeypatch.undo()
        native.set_enabled(None)


def _fp4_extremes(dtype):
    x = grad_like((8, 64), seed=7)
    x[0] *= 1e-30  # E4M3 subnormal / zero block scales
    x[1] *= 1e30
    x[2, :16] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 2)  # grid ties
    x[3] = 1e-42  # fp32 subnormals
    x[4, 5] = 1e6  # one outlier: the other blocks' NVFP4 scales underflow E4M3
    return torch.where(torch.isfinite(x.to(dtype)), x, 0.0).to(dtype)


FP4 = {  # name: (twin, reference given uniforms u, stochastic)
    "nvfp4_rtn": (lambda x, d, **k: cpu.nvfp4(x, dim=d, **k), lambda x, d, u: fp4.nvfp4(x, dim=d), False),
    "nvfp4_sr": (lambda x, d, **k: cpu.nvfp4(x, dim=d, rounding="sr", **k),
                 lambda x, d, u: fp4.nvfp4(x, dim=d, rounding="sr", noise=u), True),
    "nvfp4_2d_sr": (lambda x, d, **k: cpu.nvfp4(x, block_2d=True, rounding="sr", **k),
                    lambda x, d, u: fp4.nvfp4(x, block_2d=True, rounding="sr", noise=u), True),
    "nvfp4_2d_rtn": (lambda x, d, **k: cpu.nvfp4(x, block_2d=True, **k), lambda x, d, u: fp4.nvfp4(x, block_2d=True),
                     False),
    "mxfp4_rtn": (lambda x, d, **k: cpu.mxfp4(x, dim=d, **k), lambda x, d, u: fp4.mxfp4(x, dim=d), False),
    "mxfp4_sr": (lambda x, d, **k: cpu.mxfp4(x, dim=d, rounding="sr", **k),
                 lambda x, d, u: fp4.mxfp4(x, dim=d, rounding="sr", noise=u), True),
    "luq4_b16": (lambda x, d, **k: cpu.block_luq(x, dim=d, **k), lambda x, d, u: fp4.block_luq(x, dim=d, noise=u), True),
    "luq3_b32": (lambda x, d, **k: cpu.block_luq(x, 3, block=32, dim=d, **k),
                 lambda x, d, u: fp4.block_luq(x, 3, block=32, dim=d, noise=u), True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(FP4))
def test_fp4_formats_bit_identical(case, dtype):
    """The block formats' C twins against lowprec.fp4 given the twins' uniforms: tails in every
    blocked dimension (37x45 along both dims, 3-D with inner > 1), extreme scales, boundary uniforms,
    and the torch fallback (the reference fed the same hashed uniforms)."""
    twin, ref, sr = FP4[case]
    for x, d in ((grad_like((37, 45), 1, dtype), -1), (grad_like((37, 45), 2, dtype), 0),
                 (grad_like((5, 7, 33), 3, dtype), 1), (_fp4_extremes(dtype), -1)):
        g = lambda: torch.Generator().manual_seed(6)  # noqa: E731
        y = twin(x, d, generator=g())
        same(y, ref(x, d, cpu.uniforms(cpu.draw_seed(g()), x.shape)))
        same(y, torch_core(lambda: twin(x, d, generator=g())))
        if sr:
            u = boundary_uniforms(x.shape)
            same(twin(x, d, noise=u), ref(x, d, u))
