"""One switch between the plain-PyTorch references and the Triton kernels.

``backend``: ``"auto"`` uses the kernel for CUDA tensors when Triton is importable and the call is
one the kernel covers (fp32/fp16/bf16, no ``noise=``, N:M with M <= 8, ...), else the reference;
CPU tensors get the CPU twins under ``"auto"`` (:mod:`lowprec.kernels.cpu`: bit-identical to the
references, fewer passes, optionally compiled). ``"reference"`` forces the readable reference.
``"triton"`` forces the kernel and raises ``RuntimeError`` when that cannot be met (no Triton; a
CPU tensor without ``TRITON_INTERPRET=1``; ``noise=`` given, since the kernel draws its own
uniforms; an unsupported dtype or configuration). ``backend=None`` reads the environment variable
``LOWPREC_BACKEND`` (default ``"auto"``): a global off switch for debugging runs.

Kernel randomness: one seed per call from ``generator`` (None: torch's global RNG), so
``torch.manual_seed`` reproduces a run; the kernel's draws differ from the reference's
``torch.rand`` draws (same distribution). Given the kernel's uniforms
(``lowprec.kernels.common.uniforms``) as ``noise=``, the reference reproduces the kernel exactly.

Layering: the references are imported here at the top; the Triton kernel modules only inside the
functions that call them, so importing this module never imports Triton. The callers are the
estimator classes in :mod:`lowprec.estimators` (and tests and benchmarks that force a backend).
"""

from __future__ import annotations

import os

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


def _eager(x: Tensor, backend: str | None, reference, twin):
    """The plain-PyTorch path for ``x``: the CPU twin (:mod:`lowprec.kernels.cpu`, bit-identical to the
    reference, fewer passes) for CPU tensors under ``"auto"``; the readable reference otherwise."""
    return twin if (not x.is_cuda and _requested(backend) == "auto") else reference


def luq(x: Tensor, bits: int = 4, *, levels: int | None = None, max_abs=None,
        generator: torch.Generator | None = None, noise: Tensor | None = None, nonfinite: str = "raise",
        return_amax: bool = False, backend: str | None = "auto"):
    """:func:`lowprec.luq.luq` through the chosen backend.

    ``return_amax=True`` also returns the current ``max|x|`` (fp32 0-d), what the in-hindsight
    estimate needs for its next step: with ``max_abs`` given, the kernel does both in one pass.
    """
    L = luq_levels(bits, levels)
    why = "noise= was given (the kernel draws its own uniforms)" if noise is not None else (
        f"the kernel supports at most 127 levels, got {L}" if L > 127 else None)
    if resolve(x, backend, who="luq", unsupported=why) == "triton":
        from .kernels import luq as k
        return k.luq(x, bits, levels=levels, max_abs=max_abs, generator=generator, nonfinite=nonfinite,
                     return_amax=return_amax)
    out = _eager(x, backend, luq_reference, cpu_twins.luq)(
        x, bits, levels=levels, max_abs=max_abs, generator=generator, noise=noise,
                        nonfinite=nonfinite)
    if not return_amax:
        return out
    wt = work_dtype(x.dtype)
    cur = x.detach().abs().amax().to(wt) if x.numel() else torch.zeros((), dtype=wt, device=x.device)
    return out, cur


def luq_pack(x: Tensor, bits: int = 4, *, levels: int | None = None, max_abs=None,
             generator: torch.Generator | None = None, noise: Tensor | None = None, nonfinite: str = "raise",
             backend: str | None = "auto") -> tuple[Tensor, Tensor]:
    """LUQ to the packed 4-bit format ``(codes uint8[ceil(numel/2)], alpha fp32 0-d)``
    (see :mod:`lowprec.packing`)."""
    L = luq_levels(bits, levels)
    if L > MAX_PACKED_LEVELS:
        raise ValueError(f"luq_pack: {L} levels + zero + sign do not fit a 4-bit code (at most {MAX_PACKED_LEVELS})")
    why = "noise= was given (the kernel draws its own uniforms)" if noise is not None else None
    if resolve(x, backend, who="luq_pack", unsupported=why) == "triton":
        from .kernels import luq as k
        return k.luq_pack(x, bits, levels=levels, max_abs=max_abs, generator=generator, nonfinite=nonfinite)
    # quantized in x's dtype (its levels are exact there, so the fp32 copy is too), as the kernel does
    q = luq_reference(x, bits, levels=levels, max_abs=max_abs, generator=generator, noise=noise,
                      nonfinite=nonfinite).float()
    _, alpha = luq_scale(x, bits, levels=L, max_abs=max_abs)
    alpha = alpha.float()
    return luq_pack_reference(q, alpha), alpha


