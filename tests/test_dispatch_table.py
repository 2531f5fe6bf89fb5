"""The dispatcher's table (lowprec.dispatch.ROUTES) is wired right: every public function has its entry,
and each entry reaches its own reference, CPU twin and Triton kernel, not a neighbour's.

The reference is checked by value against the function in its home module (given ``noise=``, so the
draw is fixed; nvfp4 vs mxfp4, luq vs block_luq... differ on these inputs), with every CPU twin
patched to fail. The twin and the kernel are checked by patching ``lowprec.kernels.cpu.<name>`` and
``lowprec.kernels.<module>.<name>`` to return a sentinel, which the dispatcher must hand back.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from lowprec import baselines, dispatch, fp4, hadamard, intq, nm, packing
from lowprec.kernels import cpu, cpu_rht, interpreter_enabled, triton_available
from lowprec.luq import luq as luq_ref
from lowprec.luq import luq_scale
from stat_utils import heavy_tailed

X = heavy_tailed((8, 32), seed=4)
U = torch.rand(X.shape, generator=torch.Generator().manual_seed(5))
U_NM = torch.rand(nm.nm_noise_shape(X.shape, 2, 4), generator=torch.Generator().manual_seed(6))
SIGNS = hadamard.random_signs(32, generator=torch.Generator().manual_seed(7))
CODES, ALPHA = dispatch.luq_pack(X, 3, noise=U, backend="reference")


def g():
    return torch.Generator().manual_seed(9)


def _luq_pack_ref():
    q = luq_ref(X, 3, noise=U).float()
    alpha = luq_scale(X, 3)[1].float()
    return packing.luq_pack_reference(q, alpha), alpha


def _nm_luq_ref():
    gen = g()
    return luq_ref(nm.nm_prune(X, 2, 4, generator=gen), 4, generator=gen)


def _uses_noise(name):
    return "noise" in inspect.signature(getattr(dispatch, name)).parameters


# name: (call(backend, noise) through the dispatcher, its reference's result, the CPU twin it runs (a function
#        of lowprec.kernels.cpu) or None, its Triton kernel as (module in lowprec.kernels, function) or None)
CASES = {
    "luq": (lambda b, u: dispatch.luq(X, 3, noise=u, backend=b), lambda: luq_ref(X, 3, noise=U), "luq",
            ("luq", "luq")),
    "luq_pack": (lambda b, u: dispatch.luq_pack(X, 3, noise=u, backend=b), _luq_pack_ref, None, ("luq", "luq_pack")),
    "luq_unpack": (lambda b, u: dispatch.luq_unpack(CODES, ALPHA, X.shape, torch.bfloat16, backend=b),
                   lambda: packing.luq_unpack_reference(CODES, ALPHA, X.shape, torch.bfloat16), None,
                   ("luq", "luq_unpack")),
    "nm_prune": (lambda b, u: dispatch.nm_prune(X, 2, 4, noise=None if u is None else U_NM, backend=b),
                 lambda: nm.nm_prune(X, 2, 4, noise=U_NM), "nm_prune", ("nm", "nm_prune")),
    "int_quant": (lambda b, u: dispatch.int_quant(X, 4, backend=b), lambda: intq.int_quant(X, 4), None,
                  ("intq", "int_quant")),
    "nm_luq": (lambda b, u: dispatch.nm_luq(X, 2, 4, generator=g(), backend=b), _nm_luq_ref, "nm_luq",
               ("fused", "nm_luq")),
    "nvfp4": (lambda b, u: dispatch.nvfp4(X, rounding="sr", noise=u, backend=b),
              lambda: fp4.nvfp4(X, rounding="sr", noise=U), "nvfp4", ("fp4", "nvfp4")),
    "mxfp4": (lambda b, u: dispatch.mxfp4(X, rounding="sr", noise=u, backend=b),
              lambda: fp4.mxfp4(X, rounding="sr", noise=U), "mxfp4", ("fp4", "mxfp4")),
    "block_luq": (lambda b, u: dispatch.block_luq(X, 3, noise=u, backend=b), lambda: fp4.block_luq(X, 3, noise=U),
                  "block_luq", ("fp4", "block_luq")),
    "radix4": (lambda b, u: dispatch.radix4(X, backend=b), lambda: baselines.radix4(X), "radix4", None),
    "fp4_rdn": (lambda b, u: dispatch.fp4_rdn(X, 3, backend=b), lambda: baselines.fp4_rdn(X, 3), "fp4_rdn", None),
    "int_sr": (lambda b, u: dispatch.int_sr(X, 4, noise=u, backend=b), lambda: baselines.int_sr(X, 4, noise=U),
               "int_sr", None),
    "block_rht": (lambda b, u: dispatch.block_rht(X, SIGNS, -1, backend=b),
                  lambda: hadamard.block_rht(X, SIGNS, -1), "block_rht", None),
    "rht_nvfp4": (lambda b, u: dispatch.rht_nvfp4(X, SIGNS, -1, rounding="sr", noise=u, backend=b),
                  lambda: fp4.nvfp4(hadamard.block_rht(X, SIGNS, -1), rounding="sr", noise=U), "rht_nvfp4",
                  ("fp4", "rht_nvfp4")),
}
TWINS = sorted(twin for *_, twin, _ in CASES.values() if twin is not None)


def twin_module(name):
    """The module of lowprec.kernels holding the CPU twin ``name``."""
    return cpu_rht if name == "rht_nvfp4" else cpu


def same(a, b):
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for p, q in zip(a, b):
            same(p, q)
        return
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def no_twins(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a CPU twin ran")
    for t in TWINS:
        monkeypatch.setattr(twin_module(t), t, boom)


def sentinels(monkeypatch, module, names):
    """Patch ``module.<name>`` for each name to return a fresh sentinel tensor and record (name, first argument);
    the arguments must fit the real function's signature."""
    calls, outs = [], {n: torch.full((1,), float(i + 1000)) for i, n in enumerate(names)}
    for n in names:
        def fake(*a, n=n, real=inspect.signature(getattr(module, n)), **k):
            real.bind(*a, **k)  # TypeError when the dispatcher passes what the real function does not take
            calls.append((n, a[0]))
            return outs[n]
        monkeypatch.setattr(module, n, fake)
    return calls, outs


