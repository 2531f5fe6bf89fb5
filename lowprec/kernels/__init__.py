"""Triton twins of the lowprec reference estimators (LUQ, N:M pruning, INT quantization).

Importing this package needs neither Triton nor a GPU: the kernel modules
(:mod:`lowprec.kernels.luq`, :mod:`~lowprec.kernels.nm`, :mod:`~lowprec.kernels.intq`,
:mod:`~lowprec.kernels.fused` (N:M then LUQ)) import Triton and are loaded only when a kernel is
called (normally through :mod:`lowprec.dispatch`). They import the references below them
(:mod:`lowprec.luq`, :mod:`lowprec.nm`, :mod:`lowprec.intq`, :mod:`lowprec.packing`) and the shared
device helpers in :mod:`lowprec.kernels.common`; ``fused`` also calls the LUQ kernel for N == M. ``TRITON_INTERPRET=0 python -m lowprec.kernels.aot_check``
compiles every kernel for sm_90 without a GPU and checks the PTX (IEEE division, no FMA, no spills).
:mod:`lowprec.kernels.cpu` holds the CPU twins (no Triton): the references' results in one pass, as C
functions (:mod:`lowprec.kernels.native` builds the ``cpu_*.c`` files) or torch cores; the dispatcher uses
them for CPU tensors.

Every kernel does its math in fp32 and mirrors its reference operation for operation, so that given
the same uniforms the outputs are bit-identical:
- fp32 divisions use ``tl.math.div_rn`` (Triton's ``/`` lowers to the approximate ``div.full.f32``
  on NVIDIA GPUs) and kernels are launched with ``enable_fp_fusion=False`` (no ``a*b+c`` -> FMA);
- ``floor(log2 y)`` and ``2^e`` come from the float's exponent field (bit operations), as
  ``lowprec._common.floor_log2`` / ``torch.ldexp`` do;
- sums inside an N:M block run left to right over the M columns, like ``lowprec.nm._colsum``;
- fp32 -> bf16 stores round to nearest even with integer ops (``common.cast_out``): the Triton
  interpreter's own cast truncates, which would break CPU-vs-GPU agreement.

Randomness: a kernel draws ``u = tl.rand(seed, offset)`` with ``offset`` the flat index of the
uniform in the reference's ``noise=`` layout; ``seed`` comes from torch's generator
(:func:`draw_seed`), so ``torch.manual_seed`` reproduces kernel runs. :func:`lowprec.kernels.common.uniforms`
regenerates those draws for tests (feed them to the reference as ``noise=``).
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["triton_available", "interpreter_enabled", "draw_seed", "SEED_HIGH"]

SEED_HIGH = 2 ** 31 - 1


def triton_available() -> bool:
    """True when Triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels then run on CPU tensors (slowly) in Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A kernel seed in ``[0, 2^31-1)`` drawn from ``generator`` (None: torch's global CPU RNG)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(SEED_HIGH, (), generator=generator, device=device))
