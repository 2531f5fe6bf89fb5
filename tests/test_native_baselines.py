"""The C twins of radix4, fp4_rdn, int_sr (lowprec.baselines) and of the block RHT's fast
Walsh–Hadamard transform (lowprec.hadamard): bit-identical to their references (the baselines given
the twins' uniforms; the FWHT, the torch butterflies) in every layout the layers hand them and in
fp32/bf16/fp16, the torch fallback too; the FWHT against the dense matmul definition within the
stated summation-order bound; the estimators and the dispatcher route to the twins on CPU tensors."""

from __future__ import annotations

import math

import pytest
import torch

from lowprec import baselines, dispatch, hadamard
from lowprec.estimators import FP4RDN, IntSR, Radix4
from lowprec.kernels import cpu, native
from kernel_utils import grad_like, same, torch_core
from stat_utils import boundary_uniforms

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"C twins unavailable: {native.status()}")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def layouts(dtype=torch.float32):
    d = grad_like((6, 8, 5, 6), seed=3, dtype=dtype)
    n, c, h, w = d.shape
    return [("contiguous", d), ("conv [C, N, HW] view", d.permute(1, 0, 2, 3).reshape(c, n, h * w)),
            ("linear [out, T] view", d.reshape(-1, w).t()), ("4-d permuted", d.permute(1, 3, 0, 2)),
            ("sliced (not dense)", d[:, :, :, :4])]


BASELINES = {  # name: (twin(x, generator, noise), reference(x, noise), stochastic)
    "radix4": (lambda x, g, u: cpu.radix4(x), lambda x, u: baselines.radix4(x), False),
    "radix4_L3": (lambda x, g, u: cpu.radix4(x, levels=3), lambda x, u: baselines.radix4(x, levels=3), False),
    "fp4_rdn": (lambda x, g, u: cpu.fp4_rdn(x), lambda x, u: baselines.fp4_rdn(x), False),
    "fp4_rdn_L8": (lambda x, g, u: cpu.fp4_rdn(x, levels=8), lambda x, u: baselines.fp4_rdn(x, levels=8), False),
    "int4_sr": (lambda x, g, u: cpu.int_sr(x, generator=g, noise=u), lambda x, u: baselines.int_sr(x, noise=u), True),
    "int8_sr": (lambda x, g, u: cpu.int_sr(x, 8, generator=g, noise=u), lambda x, u: baselines.int_sr(x, 8, noise=u),
                True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(BASELINES))
def test_baseline_twins_bit_identical_every_layout(case, dtype):
    twin, ref, sr = BASELINES[case]
    for name, x in layouts(dtype):
        g = lambda: torch.Generator().manual_seed(6)  # noqa: E731
        y = twin(x, g(), None)
        same(y, ref(x, cpu.uniforms(cpu.draw_seed(g()), x.shape) if sr else None))
        same(y, torch_core(lambda: twin(x, g(), None)))
        if sr:
            u = boundary_uniforms(x.shape)
            same(twin(x, None, u), ref(x, u))


@pytest.mark.parametrize("case", list(BASELINES))
def test_baseline_twins_edge_tensors(case):
    twin, ref, sr = BASELINES[case]
    u = lambda x: boundary_uniforms(x.shape) if sr else None  # noqa: E731
    for x in (torch.zeros(3, 5), torch.full((4, 4), 2.0 ** -149), torch.tensor([[3.4e38, -3.4e38, 1e-45, 0.0]]),
              torch.tensor([[1.0, 0.5, 0.25, 0.125, 1.5, 0.75, 2 ** -13, 6e-8]]).half()):
        same(twin(x, None, u(x)), ref(x, u(x)))
    bad = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])
    with pytest.raises(Exception, match="NaN/Inf"):
        twin(bad, torch.Generator().manual_seed(0), None)


@pytest.mark.parametrize("est,fn", [(Radix4(), "radix4"), (FP4RDN(4), "fp4_rdn"), (IntSR(4), "int_sr")])
def test_estimators_route_to_the_twins(est, fn, monkeypatch):
    calls = []
    real = getattr(cpu, fn)
    monkeypatch.setattr(cpu, fn, lambda *a, **k: calls.append(1) or real(*a, **k))
    x = grad_like((8, 12), seed=1)
    est(x, generator=torch.Generator().manual_seed(0))
    assert calls, "the CPU twin was not called"
    monkeypatch.setenv("LOWPREC_BACKEND", "reference")
    calls.clear()
    est(x, generator=torch.Generator().manual_seed(0))
    assert not calls  # LOWPREC_BACKEND=reference: the readable reference


