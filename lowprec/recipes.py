"""Recipes: which estimator each GEMM of a layer sees, and the registry of names.

A layer computes ``z = W a``; its backward has two GEMMs that both consume δ = ∂C/∂z:
the backward GEMM ``Wᵀδ`` (grad-input) and the update GEMM ``δ aᵀ`` (grad-weight).
:class:`GradRecipe` names the estimator applied to δ for each, and the number of SMP samples the
update GEMM averages. :class:`FwdRecipe` names the forward quantizers of ``W`` and ``a``.

δ routes (spec/formats.md, "δ routes"): where an estimate of δ goes. N:M hardware needs the
sparse operand's blocks along the reduction dimension of the GEMM it feeds; inside a layer δ is a
``[C_out, tokens]`` matrix, so ``NMPrune(dim=-1)`` blocks along tokens (the update GEMM's reduction
dimension) and ``NMPrune(dim=0)`` along output channels (the backward GEMM's). ``GradRecipe.route``
names the route, derived from the two slots:

- ``update``: estimate on the update GEMM only (``mvue24``: blocks along tokens);
- ``backward``: estimate on the backward GEMM only, the update GEMM gets exact δ
  (``mvue24_bwd``: blocks along output channels);
- ``both``: one draw feeds both GEMMs (``luq4``; ``mvue24_both``: blocks along output channels);
  the estimate then propagates to every earlier layer;
- ``split``: a different estimator per GEMM (``mvue24_luq4``); ``dense``: exact δ (``fp32``).

The same names work from Python (``grad_recipe("luq4")``) and from the CLI (``grad=luq4``, one
YAML per name under ``conf/grad``; a test checks both give equal objects). The estimators themselves
live in :mod:`lowprec.estimators`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .estimators import (LUQ, MXFP4, NVFP4, BlockLUQ, Chain, FP4RDN, IntQuant, IntSR, NMPrune, Radix4,
                         check_estimator)
from .hadamard import check_rht_size


ROUTES = ("dense", "update", "backward", "both", "split")


def _derive_route(backward, update) -> str:
    if backward is None:
        return "dense" if update is None else "update"
    if update is None:
        return "backward"
    return "both" if backward == update else "split"


@dataclass(frozen=True)
class GradRecipe:
    """What a layer does with δ in backward (see module docstring).

    ``backward``/``update``: estimator for the backward / update GEMM, None = exact δ.
    ``samples``: SMP, the update GEMM averages this many independent draws. When
    ``backward == update`` one draw feeds both GEMMs (``shared``): the first update draw is the
    backward GEMM's δ.
    ``route``: one of ROUTES (module docstring), always derived from ``backward``/``update``; given
    (a YAML may spell it out so the run's resolved config shows it) it must equal the derived one.
    A field rather than a property so that every run's summary records it.
    """

    name: str = "fp32"
    backward: Any = None
    update: Any = None
    samples: int = 1
    # Per-operand slots (issue 11; None = today's behaviour, bit-identical). Layers present each
    # operand as a 2-D matrix (lowprec.layers): W as [C_out, K], a as [tokens, C_in].
    weight_bwd: Any = None  # W in the backward GEMM, re-quantized from the high-precision W (dim=0: along C_out)
    act_upd: Any = None  # a in the update GEMM, re-quantized from the high-precision a (dim=0: along tokens)
    update_rht: int | None = None  # block random Hadamard (16/32) on both update-GEMM operands, along tokens
    route: str | None = None

    def __post_init__(self):
        check_estimator(self.backward, f"grad recipe {self.name!r} backward")
        check_estimator(self.update, f"grad recipe {self.name!r} update")
        derived = _derive_route(self.backward, self.update)
        if self.route is None:
            object.__setattr__(self, "route", derived)
        elif self.route != derived:
            raise ValueError(f"grad recipe {self.name!r}: route={self.route!r}, but backward/update make it "
                             f"{derived!r} (routes: {', '.join(ROUTES)})")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"grad recipe {self.name!r}: samples={self.samples!r}, expected an integer >= 1")
        check_estimator(self.weight_bwd, f"grad recipe {self.name!r} weight_bwd")
        check_estimator(self.act_upd, f"grad recipe {self.name!r} act_upd")
        if self.update_rht is not None:
            check_rht_size(self.update_rht)
            if self.backward is not None and self.backward == self.update:
                raise ValueError(f"grad recipe {self.name!r}: update_rht={self.update_rht} rotates the update "
                                 "GEMM's δ, so one draw cannot also feed the backward GEMM (backward == update)")
        if self.samples > 1 and self.update is None:
            raise ValueError(f"grad recipe {self.name!r}: samples={self.samples} averages draws of the update "
                             "estimator, but update is None (exact δ)")

    @property
    def shared(self) -> bool:
        return self.backward is not None and self.backward == self.update

    @property
    def identity(self) -> bool:
        return (self.backward is None and self.update is None and self.weight_bwd is None
                and self.act_upd is None and self.update_rht is None)

    @property
    def unbiased(self) -> bool:
        return all(e is None or e.unbiased for e in (self.backward, self.update, self.weight_bwd, self.act_upd))


@dataclass(frozen=True)
class FwdRecipe:
    """Forward quantizers of the weight and the input activation (None = high precision)."""

    name: str = "fp32"
    weight: Any = None
    act: Any = None

    def __post_init__(self):
        check_estimator(self.weight, f"fwd recipe {self.name!r} weight")
        check_estimator(self.act, f"fwd recipe {self.name!r} act")

    @property
    def identity(self) -> bool:
        return self.weight is None and self.act is None


def _both(name: str, est, samples: int = 1) -> GradRecipe:
    return GradRecipe(name, backward=est, update=est, samples=samples)


_TOKENS_DIM, _CHANNELS_DIM = -1, 0  # dims of the layer's [C_out, tokens] view of δ
_FP4 = {"nvfp4": NVFP4, "mxfp4": MXFP4}


def _per_gemm(name: str, cls, **kw) -> GradRecipe:
    """``cls`` on δ with blocks along C_out for the backward GEMM and along tokens for the update GEMM."""
    return GradRecipe(name, backward=cls(dim=_CHANNELS_DIM, **kw), update=cls(dim=_TOKENS_DIM, **kw))


def _update_only(name: str, est) -> GradRecipe:
    return GradRecipe(name, backward=None, update=est)


def _backward_only(name: str, est) -> GradRecipe:
    return GradRecipe(name, backward=est, update=None)


# N:M δ estimators by name; each gets three routes: `<name>` (update GEMM, blocks along tokens),
# `<name>_bwd` (backward GEMM, blocks along output channels), `<name>_both` (one draw, blocks
# along output channels, both GEMMs).
_NM = {
    "mvue12": (1, 2, "mvue"),
    "mvue24": (2, 4, "mvue"),
    "mvue24_approx": (2, 4, "mvue_approx"),
    "mse12": (1, 2, "mse"),
    "mse24": (2, 4, "mse"),
}


def _nm_routes(name: str, n: int, m: int, method: str) -> dict[str, Callable[[], GradRecipe]]:
    return {
        name: lambda: _update_only(name, NMPrune(n, m, method, dim=_TOKENS_DIM)),
        f"{name}_bwd": lambda: _backward_only(f"{name}_bwd", NMPrune(n, m, method, dim=_CHANNELS_DIM)),
        f"{name}_both": lambda: _both(f"{name}_both", NMPrune(n, m, method, dim=_CHANNELS_DIM)),
    }


_GRAD: dict[str, Callable[[], GradRecipe]] = {
    "fp32": lambda: GradRecipe("fp32"),
    "luq4": lambda: _both("luq4", LUQ(4)),
    "luq4_smp2": lambda: _both("luq4_smp2", LUQ(4), samples=2),
    "luq3": lambda: _both("luq3", LUQ(3)),
    "radix4": lambda: _both("radix4", Radix4()),
    "fp4_rdn": lambda: _both("fp4_rdn", FP4RDN(4)),
    "int4_sr": lambda: _both("int4_sr", IntSR(4)),
    # Block-scaled FP4 (issue 11): blocks along each GEMM's reduction dimension, so the backward GEMM
    # (reduction over C_out) and the update GEMM (over tokens) get separate draws.
    **{f"{fmt}_{r}": (lambda fmt=fmt, r=r: _per_gemm(f"{fmt}_{r}", _FP4[fmt], rounding=r))
       for fmt in ("nvfp4", "mxfp4") for r in ("rtn", "sr")},
    # NVIDIA's recipe for the backward: SR δ, 16-point RHT on the update GEMM, a in NVFP4 (RTN) there.
    "nvfp4_sr_rht": lambda: GradRecipe("nvfp4_sr_rht", backward=NVFP4("sr", dim=_CHANNELS_DIM),
                                       update=NVFP4("sr", dim=_TOKENS_DIM), act_upd=NVFP4("rtn", dim=0),
                                       update_rht=16),
    "luq4_b16": lambda: _per_gemm("luq4_b16", BlockLUQ, bits=4, block=16),
    "luq4_b32": lambda: _per_gemm("luq4_b32", BlockLUQ, bits=4, block=32),
    **{k: v for name, nm in _NM.items() for k, v in _nm_routes(name, *nm).items()},
    # Sparse + 4-bit: the backward GEMM gets dense LUQ δ, the update GEMM MVUE-pruned then LUQ δ.
    "mvue12_luq4": lambda: GradRecipe("mvue12_luq4", backward=LUQ(4), update=Chain((NMPrune(1, 2, "mvue"), LUQ(4)))),
    "mvue24_luq4": lambda: GradRecipe("mvue24_luq4", backward=LUQ(4), update=Chain((NMPrune(2, 4, "mvue"), LUQ(4)))),
}

_FWD: dict[str, Callable[[], FwdRecipe]] = {
    "fp32": lambda: FwdRecipe("fp32"),
    "int4": lambda: FwdRecipe("int4", weight=IntQuant(4, signed=True), act=IntQuant(4)),
    "int8": lambda: FwdRecipe("int8", weight=IntQuant(8, signed=True), act=IntQuant(8)),
    # Block FP4, round-to-nearest, blocks along the forward GEMM's reduction dimension (W as [C_out, K],
    # a as [tokens, C_in]: dim=-1); NVFP4 weights in 16x16 tiles (one quantized W serves W and Wᵀ).
    "nvfp4": lambda: FwdRecipe("nvfp4", weight=NVFP4("rtn", block_2d=True), act=NVFP4("rtn", dim=-1)),
    "mxfp4": lambda: FwdRecipe("mxfp4", weight=MXFP4("rtn", dim=-1), act=MXFP4("rtn", dim=-1)),
}

GRAD_NAMES = tuple(_GRAD)
FWD_NAMES = tuple(_FWD)


def _lookup(table: dict, name, kind: str):
    if isinstance(name, (GradRecipe, FwdRecipe)):
        return name
    if name not in table:
        import difflib

        close = difflib.get_close_matches(str(name), table, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown {kind} method {name!r}{hint}; valid: {', '.join(table)}")
    return table[name]()


def grad_recipe(name: str | GradRecipe) -> GradRecipe:
    """The gradient recipe registered under ``name`` (ValueError listing the names if unknown)."""
    return _lookup(_GRAD, name, "gradient")


def fwd_recipe(name: str | FwdRecipe) -> FwdRecipe:
    """The forward recipe registered under ``name`` (ValueError listing the names if unknown)."""
    return _lookup(_FWD, name, "forward")


def estimator(name: str):
    """The δ estimator behind a gradient recipe name: its update-GEMM estimator, the backward one
    for a backward-route recipe; None for fp32."""
    r = grad_recipe(name)
    return r.update if r.update is not None else r.backward
