"""Recipes: which estimator each GEMM of a layer sees, and the registry of names.

A layer computes ``z = W a``; its backward has two GEMMs that both consume δ = ∂C/∂z:
the backward GEMM ``Wᵀδ`` (grad-input) and the update GEMM ``δ aᵀ`` (grad-weight).
:class:`GradRecipe` names the estimator applied to δ for each, and the number of SMP samples the
update GEMM averages. :class:`FwdRecipe` names the forward quantizers of ``W`` and ``a``.

The same names work from Python (``grad_recipe("luq4")``) and from the CLI (``grad=luq4``, one
YAML per name under ``conf/grad``; a test checks both give equal objects). The estimators themselves
live in :mod:`lowprec.estimators`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .estimators import LUQ, Chain, FP4RDN, IntQuant, IntSR, NMPrune, Radix4, check_estimator


@dataclass(frozen=True)
class GradRecipe:
    """What a layer does with δ in backward (see module docstring).

    ``backward``/``update``: estimator for the backward / update GEMM, None = exact δ.
    ``samples``: SMP, the update GEMM averages this many independent draws. When
    ``backward == update`` one draw feeds both GEMMs (``shared``): the first update draw is the
    backward GEMM's δ.
    """

    name: str = "fp32"
    backward: Any = None
    update: Any = None
    samples: int = 1

    def __post_init__(self):
        check_estimator(self.backward, f"grad recipe {self.name!r} backward")
        check_estimator(self.update, f"grad recipe {self.name!r} update")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"grad recipe {self.name!r}: samples={self.samples!r}, expected an integer >= 1")
        if self.samples > 1 and self.update is None:
            raise ValueError(f"grad recipe {self.name!r}: samples={self.samples} averages draws of the update "
                             "estimator, but update is None (exact δ)")

    @property
    def shared(self) -> bool:
        return self.backward is not None and self.backward == self.update

    @property
    def identity(self) -> bool:
        return self.backward is None and self.update is None

    @property
    def unbiased(self) -> bool:
        return all(e is None or e.unbiased for e in (self.backward, self.update))


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


def _update_only(name: str, est) -> GradRecipe:
    return GradRecipe(name, backward=None, update=est)


_GRAD: dict[str, Callable[[], GradRecipe]] = {
    "fp32": lambda: GradRecipe("fp32"),
    "luq4": lambda: _both("luq4", LUQ(4)),
    "luq4_smp2": lambda: _both("luq4_smp2", LUQ(4), samples=2),
    "luq3": lambda: _both("luq3", LUQ(3)),
    "radix4": lambda: _both("radix4", Radix4()),
    "fp4_rdn": lambda: _both("fp4_rdn", FP4RDN(4)),
    "int4_sr": lambda: _both("int4_sr", IntSR(4)),
    "mvue12": lambda: _update_only("mvue12", NMPrune(1, 2, "mvue")),
    "mvue24": lambda: _update_only("mvue24", NMPrune(2, 4, "mvue")),
    "mvue24_approx": lambda: _update_only("mvue24_approx", NMPrune(2, 4, "mvue_approx")),
    "mse12": lambda: _update_only("mse12", NMPrune(1, 2, "mse")),
    "mse24": lambda: _update_only("mse24", NMPrune(2, 4, "mse")),
    # Sparse + 4-bit: the backward GEMM gets dense LUQ δ, the update GEMM MVUE-pruned then LUQ δ.
    "mvue12_luq4": lambda: GradRecipe("mvue12_luq4", backward=LUQ(4), update=Chain((NMPrune(1, 2, "mvue"), LUQ(4)))),
    "mvue24_luq4": lambda: GradRecipe("mvue24_luq4", backward=LUQ(4), update=Chain((NMPrune(2, 4, "mvue"), LUQ(4)))),
}

_FWD: dict[str, Callable[[], FwdRecipe]] = {
    "fp32": lambda: FwdRecipe("fp32"),
    "int4": lambda: FwdRecipe("int4", weight=IntQuant(4, signed=True), act=IntQuant(4)),
    "int8": lambda: FwdRecipe("int8", weight=IntQuant(8, signed=True), act=IntQuant(8)),
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
    """The δ estimator behind a gradient recipe name (its update-GEMM estimator; None for fp32)."""
    return grad_recipe(name).update
