"""The block FP4 C twins' fast paths (lowprec/kernels/cpu_fp4.c): blocks along a row G at a time
(their maxima and scales with the blocks in the vector lanes), rows of whole blocks read back to back
across row ends (each block's uniform index from its row and column: a Linear δ's token view, blocks
along C_out), and each block's own NaN/Inf test (MXFP4 and block LUQ read x once).
Bit for bit equal to lowprec.fp4 given the twins' uniforms and to the torch cores, with partial groups
and tail blocks, in transposed layouts, at extreme scales, for fp32/bf16/fp16; a NaN/Inf anywhere
raises or gives zeros as the reference does; the thread count changes nothing. NVFP4 after the block
RHT (lp_rht_nvfp4_f32: the rotation into a buffer, never written) equals the two twins and the references."""

from __future__ import annotations

import pytest
import torch

from lowprec import NonFiniteError, dispatch, fp4, hadamard
from lowprec.kernels import cpu, cpu_rht, native, native_calls
from kernel_utils import grad_like, same, torch_core
from stat_utils import boundary_uniforms

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"C twins unavailable: {native.status()}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

FP4 = {  # name: (twin(x, dim, **kw), reference(x, dim, uniforms), stochastic)
    "nvfp4_rtn": (lambda x, d, **k: cpu.nvfp4(x, dim=d, **k), lambda x, d, u: fp4.nvfp4(x, dim=d), False),
    "nvfp4_sr": (lambda x, d, **k: cpu.nvfp4(x, dim=d, rounding="sr", **k),
                 lambda x, d, u: fp4.nvfp4(x, dim=d, rounding="sr", noise=u), True),
    "mxfp4_rtn": (lambda x, d, **k: cpu.mxfp4(x, dim=d, **k), lambda x, d, u: fp4.mxfp4(x, dim=d), False),
    "mxfp4_sr": (lambda x, d, **k: cpu.mxfp4(x, dim=d, rounding="sr", **k),
                 lambda x, d, u: fp4.mxfp4(x, dim=d, rounding="sr", noise=u), True),
    "luq4_b16": (lambda x, d, **k: cpu.block_luq(x, dim=d, **k), lambda x, d, u: fp4.block_luq(x, dim=d, noise=u),
                 True),
    "luq3_b32": (lambda x, d, **k: cpu.block_luq(x, 3, block=32, dim=d, **k),
                 lambda x, d, u: fp4.block_luq(x, 3, block=32, dim=d, noise=u), True),
}


def extremes(dtype):
    """[16, 512] (folded into one row: 2 groups of 16 blocks of 16, one of 32) with special rows."""
    x = grad_like((16, 512), seed=9)
    x[0] *= 1e-30  # E4M3 subnormal / zero block scales, MXFP4 scales clamped at 2^-126
    x[1] *= 1e30
    x[2, :16] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 2)  # grid ties
    x[3] = 1e-42  # fp32 subnormals
    x[4, 5] = 1e6  # an outlier: the other blocks' NVFP4 scales underflow E4M3
    x[5] = 0.0  # all-zero blocks
    x[6, 100:140] = -7.0  # equal magnitudes
    x[7, ::3] = 3.0e38  # near fp32's max (inf in bf16/fp16: zeroed below)
    x[8, :256] = torch.linspace(-1e-38, 1e-38, 256)  # around the smallest normal
    return torch.where(torch.isfinite(x.to(dtype)), x, 0.0).to(dtype)


