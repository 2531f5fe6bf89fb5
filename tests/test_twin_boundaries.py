"""Every twin against its reference at the range boundaries (issue 24): fp16 and bf16 tensors whose
max sits at the dtype's smallest normal, just above it, and a few binades above it (where LUQ's grid is
cut from below: α = m·2^-j with j = floor(log2 m) - e_tiny < L-1), and blocks whose scale underflows
(N:M blocks of subnormals, NVFP4 blocks whose E4M3 scale is subnormal or zero, MXFP4 scales clamped
at 2^-126, block-LUQ blocks whose α is subnormal). Twins: the C twins and the torch cores of
lowprec.kernels.cpu, and the Triton kernels in the interpreter (small sizes: it is slow). All are fed
the same uniforms (``noise=``, or the kernels' own draws regenerated), so equality is bit for bit.

Guards, among others, the planted LUQ level-index off-by-one in the C twin (``j = e - e_tiny`` for
``(e - 1) - e_tiny`` in cpu_luq.c): with max|x| at fp16's smallest normal, or at ~4e-4, it halves α
and the C twin then differs from lowprec.luq in a large fraction of the elements."""

from __future__ import annotations

import math

import pytest
import torch

from lowprec import baselines, fp4, hadamard
from lowprec.intq import int_quant as intq_ref
from lowprec.kernels import cpu, interpreter_enabled, native, triton_available
from lowprec.luq import luq as luq_ref
from lowprec.nm import nm_noise_shape
from lowprec.nm import nm_prune as nm_ref
from kernel_utils import torch_core
from stat_utils import boundary_uniforms

HALF = [torch.float16, torch.bfloat16]
has_c = pytest.mark.skipif(native.library() is None, reason=f"C twins unavailable: {native.status()}")
has_triton = pytest.mark.skipif(not (triton_available() and interpreter_enabled()),
                                reason="needs triton and TRITON_INTERPRET=1")


def same(a, b, what=""):
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, a.dtype, b.shape, b.dtype)
    bad = (a != b) & ~(a.isnan() & b.isnan())
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} of {a.numel()} differ"


def _next_up(v: float, dtype) -> float:
    t = torch.tensor(v, dtype=dtype)
    return float(torch.nextafter(t.float(), torch.tensor(math.inf)).to(dtype)) if dtype == torch.float32 else \
        float((t.view(torch.int16) + 1).view(dtype))


def tops(dtype):
    """Maxima at, just above, and a few binades above the smallest normal (and fp16's 4e-4)."""
    tiny = torch.finfo(dtype).tiny
    out = {"at smallest normal": tiny, "just above it": _next_up(tiny, dtype), "2^3 above": tiny * 8.0,
           "just below 2^6 above": float(torch.tensor(tiny * 64.0 * 0.99, dtype=dtype))}
    if dtype == torch.float16:
        out["4e-4"] = float(torch.tensor(4e-4, dtype=dtype))
    return out


def near_tiny(dtype, top: float, shape=(8, 64), seed=0):
    """Log-uniform magnitudes over the 14 binades below ``top`` (subnormals of ``dtype`` included, the
    smallest flushing to zero), random signs, ``top`` itself in the first element."""
    g = torch.Generator().manual_seed(seed)
    mag = top * torch.exp2(-14.0 * torch.rand(shape, generator=g, dtype=torch.float64))
    x = (mag * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).double()).to(dtype)
    x.view(-1)[0] = top
    x.view(-1)[7::13] = 0.0
    return x


def underflow_blocks(dtype, seed=1):
    """Blocks whose scale underflows next to ordinary ones: an outlier row (NVFP4's tensor scale then
    makes the other blocks' E4M3 scales subnormal or zero), rows of the dtype's subnormals (N:M
    normalization clamps, MXFP4 scale clamps at 2^-126 for bf16, block-LUQ α subnormal)."""
    fi = torch.finfo(dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 64, generator=g, dtype=torch.float64)
    x[0, 3] = float(fi.max) / 4
    x[1] *= 1e-3
    x[2] = fi.tiny * fi.eps * torch.randint(-3, 4, (64,), generator=g).double()  # subnormals only
    x[3] = fi.tiny * torch.rand(64, generator=g, dtype=torch.float64)  # at and below the smallest normal
    x[4, :32] = fi.tiny * fi.eps
    return x.to(dtype)


