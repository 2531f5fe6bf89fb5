"""What the kernel-twin tests share: the devices they run on, the dtypes, the inputs, the bit-exact check.

The ``cpu`` cases run the Triton kernels in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
the ``cuda`` cases (marked ``gpu``) run the compiled kernels with ``TRITON_INTERPRET=0 pytest -m gpu``.
"""

import pytest
import torch

from lowprec.kernels import interpreter_enabled, native
from stat_utils import heavy_tailed

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        pytest.mark.skipif(interpreter_enabled(), reason="set TRITON_INTERPRET=0 to test the compiled kernels"),
    ]),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def heavy(shape, seed=0, dtype=torch.float32):
    """Log-normal magnitudes, random signs (how gradients look), with a few exact zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(2.0 * torch.randn(shape, generator=g)) * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    x.view(-1)[::17] = 0.0
    return x.to(dtype)


def grad_like(shape, seed=0, dtype=torch.float32):
    """Heavy-tailed values with exact zeros and blocks spanning many binades (capped entries, underflowing
    shares and block scales), finite in ``dtype``: the C twins' test inputs."""
    x = heavy_tailed(shape, sigma=3.0, seed=seed)
    x.view(-1)[::5] = 0.0
    x.view(-1)[3::11] *= 1e-30
    return torch.where(torch.isfinite(x.to(dtype)), x, 0.0).to(dtype)


def same(a, b, what=""):
    """Output ``a`` (a kernel's, a twin's) equals ``b`` (the reference's) bit for bit (shape, dtype, every value)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, a.dtype, b.shape, b.dtype)
    a, b = a.cpu(), b.cpu()
    if not torch.equal(a, b):
        bad = (a != b) & ~(a.isnan() & b.isnan())
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} differ, e.g. {a[bad][:4]} vs {b[bad][:4]}")


def torch_core(fn):
    """``fn()`` with the C twins off: the torch cores (same uniforms) run."""
    native.set_enabled(False)
    try:
        return fn()
    finally:
        native.set_enabled(None)
