"""Recipes: which estimator each GEMM of a layer sees, and the registry of names.

A layer computes ``z = W a``; its backward has two GEMMs that both consume δ = ∂C/∂z:
the backward GEMM ``Wᵀδ`` (grad-input) and the update GEMM ``δ aᵀ`` (grad-weight).
:class:`GradRecipe` names the estimator applied to δ for each, and the number of SMP samples the
update GEMM averages. :class:`FwdRecipe` names the forward quantizers of ``W`` and ``a``.

δ routes (docs/routes.md#routes): where an estimate of δ goes. N:M hardware needs the
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

The registry here is the one owner of the names: ``grad_recipe("luq4")`` from Python, and
``grad=luq4`` / ``fwd=int4`` from the CLI through Hydra's ConfigStore, where `register_configs`
(run when this module is imported) stores every name under the config groups ``grad`` and ``fwd``
as the node `grad_config` / `fwd_config` writes: ``_target_`` plus the recipe's fields, each
estimator as its ``_target_`` and dataclass fields, so ``grad.backward.bits=3`` overrides a field
and ``hydra.utils.instantiate`` rebuilds the recipe. A recipe whose two slots hold one estimator
(``shared``) spells the update slot as ``${.backward}``, so an override of the backward slot keeps
it shared. There are no YAML files for recipes; ``RECIPE_DOCS`` holds one line per name. The
estimators themselves live in :mod:`lowprec.estimators`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
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

_SPARSE = {"mvue": "MVUE {n}:{m} sparse δ (unbiased)", "mvue_approx":
           "Approximate MVUE {n}:{m} (sequential sampling without replacement, Horvitz-Thompson rescaling)",
           "mse": "MSE-optimal {n}:{m} mask (keep the {n} largest; biased)"}
_BLOCK_FMT = ("Blocks along each GEMM's reduction dimension of δ ([C_out, tokens]): C_out (dim 0) for the "
              "backward GEMM, tokens (dim -1) for the update GEMM; two independent draws.")
_FMT_DOC = {
    "nvfp4": "NVFP4: E2M1 in blocks of 16, E4M3 block scale, FP32 tensor scale",
    "mxfp4": "MXFP4 (OCP MX): E2M1 in blocks of 32, E8M0 (power-of-two) block scale",
}
_ROUND_DOC = {"rtn": "round-to-nearest with the published scale rule (clips: biased)",
              "sr": "stochastic rounding, block scale rounded up so nothing clips (unbiased; our rule)"}

# One line per name (what the YAML files' comments said): `python -c "import lowprec.recipes as r;
# print(r.RECIPE_DOCS)"`, README's table.
RECIPE_DOCS: dict[str, dict[str, str]] = {"grad": {
    "fp32": "No gradient quantization: exact δ in both backward GEMMs.",
    "luq4": "LUQ 4-bit (radix-2 FP4, stochastic underflow + unbiased rounding; 7 non-zero magnitudes); "
            "one quantized δ feeds both GEMMs.",
    "luq4_smp2": "LUQ 4-bit + SMP: the update GEMM averages 2 independent LUQ draws (the first also feeds "
                 "the backward GEMM).",
    "luq3": "LUQ 3-bit (3 non-zero magnitudes).",
    "radix4": "Ultra-low baseline: radix-4 FP4, log-domain round-to-nearest (biased).",
    "fp4_rdn": "LUQ's grid with deterministic rounding and flush-to-zero underflow (biased).",
    "int4_sr": "Uniform INT4 with stochastic rounding (unbiased, but a poor grid for gradients).",
    **{f"{fmt}_{r}": f"{_FMT_DOC[fmt]}; {_ROUND_DOC[r]}. {_BLOCK_FMT}" for fmt in _FP4 for r in _ROUND_DOC},
    "nvfp4_sr_rht": "NVIDIA's NVFP4 pretraining recipe for the backward: stochastic-rounded NVFP4 δ for both "
                    "GEMMs (blocks along C_out / tokens), a 16-point random Hadamard transform on both "
                    "update-GEMM operands (one sign vector per step), and the update GEMM's a re-quantized to "
                    "NVFP4 (RTN) along tokens.",
    **{f"luq4_b{b}": f"Block-scaled LUQ 4-bit (ours): LUQ's levels, stochastic underflow and rounding with one "
                     f"max per {b} elements along each GEMM's reduction dimension (C_out for backward, tokens "
                     "for update); unbiased." for b in (16, 32)},
    **{k: v for name, (n, m, meth) in _NM.items() for k, v in {
        name: _SPARSE[meth].format(n=n, m=m) + " on the update GEMM (blocks along tokens); backward GEMM "
                                               "uses dense δ.",
        f"{name}_bwd": _SPARSE[meth].format(n=n, m=m) + " on the backward GEMM only (blocks along output "
                                                        "channels); update GEMM uses exact δ.",
        f"{name}_both": _SPARSE[meth].format(n=n, m=m) + ", one draw (blocks along output channels) feeding "
                                                         "both the backward and the update GEMM."}.items()},
    **{f"mvue{nm}_luq4": f"MVUE {nm[0]}:{nm[1]} then LUQ 4-bit on the update GEMM; LUQ 4-bit δ on the backward "
                         "GEMM." for nm in ("12", "24")},
}, "fwd": {
    "fp32": "No forward quantization.",
    "int4": "INT4 round-to-nearest weights (signed) and activations (unsigned after ReLU, else signed), "
            "SAWB clip.",
    "int8": "INT8 round-to-nearest weights and activations, MSE-optimal clip.",
    "nvfp4": "NVFP4 forward, round-to-nearest (published scale rules): weights in 16x16 tiles of [C_out, K] "
             "(one quantized W serves W and Wᵀ), activations in 1x16 blocks along C_in ([tokens, C_in]).",
    "mxfp4": "MXFP4 forward, round-to-nearest with the OCP scale rule: blocks of 32 along the forward GEMM's "
             "reduction dimension (W as [C_out, K], a as [tokens, C_in]: dim -1).",
}}

# Fields a recipe's config node spells out although they hold their defaults (every node has name,
# the two δ slots and samples): the operand slots of the block formats, the route of the N:M
# backward/both routes. They are what the YAML files of these names held, so the resolved config
# of a run (resolved_config.yaml, W&B) is what it was when recipes were files.
_SPELLED: dict[str, tuple[str, ...]] = {
    **{n: ("weight_bwd", "act_upd", "update_rht")
       for n in (*(f"{f}_{r}" for f in _FP4 for r in _ROUND_DOC), "nvfp4_sr_rht", "luq4_b16", "luq4_b32")},
    **{f"{n}_{r}": ("route",) for n in _NM for r in ("bwd", "both")},
}


def estimator_config(est) -> dict[str, Any] | None:
    """The Hydra node of an estimator: ``_target_`` (its class in the ``lowprec`` namespace) and its
    dataclass fields in order; a Chain's steps as a list of nodes (``_convert_: all`` makes them a
    list again, which Chain turns into its tuple)."""
    if est is None:
        return None
    node: dict[str, Any] = {"_target_": f"lowprec.{type(est).__name__}"}
    if isinstance(est, Chain):
        return {**node, "_convert_": "all", "steps": [estimator_config(s) for s in est.steps]}
    for f in fields(est):
        node[f.name] = getattr(est, f.name)
    return node


def grad_config(name: str) -> dict[str, Any]:
    """The config node of the gradient recipe ``name`` (what ``grad=<name>`` composes)."""
    r = grad_recipe(name)
    node = {"_target_": "lowprec.GradRecipe", "name": r.name, "backward": estimator_config(r.backward),
            "update": "${.backward}" if r.shared else estimator_config(r.update), "samples": r.samples}
    for k in _SPELLED.get(name, ()):
        v = getattr(r, k)
        node[k] = v if k in ("route", "update_rht") else estimator_config(v)
    return node


def fwd_config(name: str) -> dict[str, Any]:
    """The config node of the forward recipe ``name`` (what ``fwd=<name>`` composes)."""
    r = fwd_recipe(name)
    return {"_target_": "lowprec.FwdRecipe", "name": r.name, "weight": estimator_config(r.weight),
            "act": estimator_config(r.act)}


def register_configs() -> None:
    """Store every registered name in Hydra's ConfigStore (groups ``grad`` and ``fwd``); idempotent.
    Run when this module is imported, so any composition after ``import lowprec`` sees them."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, names, node in (("grad", GRAD_NAMES, grad_config), ("fwd", FWD_NAMES, fwd_config)):
        for n in names:
            cs.store(group=group, name=n, node=node(n), provider="lowprec.recipes")


def config_options(group: str) -> list[str]:
    """The option names this registry stores in a config group ("grad", "fwd"; [] for any other
    group), e.g. for a CLI's option check: they are not files under conf/."""
    return list({"grad": GRAD_NAMES, "fwd": FWD_NAMES}.get(group, ()))


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


register_configs()