def test_every_public_function_has_a_route():
    public = {n for n, f in vars(dispatch).items() if inspect.isfunction(f) and f.__module__ == dispatch.__name__
              and not n.startswith("_")} - {"resolve", "fuses_nm_luq", "runs_twins"}
    assert public == set(dispatch.ROUTES) == set(CASES)
    for name, (*_, twin, kernel) in CASES.items():
        r = dispatch.ROUTES[name]
        assert (r.twin is None) == (twin is None) and (r.kernel is None) == (kernel is None), name


@pytest.mark.parametrize("name", CASES)
def test_reference_backend_runs_its_reference(name, monkeypatch):
    call, ref, twin, _ = CASES[name]
    no_twins(monkeypatch)
    same(call("reference", U), ref())
    if twin is None:  # no twin: "auto" on a CPU tensor runs the reference too
        same(call("auto", U), ref())


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c[2] is not None])
def test_auto_on_cpu_runs_its_twin(name, monkeypatch):
    call, _, twin, _ = CASES[name]
    calls, outs = sentinels(monkeypatch, twin_module(twin), [twin])
    assert call("auto", U) is outs[twin]
    assert len(calls) == 1 and calls[0][0] == twin and calls[0][1] is X  # once, on x


def test_luq_return_amax_on_the_eager_paths(monkeypatch):
    calls, outs = sentinels(monkeypatch, cpu, ["luq"])
    out, cur = dispatch.luq(X, return_amax=True)
    assert out is outs["luq"] and torch.equal(cur, X.abs().amax())
    out, cur = dispatch.luq(X, 3, noise=U, return_amax=True, backend="reference")
    same(out, luq_ref(X, 3, noise=U))
    assert torch.equal(cur, X.abs().amax())


needs_interpreter = pytest.mark.skipif(not (triton_available() and interpreter_enabled()),
                                       reason="needs triton and TRITON_INTERPRET=1")


@needs_interpreter
@pytest.mark.parametrize("name", CASES)
def test_triton_backend_runs_its_kernel(name, monkeypatch):
    call, ref, _, kernel = CASES[name]
    no_twins(monkeypatch)
    if kernel is None:  # no kernel to force: "triton" runs the reference
        same(call("triton", U), ref())
        return
    module, fn = kernel
    calls, outs = sentinels(monkeypatch, importlib.import_module(f"lowprec.kernels.{module}"), [fn])
    assert call("triton", None) is outs[fn]
    assert calls == [(fn, CODES if name == "luq_unpack" else X)]


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c[3] is not None and _uses_noise(n)])
def test_noise_rules_the_kernel_out(name):
    call = CASES[name][0]
    with pytest.raises(RuntimeError, match=rf"^{name}: backend='triton' requested but noise= was given"):
        call("triton", U)


@pytest.mark.parametrize("name", ["nm_prune", "nm_luq"])
def test_m_above_8_rules_the_kernel_out(name):
    why = "the kernel supports M <= 8, got M=16"
    with pytest.raises(RuntimeError, match=rf"^{name}: backend='triton' requested but {why}"):
        getattr(dispatch, name)(X, 2, 16, backend="triton")


@pytest.mark.parametrize("shape", [(6, 2, 49), (8, 64), (5, 3, 16)])
@pytest.mark.parametrize("nm", [(2, 4), (1, 2)])
def test_fused_nm_luq_chain_equals_its_two_steps(shape, nm, monkeypatch):
    """N:M then LUQ through the fused CPU twin equals the two estimators applied in turn: values,
    layout and the generator's state after, also for a token view whose last dim splits blocks
    (NMPrune then runs its blocks along the flattened tokens, and so must the fused call)."""
    from lowprec.estimators import LUQ, Chain, NMPrune

    monkeypatch.delenv("LOWPREC_BACKEND", raising=False)
    calls = []
    monkeypatch.setattr(cpu, "nm_luq", lambda *a, _f=cpu.nm_luq, **k: calls.append(1) or _f(*a, **k))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    steps = (NMPrune(*nm), LUQ(4))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    fused = Chain(steps)(x, generator=g1)
    y = x
    for s in steps:
        y = s(y, generator=g2)
    assert calls, "the fused twin did not run"
    assert torch.equal(fused, y) and fused.stride() == y.stride()
    assert torch.equal(g1.get_state(), g2.get_state())