def inputs(dtype):
    cases = [(f"max {k}", near_tiny(dtype, v, seed=i)) for i, (k, v) in enumerate(tops(dtype).items())]
    return cases + [("underflowing block scales", underflow_blocks(dtype))]


# ----------------------------------------------------------------------------- CPU twins (C and torch cores)

CPU_CASES = {  # name: (twin(x, noise), reference(x, noise), noise shape or None)
    "luq4": (lambda x, u: cpu.luq(x, noise=u), lambda x, u: luq_ref(x, noise=u), lambda s: s),
    "luq3": (lambda x, u: cpu.luq(x, 3, noise=u), lambda x, u: luq_ref(x, 3, noise=u), lambda s: s),
    "luq4 hindsight max": (lambda x, u: cpu.luq(x, max_abs=float(x.abs().max()) * 1.5, noise=u),
                           lambda x, u: luq_ref(x, max_abs=float(x.abs().max()) * 1.5, noise=u), lambda s: s),
    **{f"{meth}{n}{m}": ((lambda x, u, n=n, m=m, meth=meth: cpu.nm_prune(x, n, m, method=meth, noise=u)),
                         (lambda x, u, n=n, m=m, meth=meth: nm_ref(x, n, m, method=meth, noise=u)),
                         (lambda s, n=n, m=m, meth=meth: None if meth == "mse" else nm_noise_shape(s, n, m, meth)))
       for n, m, meth in [(1, 2, "mvue"), (2, 4, "mvue"), (2, 4, "mvue_approx"), (2, 4, "mse")]},
    "nvfp4_rtn": (lambda x, u: cpu.nvfp4(x), lambda x, u: fp4.nvfp4(x), lambda s: None),
    "nvfp4_sr": (lambda x, u: cpu.nvfp4(x, rounding="sr", noise=u), lambda x, u: fp4.nvfp4(x, rounding="sr", noise=u),
                 lambda s: s),
    "nvfp4_2d_rtn": (lambda x, u: cpu.nvfp4(x, block_2d=True), lambda x, u: fp4.nvfp4(x, block_2d=True), lambda s: None),
    "mxfp4_rtn": (lambda x, u: cpu.mxfp4(x), lambda x, u: fp4.mxfp4(x), lambda s: None),
    "mxfp4_sr": (lambda x, u: cpu.mxfp4(x, rounding="sr", noise=u), lambda x, u: fp4.mxfp4(x, rounding="sr", noise=u),
                 lambda s: s),
    "luq4_b16": (lambda x, u: cpu.block_luq(x, noise=u), lambda x, u: fp4.block_luq(x, noise=u), lambda s: s),
    "radix4": (lambda x, u: cpu.radix4(x), lambda x, u: baselines.radix4(x), lambda s: None),
    "fp4_rdn": (lambda x, u: cpu.fp4_rdn(x), lambda x, u: baselines.fp4_rdn(x), lambda s: None),
    "int4_sr": (lambda x, u: cpu.int_sr(x, noise=u), lambda x, u: baselines.int_sr(x, noise=u), lambda s: s),
    "block_rht": (lambda x, u: cpu.block_rht(x, _SIGNS, 0), lambda x, u: hadamard.block_rht(x, _SIGNS, 0), lambda s: None),
}
_SIGNS = torch.tensor([1.0, -1.0, -1.0, 1.0] * 4)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", list(CPU_CASES))
def test_cpu_twins_at_the_range_boundaries(case, dtype):
    twin, ref, ushape = CPU_CASES[case]
    for name, x in inputs(dtype):
        shp = ushape(x.shape)
        for u in ([None] if shp is None else [torch.rand(shp, generator=torch.Generator().manual_seed(3)),
                                                boundary_uniforms(shp)]):
            want = ref(x, u)
            if native.library() is not None:
                same(twin(x, u), want, f"C twin, {name}")
            same(torch_core(lambda: twin(x, u)), want, f"torch core, {name}")


