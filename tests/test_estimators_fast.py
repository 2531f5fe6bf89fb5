"""The CPU twins (lowprec.kernels.cpu) against the readable references: bit-identical given the same
uniforms (and the same generator state), every dtype, edge inputs and extreme uniforms; the
dispatcher's automatic choice; the compiled cores and their fallback."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowprec as lp
from lowprec import dispatch
from lowprec.kernels import cpu
from lowprec.luq import luq as luq_ref
from lowprec.nm import nm_noise_shape
from lowprec.nm import nm_prune as nm_ref
from stat_utils import RANGE_DTYPES, U_LAST, boundary_uniforms, full_range_values, heavy_tailed

NM_CASES = [(1, 2, "mvue"), (2, 4, "mvue"), (2, 8, "mvue"), (3, 8, "mvue"), (2, 4, "mvue_approx"),
            (1, 4, "mvue_approx"), (2, 4, "mse")]


def same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b), f"{int((a != b).sum())} of {a.numel()} differ"


def special(shape, dtype, seed=0):
    x = heavy_tailed(shape, sigma=3.0, seed=seed).to(torch.float64)
    flat = x.view(-1)
    flat[::7] = 0.0
    flat[1:9] = torch.tensor([1.0, 1.0, 1.0, 1.0, 10.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    fi = torch.finfo(dtype)
    flat[9:13] = torch.tensor([fi.tiny, fi.tiny * fi.eps, fi.max / 3, 1.0], dtype=torch.float64)
    return torch.where(torch.isfinite(x.to(dtype)), x, 0.0).to(dtype)


@pytest.mark.parametrize("dtype", RANGE_DTYPES)
@pytest.mark.parametrize("bits,levels,max_abs", [(4, None, None), (2, None, None), (8, None, None), (4, 8, None),
                                                 (4, None, 3.0), (4, None, 1e6)])
def test_luq_twin_bit_identical(dtype, bits, levels, max_abs):
    x = special((37, 29), dtype, seed=bits)
    for u in (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)), boundary_uniforms(x.shape)):
        same(cpu.luq(x, bits, levels=levels, max_abs=max_abs, noise=u),
             luq_ref(x, bits, levels=levels, max_abs=max_abs, noise=u))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    same(cpu.luq(x.t(), bits, levels=levels, generator=g1), luq_ref(x.t(), bits, levels=levels, generator=g2))


@pytest.mark.parametrize("dtype", RANGE_DTYPES)
@pytest.mark.parametrize("n,m,method", NM_CASES)
@pytest.mark.parametrize("dim", [-1, 0])
def test_nm_twin_bit_identical(dtype, n, m, method, dim):
    x = special((24, 30), dtype, seed=m)
    shape = nm_noise_shape(x.shape, n, m, method, dim)
    us = [None] if method == "mse" else [torch.rand(shape, generator=torch.Generator().manual_seed(2)),
                                         boundary_uniforms(shape), torch.full(shape, U_LAST)]
    for u in us:
        same(cpu.nm_prune(x, n, m, method=method, dim=dim, noise=u), nm_ref(x, n, m, method=method, dim=dim, noise=u))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    same(cpu.nm_prune(x, n, m, method=method, dim=dim, generator=g1),
         nm_ref(x, n, m, method=method, dim=dim, generator=g2))


@pytest.mark.parametrize("dtype", RANGE_DTYPES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), bits=st.integers(2, 8), case=st.sampled_from([(1, 2, "mvue"), (2, 4, "mvue"),
                                                                      (2, 4, "mvue_approx")]))
def test_twins_full_range(dtype, data, bits, case):
    x = data.draw(full_range_values(dtype, min_size=8, max_size=8)).reshape(2, 4)
    u = boundary_uniforms(x.shape, seed=bits)
    same(cpu.luq(x, bits, noise=u), luq_ref(x, bits, noise=u))
    n, m, method = case
    un = boundary_uniforms(nm_noise_shape(x.shape, n, m, method), seed=bits)
    same(cpu.nm_prune(x, n, m, method=method, noise=un), nm_ref(x, n, m, method=method, noise=un))


def test_twins_edges_and_errors():
    for f in (cpu.luq, lambda v, **k: cpu.nm_prune(v, 2, 4, **k)):
        assert f(torch.empty(0, 4)).shape == (0, 4)
        assert not f(torch.zeros(3, 8)).any()
        bad = torch.ones(2, 8)
        bad[1, 3] = float("nan")
        with pytest.raises(ValueError, match="NaN/Inf"):
            f(bad)
        assert not f(bad, nonfinite="skip").any()
        with pytest.raises(ValueError, match="expected a torch.Tensor"):
            f([1.0, 2.0])
    with pytest.raises(ValueError, match="max_abs"):
        cpu.luq(torch.ones(3), max_abs=float("nan"))
    with pytest.raises(ValueError, match="bits=9"):
        cpu.luq(torch.ones(3), 9)


def test_dispatch_takes_the_twin_on_cpu_under_auto(monkeypatch):
    calls = []
    real_luq, real_nm = cpu.luq, cpu.nm_prune
    monkeypatch.setattr(cpu, "luq", lambda *a, **k: calls.append("luq") or real_luq(*a, **k))
    monkeypatch.setattr(cpu, "nm_prune", lambda *a, **k: calls.append("nm") or real_nm(*a, **k))
    x = heavy_tailed((8, 16), seed=1)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    same(dispatch.luq(x, generator=g()), luq_ref(x, generator=g()))
    same(dispatch.nm_prune(x, 2, 4, generator=g()), nm_ref(x, 2, 4, generator=g()))
    assert calls == ["luq", "nm"]
    dispatch.luq(x, backend="reference")
    monkeypatch.setenv("LOWPREC_BACKEND", "reference")
    lp.LUQ(4)(x)
    lp.NMPrune(2, 4)(x)
    assert calls == ["luq", "nm"], "backend='reference' and LOWPREC_BACKEND=reference bypass the twins"


def test_compile_switch_and_fallback(monkeypatch):
    monkeypatch.setenv(cpu.COMPILE_ENV, "maybe")
    cpu.set_compile(None)
    with pytest.raises(ValueError, match="LOWPREC_CPU_COMPILE"):
        cpu.compile_enabled()
    monkeypatch.setenv(cpu.COMPILE_ENV, "0")
    assert cpu.compile_status().startswith("eager")

    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("no inductor here")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    cpu.set_compile(True)
    try:
        x = heavy_tailed((16, 16), seed=2)
        u = torch.rand(x.shape)
        with pytest.warns(RuntimeWarning, match="torch.compile unavailable"):
            y = cpu.luq(x, noise=u)
        same(y, luq_ref(x, noise=u))
        assert "compile failed" in cpu.compile_status()
    finally:
        cpu.set_compile(None)  # also forgets the failure


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="needs a C++ compiler")
def test_compiled_cores_bit_identical():
    """The cores under torch.compile (inductor C++): the same floats as the eager references."""
    cpu.set_compile(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback would hide a compile failure
            for dtype in (torch.float32, torch.bfloat16):
                x = special((33, 64), dtype, seed=4)
                u = boundary_uniforms(x.shape)
                same(cpu.luq(x, noise=u), luq_ref(x, noise=u))
                for n, m, method in ((2, 4, "mvue"), (1, 2, "mvue"), (2, 4, "mvue_approx")):
                    un = boundary_uniforms(nm_noise_shape(x.shape, n, m, method))
                    same(cpu.nm_prune(x, n, m, method=method, noise=un), nm_ref(x, n, m, method=method, noise=un))
        assert cpu.compile_status().startswith("compiled")
    finally:
        cpu.set_compile(None)
