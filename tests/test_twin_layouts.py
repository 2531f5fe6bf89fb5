"""A run's numbers must not depend on whether a C compiler was found (issue 23): the C twins and the
torch cores return δ̂ in the same memory layout (the next GEMM's summation order follows its
operands' layout), so every recipe's layer gradients are bit-identical with LOWPREC_CPU_NATIVE=0 and
=1. Before the fix the N:M C twin returned a transposed Linear δ in its transposed layout and the
torch core a contiguous tensor: mvue24 / mvue24_approx / mvue12 / mse24 / mvue24_luq4 gradients
differed in the last bits."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lowprec import fp4
from lowprec.convert import convert
from lowprec.kernels import cpu, native
from lowprec.recipes import GRAD_NAMES
from stat_utils import heavy_tailed

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"C twins unavailable: {native.status()}")


def _with(enabled: bool, fn, monkeypatch):
    monkeypatch.setenv(native.ENV, "1" if enabled else "0")
    native.set_enabled(None)
    try:
        return fn()
    finally:
        monkeypatch.delenv(native.ENV)
        native.set_enabled(None)


def _views():
    d = heavy_tailed((6, 8, 4, 8), sigma=3.0, seed=3)
    return {"contiguous": d.reshape(48, 32), "linear [out, T] view": d.reshape(-1, 16).t(),
            "conv [C, N, HW] view": d.permute(1, 0, 2, 3).reshape(8, 6, 32),
            "sliced": d.reshape(48, 32)[:, :24]}


TWINS = {
    "luq": lambda x, g: cpu.luq(x, generator=g),
    "mvue24": lambda x, g: cpu.nm_prune(x, 2, 4, generator=g),
    "mvue24 dim 0": lambda x, g: cpu.nm_prune(x, 2, 4, dim=0, generator=g),
    "mvue24_approx": lambda x, g: cpu.nm_prune(x, 2, 4, method="mvue_approx", generator=g),
    "mvue12": lambda x, g: cpu.nm_prune(x, 1, 2, generator=g),
    "mse24": lambda x, g: cpu.nm_prune(x, 2, 4, method="mse"),
    "nvfp4_sr": lambda x, g: cpu.nvfp4(x, rounding="sr", generator=g),
    "mxfp4_rtn dim 0": lambda x, g: cpu.mxfp4(x, dim=0),
    "block_luq": lambda x, g: cpu.block_luq(x, generator=g),
    "radix4": lambda x, g: cpu.radix4(x),
    "fp4_rdn": lambda x, g: cpu.fp4_rdn(x),
    "int_sr": lambda x, g: cpu.int_sr(x, generator=g),
    "block_rht dim 0": lambda x, g: cpu.block_rht(x, torch.tensor([1.0, -1.0] * 8), 0),
    "block_rht dim -1": lambda x, g: cpu.block_rht(x, torch.tensor([1.0, -1.0] * 8), -1, inverse=True),
}


@pytest.mark.parametrize("view", list(_views()))
@pytest.mark.parametrize("twin", list(TWINS))
def test_c_twin_and_torch_core_same_values_and_layout(twin, view, monkeypatch):
    x = _views()[view]
    fn = TWINS[twin]
    a = _with(True, lambda: fn(x, torch.Generator().manual_seed(4)), monkeypatch)
    b = _with(False, lambda: fn(x, torch.Generator().manual_seed(4)), monkeypatch)
    assert torch.equal(a, b)
    assert a.stride() == b.stride(), (a.stride(), b.stride())


def _model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(1),
                         nn.Linear(8 * 8 * 8, 32), nn.GELU(), nn.Linear(32, 16))


def _grads(recipe: str):
    torch.manual_seed(0)
    m = _model()
    convert(m, fwd="fp32", grad=recipe)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    m(x).square().sum().backward()
    return [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("recipe", [r for r in GRAD_NAMES if r != "fp32"])
def test_layer_gradients_identical_with_and_without_the_c_twins(recipe, monkeypatch):
    """Conv and Linear layers (Linear δ reaches the estimators transposed), every grad recipe."""
    a = _with(True, lambda: _grads(recipe), monkeypatch)
    b = _with(False, lambda: _grads(recipe), monkeypatch)
    for i, (p, q) in enumerate(zip(a, b)):
        assert torch.equal(p, q), f"{recipe}: parameter {i} differs by up to {float((p - q).abs().max()):.3g}"


@pytest.mark.parametrize("fmt", ["nvfp4_sr", "nvfp4_rtn", "mxfp4_sr", "luq4_b16", "luq3_b32"])
def test_fp4_twins_read_views_in_memory_order(fmt):
    """The block FP4 C twins take a dense view (a transposed Linear δ, a permuted 3-/4-d tensor) in its
    own memory order, uniforms indexed in its logical order (no transposing copy): equal to the
    reference given those uniforms, in every blocked dim, the output in the input's layout."""
    fns = {"nvfp4_sr": (lambda x, d, **k: cpu.nvfp4(x, dim=d, rounding="sr", **k),
                        lambda x, d, u: fp4.nvfp4(x, dim=d, rounding="sr", noise=u)),
           "nvfp4_rtn": (lambda x, d, **k: cpu.nvfp4(x, dim=d, **k), lambda x, d, u: fp4.nvfp4(x, dim=d)),
           "mxfp4_sr": (lambda x, d, **k: cpu.mxfp4(x, dim=d, rounding="sr", **k),
                        lambda x, d, u: fp4.mxfp4(x, dim=d, rounding="sr", noise=u)),
           "luq4_b16": (lambda x, d, **k: cpu.block_luq(x, dim=d, **k), lambda x, d, u: fp4.block_luq(x, dim=d, noise=u)),
           "luq3_b32": (lambda x, d, **k: cpu.block_luq(x, 3, block=32, dim=d, **k),
                        lambda x, d, u: fp4.block_luq(x, 3, block=32, dim=d, noise=u))}
    twin, ref = fns[fmt]
    base = heavy_tailed((6, 5, 7, 36), sigma=3.0, seed=9)
    views = [base.reshape(-1, 36).t(), base.permute(3, 0, 2, 1), base.permute(1, 3, 0, 2).reshape(5, 36, 42),
             base.permute(2, 0, 1, 3), base[:, :, :, :20], base.permute(0, 3, 1, 2)]
    assert sum(cpu._blocked_view(x, d) is not None for x in views for d in range(x.dim())) >= 6
    for x in views:
        for d in range(x.dim()):
            g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
            y = twin(x, d, generator=g())
            assert torch.equal(y, ref(x, d, cpu.uniforms(cpu.draw_seed(g()), x.shape))), (tuple(x.stride()), d)
            if cpu._blocked_view(x, d) is not None:  # read in memory order: written in it too
                assert y.stride() == x.stride(), (x.stride(), y.stride(), d)
            else:  # a permutation whose uniform index is not affine in the memory order: a contiguous copy
                assert y.is_contiguous()
