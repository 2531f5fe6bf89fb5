"""The N:M C twins' batch paths (lowprec/kernels/cpu_nm.c): VW blocks per batch read as one vector
load per block element (blocks side by side: a row's run of batches in one loop), deinterleaved by shuffles (blocks back to back), or
gathered; a batch across row ends takes the first two when memory runs on there although the
uniform index jumps; MSE 2:4 in the same lanes, MSE 1:2 as a row loop when blocks sit side by side.
Bit for bit equal to lowprec.nm given the twins' uniforms and to the torch cores; a NaN/Inf in any
path raises or gives zeros as the reference does."""

from __future__ import annotations

import pytest
import torch

from lowprec import NonFiniteError
from lowprec.kernels import cpu, native
from lowprec.luq import luq as luq_ref
from lowprec.nm import nm_noise_shape
from lowprec.nm import nm_prune as nm_ref
import kernel_utils
from kernel_utils import same, torch_core
from stat_utils import U_LAST, boundary_uniforms

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"C twins unavailable: {native.status()}")

METHODS = [(1, 2, "mvue"), (2, 4, "mvue"), (2, 4, "mvue_approx"), (1, 2, "mse"), (2, 4, "mse"), (3, 8, "mse")]


def poked(x, k, v):
    """A copy of dense ``x`` (same strides) with its k-th element in memory order set to v."""
    y = x.clone()
    torch.as_strided(y, (y.numel(),), (1,))[k] = v
    return y


def grad_like(shape, seed=0):
    x = kernel_utils.grad_like(shape, seed)
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


def mvue12_edge_blocks():
    """MVUE 1:2 blocks at each branch of its closed form (cpu_nm_block.h, mvue12_keep_v): a share rounded to 1
    (capped), the small entry underflowing to s = 0 while the large one's share rounds to 1 - 2^-24 (kept
    outright, whatever the uniform), equal entries, subnormals, a zero (passed through), signs mixed."""
    big = 1.0096 * 2.0 ** 20  # s = 1.0096: s·(1/s) rounds to 1 - 2^-24
    pairs = [(1.0, 2.0 ** -25), (2.0 ** -25, -1.0), (big, 2.0 ** -131), (-(2.0 ** -131), big), (big, -big),
             (3.0, 3.0), (1e-40, 3e-41), (0.0, 5.0), (1.0096, 0.3), (1.0, 1e-7)]
    return torch.tensor(pairs * 4, dtype=torch.float32)  # 40 blocks: two VW-lane batches and a tail


def test_mvue12_closed_form_at_its_edges():
    x = mvue12_edge_blocks()
    for name, y, d in [("back to back", x.reshape(-1), -1), ("rows of 10 blocks", x.reshape(4, 10, 2), -1),
                       ("side by side", x.t().contiguous().t(), -1), ("along dim 0", x.t().contiguous(), 0)]:
        shape = nm_noise_shape(y.shape, 1, 2, "mvue", d)
        for u in (torch.full(shape, U_LAST), torch.zeros(shape), torch.full(shape, 0.5), boundary_uniforms(shape, 3)):
            want = nm_ref(y, 1, 2, dim=d, noise=u)
            assert torch.isfinite(want).all(), name
            same(cpu.nm_prune(y, 1, 2, dim=d, noise=u), want, name)


# ----------------------------------------------------------------------------- N:M then LUQ, fused

FUSED = [(1, 2, "mvue"), (2, 4, "mvue"), (2, 4, "mvue_approx"), (3, 8, "mvue"), (2, 4, "mse")]


def two_steps(x, n, m, g, **kw):
    luq_kw = {k: kw.pop(k) for k in ("bits", "levels") if k in kw}
    y = cpu.nm_prune(x, n, m, generator=g, **kw)
    return cpu.luq(y, luq_kw.pop("bits", 4), generator=g, nonfinite=kw.get("nonfinite", "raise"), **luq_kw)


