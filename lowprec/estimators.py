"""Estimators: the callable, frozen configurations a recipe names, over the reference functions.

An estimator maps a tensor δ to an estimate δ̂ of the same shape and dtype (:class:`Estimator`):

- ``est(x, *, generator=None, state=None)``: one draw. ``generator`` supplies the randomness
  (None: torch's global RNG); ``state`` is the caller's per-layer dict for estimators that carry
  something from step to step (LUQ's in-hindsight max), None when there is nothing to carry.
- ``name``, ``unbiased`` (``E[δ̂] = δ``), ``elementwise`` (False when the result depends on the
  layout, as N:M blocks do: layers present δ as ``[C_out, tokens]``); optionally ``token_views``
  (True: δ may come as a view ``[C_out, *token dims]``, e.g. a convolution's ``[C_out, N, H·W]``,
  and the estimator acts as on its ``[C_out, tokens]`` reshape; layers then skip that copy).
- ``expected_variance(x)``: the closed-form total variance ``Σ Var[δ̂_i]`` (fp64 0-d), or None.

Composition: :class:`Chain` applies estimators in order with independent draws (a composition of
independent unbiased estimators is unbiased); :class:`SMP` averages ``samples`` independent draws
(variance / samples). SMP averaging lives here only: layers and scripts use :class:`SMP` /
:func:`sample_mean`.

This module is the only caller of :mod:`lowprec.dispatch` (Triton kernel on CUDA tensors, the
reference elsewhere, ``$LOWPREC_BACKEND`` to force one). Estimators without a kernel call their
reference function directly. Adding an estimator: a reference function (its own module, importing
only :mod:`lowprec._common`), a class here, a registry line in :mod:`lowprec.recipes` (which also
makes ``grad=<name>`` / ``fwd=<name>`` on the command line) and a test; a kernel twin adds one
function to :mod:`lowprec.dispatch`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from . import dispatch
from ._common import check_nonfinite_mode
from .baselines import check_radix4_levels, int_sr_variance
from .fp4 import MXFP4_BLOCK, NVFP4_BLOCK, block_luq_variance, check_block, check_rounding, fp4_sr_variance
from .intq import CLIP_METHODS, check_bits
from .luq import luq_levels, luq_variance
from .nm import check_nm, nm_variance

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@runtime_checkable
class Estimator(Protocol):
    """What a recipe slot holds (see module docstring)."""

    name: str
    unbiased: bool
    elementwise: bool

    def __call__(self, x: Tensor, *, generator: torch.Generator | None = None,
                 state: dict | None = None) -> Tensor: ...

    def expected_variance(self, x: Tensor) -> Tensor | None: ...


def check_estimator(est, who: str) -> None:
    """ValueError unless ``est`` is None or looks like an estimator (callable, .elementwise, .unbiased)."""
    if est is not None and not (callable(est) and hasattr(est, "elementwise") and hasattr(est, "unbiased")):
        raise ValueError(f"{who}: {est!r} is not an estimator (callable with .elementwise and .unbiased)")


def _zero_variance(x: Tensor) -> Tensor:
    return torch.zeros((), dtype=torch.float64, device=x.device)


class _Deterministic:
    """What a deterministic, element-by-element rounding shares: biased, no variance."""

    unbiased = False
    elementwise = True

    def expected_variance(self, x: Tensor) -> Tensor:
        return _zero_variance(x)


def _check_levels(levels) -> None:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels={levels!r}: expected a positive integer")


# ----------------------------------------------------------------------------- LUQ and N:M


@dataclass(frozen=True)
class LUQ:
    """Callable LUQ configuration (see :func:`lowprec.luq.luq`).

    ``hindsight``: η of the in-hindsight max ``m̂_t = (1-η)·max|δ_{t-1}| + η·m̂_{t-1}``, kept in the
    caller's per-layer ``state`` dict; None uses the exact max of the current tensor.
    """

    bits: int = 4
    levels: int | None = None
    hindsight: float | None = None
    nonfinite: str = "raise"

    def __post_init__(self):
        luq_levels(self.bits, self.levels)
        check_nonfinite_mode(self.nonfinite)
        if self.hindsight is not None and not (0.0 <= float(self.hindsight) < 1.0):
            raise ValueError(f"hindsight={self.hindsight!r}: expected η in [0, 1) or None")

    unbiased = True
    elementwise = True

    @property
    def name(self) -> str:
        return f"luq{self.bits}" + ("" if self.levels is None else f"_L{self.levels}")

    @property
    def num_levels(self) -> int:
        return luq_levels(self.bits, self.levels)

    def __call__(self, x: Tensor, *, generator=None, state: dict | None = None, noise=None) -> Tensor:
        if self.hindsight is None or state is None:
            return dispatch.luq(x, self.bits, levels=self.levels, generator=generator, noise=noise,
                                nonfinite=self.nonfinite, backend=None)
        m_hat = state.get("m_hat")
        out, cur = dispatch.luq(x, self.bits, levels=self.levels, max_abs=m_hat, generator=generator, noise=noise,
                                nonfinite=self.nonfinite, return_amax=True, backend=None)
        new = cur if m_hat is None else (1 - self.hindsight) * cur + self.hindsight * m_hat
        # a non-finite δ skipped (nonfinite='skip') must not poison the estimate for every later step
        state["m_hat"] = new if m_hat is None else torch.where(torch.isfinite(cur), new, m_hat)
        return out

    def expected_variance(self, x: Tensor) -> Tensor | None:
        return None if self.hindsight is not None else luq_variance(x, self.bits, levels=self.levels)


@dataclass(frozen=True)
class NMPrune:
    """Callable N:M configuration (see :func:`lowprec.nm.nm_prune`).

    Inside a layer δ is presented as a ``[C_out, tokens]`` matrix: ``dim=-1`` (default) puts the
    blocks along tokens, the update GEMM's reduction dimension; ``dim=0`` along output channels.
    """

    n: int = 2
    m: int = 4
    method: str = "mvue"
    dim: int = -1
    nonfinite: str = "raise"

    def __post_init__(self):
        check_nm(self.n, self.m, self.method)
        check_nonfinite_mode(self.nonfinite)
        if isinstance(self.dim, bool) or not isinstance(self.dim, int):
            raise ValueError(f"dim={self.dim!r}: expected an integer")

    elementwise = False
    token_views = True

    @property
    def unbiased(self) -> bool:
        return self.method != "mse" or self.n == self.m

    @property
    def name(self) -> str:
        return f"{self.method}{self.n}{self.m}"

    def __call__(self, x: Tensor, *, generator=None, state: dict | None = None, noise=None) -> Tensor:
        if x.dim() > 2 and self.dim % x.dim() == x.dim() - 1 and x.shape[-1] % self.m:
            # a token view whose last dim would split blocks: blocks run along the flattened tokens
            return self(x.reshape(x.shape[0], -1), generator=generator, noise=noise).view(x.shape)
        return dispatch.nm_prune(x, self.n, self.m, method=self.method, dim=self.dim, generator=generator,
                                 noise=noise, nonfinite=self.nonfinite, backend=None)

    def expected_variance(self, x: Tensor) -> Tensor | None:
        return nm_variance(x, self.n, self.m, method=self.method, dim=self.dim)


# ----------------------------------------------------------------------------- forward INT


@dataclass(frozen=True)
class IntQuant(_Deterministic):
    """Callable forward INT quantizer (see :func:`lowprec.intq.int_quant`); deterministic."""

    bits: int = 4
    signed: bool | None = None
    per_channel: bool = False
    clip_method: str = "sawb"

    def __post_init__(self):
        check_bits(self.bits)
        if self.clip_method not in CLIP_METHODS:
            raise ValueError(f"clip_method={self.clip_method!r}: expected one of {CLIP_METHODS}")

    @property
    def name(self) -> str:
        return f"int{self.bits}" + ("_pc" if self.per_channel else "")

    def __call__(self, x: Tensor, *, generator=None, state: dict | None = None) -> Tensor:
        return dispatch.int_quant(x, self.bits, signed=self.signed, per_channel=self.per_channel,
                                  clip_method=self.clip_method, backend=None)


# ----------------------------------------------------------------------------- baselines (CPU twins, no kernel)


@dataclass(frozen=True)
class Radix4(_Deterministic):
    """Radix-4 FP4 with log-domain round-to-nearest (see :func:`lowprec.baselines.radix4`)."""

    levels: int = 7
    nonfinite: str = "raise"

    def __post_init__(self):
        check_radix4_levels(self.levels)
        check_nonfinite_mode(self.nonfinite)

    name = "radix4"

    def __call__(self, x: Tensor, *, generator=None, state=None) -> Tensor:
        return dispatch.radix4(x, levels=self.levels, nonfinite=self.nonfinite, backend=None)


@dataclass(frozen=True)
class FP4RDN(_Deterministic):
    """LUQ's grid with deterministic round-to-nearest (see :func:`lowprec.baselines.fp4_rdn`)."""

    bits: int = 4
    levels: int | None = None
    nonfinite: str = "raise"

    def __post_init__(self):
        luq_levels(self.bits, self.levels)
        check_nonfinite_mode(self.nonfinite)

    name = "fp4_rdn"

    def __call__(self, x: Tensor, *, generator=None, state=None) -> Tensor:
        return dispatch.fp4_rdn(x, self.bits, levels=self.levels, nonfinite=self.nonfinite, backend=None)