def luq_unpack(codes: Tensor, alpha, shape, dtype: torch.dtype = torch.float32,
               backend: str | None = "auto") -> Tensor:
    """Decode :func:`luq_pack`'s output into a tensor of ``shape`` and ``dtype``."""
    probe = torch.empty(0, dtype=dtype, device=codes.device)
    if resolve(probe, backend, who="luq_unpack") == "triton":
        from .kernels import luq as k
        return k.luq_unpack(codes, alpha, shape, dtype)
    return luq_unpack_reference(codes, alpha, shape, dtype)


def nm_prune(x: Tensor, n: int, m: int, *, method: str = "mvue", dim: int = -1,
             generator: torch.Generator | None = None, noise: Tensor | None = None, nonfinite: str = "raise",
             backend: str | None = "auto") -> Tensor:
    """:func:`lowprec.nm.nm_prune` through the chosen backend."""
    check_nm(n, m, method)
    why = "noise= was given (the kernel draws its own uniforms)" if noise is not None else (
        f"the kernel supports M <= 8, got M={m}" if m > 8 else None)
    if resolve(x, backend, who="nm_prune", unsupported=why) == "triton":
        from .kernels import nm as k
        return k.nm_prune(x, n, m, method=method, dim=dim, generator=generator, nonfinite=nonfinite)
    return _eager(x, backend, nm_prune_reference, cpu_twins.nm_prune)(
        x, n, m, method=method, dim=dim, generator=generator, noise=noise, nonfinite=nonfinite)


def int_quant(x: Tensor, bits: int = 4, *, signed: bool | None = None, per_channel: bool = False,
              clip: float | Tensor | None = None, clip_method: str = "sawb", backend: str | None = "auto") -> Tensor:
    """:func:`lowprec.intq.int_quant` through the chosen backend.

    With ``clip`` given the two backends agree bit for bit; a SAWB clip computed by the kernel's
    reduction differs from the reference's in the last bits (summation order).
    """
    if resolve(x, backend, who="int_quant") == "triton":
        from .kernels import intq as k
        return k.int_quant(x, bits, signed=signed, per_channel=per_channel, clip=clip, clip_method=clip_method)
    return int_quant_reference(x, bits, signed=signed, per_channel=per_channel, clip=clip, clip_method=clip_method)


def fuses_nm_luq(x: Tensor) -> bool:
    """Whether N:M-then-LUQ on ``x`` should take :func:`nm_luq` (one fused pass) rather than the two steps.

    CUDA tensors only: there the fused kernel saves a full read and write of δ. Elsewhere the two
    steps run one after the other, each through its own backend choice (so ``LOWPREC_BACKEND=triton``
    under the interpreter exercises the separate kernels).
    """
    return x.is_cuda


def nm_luq(x: Tensor, n: int, m: int, *, method: str = "mvue", dim: int = -1, bits: int = 4,
           levels: int | None = None, generator: torch.Generator | None = None, nonfinite: str = "raise",
           backend: str | None = "auto") -> Tensor:
    """N:M prune then LUQ (the ``mvue24_luq4`` composite): ``luq(nm_prune(x, ...), ...)``, one fused kernel
    (two passes over x, no intermediate tensor) on the Triton backend."""
    check_nm(n, m, method)
    L = luq_levels(bits, levels)
    why = f"the kernel supports M <= 8, got M={m}" if m > 8 else (
        f"the kernel supports at most 127 levels, got {L}" if L > 127 else None)
    if resolve(x, backend, who="nm_luq", unsupported=why) == "triton":
        from .kernels import fused as k
        return k.nm_luq(x, n, m, method=method, dim=dim, bits=bits, levels=levels, generator=generator,
                        nonfinite=nonfinite)
    y = _eager(x, backend, nm_prune_reference, cpu_twins.nm_prune)(x, n, m, method=method, dim=dim,
                                                                   generator=generator, nonfinite=nonfinite)
    return _eager(x, backend, luq_reference, cpu_twins.luq)(y, bits, levels=levels, generator=generator,
                                                            nonfinite=nonfinite)