# ----------------------------------------------------------------------------- FWHT


def fwht_error_bound(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """2n·2^-24·c·Σ_j|x_j| per block (padded like the output): the forward error of summing the
    block's n terms in two orders (FWHT tree vs the GEMM's), plus the one rounding of c·Σ."""
    d = dim % x.dim()
    a = x.double().abs().movedim(d, -1)
    pad = -a.shape[-1] % n
    a = torch.nn.functional.pad(a, (0, pad))
    sums = a.reshape(*a.shape[:-1], -1, n).sum(-1, keepdim=True).expand(*a.shape[:-1], -1, n).reshape(a.shape)
    return (2 * n * 2.0 ** -24 / math.sqrt(n) * sums).movedim(-1, d)


@pytest.mark.parametrize("n", [16, 32])
@pytest.mark.parametrize("inverse", [False, True])
def test_fwht_matches_the_dense_definition_within_the_summation_bound(n, inverse):
    """Not bit-exact with the dense matmul (another summation order, and for n = 32 one rounding of
    c·Σ instead of n of x·c): each output within 2n·2^-24·c·Σ|x_j| of it, which a wrong sign, stage or
    scale (errors of order c·|x|) is far outside."""
    s = hadamard.random_signs(n, generator=torch.Generator().manual_seed(n))
    for x, dim in ((grad_like((37, 45), 1), -1), (grad_like((37, 45), 2), 0), (grad_like((5, 7, 33), 3), 1)):
        y, ref = hadamard.block_rht(x, s, dim, inverse=inverse), hadamard.block_rht_dense(x, s, dim, inverse=inverse)
        assert y.shape == ref.shape
        err = (y.double() - ref.double()).abs()
        assert bool((err <= fwht_error_bound(x, n, dim)).all()), float(err.max())
        if n == 16:  # c = 1/4 exact: tiny inputs of one binade sum exactly in any order
            xi = torch.randint(-8, 9, x.shape, generator=torch.Generator().manual_seed(1)).float()
            same(hadamard.block_rht(xi, s, dim, inverse=inverse), hadamard.block_rht_dense(xi, s, dim, inverse=inverse))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [16, 32])
def test_fwht_twin_bit_identical(n, dtype):
    """The C pass against the torch butterflies: rotation along the last dim (inner = 1, blocks in
    lanes), the first (inner > 1), a middle one, tails padded, transposed inputs, both directions."""
    s = hadamard.random_signs(n, generator=torch.Generator().manual_seed(1))
    cases = [(grad_like((37, 45), 1, dtype), -1), (grad_like((37, 45), 2, dtype), 0), (grad_like((5, 7, 33), 3, dtype), 1),
             (grad_like((45, 37), 4, dtype).t(), 0), (grad_like((3, 200), 5, dtype), -1), (grad_like((64, 130), 6, dtype), 0)]
    for x, dim in cases:
        for inverse in (False, True):
            y = cpu.block_rht(x, s, dim, inverse=inverse)
            same(y, hadamard.block_rht(x, s, dim, inverse=inverse))
            same(y, dispatch.block_rht(x, s, dim, inverse=inverse))
            same(y, torch_core(lambda: cpu.block_rht(x, s, dim, inverse=inverse)))
            assert y.is_contiguous() or y.t().is_contiguous() and x.t().is_contiguous()  # transposed in, transposed out


def test_fwht_inverse_undoes_and_preserves_products():
    s = hadamard.random_signs(16, generator=torch.Generator().manual_seed(2))
    a, b = grad_like((9, 40), 1), grad_like((40, 7), 2)
    back = cpu.block_rht(cpu.block_rht(a, s, -1), s, -1, inverse=True)[:, :40]
    assert torch.allclose(back, a, rtol=1e-5, atol=1e-30 + 1e-6 * float(a.abs().max()))
    prod = cpu.block_rht(a, s, -1) @ cpu.block_rht(b, s, 0)
    assert torch.allclose(prod.double(), a.double() @ b.double(), rtol=1e-4, atol=1e-5 * float((a.abs() @ b.abs()).max()))
