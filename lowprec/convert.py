"""Turn a model's weight layers into converted ones and back; their run-time state.

`convert()` swaps the class of eligible modules in place (the module object, its Parameters,
buffers and hooks are kept; state_dict keys are unchanged) and returns a `ConvertReport` naming
every weight layer with what happened to it and why:

    nn.Linear -> QLinear, nn.Conv1d -> QConv1d, nn.Conv2d -> QConv2d (lowprec.layers),
    nn.MultiheadAttention -> QMultiheadAttention (lowprec.layers_mha; its input projection; its
        out_proj is an nn.Linear child converted like any other, so it is its own layer),
    a module that applies its Linear children's weights functionally (torchvision's Swin
        attention, lowprec.layers_fn): its children converted, the module wrapped so its
        F.linear calls on their weights run them,
    subclasses of these whose forward is the base's or named in EQUIVALENT_FORWARD (timm's Linear),
    parametrized Linear/Conv1d/Conv2d (weight norm: the GEMMs use the computed weight),
    transformers' Conv1D -> QConv1D (lowprec.layers_hf; recognized when transformers is imported).

Converting a model that already holds converted layers is a ValueError; use `set_recipes()` to
change recipes in place (e.g. for FNT) or `unconvert()` first. `collect_stats()` averages and
clears the layers' statistics.

`converted_layers()` yields every converted GEMM with its per-GEMM state (lowprec.qgemm.GemmState):
a converted module by its name, a converted attention's input projection as `<name>.in_proj` (or
`<name>.q_proj`, `.k_proj`, `.v_proj` with separate weights). `layer_state()` / `load_layer_state()`
carry what state_dict does not, per such name: `lp_state_dict()` — the estimators' state (LUQ's
in-hindsight max) and the weight-N:M mask with the forward count that schedules its
recomputation — so that a resumed run takes the same steps as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch.nn as nn
from torch.nn.utils import parametrize

from .layers import QConv1d, QConv2d, QLinear, QModule, recipe_name, resolve_fwd, resolve_grad
from .layers_fn import QWeightOwner, functional_children, wrap_owner
from .layers_hf import QConv1D, hf_conv1d_class
from .layers_mha import QMultiheadAttention
from .qgemm import GemmState
from .weight_nm import check_weight_nm, format_weight_nm

__all__ = ["convert", "set_recipes", "unconvert", "collect_stats", "ConvertReport", "converted_layers",
           "layer_state", "load_layer_state", "EQUIVALENT_FORWARD"]

# (base class, converter) in the order they are tested; transformers' Conv1D is added when imported
_MAKE = ((nn.Linear, QLinear.from_linear), (nn.Conv2d, QConv2d.from_conv), (nn.Conv1d, QConv1d.from_conv),
         (nn.MultiheadAttention, QMultiheadAttention.from_mha))
# every torch conv layer (the report lists the unsupported ones as skipped, with the reason)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


# subclasses whose forward is known to equal their base's (qualified name of the class defining
# forward): converted like the base. timm.layers.Linear only adds a cast under TorchScript.
EQUIVALENT_FORWARD: set[str] = {"timm.layers.linear.Linear"}


def _forward_equivalent(cls: type, base: type) -> bool:
    """True if cls's forward is base's or one named in EQUIVALENT_FORWARD (defined by a subclass of base)."""
    if cls.forward is base.forward:
        return True
    owner = next(c for c in cls.__mro__ if "forward" in c.__dict__)
    return issubclass(owner, base) and f"{owner.__module__}.{owner.__qualname__}" in EQUIVALENT_FORWARD


_PARAMETRIZED: dict[tuple[type, type], type] = {}


def _parametrized_maker(make, mod: nn.Module):
    """A converter for a parametrized QLinear/QConv kind (weight norm, spectral norm), else None.
    The converted class derives from the layer kind and from parametrize's class of `mod`, so
    `self.weight` stays the computed property: the GEMMs see the computed weight and its gradient
    flows on through the parametrization to the original parameters, as in the unconverted layer."""
    qcls = getattr(make, "__self__", None)
    if not (isinstance(qcls, type) and issubclass(qcls, QModule)):
        return None
    key = (qcls, type(mod))
    if key not in _PARAMETRIZED:
        _PARAMETRIZED[key] = type(f"Parametrized{qcls.__name__}", key, {"__module__": qcls.__module__})
    cls = _PARAMETRIZED[key]
    return lambda m, *, fwd, grad, weight_nm, weight_nm_every, stats_every: cls._convert(
        m, fwd, grad, weight_nm, weight_nm_every, stats_every)


def _makers() -> tuple[tuple[type, Any], ...]:
    hf = hf_conv1d_class()
    return _MAKE if hf is None else (*_MAKE, (hf, QConv1D.from_hf))


def converted_layers(model: nn.Module) -> Iterator[tuple[str, GemmState]]:
    """(name, per-GEMM state) for every converted GEMM of `model`, in module order: converted
    modules by their name, an attention's input projection(s) as `<name>.in_proj` etc."""
    for name, m in model.named_modules():
        if isinstance(m, GemmState):
            yield name, m
        elif isinstance(m, QMultiheadAttention):
            for slot, st in m.lp_slots.items():
                yield (f"{name}.{slot}" if name else slot), st


