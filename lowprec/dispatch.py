"""One switch between the plain-PyTorch references, their CPU twins and the Triton kernels.

``backend``: ``"auto"`` uses the kernel for CUDA tensors when Triton is importable and the call is
one the kernel covers (fp32/fp16/bf16, no ``noise=``, N:M with M <= 8, ...), else the reference;
CPU tensors get the CPU twins under ``"auto"`` (:mod:`lowprec.kernels.cpu`: bit-identical to the
references, fewer passes, optionally compiled). ``"reference"`` forces the readable reference.
``"triton"`` forces the kernel and raises ``RuntimeError`` when that cannot be met (no Triton; a
CPU tensor without ``TRITON_INTERPRET=1``; ``noise=`` given, since the kernel draws its own
uniforms; an unsupported dtype or configuration). ``backend=None`` reads the environment variable
``LOWPREC_BACKEND`` (default ``"auto"``): a global off switch for debugging runs.

The table: :data:`ROUTES` holds one :class:`Route` per public function (same name): its plain-PyTorch
``reference``; its CPU ``twin`` (None: the reference on CPU tensors too); its Triton ``kernel`` as
``"module.function"`` in :mod:`lowprec.kernels`, imported at the first call (None: no kernel); and
``why``, which checks the call's arguments and says why the kernel cannot take the call (None: it
can). :func:`_route` serves every public function from it: the kernel when there is one and
:func:`resolve` picks it (``noise=`` dropped, always None there); else the twin for a CPU tensor
under ``"auto"``; else the reference. The public functions are thin wrappers (signatures, docs).
Entries that adapt the call: ``luq`` (``return_amax``: the kernel gets max|x| from its own pass,
the eager paths reduce once more), ``luq_pack`` (reference LUQ then packing; no twin),
``luq_unpack`` (resolved on an empty probe of the output dtype: its input is uint8 codes),
``nm_luq`` (eagerly N:M then LUQ, both references or both twins). ``radix4``, ``fp4_rdn``,
``int_sr`` and ``block_rht`` have no kernel: CUDA tensors and every backend but ``"auto"``
(``"triton"`` too) run the reference. ``rht_nvfp4`` (NVFP4 of the block RHT, blocks along the rotated
dim) is the rotation's reference then nvfp4's, or its kernel after the torch rotation; its CPU twin does
both in one C call.

Kernel randomness: one seed per call from ``generator`` (None: torch's global RNG), so
``torch.manual_seed`` reproduces a run; the kernel's draws differ from the reference's
``torch.rand`` draws (same distribution). Given the kernel's uniforms
(``lowprec.kernels.common.uniforms``) as ``noise=``, the reference reproduces the kernel exactly.

Layering: the references are imported here at the top; the Triton kernel modules only when a
kernel is called, so importing this module never imports Triton. The callers are the
estimator classes in :mod:`lowprec.estimators` (and tests and benchmarks that force a backend).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .fp4 import block_luq as block_luq_reference
from .fp4 import mxfp4 as mxfp4_reference
from .fp4 import nvfp4 as nvfp4_reference
from ._common import check_float, work_dtype
from .baselines import fp4_rdn as fp4_rdn_reference
from .baselines import int_sr as int_sr_reference
from .baselines import radix4 as radix4_reference
from .hadamard import block_rht as block_rht_reference
from .intq import int_quant as int_quant_reference
from .kernels import cpu as cpu_twins
from .kernels import cpu_rht
from .kernels import interpreter_enabled, triton_available
from .luq import luq as luq_reference
from .luq import luq_levels, luq_scale
from .nm import check_nm
from .nm import nm_prune as nm_prune_reference
from .packing import MAX_PACKED_LEVELS, luq_pack_reference, luq_unpack_reference

BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "LOWPREC_BACKEND"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_NUMEL = 2 ** 31 - 1


def _requested(backend: str | None) -> str:
    b = os.environ.get(ENV_VAR, "auto") if backend is None else backend
    if b not in BACKENDS:
        src = f"{ENV_VAR}={b!r}" if backend is None else f"backend={b!r}"
        raise ValueError(f"{src}: expected one of {BACKENDS}")
    return b


def resolve(x: Tensor, backend: str | None = "auto", *, who: str = "lowprec", unsupported: str | None = None) -> str:
    """``"reference"`` or ``"triton"`` for input ``x``; ``unsupported`` says why the kernel cannot take this call."""
    check_float(x, who)
    b = _requested(backend)
    if b == "reference":
        return "reference"
    if unsupported is None and x.dtype not in _KERNEL_DTYPES:
        unsupported = f"the kernels take fp32/fp16/bf16, got {x.dtype}"
    if unsupported is None and x.numel() > _MAX_NUMEL:
        unsupported = f"{x.numel()} elements exceed the kernels' int32 indexing"
    if b == "auto":
        return "triton" if (x.is_cuda and unsupported is None and triton_available()) else "reference"
    if unsupported is not None:
        raise RuntimeError(f"{who}: backend='triton' requested but {unsupported}")
    if not triton_available():
        raise RuntimeError(f"{who}: backend='triton' requested but triton is not importable (pip install triton)")
    if not x.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            f"{who}: backend='triton' requested for a {x.device} tensor; the kernels need a CUDA tensor, "
            "or TRITON_INTERPRET=1 in the environment (set before triton is imported) to run on the CPU"
        )
    return "triton"


def runs_twins(x: Tensor, backend: str | None = None) -> bool:
    """Whether a call on ``x`` runs the CPU twins (a CPU tensor under ``"auto"``): a caller that calls a
    fused twin directly (backward's Im2col: lowprec.kernels.cpu_rht) asks first, as the routes would."""
    return not x.is_cuda and _requested(backend) == "auto"


def _eager(x: Tensor, backend: str | None, reference, twin):
    """The plain-PyTorch path for ``x``: the CPU twin (:mod:`lowprec.kernels.cpu`, bit-identical to the
    reference, fewer passes) for CPU tensors under ``"auto"``; the readable reference otherwise."""
    return twin if (twin is not None and runs_twins(x, backend)) else reference


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Route:
    """How one public function is routed (see the module docstring)."""
    reference: Callable
    twin: Callable | None = None  # bit-identical to the reference, given the same uniforms
    kernel: str | None = None  # "module.function" in lowprec.kernels
    why: Callable[..., str | None] | None = None  # (args after x) -> why the kernel can't, or None; may raise


def _twin(name: str, module=cpu_twins) -> Callable:
    # looked up at each call, so a patched lowprec.kernels.cpu.<name> (or module.<name>) is the one that runs
    return lambda *args, **kw: getattr(module, name)(*args, **kw)


def _with_amax(f: Callable) -> Callable:  # luq's eager paths: max|x| is one more reduction
    def eager(x, *args, return_amax=False, **kw):
        out = f(x, *args, **kw)
        if not return_amax:
            return out
        wt = work_dtype(x.dtype)
        cur = x.detach().abs().amax().to(wt) if x.numel() else torch.zeros((), dtype=wt, device=x.device)
        return out, cur
    return eager


def _nm_then_luq(nm: Callable, lq: Callable) -> Callable:  # nm_luq's eager paths: two passes, not fused
    def eager(x, n, m, *, method, dim, bits, levels, generator, nonfinite):
        y = nm(x, n, m, method=method, dim=dim, generator=generator, nonfinite=nonfinite)
        return lq(y, bits, levels=levels, generator=generator, nonfinite=nonfinite)
    return eager


def _rht_then(f: Callable) -> Callable:  # a block format's reference after the rotation's
    return lambda x, signs, dim, **kw: f(block_rht_reference(x, signs, dim), dim=dim, **kw)


def _luq_pack_eager(x, bits, *, levels, max_abs, generator, noise, nonfinite):
    # quantized in x's dtype (its levels are exact there, so the fp32 copy is too), as the kernel does
    q = luq_reference(x, bits, levels=levels, max_abs=max_abs, generator=generator, noise=noise,
                      nonfinite=nonfinite).float()
    _, alpha = luq_scale(x, bits, levels=luq_levels(bits, levels), max_abs=max_abs)
    alpha = alpha.float()
    return luq_pack_reference(q, alpha), alpha


_NOISE = "noise= was given (the kernel draws its own uniforms)"


def _levels_reason(L: int) -> str | None:  # the kernel's own limit (luq_levels caps L at 127 today)
    return f"the kernel supports at most 127 levels, got {L}" if L > 127 else None


def _m_reason(m: int) -> str | None:
    return f"the kernel supports M <= 8, got M={m}" if m > 8 else None


def _why_noise(*_, noise=None, **__) -> str | None:
    return _NOISE if noise is not None else None


def _why_luq(bits, *, levels, noise, **_) -> str | None:
    L = luq_levels(bits, levels)
    return _NOISE if noise is not None else _levels_reason(L)


def _why_luq_pack(bits, *, levels, noise, **_) -> str | None:
    L = luq_levels(bits, levels)
    if L > MAX_PACKED_LEVELS:
        raise ValueError(f"luq_pack: {L} levels + zero + sign do not fit a 4-bit code (at most {MAX_PACKED_LEVELS})")
    return _why_noise(noise=noise)


def _why_nm(n, m, *, method, noise, **_) -> str | None:
    check_nm(n, m, method)
    return _NOISE if noise is not None else _m_reason(m)


def _why_nm_luq(n, m, *, method, bits, levels, **_) -> str | None:
    check_nm(n, m, method)
    L = luq_levels(bits, levels)
    return _m_reason(m) or _levels_reason(L)


ROUTES: dict[str, Route] = {
    "luq": Route(_with_amax(luq_reference), _with_amax(_twin("luq")), "luq.luq", _why_luq),
    "luq_pack": Route(_luq_pack_eager, None, "luq.luq_pack", _why_luq_pack),
    "luq_unpack": Route(luq_unpack_reference, None, "luq.luq_unpack"),
    "nm_prune": Route(nm_prune_reference, _twin("nm_prune"), "nm.nm_prune", _why_nm),
    "int_quant": Route(int_quant_reference, None, "intq.int_quant"),
    "nm_luq": Route(_nm_then_luq(nm_prune_reference, luq_reference), _twin("nm_luq"),
                    "fused.nm_luq", _why_nm_luq),
    "nvfp4": Route(nvfp4_reference, _twin("nvfp4"), "fp4.nvfp4", _why_noise),
    "mxfp4": Route(mxfp4_reference, _twin("mxfp4"), "fp4.mxfp4", _why_noise),
    "block_luq": Route(block_luq_reference, _twin("block_luq"), "fp4.block_luq", _why_luq),
    # no Triton kernel: CUDA tensors (and any backend but "auto") run the reference, CPU tensors the twin
    "radix4": Route(radix4_reference, _twin("radix4")),
    "fp4_rdn": Route(fp4_rdn_reference, _twin("fp4_rdn")),
    "int_sr": Route(int_sr_reference, _twin("int_sr")),
    "block_rht": Route(block_rht_reference, _twin("block_rht")),
    # NVFP4 after the rotation: the two references one after the other; the kernel module's nvfp4 after it
    "rht_nvfp4": Route(_rht_then(nvfp4_reference), _twin("rht_nvfp4", cpu_rht), "fp4.rht_nvfp4", _why_noise),
}


def _route(name: str, backend: str | None, x, *args, on: Tensor | None = None, **kw):
    """Run ``ROUTES[name]`` on ``x`` (resolving the backend on ``on`` when given) with ``args``/``kw``."""
    r = ROUTES[name]
    if r.kernel is not None:
        why = None if r.why is None else r.why(*args, **kw)
        if resolve(x if on is None else on, backend, who=name, unsupported=why) == "triton":
            kw.pop("noise", None)  # None here: a given noise= rules the kernel out
            module, fn = r.kernel.split(".")
            return getattr(importlib.import_module(f".kernels.{module}", __package__), fn)(x, *args, **kw)
    return _eager(x, backend, r.reference, r.twin)(x, *args, **kw)


# ----------------------------------------------------------------------------- the public functions


def luq(x: Tensor, bits: int = 4, *, levels: int | None = None, max_abs=None,
        generator: torch.Generator | None = None, noise: Tensor | None = None, nonfinite: str = "raise",
        return_amax: bool = False, backend: str | None = "auto"):
    """:func:`lowprec.luq.luq` through the chosen backend.

    ``return_amax=True`` also returns the current ``max|x|`` (fp32 0-d), what the in-hindsight
    estimate needs for its next step: with ``max_abs`` given, the kernel does both in one pass.
    """
    return _route("luq", backend, x, bits, levels=levels, max_abs=max_abs, generator=generator, noise=noise,
                  nonfinite=nonfinite, return_amax=return_amax)


def luq_pack(x: Tensor, bits: int = 4, *, levels: int | None = None, max_abs=None,
             generator: torch.Generator | None = None, noise: Tensor | None = None, nonfinite: str = "raise",
             backend: str | None = "auto") -> tuple[Tensor, Tensor]:
    """LUQ to the packed 4-bit format ``(codes uint8[ceil(numel/2)], alpha fp32 0-d)``
    (see :mod:`lowprec.packing`)."""
    return _route("luq_pack", backend, x, bits, levels=levels, max_abs=max_abs, generator=generator, noise=noise,
                  nonfinite=nonfinite)


def luq_unpack(codes: Tensor, alpha, shape, dtype: torch.dtype = torch.float32,
               backend: str | None = "auto") -> Tensor:
    """Decode :func:`luq_pack`'s output into a tensor of ``shape`` and ``dtype``."""
    probe = torch.empty(0, dtype=dtype, device=codes.device)
    return _route("luq_unpack", backend, codes, alpha, shape, dtype, on=probe)


def nm_prune(x: Tensor, n: int, m: int, *, method: str = "mvue", dim: int = -1,
             generator: torch.Generator | None = None, noise: Tensor | None = None, nonfinite: str = "raise",
             backend: str | None = "auto") -> Tensor:
    """:func:`lowprec.nm.nm_prune` through the chosen backend."""
    return _route("nm_prune", backend, x, n, m, method=method, dim=dim, generator=generator, noise=noise,
                  nonfinite=nonfinite)


def int_quant(x: Tensor, bits: int = 4, *, signed: bool | None = None, per_channel: bool = False,
              clip: float | Tensor | None = None, clip_method: str = "sawb", backend: str | None = "auto") -> Tensor:
    """:func:`lowprec.intq.int_quant` through the chosen backend.

    With ``clip`` given the two backends agree bit for bit; a SAWB clip computed by the kernel's
    reduction differs from the reference's in the last bits (summation order).
    """
    return _route("int_quant", backend, x, bits, signed=signed, per_channel=per_channel, clip=clip,
                  clip_method=clip_method)


def fuses_nm_luq(x: Tensor) -> bool:
    """Whether N:M-then-LUQ on ``x`` should take :func:`nm_luq` (one fused pass) rather than the two steps.

    CUDA tensors: the fused kernel saves a full read and write of δ. CPU tensors under ``"auto"``
    (``LOWPREC_BACKEND`` unset): the fused CPU twin (:func:`lowprec.kernels.cpu.nm_luq`, two passes
    over δ instead of three, the same numbers and draws as the two twins). Otherwise the two steps
    run one after the other, each through its own backend choice (so ``LOWPREC_BACKEND=triton``
    under the interpreter exercises the separate kernels, and ``reference`` the references).
    """
    return x.is_cuda or _requested(None) == "auto"


def nm_luq(x: Tensor, n: int, m: int, *, method: str = "mvue", dim: int = -1, bits: int = 4,
           levels: int | None = None, generator: torch.Generator | None = None, nonfinite: str = "raise",
           backend: str | None = "auto") -> Tensor:
    """N:M prune then LUQ (the ``mvue24_luq4`` composite): ``luq(nm_prune(x, ...), ...)``, one fused kernel
    (two passes over x, no intermediate tensor) on the Triton backend."""
    return _route("nm_luq", backend, x, n, m, method=method, dim=dim, bits=bits, levels=levels, generator=generator,
                  nonfinite=nonfinite)


def nvfp4(x: Tensor, *, dim: int = -1, rounding: str = "rtn", block_2d: bool = False,
          generator: torch.Generator | None = None, noise: Tensor | None = None, nonfinite: str = "raise",
          backend: str | None = "auto") -> Tensor:
    """:func:`lowprec.fp4.nvfp4` through the chosen backend."""
    return _route("nvfp4", backend, x, dim=dim, rounding=rounding, block_2d=block_2d, generator=generator,
                  noise=noise, nonfinite=nonfinite)


def mxfp4(x: Tensor, *, dim: int = -1, rounding: str = "rtn", generator: torch.Generator | None = None,
          noise: Tensor | None = None, nonfinite: str = "raise", backend: str | None = "auto") -> Tensor:
    """:func:`lowprec.fp4.mxfp4` through the chosen backend."""
    return _route("mxfp4", backend, x, dim=dim, rounding=rounding, generator=generator, noise=noise,
                  nonfinite=nonfinite)


def block_luq(x: Tensor, bits: int = 4, *, block: int = 16, dim: int = -1, levels: int | None = None,
              generator: torch.Generator | None = None, noise: Tensor | None = None, nonfinite: str = "raise",
              backend: str | None = "auto") -> Tensor:
    """:func:`lowprec.fp4.block_luq` through the chosen backend."""
    return _route("block_luq", backend, x, bits, block=block, dim=dim, levels=levels, generator=generator,
                  noise=noise, nonfinite=nonfinite)


def radix4(x: Tensor, *, levels: int = 7, nonfinite: str = "raise", backend: str | None = "auto") -> Tensor:
    """:func:`lowprec.baselines.radix4`; its C twin on CPU tensors."""
    return _route("radix4", backend, x, levels=levels, nonfinite=nonfinite)


def fp4_rdn(x: Tensor, bits: int = 4, *, levels: int | None = None, nonfinite: str = "raise",
            backend: str | None = "auto") -> Tensor:
    """:func:`lowprec.baselines.fp4_rdn`; its C twin on CPU tensors."""
    return _route("fp4_rdn", backend, x, bits, levels=levels, nonfinite=nonfinite)


def int_sr(x: Tensor, bits: int = 4, *, generator: torch.Generator | None = None, noise: Tensor | None = None,
           nonfinite: str = "raise", backend: str | None = "auto") -> Tensor:
    """:func:`lowprec.baselines.int_sr`; its C twin on CPU tensors (the same result given ``noise``)."""
    return _route("int_sr", backend, x, bits, generator=generator, noise=noise, nonfinite=nonfinite)


def block_rht(x: Tensor, signs: Tensor, dim: int, *, inverse: bool = False, backend: str | None = "auto") -> Tensor:
    """:func:`lowprec.hadamard.block_rht` (the FWHT); one C pass on CPU tensors, bit-identical."""
    _requested(backend)  # a bad backend= raises for CUDA tensors too (the twin-only routes check it on CPU only)
    return _route("block_rht", backend, x, signs, dim, inverse=inverse)


def rht_nvfp4(x: Tensor, signs: Tensor, dim: int, *, rounding: str = "rtn", generator: torch.Generator | None = None,
              noise: Tensor | None = None, nonfinite: str = "raise", backend: str | None = "auto") -> Tensor:
    """``nvfp4(block_rht(x, signs, dim), dim=dim)``; on CPU tensors both in one C call where it can (the
    rotated tensor never written), the same numbers."""
    return _route("rht_nvfp4", backend, x, signs, dim, rounding=rounding, generator=generator, noise=noise,
                  nonfinite=nonfinite)
