"""Small helpers shared by the estimator families: input checks and the uniform draws.

Every stochastic reference takes its uniforms either from ``noise=`` (so a Triton kernel's own
``tl.rand`` draws can be fed in and the outputs compared bit for bit) or draws them from
``generator`` (None = torch's global RNG, which the trainer seeds).
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
NONFINITE_MODES = ("raise", "skip")


class NonFiniteError(ValueError):
    """An estimator met NaN/Inf in its input (the trainer can skip such steps)."""


def check_float(x: Tensor, who: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{who}: expected a floating tensor (fp32/fp16/bf16/fp64), got {x.dtype}")


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


def pow2(e: Tensor) -> Tensor:
    """2**e for integer tensors, exactly, in fp32 (ldexp: no rounding, unlike exp2 on some backends)."""
    return torch.ldexp(torch.ones_like(e, dtype=torch.float32), e.to(torch.int32))


def floor_log2(y: Tensor) -> Tensor:
    """floor(log2(y)) for positive finite fp32 y, exactly (from the float's exponent, not log2)."""
    _, e = torch.frexp(y)
    return (e - 1).to(torch.int32)