@dataclass(frozen=True)
class IntSR:
    """Uniform INT grid with stochastic rounding (see :func:`lowprec.baselines.int_sr`)."""

    bits: int = 4
    nonfinite: str = "raise"

    def __post_init__(self):
        check_bits(self.bits)
        check_nonfinite_mode(self.nonfinite)

    unbiased = True
    elementwise = True

    @property
    def name(self) -> str:
        return f"int{self.bits}_sr"

    def __call__(self, x: Tensor, *, generator=None, state=None, noise=None) -> Tensor:
        return dispatch.int_sr(x, self.bits, generator=generator, noise=noise, nonfinite=self.nonfinite,
                               backend=None)

    def expected_variance(self, x: Tensor) -> Tensor:
        return int_sr_variance(x, self.bits)


# ----------------------------------------------------------------------------- block-scaled FP4


def _check_dim(dim) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise ValueError(f"dim={dim!r}: expected an integer")


@dataclass(frozen=True)
class NVFP4:
    """NVFP4 quantize-dequantize (see :func:`lowprec.fp4.nvfp4`): E2M1 in blocks of 16 along ``dim``
    (``block_2d``: 16x16 tiles of the ``[shape[0], -1]`` view, for weights), E4M3 block scale, FP32
    tensor scale. ``rounding='rtn'``: the published rule (biased); ``'sr'``: stochastic rounding with
    the block scale rounded up (unbiased). Layers present 2-D operands (see :mod:`lowprec.layers`)."""

    rounding: str = "sr"
    dim: int = -1
    block_2d: bool = False
    nonfinite: str = "raise"

    def __post_init__(self):
        check_rounding(self.rounding)
        _check_dim(self.dim)
        check_nonfinite_mode(self.nonfinite)

    elementwise, block = False, NVFP4_BLOCK  # blocks of 16 along dim (block_2d: 16x16 tiles)

    @property
    def unbiased(self) -> bool:
        return self.rounding == "sr"

    @property
    def name(self) -> str:
        return f"nvfp4_{self.rounding}" + ("_2d" if self.block_2d else "")

    def __call__(self, x: Tensor, *, generator=None, state=None, noise=None) -> Tensor:
        return dispatch.nvfp4(x, dim=self.dim, rounding=self.rounding, block_2d=self.block_2d, generator=generator,
                              noise=noise, nonfinite=self.nonfinite, backend=None)

    def after_rht(self, x: Tensor, signs: Tensor, *, generator=None) -> Tensor:
        """``self(block_rht(x, signs, self.dim))``: on CPU tensors one pass over x where it can."""
        if self.block_2d:
            return self(dispatch.block_rht(x, signs, self.dim, backend=None), generator=generator)
        return dispatch.rht_nvfp4(x, signs, self.dim, rounding=self.rounding, generator=generator,
                                  nonfinite=self.nonfinite, backend=None)

    def expected_variance(self, x: Tensor) -> Tensor | None:
        if self.rounding == "rtn":
            return _zero_variance(x)
        return fp4_sr_variance(x, "nvfp4", dim=self.dim, block_2d=self.block_2d)