def layouts(dtype):
    """(name, x, dim): every path of the row kernel and the column kernel."""
    t = grad_like((300, 520), 4, dtype).t()  # [520, 300] with strides (1, 520): a Linear δ's token view
    return [("long rows, partial group and tail", grad_like((3, 700), 1, dtype), -1),
            ("short rows folded into one", grad_like((40, 96), 2, dtype), -1),
            ("short rows with a tail (not folded)", grad_like((50, 40), 3, dtype), -1),
            ("transposed: blocks along memory rows", t, 0),
            ("transposed: blocks across memory rows", t, -1),
            ("transposed, whole blocks per row (not folded: the uniform index jumps)",
             grad_like((300, 512), 7, dtype).t(), 0),
            ("transposed, short rows of whole blocks", grad_like((40, 96), 8, dtype).t(), 0),
            ("3-D, blocks along an outer dim", grad_like((4, 600, 3), 5, dtype), 1),
            ("a convolution's token view [C, N, H·W] in NCHW memory (rows in two levels)",
             grad_like((6, 40, 64), 12, dtype).transpose(0, 1), -1),
            ("the same with 3 blocks per row (groups span rows of both levels)",
             grad_like((5, 7, 48), 13, dtype).transpose(0, 1), -1),
            ("3-D, blocks along the last dim", grad_like((2, 3, 1100), 6, dtype), -1),
            ("extremes", extremes(dtype), -1),
            ("extremes along dim 0", extremes(dtype), 0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(FP4))
def test_fp4_fast_paths_bit_identical(case, dtype):
    twin, ref, sr = FP4[case]
    for name, x, d in layouts(dtype):
        g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
        y = twin(x, d, generator=g())
        same(y, ref(x, d, cpu.uniforms(cpu.draw_seed(g()), x.shape)), f"C twin vs reference, {name}")
        same(y, torch_core(lambda: twin(x, d, generator=g())), f"C twin vs torch core, {name}")
        if sr:
            u = boundary_uniforms(x.shape, seed=1)
            same(twin(x, d, noise=u), ref(x, d, u), f"given uniforms, {name}")


@pytest.mark.parametrize("case", list(FP4))
def test_fp4_nonfinite_anywhere_raises_or_zeros(case):
    """A NaN/Inf in a group, in a row's tail block, in a column block, or in the last element: the
    block that reads it reports it (MXFP4 and block LUQ have no separate max pass)."""
    twin, ref, _ = FP4[case]
    for shape, d, where in [((3, 700), -1, (1, 300)), ((3, 700), -1, (2, 699)), ((40, 96), -1, (39, 95)),
                            ((64, 48), 0, (40, 7)), ((4, 600, 3), 1, (3, 599, 2)), ((16, 512), -1, (0, 0)),
                            ("t", 0, (70, 33)), ("t", 0, (95, 39))]:  # transposed: groups across row ends
        for bad in (float("nan"), float("inf"), -float("inf")):
            x = grad_like((40, 96), 8).t() if shape == "t" else grad_like(shape, 8)
            x[where] = bad
            with pytest.raises(NonFiniteError):
                ref(x, d, boundary_uniforms(x.shape))
            with pytest.raises(NonFiniteError):
                twin(x, d, generator=torch.Generator().manual_seed(0))
            same(twin(x, d, generator=torch.Generator().manual_seed(0), nonfinite="skip"), torch.zeros_like(x),
                 f"skip, {shape} {where} {bad}")


@pytest.mark.parametrize("case", list(FP4))
def test_fp4_thread_count_does_not_change_results(case):
    twin, _, _ = FP4[case]
    before = torch.get_num_threads()
    try:
        for x, d in ((grad_like((64, 2048), 10), -1), (grad_like((64, 2048), 11), 0), (grad_like((8, 16384), 12), -1),
                     (grad_like((2048, 96), 13).t(), 0)):
            outs = []
            for t in (1, 3):
                torch.set_num_threads(t)
                outs.append(twin(x, d, generator=torch.Generator().manual_seed(2)))
            same(*outs, f"threads, {tuple(x.shape)} dim {d}")
            x[-1, -1] = float("nan")
            with pytest.raises(NonFiniteError):
                twin(x, d, generator=torch.Generator().manual_seed(2))
    finally:
        torch.set_num_threads(before)


def rht_layouts(dtype=torch.float32):
    """(name, x, dim, fused): the RHT's rotated dim not innermost in memory (one C call: fused) or innermost
    (the two twins), with tail blocks (zero-padded rows) and partial column chunks."""
    x = extremes(dtype).t().contiguous()  # [512, 16]: the special rows as columns, rotated along dim 0
    x[:, 7] /= 30  # 1e37, not 3e38: a block's sum of 16 stays finite
    return [("[T, C] along tokens, T % 32 != 0, C % 64 != 0", grad_like((1000, 70), 1, dtype), 0, True),
            ("transposed [C, T] view along tokens (a Linear δ)", grad_like((130, 300), 2, dtype).t(), -1, True),
            ("3-D, rotated along the middle dim", grad_like((3, 37, 200), 3, dtype), 1, True),
            ("extremes as columns", x, 0, True),
            ("rotated along the innermost dim", grad_like((40, 100), 4, dtype), -1, False)]


@pytest.mark.parametrize("n", [16, 32])
@pytest.mark.parametrize("rounding", ["rtn", "sr"])
def test_rht_nvfp4_equals_the_rotation_then_nvfp4(n, rounding, monkeypatch):
    calls = []
    run = native_calls.run_rht_nvfp4
    monkeypatch.setattr(native_calls, "run_rht_nvfp4", lambda *a, **k: calls.append(1) or run(*a, **k))
    s = hadamard.random_signs(n, generator=torch.Generator().manual_seed(n))
    for dtype in (torch.float32, torch.float16):
        for name, x, d, fused in rht_layouts(dtype):
            g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
            del calls[:]
            y = cpu_rht.rht_nvfp4(x, s, d, rounding=rounding, generator=g())
            assert len(calls) == (fused and dtype == torch.float32), (name, dtype)  # fp16: block_rht rounds to fp16
            r = hadamard.block_rht(x, s, d)
            same(y, cpu.nvfp4(cpu.block_rht(x, s, d), dim=d, rounding=rounding, generator=g()), f"two twins, {name}")
            assert y.stride() == cpu.block_rht(x, s, d).stride(), name  # the layout the update GEMM gets
            same(y, fp4.nvfp4(r, dim=d, rounding=rounding, noise=cpu.uniforms(cpu.draw_seed(g()), r.shape)),
                 f"reference, {name}")
            same(y, torch_core(lambda: cpu_rht.rht_nvfp4(x, s, d, rounding=rounding, generator=g())), f"torch, {name}")
            same(y, dispatch.rht_nvfp4(x, s, d, rounding=rounding, generator=g()), f"dispatch, {name}")
            if rounding == "sr":
                u = boundary_uniforms(r.shape, seed=1)
                same(cpu_rht.rht_nvfp4(x, s, d, rounding="sr", noise=u), fp4.nvfp4(r, dim=d, rounding="sr", noise=u),
                     f"given uniforms, {name}")


def test_rht_nvfp4_nonfinite_and_threads():
    s = hadamard.random_signs(16, generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    try:
        for x, d in ((grad_like((2000, 300), 1), 0), (grad_like((2000, 300), 2).t(), -1)):
            outs = []
            for t in (1, 3):
                torch.set_num_threads(t)
                outs.append(cpu_rht.rht_nvfp4(x, s, d, rounding="sr", generator=torch.Generator().manual_seed(2)))
            same(*outs, f"threads, {tuple(x.shape)} dim {d}")
            x[1999 if d == 0 else 7, 7 if d == 0 else 1999] = float("nan")  # in the last (tail-less) block
            with pytest.raises(NonFiniteError):
                cpu_rht.rht_nvfp4(x, s, d, generator=torch.Generator().manual_seed(2))
            same(cpu_rht.rht_nvfp4(x, s, d, nonfinite="skip"), torch.zeros_like(outs[0]), f"skip, dim {d}")
    finally:
        torch.set_num_threads(before)
