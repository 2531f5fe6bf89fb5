"""The N:M C twins' batch paths (lowprec/kernels/cpu_nm.c): VW blocks per batch read as one vector
load per block element (blocks side by side), deinterleaved by shuffles (blocks back to back), or
gathered; a batch across row ends takes the first two when memory runs on there although the
uniform index jumps; MSE 2:4 in the same lanes, MSE 1:2 as a row loop when blocks sit side by side.
Bit for bit equal to lowprec.nm given the twins' uniforms and to the torch cores; a NaN/Inf in any
path raises or gives zeros as the reference does."""

from __future__ import annotations

import pytest
import torch

from lowprec import NonFiniteError
from lowprec.kernels import cpu, native
from lowprec.nm import nm_noise_shape
from lowprec.nm import nm_prune as nm_ref
from kernel_utils import torch_core
from stat_utils import boundary_uniforms, heavy_tailed

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"C twins unavailable: {native.status()}")

METHODS = [(1, 2, "mvue"), (2, 4, "mvue"), (2, 4, "mvue_approx"), (1, 2, "mse"), (2, 4, "mse"), (3, 8, "mse")]


def same(a, b, what=""):
    assert a.shape == b.shape and a.dtype == b.dtype, what
    assert torch.equal(a, b), f"{what}: {int((a != b).sum())} of {a.numel()} differ"


def poked(x, k, v):
    """A copy of dense ``x`` (same strides) with its k-th element in memory order set to v."""
    y = x.clone()
    torch.as_strided(y, (y.numel(),), (1,))[k] = v
    return y


def grad_like(shape, seed=0):
    x = heavy_tailed(shape, sigma=3.0, seed=seed)
    x.view(-1)[::5] = 0.0
    x.view(-1)[3::11] *= 1e-30
    x.view(-1)[7::13] = -x.view(-1)[6::13][: x.view(-1)[7::13].numel()]  # ties (MSE keeps the lower index)
    return x


def layouts():
    """(name, x, dim): each batch path of nm_span / nm_blocks_v."""
    return [
        ("blocks back to back, long rows (shuffles)", grad_like((6, 256), 1), -1),
        ("rows of whole blocks, memory runs on, uniform index jumps", grad_like((24, 4, 16), 2).permute(1, 0, 2), -1),
        ("blocks side by side, rows of 8, memory runs on, index jumps",
         grad_like((8, 6, 8), 3).permute(2, 1, 0), -1),
        ("blocks side by side in rows of 32", grad_like((8, 6, 32), 4).permute(2, 1, 0), -1),
        ("a Linear's [out, T] view (gather across rows)", grad_like((96, 24), 5).t(), -1),
        ("conv [C, N, HW] view, blocks along C", grad_like((4, 16, 5, 6), 6).permute(1, 0, 2, 3).reshape(16, 4, 30), 0),
        ("conv [C, N, HW] view, blocks along HW", grad_like((4, 16, 2, 8), 7).permute(1, 0, 2, 3).reshape(16, 4, 16), -1),
    ]


@pytest.mark.parametrize("n,m,method", METHODS, ids=lambda v: str(v))
def test_nm_batch_paths_bit_identical(n, m, method):
    for name, x, d in layouts():
        if x.shape[d] % m:
            continue
        if method == "mse":
            same(cpu.nm_prune(x, n, m, method="mse", dim=d), nm_ref(x, n, m, method="mse", dim=d), name)
            same(cpu.nm_prune(x, n, m, method="mse", dim=d),
                 torch_core(lambda: cpu.nm_prune(x, n, m, method="mse", dim=d)), name)
            continue
        g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
        shape = nm_noise_shape(x.shape, n, m, method, d)
        y = cpu.nm_prune(x, n, m, method=method, dim=d, generator=g())
        same(y, nm_ref(x, n, m, method=method, dim=d, noise=cpu.uniforms(cpu.draw_seed(g()), shape)), name)
        t = torch_core(lambda: cpu.nm_prune(x, n, m, method=method, dim=d, generator=g()))
        same(y, t, name)
        assert y.stride() == t.stride(), name
        u = boundary_uniforms(shape, seed=2)
        same(cpu.nm_prune(x, n, m, method=method, dim=d, noise=u), nm_ref(x, n, m, method=method, dim=d, noise=u),
             f"given uniforms, {name}")


@pytest.mark.parametrize("n,m,method", METHODS, ids=lambda v: str(v))
def test_nm_nonfinite_in_every_path_raises_or_zeros(n, m, method):
    for name, x, d in layouts():
        if x.shape[d] % m:
            continue
        for k in (0, x.numel() // 2 + 1, x.numel() - 1):  # in memory order: first, middle, last batch
            for bad in (float("nan"), float("inf")):
                y = poked(x, k, bad)
                with pytest.raises(NonFiniteError):
                    cpu.nm_prune(y, n, m, method=method, dim=d, generator=torch.Generator().manual_seed(0))
                z = cpu.nm_prune(y, n, m, method=method, dim=d, generator=torch.Generator().manual_seed(0),
                                 nonfinite="skip")
                assert torch.equal(z, torch.zeros_like(y)), (name, k, bad)