@dataclass(frozen=True)
class MXFP4:
    """MXFP4 quantize-dequantize (see :func:`lowprec.fp4.mxfp4`): E2M1 in blocks of 32 along ``dim``,
    E8M0 scale. ``'rtn'``: the OCP scale rule (clips (6, 8)·X: biased); ``'sr'``: scale rounded up,
    stochastic rounding (unbiased)."""

    rounding: str = "sr"
    dim: int = -1
    nonfinite: str = "raise"

    def __post_init__(self):
        check_rounding(self.rounding)
        _check_dim(self.dim)
        check_nonfinite_mode(self.nonfinite)

    elementwise, block = False, MXFP4_BLOCK

    @property
    def unbiased(self) -> bool:
        return self.rounding == "sr"

    @property
    def name(self) -> str:
        return f"mxfp4_{self.rounding}"

    def __call__(self, x: Tensor, *, generator=None, state=None, noise=None) -> Tensor:
        return dispatch.mxfp4(x, dim=self.dim, rounding=self.rounding, generator=generator, noise=noise,
                              nonfinite=self.nonfinite, backend=None)

    def expected_variance(self, x: Tensor) -> Tensor | None:
        if self.rounding == "rtn":
            return _zero_variance(x)
        return fp4_sr_variance(x, "mxfp4", dim=self.dim)