def nvfp4(x: Tensor, *, dim: int = -1, rounding: str = "rtn", block_2d: bool = False,
          generator: torch.Generator | None = None, noise: Tensor | None = None, nonfinite: str = "raise",
          backend: str | None = "auto") -> Tensor:
    """:func:`lowprec.fp4.nvfp4` through the chosen backend."""
    why = "noise= was given (the kernel draws its own uniforms)" if noise is not None else None
    if resolve(x, backend, who="nvfp4", unsupported=why) == "triton":
        from .kernels import fp4 as k
        return k.nvfp4(x, dim=dim, rounding=rounding, block_2d=block_2d, generator=generator, nonfinite=nonfinite)
    return _eager(x, backend, nvfp4_reference, cpu_twins.nvfp4)(
        x, dim=dim, rounding=rounding, block_2d=block_2d, generator=generator, noise=noise, nonfinite=nonfinite)


def mxfp4(x: Tensor, *, dim: int = -1, rounding: str = "rtn", generator: torch.Generator | None = None,
          noise: Tensor | None = None, nonfinite: str = "raise", backend: str | None = "auto") -> Tensor:
    """:func:`lowprec.fp4.mxfp4` through the chosen backend."""
    why = "noise= was given (the kernel draws its own uniforms)" if noise is not None else None
    if resolve(x, backend, who="mxfp4", unsupported=why) == "triton":
        from .kernels import fp4 as k
        return k.mxfp4(x, dim=dim, rounding=rounding, generator=generator, nonfinite=nonfinite)
    return _eager(x, backend, mxfp4_reference, cpu_twins.mxfp4)(
        x, dim=dim, rounding=rounding, generator=generator, noise=noise, nonfinite=nonfinite)


def block_luq(x: Tensor, bits: int = 4, *, block: int = 16, dim: int = -1, levels: int | None = None,
              generator: torch.Generator | None = None, noise: Tensor | None = None, nonfinite: str = "raise",
              backend: str | None = "auto") -> Tensor:
    """:func:`lowprec.fp4.block_luq` through the chosen backend."""
    L = luq_levels(bits, levels)
    why = "noise= was given (the kernel draws its own uniforms)" if noise is not None else (
        f"the kernel supports at most 127 levels, got {L}" if L > 127 else None)
    if resolve(x, backend, who="block_luq", unsupported=why) == "triton":
        from .kernels import fp4 as k
        return k.block_luq(x, bits, block=block, dim=dim, levels=levels, generator=generator, nonfinite=nonfinite)
    return _eager(x, backend, block_luq_reference, cpu_twins.block_luq)(
        x, bits, block=block, dim=dim, levels=levels, generator=generator, noise=noise, nonfinite=nonfinite)


# ----------------------------------------------------------------------------- CPU-twin-only estimators
# No Triton kernel: CUDA tensors (and backend="reference") run the reference, CPU tensors the CPU twin.


def radix4(x: Tensor, *, levels: int = 7, nonfinite: str = "raise", backend: str | None = "auto") -> Tensor:
    """:func:`lowprec.baselines.radix4`; its C twin on CPU tensors."""
    return _eager(x, backend, radix4_reference, cpu_twins.radix4)(x, levels=levels, nonfinite=nonfinite)


def fp4_rdn(x: Tensor, bits: int = 4, *, levels: int | None = None, nonfinite: str = "raise",
            backend: str | None = "auto") -> Tensor:
    """:func:`lowprec.baselines.fp4_rdn`; its C twin on CPU tensors."""
    return _eager(x, backend, fp4_rdn_reference, cpu_twins.fp4_rdn)(x, bits, levels=levels, nonfinite=nonfinite)


def int_sr(x: Tensor, bits: int = 4, *, generator: torch.Generator | None = None, noise: Tensor | None = None,
           nonfinite: str = "raise", backend: str | None = "auto") -> Tensor:
    """:func:`lowprec.baselines.int_sr`; its C twin on CPU tensors (the same result given ``noise``)."""
    return _eager(x, backend, int_sr_reference, cpu_twins.int_sr)(x, bits, generator=generator, noise=noise,
                                                                  nonfinite=nonfinite)


def block_rht(x: Tensor, signs: Tensor, dim: int, *, inverse: bool = False, backend: str | None = "auto") -> Tensor:
    """:func:`lowprec.hadamard.block_rht` (the FWHT); one C pass on CPU tensors, bit-identical."""
    _requested(backend)
    return _eager(x, backend, block_rht_reference, cpu_twins.block_rht)(x, signs, dim, inverse=inverse)
