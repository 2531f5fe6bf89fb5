"""Triton kernels vs the plain-PyTorch references, and the dispatcher.

On the CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
The ``cuda`` variants (marked ``gpu``) run the compiled kernels: ``TRITON_INTERPRET=0 pytest -m gpu
tests/test_kernels.py`` on a machine with a GPU. Bit-exact checks feed the kernel's own uniforms
(``lowprec.kernels.common.uniforms``) to the reference as ``noise=`` and require ``torch.equal``;
the reference always runs on the CPU (it is the specification).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lowprec import dispatch
from lowprec.intq import int_quant, sawb_clip
from lowprec.kernels import cpu, interpreter_enabled
from lowprec.luq import luq, luq_variance
from lowprec.nm import nm_noise_shape, nm_prune, nm_variance

pytest.importorskip("triton")
# numpy warnings from the interpreter for lanes the kernels mask out afterwards (0/0 in padding etc.)
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

from lowprec.kernels import fused as kfused  # noqa: E402
from lowprec.kernels import intq as kintq  # noqa: E402
from lowprec.kernels import luq as kluq  # noqa: E402
from lowprec.kernels import nm as knm  # noqa: E402
from lowprec.kernels.common import uniforms  # noqa: E402
from kernel_utils import DEVICES, DTYPES, heavy, same  # noqa: E402
from lowprec.packing import luq_pack_reference, luq_unpack_reference  # noqa: E402

# ---------------------------------------------------------------------------------------------- LUQ

LUQ_SHAPES = {"1": (1,), "1000": (1000,), "4097": (4097,), "2d_noncontig": (65, 33), "zeros": (300,)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(LUQ_SHAPES))
def test_luq_bit_exact(device, dtype, case):
    x = heavy(LUQ_SHAPES[case], seed=len(case), dtype=dtype)
    if case == "zeros":
        x.zero_()
    if case == "2d_noncontig":
        x = x.t()  # [33, 65] view, not contiguous
        assert not x.is_contiguous()
    q = kluq.luq(x.to(device), seed=1234)
    u = uniforms(1234, x.shape, device).cpu()
    same(q, luq(x, noise=u))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,levels", [(4, 8), (3, None), (5, None)])
def test_luq_levels_bit_exact(device, bits, levels):
    x = heavy((2001,), seed=3)
    q = kluq.luq(x.to(device), bits, levels=levels, seed=9)
    same(q, luq(x, bits, levels=levels, noise=uniforms(9, x.shape, device).cpu()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_luq_hindsight_one_pass(device, dtype):
    # 1.2345678 is not a bf16/fp16 value: the levels α·2^k need rounding on output (bf16: RNE).
    x = heavy((3001,), seed=4, dtype=dtype)
    q, cur = kluq.luq(x.to(device), max_abs=1.2345678, seed=21, return_amax=True)
    same(q, luq(x, max_abs=1.2345678, noise=uniforms(21, x.shape, device).cpu()))
    assert cur.item() == x.float().abs().max().item()
    # the two-pass path returns the same max
    _, cur2 = kluq.luq(x.to(device), seed=21, return_amax=True)
    assert cur2.item() == cur.item()


@pytest.mark.parametrize("device", DEVICES)
def test_luq_amax_impls_agree(device):
    x = heavy((5000,), seed=5).to(device)
    assert kluq.amax(x, "triton").item() == kluq.amax(x, "torch").item() == x.abs().max().item()
    same(kluq.luq(x, seed=3, amax_impl="torch"), kluq.luq(x, seed=3))


@pytest.mark.parametrize("device", DEVICES)
def test_luq_nonfinite(device):
    x = heavy((500,), seed=6).to(device)
    x[7] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        kluq.luq(x, seed=1)
    assert kluq.luq(x, seed=1, nonfinite="skip").abs().sum().item() == 0
    assert kluq.luq(x, seed=1, nonfinite="skip", max_abs=3.0).abs().sum().item() == 0
    x[7] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        kluq.luq(x, seed=1, max_abs=3.0)


@pytest.mark.parametrize("device", DEVICES)
def test_luq_seed_from_torch_rng(device):
    x = heavy((777,), seed=7).to(device)
    torch.manual_seed(5)
    a = kluq.luq(x)
    torch.manual_seed(5)
    b = kluq.luq(x)
    c = kluq.luq(x)
    same(a, b)
    assert not torch.equal(a, c)
    g = torch.Generator().manual_seed(5)
    same(kluq.luq(x, generator=g), a)  # the seed comes from the same CPU stream


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 999, 4096])
def test_luq_pack_round_trip(device, dtype, n):
    x = heavy((n,), seed=n, dtype=dtype)
    codes, alpha = kluq.luq_pack(x.to(device), seed=77)
    assert codes.dtype == torch.uint8 and codes.numel() == (n + 1) // 2
    ref = luq(x, noise=uniforms(77, x.shape, device).cpu())
    same(kluq.luq_unpack(codes, alpha, x.shape, dtype), ref)  # kernel decoder
    same(luq_unpack_reference(codes.cpu(), alpha.cpu(), x.shape, dtype), ref)  # torch decoder
    ref32 = luq(x.float(), noise=uniforms(77, x.shape, device).cpu())
    same(luq_pack_reference(ref32, alpha.cpu()), codes.cpu())  # torch encoder
    # 4 bits per element: the code set is sign + 3-bit exponent index
    nib = torch.stack([codes.cpu() & 15, codes.cpu() >> 4], -1).reshape(-1)[:n]
    assert int((nib & 7).max()) <= 7


def test_luq_pack_rejects_wide_formats():
    with pytest.raises(ValueError, match="4-bit"):
        kluq.luq_pack(torch.randn(10), 4, levels=8)
    with pytest.raises(ValueError, match="4-bit"):
        dispatch.luq_pack(torch.randn(10), 5)


def test_dispatch_pack_backends_agree():
    x = heavy((1001,), seed=8)
    codes, alpha = kluq.luq_pack(x, seed=5)
    rc, ra = dispatch.luq_pack(x, noise=uniforms(5, x.shape), backend="reference")
    same(rc, codes)
    assert ra.item() == alpha.item()
    same(dispatch.luq_unpack(codes, alpha, x.shape, backend="triton"),
         dispatch.luq_unpack(codes, alpha, x.shape, backend="reference"))


# ---------------------------------------------------------------------------------------------- N:M


def nm_input(shape, dtype=torch.float32, seed=0):
    """Gradient-like values plus the special blocks along dim -1: all zero, <= N non-zeros, one dominant
    entry (the 2:4 regime |x_k| > S/2), ties (mse)."""
    x = heavy(shape, seed=seed)
    flat = x.view(shape[0], -1)
    flat[0, :8] = 0.0
    flat[0, 8:12] = torch.tensor([0.0, 3.0, 0.0, -1.0])
    flat[1 % shape[0], :8] = torch.tensor([10.0, 1.0, -1.0, 1.0, 2.0, 2.0, -2.0, 2.0])
    return x.to(dtype)


NM_CASES = [(1, 2, "mvue"), (2, 4, "mvue"), (2, 8, "mvue"), (3, 8, "mvue"), (2, 3, "mvue"),
            (2, 4, "mvue_approx"), (1, 4, "mvue_approx"), (2, 4, "mse"), (1, 4, "mse")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,m,method", NM_CASES, ids=[f"{m}{n}{k}" for n, k, m in NM_CASES])
@pytest.mark.parametrize("dim", [-1, 0])
def test_nm_bit_exact(device, n, m, method, dim):
    x = nm_input((6, 1003))  # 1003 % M != 0 (dim -1) and 6 % 4 != 0 (dim 0): tail padding both ways
    q = knm.nm_prune(x.to(device), n, m, method=method, dim=dim, seed=31)
    u = None if method == "mse" else uniforms(31, nm_noise_shape(x.shape, n, m, method, dim), device).cpu()
    same(q, nm_prune(x, n, m, method=method, dim=dim, noise=u))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["mvue", "mvue_approx"])
def test_nm_bit_exact_half(device, dtype, method):
    x = nm_input((5, 402), dtype=dtype, seed=1)
    q = knm.nm_prune(x.to(device), 2, 4, method=method, seed=8)
    same(q, nm_prune(x, 2, 4, method=method, noise=uniforms(8, nm_noise_shape(x.shape, 2, 4, method), device).cpu()))


@pytest.mark.parametrize("device", DEVICES)
def test_nm_nd_and_noncontiguous(device):
    x = heavy((4, 7, 9), seed=2)
    u = uniforms(3, nm_noise_shape(x.shape, 2, 4, "mvue", 1), device).cpu()
    same(knm.nm_prune(x.to(device), 2, 4, dim=1, seed=3), nm_prune(x, 2, 4, dim=1, noise=u))
    xt = heavy((50, 6), seed=3).t()  # [6, 50] non-contiguous, blocks along tokens
    u = uniforms(4, nm_noise_shape(xt.shape, 1, 2), device).cpu()
    same(knm.nm_prune(xt.to(device), 1, 2, seed=4), nm_prune(xt, 1, 2, noise=u))


@pytest.mark.parametrize("device", DEVICES)
def test_nm_edge_cases(device):
    x = heavy((3, 40), seed=4).to(device)
    same(knm.nm_prune(x, 4, 4), x)  # N == M: identity
    same(knm.nm_prune(torch.zeros(3, 40, device=device), 2, 4, seed=1), torch.zeros(3, 40))
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        knm.nm_prune(x, 2, 4, seed=1)
    assert knm.nm_prune(x, 2, 4, seed=1, nonfinite="skip").abs().sum().item() == 0
    with pytest.raises(ValueError, match="M <= 8"):
        knm.nm_prune(x, 2, 16)
    with pytest.raises(ValueError):
        knm.nm_prune(x, 3, 4, method="mvue_approx")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,m,method,dim", [(2, 4, "mvue", -1), (1, 2, "mvue", 0), (2, 4, "mvue_approx", -1),
                                            (2, 4, "mse", 0)])
def test_fused_nm_luq_bit_exact(device, dtype, n, m, method, dim):
    x = nm_input((6, 1003), dtype=dtype, seed=5)
    q = kfused.nm_luq(x.to(device), n, m, method=method, dim=dim, seed=3, seed_luq=4)
    u1 = None if method == "mse" else uniforms(3, nm_noise_shape(x.shape, n, m, method, dim), device).cpu()
    same(q, luq(nm_prune(x, n, m, method=method, dim=dim, noise=u1), noise=uniforms(4, x.shape, device).cpu()))


@pytest.mark.parametrize("device", DEVICES)
def test_fused_nm_luq_nonfinite_and_dispatch(device):
    x = nm_input((4, 100), seed=6).to(device)
    ref = dispatch.nm_luq(x.cpu(), 2, 4, generator=torch.Generator().manual_seed(0), backend="reference")
    assert ref.shape == x.shape and int((ref.view(4, 25, 4) != 0).sum(-1).max()) <= 2
    x[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        kfused.nm_luq(x, 2, 4, seed=1, seed_luq=2)
    assert kfused.nm_luq(x, 2, 4, seed=1, seed_luq=2, nonfinite="skip").abs().sum().item() == 0


# ---------------------------------------------------------------------------------------------- INT


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("signed", [None, True, False])
def test_int_quant_bit_exact(device, dtype, per_channel, signed):
    x = torch.randn(16, 3, 3, 21, generator=torch.Generator().manual_seed(0)).to(dtype)
    if signed is False:
        x = x.relu()  # an activation after ReLU: unsigned grid
    c = sawb_clip(x, 4, per_channel=per_channel)
    xd = x.to(device)
    same(kintq.int_quant(xd, 4, signed=signed, per_channel=per_channel, clip=c.to(device)),
         int_quant(x, 4, signed=signed, per_channel=per_channel, clip=c))
    # clip computed by the kernel's reduction: close to the reference's, and the output is exactly
    # the reference's output for that clip
    ck = kintq.sawb_clip(xd, 4, per_channel=per_channel).cpu()
    torch.testing.assert_close(ck, c, rtol=1e-5, atol=0)
    same(kintq.int_quant(xd, 4, signed=signed, per_channel=per_channel),
         int_quant(x, 4, signed=signed, per_channel=per_channel, clip=ck))
    same(kintq.int_quant(xd, 8, signed=signed, per_channel=per_channel, clip_method="max"),
         int_quant(x, 8, signed=signed, per_channel=per_channel, clip_method="max"))


@pytest.mark.parametrize("device", DEVICES)
def test_int_quant_mse_scalar_clip_and_errors(device):
    x = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    xd = x.to(device)
    same(kintq.int_quant(xd, 3, clip_method="mse"), int_quant(x, 3, clip_method="mse"))
    same(kintq.int_quant(xd, 4, per_channel=True, clip=0.7, signed=True),
         int_quant(x, 4, per_channel=True, clip=0.7, signed=True))
    x[2, 3] = float("inf")
    for kw in ({}, {"clip": 1.0, "signed": True}):
        with pytest.raises(ValueError, match="NaN/Inf"):
            kintq.int_quant(x.to(device), 4, **kw)


# ---------------------------------------------------------------------------------------------- statistics


def assert_unbiased_draws(d, x, variance, z=6.0):
    """d: K independent draws [K, *x.shape] of an estimator of x with closed-form total variance.

    S = ‖mean_K - x‖² has E[S] = V/K when unbiased; sd[S] from the measured per-element moments.
    A bias b adds ‖b‖², which does not shrink with K.
    """
    d, x = d.double(), x.double()
    k = d.shape[0]
    s = float((d.mean(0) - x).square().sum())
    c = d - d.mean(0)
    var = c.square().sum(0) / (k - 1)
    mu4 = c.pow(4).mean(0)
    sd = float(((3 * var.square() * (k - 1) + mu4) / k ** 3 - (var / k).square()).clamp_min(0).sum().sqrt())
    e_s = float(variance) / k
    assert s <= e_s + z * sd + 1e-12 * float(x.square().sum()), f"‖mean-x‖²={s:.4g} > {e_s:.4g} + {z}·{sd:.4g}"
    # the measured total variance matches the closed form (the probabilities are the MVUE's)
    assert abs(float(var.sum()) / float(variance) - 1) < 0.1, (float(var.sum()), float(variance))
    return s, e_s, sd


K = 192


@pytest.mark.parametrize("device", DEVICES)
def test_luq_kernel_unbiased(device):
    x = heavy((1024,), seed=11)
    x[0] = 40.0  # fixes m, so that the K stacked copies share the max
    # K independent draws in one launch: the uniforms depend on the flat offset
    d = kluq.luq(x.repeat(K).to(device), seed=5).view(K, -1).cpu()
    assert_unbiased_draws(d, x, luq_variance(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,m,method", [(1, 2, "mvue"), (2, 4, "mvue"), (2, 8, "mvue"), (2, 4, "mvue_approx")])
def test_nm_kernel_unbiased(device, n, m, method):
    x = nm_input((4, 256), seed=12)
    d = knm.nm_prune(x.repeat(K, 1).to(device), n, m, method=method, seed=6).view(K, *x.shape).cpu()
    assert_unbiased_draws(d, x, nm_variance(x, n, m, method=method))


@pytest.mark.parametrize("device", DEVICES)
def test_unbiasedness_check_catches_mse(device):
    x = nm_input((4, 256), seed=12)
    d = knm.nm_prune(x.repeat(K, 1).to(device), 2, 4, method="mse").view(K, *x.shape).cpu()
    with pytest.raises(AssertionError):
        assert_unbiased_draws(d, x, nm_variance(x, 2, 4, method="mvue"))


# ---------------------------------------------------------------------------------------------- dispatcher


def test_dispatch_cpu_auto_uses_reference(monkeypatch):
    x = heavy((300,), seed=13)

    def boom(*a, **k):
        raise AssertionError("kernel called for a CPU tensor under backend='auto'")

    monkeypatch.setattr(kluq, "luq", boom)
    monkeypatch.setattr(knm, "nm_prune", boom)
    monkeypatch.setattr(kintq, "int_quant", boom)
    assert dispatch.resolve(x, "auto") == "reference"
    # the CPU twins (kernels/cpu.py), whose draws cpu.uniforms regenerates for the reference
    seed = cpu.draw_seed(torch.Generator().manual_seed(1))
    same(dispatch.luq(x, generator=torch.Generator().manual_seed(1)), luq(x, noise=cpu.uniforms(seed, x.shape)))
    same(dispatch.nm_prune(x.view(3, 100), 2, 4, generator=torch.Generator().manual_seed(1)),
         nm_prune(x.view(3, 100), 2, 4, noise=cpu.uniforms(seed, (3, 25, 1))))
    same(dispatch.int_quant(x), int_quant(x))
    out, cur = dispatch.luq(x, max_abs=2.0, return_amax=True)
    assert cur.item() == x.abs().max().item()


def test_dispatch_triton_on_cpu_with_interpreter():
    if not interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1")
    x = heavy((300,), seed=14)
    same(dispatch.luq(x, generator=torch.Generator().manual_seed(2), backend="triton"),
         kluq.luq(x, generator=torch.Generator().manual_seed(2)))
    same(dispatch.nm_prune(x.view(3, 100), 1, 2, backend="triton", generator=torch.Generator().manual_seed(2)),
         knm.nm_prune(x.view(3, 100), 1, 2, generator=torch.Generator().manual_seed(2)))
    same(dispatch.int_quant(x, clip=1.5, backend="triton"), int_quant(x, clip=1.5))


def test_dispatch_triton_errors(monkeypatch):
    x = torch.randn(64)
    with pytest.raises(RuntimeError, match="noise"):
        dispatch.luq(x, noise=torch.rand(64), backend="triton")
    with pytest.raises(RuntimeError, match="fp32/fp16/bf16"):
        dispatch.luq(x.double(), backend="triton")
    with pytest.raises(RuntimeError, match="M <= 8"):
        dispatch.nm_prune(x.view(4, 16), 2, 16, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        dispatch.luq(x, backend="cuda")
    monkeypatch.setattr(dispatch, "interpreter_enabled", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.luq(x, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.int_quant(x, backend="triton")
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="not importable"):
        dispatch.nm_prune(x.view(4, 16), 2, 4, backend="triton")
    assert dispatch.resolve(x, "auto") == "reference"


def test_dispatch_env_switch(monkeypatch):
    x = torch.randn(64)
    monkeypatch.setenv("LOWPREC_BACKEND", "reference")
    assert dispatch.resolve(x, None) == "reference"
    monkeypatch.setenv("LOWPREC_BACKEND", "gpu")
    with pytest.raises(ValueError, match="LOWPREC_BACKEND"):
        dispatch.resolve(x, None)


def test_import_without_triton(tmp_path):
    """lowprec (and the dispatcher's reference path) must work where triton cannot be imported."""
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # as if not installed: import fails, find_spec is None\n"
        "import torch, lowprec\n"
        "from lowprec import dispatch\n"
        "x = torch.randn(100)\n"
        "dispatch.luq(x); dispatch.nm_prune(x.view(4, 25), 2, 4); dispatch.int_quant(x)\n"
        "try:\n"
        "    dispatch.luq(x, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
        "assert sys.modules['triton'] is None\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- sm_90 compile


def test_kernels_compile_for_sm90():
    """No GPU in CI: compile every kernel variant for Hopper with Triton's own ptxas and check that the
    PTX keeps the bit-exact recipe (IEEE division only, no FMA contraction) and does not spill.
    In a subprocess, because under TRITON_INTERPRET=1 the kernels are not compilable objects."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-m", "lowprec.kernels.aot_check"], capture_output=True, text=True, env=env,
                       timeout=600)
    if r.returncode != 0 and "ptxas" in r.stderr and "FAIL" not in r.stdout:
        pytest.skip(f"cannot compile for sm_90 here: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    for name in ("luq ", "nm_mvue24 ", "nm_luq_pass2 ", "intq ", "fp4_nvfp4_rtn ", "fp4_nvfp4_sr ", "fp4_nvfp4_2d_rtn ",
                 "fp4_mxfp4_rtn ", "fp4_mxfp4_sr ", "fp4_luq4_b16 ", "fp4_luq4_b32 "):  # every family, FP4 too
        assert name in r.stdout, name


# ---------------------------------------------------------------------------------------------- boundaries and range
# Issue 14 items 6, 11, 12: the same uniforms fed to both twins (``noise=``), boundary values included.

U_LAST = 1.0 - 2.0 ** -24


def luq_boundary_case():
    """x and u with y = |x|/α equal to u (underflow) or (|x| - l)/l equal to u (rounding), plus u = 0 and
    u = 1 - 2^-24 everywhere; m = 64 -> α = 1, so every case is exact."""
    g = torch.Generator().manual_seed(0)
    k = torch.randint(1, 2 ** 23, (64,), generator=g).float() * 2.0 ** -23  # on the 2^-23 grid: 1 + u exact
    u = torch.cat([k, k, torch.zeros(32), torch.full((32,), U_LAST), k])
    x = torch.cat([k, 1 + k, heavy((32,), seed=1), heavy((32,), seed=2), 4 * (1 + k)])
    x[0] = 64.0
    sign = torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0)
    return x * sign, u


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_luq_boundary_uniforms(device, dtype):
    x, u = luq_boundary_case()
    x = x.to(dtype)
    ref = luq(x, max_abs=64.0, noise=u)
    got = kluq.luq(x.to(device), max_abs=64.0, noise=u.to(device))
    same(got, ref)
    if dtype == torch.float32:  # u == y: strict '<' keeps 0 below α and the lower level inside a bin
        assert not bool(ref[1:64].any()) and bool((ref[64:128].abs() == 1).all())
        assert bool((ref[-64:].abs() == 4).all())
    codes, alpha = kluq.luq_pack(x.to(device), max_abs=64.0, noise=u.to(device))
    same(luq_unpack_reference(codes.cpu(), alpha.cpu(), x.shape, dtype), ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,m,method", [(2, 4, "mvue"), (1, 2, "mvue"), (3, 8, "mvue"), (2, 4, "mvue_approx"),
                                        (1, 4, "mvue_approx")])
def test_nm_boundary_uniforms(device, n, m, method):
    x = nm_input((6, 8 * m), seed=3)
    x[2, :m] = 1.0  # equal entries: cumulative boundaries at multiples of 1/M (u = 0.5 hits one)
    x[3, :m] = torch.tensor([10.0, 1.0, 2.0, 3.0, 0.5, 0.5, 0.5, 0.5])[:m]  # a capped entry
    shape = nm_noise_shape(x.shape, n, m, method)
    for u in (torch.zeros(shape), torch.full(shape, U_LAST), torch.full(shape, 0.5), torch.full(shape, 0.25)):
        ref = nm_prune(x, n, m, method=method, noise=u)
        same(knm.nm_prune(x.to(device), n, m, method=method, noise=u.to(device)), ref)
        kept = (ref.view(6, -1, m) != 0).sum(-1)
        dense = (x.view(6, -1, m) != 0).sum(-1) > n
        assert bool((kept[dense] == n).all()), "exactly N kept for every u"
        ul = torch.full(x.shape, 0.5)
        same(kfused.nm_luq(x.to(device), n, m, method=method, noise=u.to(device), noise_luq=ul.to(device)),
             luq(ref, noise=ul))


RANGE_BLOCKS = [
    [1e-40, 2e-40, 3e-40, 4e-40],  # fp32 subnormals (were kept unscaled)
    [3e38, 3e38, 3e38, 1e38],  # sums overflow fp32 (were inf / all zeros)
    [1e38, 2e38, 5e37, 1e37],  # near the max, representable
    [1.0, 1e-8, 1e-8, 0.0],  # S - |x_0| cancels in fp32 (approx: p was inf)
    [1.0, 1e-45, 1e-45, 0.0],  # shares underflow
    [40000.0, 40000.0, 1.0, 0.0],  # fp16: Σ/N above 65504
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m,method", [(2, 4, "mvue"), (1, 2, "mvue"), (2, 4, "mvue_approx")])
def test_nm_range_bit_exact(device, dtype, n, m, method):
    x = torch.tensor(RANGE_BLOCKS).repeat(8, 1)
    x = torch.where(torch.isfinite(x.to(dtype)), x, torch.finfo(dtype).max).to(dtype)
    shape = nm_noise_shape(x.shape, n, m, method)
    u = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    ref = nm_prune(x, n, m, method=method, noise=u)
    assert bool(torch.isfinite(ref).all())
    same(knm.nm_prune(x.to(device), n, m, method=method, noise=u.to(device)), ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_luq_range_bit_exact(device, dtype):
    fi = torch.finfo(dtype)
    rows = [torch.tensor([1e-44, -2e-44, 3e-45, 0.0]),  # fp32 subnormal max: α = m
            torch.tensor([fi.max, -fi.max / 3, fi.smallest_normal, fi.smallest_normal * fi.eps]),
            torch.tensor([1e-3, -2e-3, 5e-4, 1e-6])]  # fp16: α cut to fp16 normals
    for bits in (2, 4, 8):
        for r in rows:
            x = r.to(dtype).repeat(16)
            u = torch.rand(x.shape, generator=torch.Generator().manual_seed(bits))
            ref = luq(x, bits, noise=u)
            assert bool(torch.isfinite(ref).all())
            same(kluq.luq(x.to(device), bits, noise=u.to(device)), ref)
    x = torch.tensor([60000.0, -3.0, 100.0]).to(dtype)  # hindsight max above fp16's range: clamped
    u = torch.rand(3, generator=torch.Generator().manual_seed(0))
    same(kluq.luq(x.to(device), max_abs=1e6, noise=u.to(device)), luq(x, max_abs=1e6, noise=u))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_int_quant_ties_and_range_bit_exact(device, dtype):
    x = torch.tensor([2.5, -2.5, 0.5, -0.5, 3.5, -3.5, 6.5, -6.5, 0.49999997], dtype=dtype)
    same(kintq.int_quant(x.to(device), 4, signed=True, clip=7.0), int_quant(x, 4, signed=True, clip=7.0))
    fi = torch.finfo(dtype)
    big = torch.tensor([fi.max, -3.0, fi.smallest_normal * fi.eps]).to(dtype)
    for clip in (fi.max * 0.999, 1e-44):
        same(kintq.int_quant(big.to(device), 4, signed=True, clip=clip), int_quant(big, 4, signed=True, clip=clip))
    with pytest.raises(ValueError, match="clip"):
        kintq.int_quant(big.to(device), 4, clip=float("nan"))