@dataclass(frozen=True)
class BlockLUQ:
    """LUQ with one max per ``block`` (16 or 32) elements along ``dim`` (see
    :func:`lowprec.fp4.block_luq`); unbiased, closed-form variance."""

    bits: int = 4
    block: int = 16
    dim: int = -1
    levels: int | None = None
    nonfinite: str = "raise"

    def __post_init__(self):
        luq_levels(self.bits, self.levels)
        check_block(self.block)
        _check_dim(self.dim)
        check_nonfinite_mode(self.nonfinite)

    unbiased = True
    elementwise = False

    @property
    def name(self) -> str:
        return f"luq{self.bits}_b{self.block}" + ("" if self.levels is None else f"_L{self.levels}")

    def __call__(self, x: Tensor, *, generator=None, state=None, noise=None) -> Tensor:
        return dispatch.block_luq(x, self.bits, block=self.block, dim=self.dim, levels=self.levels,
                                  generator=generator, noise=noise, nonfinite=self.nonfinite, backend=None)

    def expected_variance(self, x: Tensor) -> Tensor:
        return block_luq_variance(x, self.bits, block=self.block, dim=self.dim, levels=self.levels)


# ----------------------------------------------------------------------------- composition


@dataclass(frozen=True)
class Chain:
    """Apply estimators in order with independent draws (e.g. MVUE prune, then LUQ the survivors).

    The composition of independent unbiased estimators is unbiased. N:M then LUQ (without a
    hindsight state) runs as one fused pass where :func:`lowprec.dispatch.fuses_nm_luq` says so.
    """

    steps: tuple = ()

    def __post_init__(self):
        steps = tuple(self.steps)
        if not steps:
            raise ValueError("Chain needs at least one step")
        for s in steps:
            check_estimator(s, "Chain")
        object.__setattr__(self, "steps", steps)

    @property
    def name(self) -> str:
        return "_".join(s.name for s in self.steps)

    @property
    def unbiased(self) -> bool:
        return all(s.unbiased for s in self.steps)

    @property
    def elementwise(self) -> bool:
        return all(s.elementwise for s in self.steps)

    @property
    def token_views(self) -> bool:
        return all(s.elementwise or getattr(s, "token_views", False) for s in self.steps)

    def __call__(self, x: Tensor, *, generator=None, state: dict | None = None) -> Tensor:
        if dispatch.fuses_nm_luq(x) and self._fusable:
            nm, q = self.steps
            if x.dim() > 2 and nm.dim % x.dim() == x.dim() - 1 and x.shape[-1] % nm.m:
                # NMPrune's token-view rule: blocks run along the flattened tokens (LUQ is elementwise)
                return self(x.reshape(x.shape[0], -1), generator=generator, state=state).view(x.shape)
            return dispatch.nm_luq(x, nm.n, nm.m, method=nm.method, dim=nm.dim, bits=q.bits, levels=q.levels,
                                   generator=generator, nonfinite=nm.nonfinite, backend=None)
        for i, s in enumerate(self.steps):
            sub = None if state is None else state.setdefault(i, {})
            x = s(x, generator=generator, state=sub)
        return x

    @property
    def _fusable(self) -> bool:
        return (len(self.steps) == 2 and isinstance(self.steps[0], NMPrune) and isinstance(self.steps[1], LUQ)
                and self.steps[1].hindsight is None and self.steps[0].nonfinite == self.steps[1].nonfinite)

    def expected_variance(self, x: Tensor) -> None:
        return None


