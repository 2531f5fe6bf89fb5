"""Triton twins of lowprec.fp4 (NVFP4, MXFP4, block LUQ) vs the references, bit for bit.

CPU cases run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); the ``cuda``
cases (marked ``gpu``) run the compiled kernels with ``TRITON_INTERPRET=0 pytest -m gpu``. The
kernel's uniforms (``lowprec.kernels.common.uniforms``) go to the reference as ``noise=``; the
reference always runs on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from lowprec import dispatch, fp4

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

from lowprec.kernels import fp4 as kfp4  # noqa: E402
from lowprec.kernels.common import uniforms  # noqa: E402
from kernel_utils import DEVICES, DTYPES, heavy, same  # noqa: E402

SHAPES = {"37x45_d-1": ((37, 45), -1), "37x45_d0": ((37, 45), 0), "5x7x33_d1": ((5, 7, 33), 1),
          "1001_d0": ((1001,), 0), "1_d0": ((1,), 0)}
SEED = 4321

CASES = {
    "nvfp4_rtn": (lambda x, d: kfp4.nvfp4(x, dim=d, seed=SEED), lambda x, d, u: fp4.nvfp4(x, dim=d)),
    "nvfp4_sr": (lambda x, d: kfp4.nvfp4(x, dim=d, rounding="sr", seed=SEED),
                 lambda x, d, u: fp4.nvfp4(x, dim=d, rounding="sr", noise=u)),
    "nvfp4_2d_rtn": (lambda x, d: kfp4.nvfp4(x, block_2d=True, seed=SEED), lambda x, d, u: fp4.nvfp4(x, block_2d=True)),
    "nvfp4_2d_sr": (lambda x, d: kfp4.nvfp4(x, block_2d=True, rounding="sr", seed=SEED),
                    lambda x, d, u: fp4.nvfp4(x, block_2d=True, rounding="sr", noise=u)),
    "mxfp4_rtn": (lambda x, d: kfp4.mxfp4(x, dim=d, seed=SEED), lambda x, d, u: fp4.mxfp4(x, dim=d)),
    "mxfp4_sr": (lambda x, d: kfp4.mxfp4(x, dim=d, rounding="sr", seed=SEED),
                 lambda x, d, u: fp4.mxfp4(x, dim=d, rounding="sr", noise=u)),
    "luq4_b16": (lambda x, d: kfp4.block_luq(x, dim=d, seed=SEED), lambda x, d, u: fp4.block_luq(x, dim=d, noise=u)),
    "luq4_b32": (lambda x, d: kfp4.block_luq(x, block=32, dim=d, seed=SEED),
                 lambda x, d, u: fp4.block_luq(x, block=32, dim=d, noise=u)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case", list(CASES))
def test_fp4_kernels_bit_exact(device, dtype, shape, case):
    shp, dim = SHAPES[shape]
    x = heavy(shp, seed=len(shape) + len(case), dtype=dtype)
    kern, ref = CASES[case]
    u = uniforms(SEED, x.shape, device).cpu()
    same(kern(x.to(device), dim), ref(x, dim, u))


@pytest.mark.parametrize("device", DEVICES)
def test_fp4_kernels_extreme_scales_bit_exact(device):
    """Tiny and huge blocks (E4M3 subnormal / zero block scales, E8M0 clamps), exact ties of the grid."""
    x = heavy((8, 64))
    x[0] *= 1e-30
    x[1] *= 1e30
    x[2, :16] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 2)
    x[3] = 1e-42  # fp32 subnormals
    x[4, 5] = 1e6  # one outlier: the other blocks' NVFP4 scales underflow E4M3
    for case, (kern, ref) in CASES.items():
        u = uniforms(SEED, x.shape, device).cpu()
        same(kern(x.to(device), -1), ref(x, -1, u))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp4_kernels_half_subnormals_bit_exact(device, dtype):
    """Blocks of 16-bit subnormals (the interpreter's bf16 -> fp32 cast got them wrong until the kernel
    widened bf16 by a bit shift): every format, both roundings, the values and the scales exact."""
    tiny = torch.finfo(dtype).smallest_normal
    x = heavy((6, 64), seed=3) * tiny / 8  # mostly subnormal magnitudes, some normal
    x[1] = torch.arange(64) * (tiny / 64)  # an exact subnormal ramp
    x = x.to(dtype)
    assert (x.abs() < tiny).sum() > 100 and (x != 0).sum() > 300
    for case, (kern, ref) in CASES.items():
        u = uniforms(SEED, x.shape, device).cpu()
        same(kern(x.to(device), -1), ref(x, -1, u))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", ["nvfp4", "mxfp4", "block_luq"])
def test_fp4_kernels_nonfinite(device, fn):
    x = heavy((4, 40)).to(device)
    x[2, 7] = float("inf")
    k = getattr(kfp4, fn)
    with pytest.raises(ValueError, match="NaN/Inf"):
        k(x, seed=1)
    assert torch.equal(k(x, seed=1, nonfinite="skip").cpu(), torch.zeros(4, 40))
    assert k(x[:0], seed=1).shape == (0, 40)


def test_dispatch_forces_either_backend():
    x = heavy((16, 48))
    torch.manual_seed(0)
    a = dispatch.mxfp4(x, backend="triton")
    assert torch.equal(a, fp4.mxfp4(x)) and torch.equal(dispatch.mxfp4(x, backend="reference"), a)
    u = torch.rand(x.shape)
    assert torch.equal(dispatch.nvfp4(x, rounding="sr", noise=u), fp4.nvfp4(x, rounding="sr", noise=u))
    with pytest.raises(RuntimeError, match="noise"):
        dispatch.block_luq(x, noise=u, backend="triton")
