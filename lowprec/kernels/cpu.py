"""CPU twins of the references: the same results, bit for bit given the same uniforms, in fewer passes.

The references (:mod:`lowprec.luq`, :mod:`lowprec.nm`) are written to be read; on a CPU their cost is
the number of passes over the tensor, not the arithmetic (``luq`` ran ~25 full-size temporaries, an
N:M call ~500 small operations). The twins here keep the host work (argument checks, the one
non-finite/all-zero test on a CPU scalar, which is not a device sync) outside a pure-tensor *core*:

- :func:`luq_core`: LUQ of every element with ``2^e`` read from the exponent field
  (``clamp(y, 1)`` with its mantissa bits cleared) instead of ``frexp``/``ldexp``, and the two
  stochastic decisions folded into one count: with ``r = (|x| - l)/l`` (negative below α, where
  ``l = α``), ``|Q(x)| = l·([u < y] + [u < r])``, because ``u < 1 <= y`` above α. Same operations
  on the same operands as the reference, so the same floats: ~12 passes instead of ~25.
- :func:`lowprec.nm.nm_core` (the reference's own N:M core, imported, not copied).

Both cores are tensor operations only, so ``torch.compile`` (inductor's C++ backend) can fuse each
into one loop. Compiling is opt-in: ``LOWPREC_CPU_COMPILE=1`` (or :func:`set_compile`). The first
call per core and dtype compiles (measured in ``scripts/bench_step.py``: tens of seconds, far less
once inductor's on-disk cache is warm), then the estimators run in a few passes. Compilation needs
a C++ compiler; when there is none, or compiling fails, the eager core runs instead (one warning,
:func:`compile_status` says why), so the results never depend on it. Inductor compiles with
``-ffp-contract=off`` and without unsafe-math flags, so the compiled cores are bit-identical to the
eager ones (``tests/test_estimators_fast.py`` checks both against the references).
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings

import torch
from torch import Tensor

from .._common import check_float, check_nonfinite_mode, nonfinite_guard, uniforms, work_dtype
from ..luq import check_luq_args, luq_alpha, luq_levels
from ..nm import check_nm, from_blocks, nm_core, to_blocks

COMPILE_ENV = "LOWPREC_CPU_COMPILE"
_EXP_MASK = {torch.float32: (torch.int32, 0x7F800000), torch.float64: (torch.int64, 0x7FF0000000000000)}

_state = {"enabled": None, "failed": None, "compiled": {}}


def set_compile(enabled: bool | None) -> None:
    """Turn the compiled cores on or off for this process (None: read ``$LOWPREC_CPU_COMPILE``);
    forgets compiled cores and an earlier compile failure (the next call tries again)."""
    _state["enabled"] = enabled
    _state["failed"] = None
    _state["compiled"].clear()


def compile_enabled() -> bool:
    if _state["enabled"] is not None:
        return bool(_state["enabled"])
    v = os.environ.get(COMPILE_ENV, "0").strip().lower()
    if v not in ("0", "1", "true", "false", "yes", "no", "on", "off", ""):
        raise ValueError(f"{COMPILE_ENV}={v!r}: expected 0 or 1")
    return v in ("1", "true", "yes", "on")


def compile_status() -> str:
    """One line: whether the cores run compiled, and if not, why."""
    if not compile_enabled():
        return f"eager (set {COMPILE_ENV}=1 to compile)"
    if _state["failed"]:
        return f"eager (compile failed: {_state['failed']})"
    return "compiled (torch.compile, inductor C++)"


def _core(fn):
    """``fn`` compiled once (dynamic shapes) when enabled and possible, else ``fn`` itself."""
    if not compile_enabled() or _state["failed"]:
        return fn
    c = _state["compiled"].get(fn)
    if c is None:
        if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None:
            _fail("no C++ compiler found")
            return fn
        logging.getLogger("torch._inductor").setLevel(logging.ERROR)
        c = _state["compiled"][fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return c


def _fail(why: str) -> None:
    _state["failed"] = why
    warnings.warn(f"lowprec CPU estimators: torch.compile unavailable ({why}); running the eager cores",
                  RuntimeWarning, stacklevel=3)


def _run(fn, *args):
    f = _core(fn)
    if f is fn:
        return fn(*args)
    try:
        return f(*args)
    except Exception as e:  # noqa: BLE001 - any compile/runtime failure of inductor: fall back, once
        _fail(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        return fn(*args)


def _absmax(x: Tensor) -> Tensor:
    """max|x| from two vectorized reductions and no |x| temporary (NaN -> NaN, ±inf -> inf);
    ``vector_norm(x, inf)`` is many times slower on a CPU."""
    return torch.maximum(x.amax(), -x.amin())


def luq_core(x: Tensor, u: Tensor, m: Tensor, alpha: Tensor) -> Tensor:
    """LUQ of ``x`` (working precision, finite) with uniforms ``u``, top level ``m`` and ``α`` (see module docstring)."""
    itype, mask = _EXP_MASK[x.dtype]
    a = torch.minimum(x.abs(), m)
    y = a / alpha
    lo = torch.clamp(y, min=1.0).view(itype).bitwise_and(mask).view(x.dtype) * alpha  # α·2^floor(log2 y)
    r = (a - lo) / lo
    count = (u < y).to(x.dtype) + (u < r).to(x.dtype)
    return torch.copysign(lo * count, x)


def luq(x: Tensor, bits: int = 4, *, levels: int | None = None, max_abs=None, generator: torch.Generator | None = None,
        noise: Tensor | None = None, nonfinite: str = "raise") -> Tensor:
    """CPU twin of :func:`lowprec.luq.luq` (same arguments, same result)."""
    L = check_luq_args(x, bits, levels, max_abs, nonfinite)
    if x.numel() == 0:
        return x.clone()
    wt = work_dtype(x.dtype)
    xw = x.detach().to(wt)
    amax = _absmax(xw)
    if nonfinite_guard(x, amax, nonfinite, "luq"):
        return torch.zeros_like(x)
    m = amax if max_abs is None else torch.as_tensor(max_abs, device=x.device).to(wt).reshape(())
    m = torch.clamp(m, max=torch.finfo(x.dtype).max)
    if not bool(m > 0):
        return torch.zeros_like(x)
    u = uniforms(x.shape, x.device, generator, noise, "luq")
    return _run(luq_core, xw, u, m, luq_alpha(m, L, x.dtype)).to(x.dtype)


def nm_prune(x: Tensor, n: int, m: int, *, method: str = "mvue", dim: int = -1,
             generator: torch.Generator | None = None, noise: Tensor | None = None, nonfinite: str = "raise") -> Tensor:
    """CPU twin of :func:`lowprec.nm.nm_prune` for the unbiased methods (mse: the reference)."""
    check_float(x, "nm_prune")
    check_nm(n, m, method)
    check_nonfinite_mode(nonfinite)
    if method == "mse" or x.dim() == 0 or not -x.dim() <= dim < x.dim() or x.numel() == 0 or n == m:
        from ..nm import nm_prune as reference

        return reference(x, n, m, method=method, dim=dim, generator=generator, noise=noise, nonfinite=nonfinite)
    blocks, length = to_blocks(x, m, dim)
    if nonfinite_guard(x, _absmax(blocks), nonfinite, "nm_prune"):
        return torch.zeros_like(x)
    k = 1 if method == "mvue" else n
    u = uniforms((*blocks.shape[:-1], k), x.device, generator, noise, "nm_prune")
    return from_blocks(_run(nm_core, blocks, u, n, method, torch.finfo(x.dtype).max), x, length, dim)