@dataclass(frozen=True)
class SMP:
    """SMP: the mean of ``samples`` independent draws of ``est`` (same bias, variance / samples).

    With a ``state``, the first draw updates it as a single call would; the other draws each see a
    copy of the state as it was before the first, so one SMP call advances the state by one step.
    Accumulation is in fp32 for fp16/bf16 draws, in the draws' dtype otherwise.
    """

    est: Any
    samples: int = 2

    def __post_init__(self):
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples={self.samples!r}: expected an integer >= 1")

    @property
    def name(self) -> str:
        return f"{self.est.name}_smp{self.samples}"

    @property
    def unbiased(self) -> bool:
        return self.est.unbiased

    @property
    def elementwise(self) -> bool:
        return self.est.elementwise

    @property
    def token_views(self) -> bool:
        return getattr(self.est, "token_views", False)

    def draws(self, x: Tensor, *, generator=None, state: dict | None = None) -> tuple[Tensor, Tensor]:
        """``(first draw, mean of all draws)``: a layer that shares δ̂ between its two GEMMs feeds
        the first draw to the backward GEMM and the mean to the update GEMM."""
        snap = copy.deepcopy(state) if (state is not None and self.samples > 1) else None
        first = self.est(x, generator=generator, state=state)
        if self.samples == 1:
            return first, first
        acc = first.float() if first.dtype in _LOW_PRECISION else first
        for _ in range(self.samples - 1):
            d = self.est(x, generator=generator, state=None if snap is None else copy.deepcopy(snap))
            acc = acc + d if acc is first else acc.add_(d)  # the first sum allocates: no clone pass
        return first, acc.div_(self.samples).to(first.dtype)

    def __call__(self, x: Tensor, *, generator=None, state: dict | None = None) -> Tensor:
        return self.draws(x, generator=generator, state=state)[1]

    def expected_variance(self, x: Tensor) -> Tensor | None:
        v = self.est.expected_variance(x) if hasattr(self.est, "expected_variance") else None
        return None if v is None else v / self.samples


def sample_mean(est, x: Tensor, samples: int, *, generator=None, state: dict | None = None) -> Tensor:
    """SMP: the mean of ``samples`` independent draws of ``est(x)`` (variance / samples); see :class:`SMP`."""
    return SMP(est, samples)(x, generator=generator, state=state)