@has_c
@pytest.mark.parametrize("dtype", HALF + [torch.float32], ids=str)
def test_c_luq_level_index_near_the_smallest_normal(dtype):
    """The C LUQ twin's own draws (no noise=) and its level index: with max|x| where the grid is cut
    from below, α = m·2^-j must use j = floor(log2 m) - e_tiny exactly (an off-by-one halves α)."""
    for name, top in tops(dtype).items():
        x = near_tiny(dtype, top, shape=(64, 64), seed=5)
        g = lambda: torch.Generator().manual_seed(11)  # noqa: E731
        y = cpu.luq(x, generator=g())
        same(y, luq_ref(x, noise=cpu.uniforms(cpu.draw_seed(g()), x.shape)), f"C luq, max {name}")
        levels = y[y != 0].abs().float().unique()
        assert float(levels.max()) == float(x.abs().max()), name  # the top level is max|x| itself


# ----------------------------------------------------------------------------- Triton kernels (interpreter)

SEED = 2468


def _triton_cases():
    from lowprec.kernels import fp4 as kfp4
    from lowprec.kernels import fused as kfused
    from lowprec.kernels import intq as kintq
    from lowprec.kernels import luq as kluq
    from lowprec.kernels import nm as knm
    from lowprec.kernels.common import uniforms

    def u(shape):
        return uniforms(SEED, shape)

    return {
        "luq4": (lambda x: kluq.luq(x, seed=SEED), lambda x: luq_ref(x, noise=u(x.shape))),
        "luq4 hindsight max": (lambda x: kluq.luq(x, max_abs=float(x.abs().max()) * 1.5, seed=SEED),
                               lambda x: luq_ref(x, max_abs=float(x.abs().max()) * 1.5, noise=u(x.shape))),
        "mvue24": (lambda x: knm.nm_prune(x, 2, 4, seed=SEED),
                   lambda x: nm_ref(x, 2, 4, noise=u(nm_noise_shape(x.shape, 2, 4, "mvue")))),
        "mvue24_approx": (lambda x: knm.nm_prune(x, 2, 4, method="mvue_approx", seed=SEED),
                          lambda x: nm_ref(x, 2, 4, method="mvue_approx",
                                           noise=u(nm_noise_shape(x.shape, 2, 4, "mvue_approx")))),
        "mse24": (lambda x: knm.nm_prune(x, 2, 4, method="mse", seed=SEED), lambda x: nm_ref(x, 2, 4, method="mse")),
        "mvue24_luq4 fused": (
            lambda x: kfused.nm_luq(x, 2, 4, noise=u(nm_noise_shape(x.shape, 2, 4, "mvue")),
                                    noise_luq=boundary_uniforms(x.shape)),
            lambda x: luq_ref(nm_ref(x, 2, 4, noise=u(nm_noise_shape(x.shape, 2, 4, "mvue"))),
                              noise=boundary_uniforms(x.shape))),
        "int4 (clip given)": (lambda x: kintq.int_quant(x, 4, signed=True, clip=float(x.abs().max())),
                              lambda x: intq_ref(x, 4, signed=True, clip=float(x.abs().max()))),
        "nvfp4_sr": (lambda x: kfp4.nvfp4(x, rounding="sr", seed=SEED), lambda x: fp4.nvfp4(x, rounding="sr",
                                                                                           noise=u(x.shape))),
        "nvfp4_2d_rtn": (lambda x: kfp4.nvfp4(x, block_2d=True, seed=SEED), lambda x: fp4.nvfp4(x, block_2d=True)),
        "mxfp4_sr": (lambda x: kfp4.mxfp4(x, rounding="sr", seed=SEED), lambda x: fp4.mxfp4(x, rounding="sr",
                                                                                           noise=u(x.shape))),
        "mxfp4_rtn": (lambda x: kfp4.mxfp4(x, seed=SEED), lambda x: fp4.mxfp4(x)),
        "luq4_b16": (lambda x: kfp4.block_luq(x, seed=SEED), lambda x: fp4.block_luq(x, noise=u(x.shape))),
    }


TRITON_NAMES = ["luq4", "luq4 hindsight max", "mvue24", "mvue24_approx", "mse24", "mvue24_luq4 fused",
                "int4 (clip given)", "nvfp4_sr", "nvfp4_2d_rtn", "mxfp4_sr", "mxfp4_rtn", "luq4_b16"]


@has_triton
@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", TRITON_NAMES)
def test_triton_twins_at_the_range_boundaries(case, dtype):
    kern, ref = _triton_cases()[case]
    for name, x in inputs(dtype):
        x = x[:4]  # 256 elements: the interpreter is slow
        same(kern(x), ref(x), f"Triton, {name}")
