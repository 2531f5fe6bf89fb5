"""Small helpers shared by the estimator families: input checks and the uniform draws.

Every stochastic reference takes its uniforms either from ``noise=`` (so a Triton kernel's own
``tl.rand`` draws can be fed in and the outputs compared bit for bit) or draws them from
``generator`` (None = torch's global RNG, which the trainer seeds).

Working precision (:func:`work_dtype`): fp16/bf16/fp32 inputs are computed in fp32 (block sums of
fp16/bf16 in a wider type), fp64 inputs in fp64. Results are rounded once, to the input's dtype;
values beyond its largest finite value are clamped to it (:func:`clamp_finite`), never made ``inf``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
NONFINITE_MODES = ("raise", "skip")


class NonFiniteError(ValueError):
    """An estimator met NaN/Inf in its input (the trainer can skip such steps)."""


class InputTypeError(TypeError, ValueError):
    """An argument of the wrong type: a TypeError, and a ValueError so that callers that turn input
    errors into one ``error:`` line (ValueError) treat it as one."""


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def check_float(x: Tensor, who: str) -> None:
    if not isinstance(x, Tensor):
        raise InputTypeError(f"{who}: x={_short(x)}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise InputTypeError(f"{who}: expected a floating tensor (fp32/fp16/bf16/fp64), got {x.dtype}")


def check_scalar(value, name: str, who: str, *, positive: bool) -> None:
    """ValueError unless ``value`` is a finite real number that is > 0 (``positive``) or >= 0.

    A 0-d/1-element tensor is checked too when it is on the CPU (reading it costs no device sync);
    a CUDA tensor is trusted (the estimator classes only pass values they computed).
    """
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"{who}: {name} must be one number, got a tensor of shape {tuple(value.shape)}")
        if value.is_cuda:
            return
        v = float(value.reshape(()))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
    else:
        raise ValueError(f"{who}: {name}={_short(value)}: expected a number")
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        want = "a finite number > 0" if positive else "a finite number >= 0"
        raise ValueError(f"{who}: {name}={v!r}: expected {want}")


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision an estimator computes in: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tiny_exponent(dtype: torch.dtype) -> int:
    """``log2`` of the smallest normal of ``dtype`` (-126 fp32/bf16, -14 fp16, -1022 fp64)."""
    return math.frexp(torch.finfo(dtype).tiny)[1] - 1


def clamp_finite(v: Tensor, dtype: torch.dtype) -> Tensor:
    """``v`` clamped to ``±finfo(dtype).max``: what rounds to ``inf`` in ``dtype`` becomes its largest finite value."""
    big = torch.finfo(dtype).max
    return torch.clamp(v, -big, big)


def check_nonfinite_mode(mode: str) -> None:
    if mode not in NONFINITE_MODES:
        raise ValueError(f"nonfinite={mode!r}: expected one of {NONFINITE_MODES}")


def nonfinite_guard(x: Tensor, amax: Tensor, mode: str, who: str) -> bool:
    """True when the caller must return zeros (mode 'skip'); raises in mode 'raise'.

    ``amax`` is max|x| (NaN or Inf when any element is), so the check costs no extra pass
    for the estimators that need the max anyway.
    """
    if bool(torch.isfinite(amax)):
        return False
    if mode == "raise":
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteError(
            f"{who}: input has {bad} NaN/Inf element(s) of {x.numel()}; "
            "a non-finite neural gradient usually means the loss diverged "
            "(lower the LR, or set nonfinite='skip' to zero this gradient and skip the step)"
        )
    return True


def uniforms(shape, device, generator: torch.Generator | None, noise: Tensor | None, who: str) -> Tensor:
    """fp32 uniforms in [0, 1) of ``shape``: the given ``noise`` (checked) or fresh draws."""
    shape = torch.Size(shape)
    if noise is not None:
        if noise.shape != shape:
            raise ValueError(f"{who}: noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
        return noise.to(device=device, dtype=torch.float32)
    if generator is None:  # (torch.compile(dynamic=True) rejects an explicit generator=None)
        return torch.rand(shape, device=device, dtype=torch.float32)
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)


def pow2(e: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """2**e for integer tensors, exactly, in ``dtype`` (fp32 or fp64; no rounding, unlike exp2 on some backends)."""
    if dtype == torch.float64:
        return torch.pow(torch.tensor(2.0, dtype=torch.float64, device=e.device), e.to(torch.float64))
    return torch.ldexp(torch.ones_like(e, dtype=torch.float32), e.to(torch.int32))


def floor_log2_normal(y: Tensor) -> Tensor:
    """floor(log2(y)) for positive *normal* fp32/fp64 ``y``, read from the exponent field (int32);
    the same as :func:`floor_log2` there, without ``frexp`` (which ``torch.compile`` cannot fuse)."""
    if y.dtype == torch.float64:
        return (((y.view(torch.int64) >> 52) & 0x7FF) - 1023).to(torch.int32)
    return ((y.view(torch.int32) >> 23) & 0xFF) - 127


def exact_pow2(e: Tensor, dtype: torch.dtype) -> Tensor:
    """2**e built from the exponent field, for integer ``e`` with ``2**e`` a normal of ``dtype``
    (fp32: [-126, 127]; fp64: [-1022, 1023]), as the kernels' ``pow2`` does."""
    if dtype == torch.float64:
        return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def floor_log2(y: Tensor) -> Tensor:
    """floor(log2(y)) for positive finite fp32 y, exactly (from the float's exponent, not log2)."""
    _, e = torch.frexp(y)
    return (e - 1).to(torch.int32)