def fused_and_two_steps(x, n, m, **kw):
    """Both ways from equal generators: (fused, two steps, whether the generators end equal)."""
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    a = cpu.nm_luq(x, n, m, generator=g1, **kw)
    b = two_steps(x, n, m, g2, **kw)
    return a, b, torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.parametrize("n,m,method", FUSED, ids=lambda v: str(v))
def test_nm_luq_equals_the_two_steps_and_draws_the_same(n, m, method):
    for name, x, d in layouts():
        if x.shape[d] % m:
            continue
        for kw in ({}, {"bits": 3}, {"levels": 5}):
            a, b, rng = fused_and_two_steps(x, n, m, method=method, dim=d, **kw)
            same(a, b, f"{name} {kw}")
            assert a.stride() == b.stride() and rng, name
        # and the references, given the uniforms the twins draw (the prune's seed first, then LUQ's)
        g = torch.Generator().manual_seed(4)
        s1, s2 = cpu.draw_seed(g), cpu.draw_seed(g)
        want = luq_ref(nm_ref(x, n, m, method=method, dim=d, noise=None if method == "mse" else cpu.uniforms(
            s1, nm_noise_shape(x.shape, n, m, method, d))), noise=cpu.uniforms(s2 if method != "mse" else s1, x.shape))
        same(cpu.nm_luq(x, n, m, method=method, dim=d, generator=torch.Generator().manual_seed(4)), want, name)


def test_nm_luq_edge_inputs_and_the_global_rng():
    x = grad_like((6, 256), 11)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):  # the two steps (no fused C twin)
        a, b, rng = fused_and_two_steps(x.to(dtype), 2, 4)
        same(a, b, str(dtype))
        assert rng
    tail = grad_like((3, 4 * 37), 13)  # 111 blocks: 6 batches of 16 and 15 one by one, max|out| in the last one
    tail[-1, -3] = 1e6
    for y in (torch.zeros(4, 64), torch.zeros(0, 8), x[:, :6], x.unsqueeze(0), tail):  # zeros, empty, padded, ...
        a, b, rng = fused_and_two_steps(y, 2, 4)
        same(a, b, str(tuple(y.shape)))
        assert rng
    torch.manual_seed(3)
    a = cpu.nm_luq(x, 2, 4)
    after = torch.get_rng_state()
    torch.manual_seed(3)
    same(a, cpu.luq(cpu.nm_prune(x, 2, 4)))
    assert torch.equal(after, torch.get_rng_state())
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    with pytest.raises(ValueError):  # LUQ's checks come after the prune's draw, as in the two steps
        cpu.nm_luq(x, 2, 4, bits=1, generator=g1)
    with pytest.raises(ValueError):
        two_steps(x, 2, 4, g2, bits=1)
    assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.parametrize("n,m,method", FUSED[:3], ids=lambda v: str(v))
def test_nm_luq_nonfinite_draws_as_the_two_steps(n, m, method):
    for name, x, d in layouts()[:3]:
        y = poked(x, x.numel() // 2 + 1, float("nan"))
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        with pytest.raises(NonFiniteError):
            cpu.nm_luq(y, n, m, method=method, dim=d, generator=g1)
        with pytest.raises(NonFiniteError):
            two_steps(y, n, m, g2, method=method, dim=d)
        assert torch.equal(g1.get_state(), g2.get_state()), name
        a, b, rng = fused_and_two_steps(y, n, m, method=method, dim=d, nonfinite="skip")
        same(a, torch.zeros_like(y), name)
        same(a, b, name)
        assert rng and a.stride() == b.stride(), name


def test_nm_luq_thread_count_and_torch_cores():
    x = grad_like((64, 128, 16), 12).permute(1, 0, 2)
    before = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 3):
            torch.set_num_threads(t)
            outs.append(cpu.nm_luq(x, 2, 4, generator=torch.Generator().manual_seed(2)))
    finally:
        torch.set_num_threads(before)
    same(*outs, "threads")
    same(outs[0], torch_core(lambda: cpu.nm_luq(x, 2, 4, generator=torch.Generator().manual_seed(2))), "torch cores")
