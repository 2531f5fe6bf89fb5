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
from lowprec.kernels import interpreter_enabled

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

from lowprec.kernels import fp4 as kfp4  # noqa: E402
from lowprec.kernels.common import uniforms  # noqa: E402

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        pytest.mark.skipif(interpreter_enabled(), reason="set TRITON_INTERPRET=0 to test the compiled kernels"),
    ]),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# odd shapes: tails in every blocked dimension, 3-D with inner > 1, a single element
SHAPES = {"37x45_d-1": ((37, 45), -1), "37x45_d0": ((37, 45), 0), "5x7x33_d1": ((5, 7, 33), 1),
          "1001_d0": ((1001,), 0), "1_d0": ((1,), 0)}
SEED = 4321


def heavy(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(2.0 * torch.randn(shape, generator=g)) * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    x.view(-1)[::17] = 0.0
    return x.to(dtype)


def same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    a, b = a.cpu(), b.cpu()
    bad = a != b
    assert torch.equal(a, b), f"{int(bad.sum())} of {a.numel()} differ, e.g. kernel {a[bad][:4]} vs reference {b[bad][:4]}"


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