def layer_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{layer name: layer.lp_state_dict()} for every converted GEMM (the checkpoint's "layer_state")."""
    return {n: m.lp_state_dict() for n, m in converted_layers(model)}


def load_layer_state(model: nn.Module, states: dict[str, dict[str, Any]]) -> None:
    """Inverse of layer_state(); call it after load_state_dict (which resets the weight masks)."""
    layers = dict(converted_layers(model))
    for n, st in states.items():
        if n not in layers:
            raise ValueError(f"load_layer_state: no converted layer {n!r} in the model")
        layers[n].load_lp_state_dict(st)


def _ineligible_reason(mod: nn.Module, makers) -> tuple[Any, str | None]:
    """(converter, None) if convertible, else (converter or None, reason)."""
    base, make = next(((b, f) for b, f in makers if isinstance(mod, b)), (None, None))
    if base is None:
        return None, f"unsupported layer type {type(mod).__name__}"
    if not _forward_equivalent(type(mod), base):
        return make, (f"{type(mod).__name__} overrides forward (not known to equal {base.__name__}'s: "
                      "lowprec.convert.EQUIVALENT_FORWARD)")
    if parametrize.is_parametrized(mod):
        pmake = _parametrized_maker(make, mod)
        return (make, "parametrized module") if pmake is None else (pmake, None)
    if isinstance(getattr(mod, "weight", None), nn.parameter.UninitializedParameter):
        return make, "uninitialized (lazy) module"
    return make, None


@dataclass
class ConvertReport:
    """What `convert()` did. `converted`: qualified names; `skipped`: name -> reason."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)
    fwd: str = "fp32"
    grad: str = "fp32"
    weight_nm: tuple[int, int, bool] | None = None  # (N, M, transposable)
    stats_every: int = 0

    @property
    def num_converted(self) -> int:
        return len(self.converted)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __str__(self) -> str:
        head = (f"lowprec.convert: fwd={self.fwd} grad={self.grad} weight_nm={format_weight_nm(self.weight_nm)} "
                f"stats_every={self.stats_every}: {self.num_converted} converted, {self.num_skipped} skipped")
        rows = [(n, self.types.get(n, ""), "converted", "") for n in self.converted]
        rows += [(n, self.types.get(n, ""), "skipped", r) for n, r in self.skipped.items()]
        order = {n: i for i, n in enumerate(self.types)}
        rows.sort(key=lambda r: order.get(r[0], len(order)))
        if not rows:
            return head + "\n(no linear/conv layers found)"
        w0 = max(5, *(len(r[0]) for r in rows))
        w1 = max(4, *(len(r[1]) for r in rows))
        lines = [head, f"{'layer':<{w0}}  {'type':<{w1}}  {'status':<9}  reason"]
        lines += [f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]:<9}  {r[3]}".rstrip() for r in rows]
        return "\n".join(lines)


def convert(
    model: nn.Module,
    *,
    fwd: Any = "fp32",
    grad: Any = "fp32",
    skip: str | Sequence[str] | None = "first_last",
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
    weight_nm: tuple[int, int] | None = None,
    weight_nm_every: int = 100,
    stats_every: int = 0,
    weight_nm_transposable: bool = True,
) -> ConvertReport:
    """Convert eligible weight layers of `model` in place (module docstring); return a report.

    fwd / grad: a FwdRecipe / GradRecipe or a registry name ("int4", "luq4", ...).
    skip: "first_last" keeps the first and last eligible layers (module order, before the filter)
        in high precision; a list of qualified names skips those (unknown names: ValueError);
        None skips none.
    module_filter_fn(module, fqn) -> bool: convert only where True.
    weight_nm=(N, M): N:M-sparse weights in forward; weight_nm_transposable (default, docs/algorithms.md#weight-nm-masks)
        makes the mask N:M along both weight dimensions so the backward GEMM's Wᵀ is N:M too.
    Eligible: nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention, transformers' Conv1D and
    subclasses that do not override forward (or whose forward is in EQUIVALENT_FORWARD), not parametrized (but Linear/Conv1d/Conv2d may be), not lazy; an attention's out_proj
    only when the attention is converted. Other ones are reported as skipped with the reason. The
    report names an attention by its module name (its input projection; the per-GEMM state is
    `<name>.in_proj` in converted_layers()). Converting nothing while a non-identity recipe (or weight_nm) was asked
    for raises ValueError. A model that already has converted layers raises ValueError
    (use set_recipes() to change recipes, or unconvert()).
    """
    fwd_r = resolve_fwd(fwd)
    grad_r = resolve_grad(grad)
    nm = check_weight_nm(weight_nm, weight_nm_transposable)
    if not isinstance(weight_nm_every, int) or weight_nm_every < 1:
        raise ValueError(f"weight_nm_every must be an int >= 1, got {weight_nm_every!r}")
    if not isinstance(stats_every, int) or stats_every < 0:
        raise ValueError(f"stats_every must be an int >= 0, got {stats_every!r}")
    if skip is not None and skip != "first_last":
        if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
            raise ValueError(f"skip must be 'first_last', None or a list of qualified names, got {skip!r}")
        skip = list(skip)

    already = [n for n, _ in converted_layers(model)]
    if already:
        raise ValueError(
            f"model already has {len(already)} converted layers (e.g. {already[0]!r}); "
            "use lowprec.convert.set_recipes(model, ...) or unconvert(model) first")

    report = ConvertReport(fwd=recipe_name(fwd_r), grad=recipe_name(grad_r), weight_nm=nm, stats_every=stats_every)
    candidates: list[tuple[str, nn.Module, Any]] = []
    parents: dict[int, nn.Module] = {}
    for _, m in model.named_modules():
        for child in m.children():
            parents.setdefault(id(child), m)
    makers = _makers()
    kinds = (nn.Linear, *_CONVS, *(b for b, _ in makers))
    eligible: set[int] = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, kinds):
            continue
        report.types[name] = type(mod).__name__
        make, reason = _ineligible_reason(mod, makers)
        parent = parents.get(id(mod))
        if reason is None and isinstance(parent, nn.MultiheadAttention) and id(parent) not in eligible:
            reason = "inside an nn.MultiheadAttention that cannot be converted (its weights used functionally)"
        if reason is not None:
            report.skipped[name] = reason
        else:
            eligible.add(id(mod))
            candidates.append((name, mod, make))

    if isinstance(skip, list):
        unknown = [s for s in skip if s not in report.types]
        if unknown:
            raise ValueError(f"skip names not found among linear/conv layers: {unknown}; "
                             f"layers are: {list(report.types)}")
    first_last = set()
    if skip == "first_last" and candidates:
        first_last = {candidates[0][0], candidates[-1][0]}

    done: set[int] = set()
    for name, mod, make in candidates:
        parent = parents.get(id(mod))
        if isinstance(skip, list) and name in skip:
            report.skipped[name] = "in skip list"
        elif name in first_last:
            report.skipped[name] = ("first" if name == candidates[0][0] else "last") + " layer (skip='first_last')"
        elif module_filter_fn is not None and not module_filter_fn(mod, name):
            report.skipped[name] = "module_filter_fn returned False"
        elif isinstance(parent, nn.MultiheadAttention) and id(parent) not in done:
            report.skipped[name] = "inside an unconverted nn.MultiheadAttention (its weights used functionally)"
        else:
            make(mod, fwd=fwd_r, grad=grad_r, weight_nm=nm, weight_nm_every=weight_nm_every,
                 stats_every=stats_every)
            if parent is not None and name.rsplit(".", 1)[-1] in (functional_children(parent) or ()):
                wrap_owner(parent)  # its F.linear on this weight now runs the converted layer
            done.add(id(mod))
            report.converted.append(name)

    identity = grad_r.identity and fwd_r.weight is None and fwd_r.act is None and nm is None
    if not report.converted and not identity:
        raise ValueError(
            f"convert() converted no layer although a non-identity recipe was requested "
            f"(fwd={report.fwd}, grad={report.grad}, weight_nm={nm}); this would silently train "
            f"in full precision.\n{report}")
    return report


def set_recipes(model: nn.Module, *, fwd: Any = None, grad: Any = None, stats_every: int | None = None,
                reset_state: bool = True) -> int:
    """Change the recipes of every converted layer in place (None = keep); e.g. FNT switches
    grad to "fp32" while keeping the forward weight quantizer. Resets estimator state unless
    reset_state=False. Returns the number of layers updated; ValueError if none."""
    layers = list(converted_layers(model))
    if not layers:
        raise ValueError("set_recipes: model has no converted layers (call convert() first)")
    fwd_r = None if fwd is None else resolve_fwd(fwd)
    grad_r = None if grad is None else resolve_grad(grad)
    for _, m in layers:
        if fwd_r is not None:
            m.fwd_recipe = fwd_r
        if grad_r is not None:
            m.grad_recipe = grad_r
        if stats_every is not None:
            m.stats_every = int(stats_every)
        if reset_state:
            m.reset_lp_state()
    return len(layers)


def unconvert(model: nn.Module) -> list[str]:
    """Turn every converted module back into its original class in place; returns their names."""
    names = []
    for name, m in list(model.named_modules()):
        if isinstance(m, (GemmState, QMultiheadAttention)):
            m.restore_class()
            names.append(name)
        elif isinstance(m, QWeightOwner):  # a wrapper, not a layer: restored, not listed
            m.restore_class()
    return names


def collect_stats(model: nn.Module) -> dict[str, dict[str, float]]:
    """{layer_name: {metric: mean over the records since the last call, ..., "records": n}} for
    every converted layer that recorded something; clears the records."""
    out: dict[str, dict[str, float]] = {}
    for name, m in list(converted_layers(model)):
        recs = m.pop_stats()
        if not recs:
            continue
        keys: dict[str, list[float]] = {}
        for r in recs:
            for k, v in r.items():
                keys.setdefault(k, []).append(v)
        out[name] = {k: sum(v) / len(v) for k, v in keys.items()}
        out[name]["records"] = float(len(recs))
    return out
