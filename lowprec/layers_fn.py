"""Modules that apply their child Linears' weights functionally, routed through the converted layers.

Some attention modules hold their projections as nn.Linear children but never call them: they pass
the weights to a function that calls `F.linear(x, self.qkv.weight, b)` itself (torchvision's
`ShiftedWindowAttention` and `ShiftedWindowAttentionV2`, the attention of swin_t/s/b and
swin_v2_t/s/b). Converting the children alone would leave those GEMMs in high precision while the
report calls them converted. A known owner (`FUNCTIONAL_OWNERS`: qualified class name -> child
names) is converted by a class swap to a subclass (`QWeightOwner`) whose forward runs the original
one under a torch-function mode that sends every `F.linear` whose weight *is* a converted child's
`weight` to that child: `child(x)` when the bias is the child's own, `child(x, lp_bias=b)` when the
owner passed another bias (V2 zeroes the key part of a copy of the qkv bias). So the qkv and proj
GEMMs run lowprec.qgemm's skeleton with the child's per-GEMM state (recipes, N:M mask, statistics,
noise monitor, lp_state), through the child's module call (its hooks run); everything else (the
attention score and value products, which have no weight, the relative position bias) runs as
before in high precision. With grad=fp32 the numbers are those of the unconverted module bit for
bit (QLinear's forward is F.linear and its backward autograd's, lowprec.layers).

An owner is recognized by its exact class (a subclass may change forward); torchvision is never
imported here.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .qgemm import GemmState

__all__ = ["FUNCTIONAL_OWNERS", "functional_children", "QWeightOwner", "wrap_owner"]

FUNCTIONAL_OWNERS: dict[str, tuple[str, ...]] = {
    "torchvision.models.swin_transformer.ShiftedWindowAttention": ("qkv", "proj"),
    "torchvision.models.swin_transformer.ShiftedWindowAttentionV2": ("qkv", "proj"),
}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def functional_children(mod: nn.Module) -> tuple[str, ...] | None:
    """The names of the children whose weights `mod` applies functionally, if its class is known."""
    if isinstance(mod, QWeightOwner):
        return mod._lp_children
    return FUNCTIONAL_OWNERS.get(_qualname(type(mod)))


class _Redirect(TorchFunctionMode):
    """F.linear(x, W, b) with W a converted child's weight -> that child's converted forward."""

    def __init__(self, layers: dict[int, nn.Module]):
        super().__init__()
        self.layers = layers

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            layer = self.layers.get(id(w))
            if layer is not None and w is layer.weight:
                x = args[0] if args else kwargs["input"]
                b = args[2] if len(args) > 2 else kwargs.get("bias")
                return layer(x) if b is layer.bias else layer(x, lp_bias=b)
        return func(*args, **kwargs)


class QWeightOwner:
    """Mixin of a converted functional owner (module docstring); the original class follows it."""

    _lp_children: tuple[str, ...]
    _lp_orig_class: type

    def forward(self, *args, **kwargs):
        layers = {}
        for n in self._lp_children:
            child = getattr(self, n)
            if isinstance(child, GemmState):
                layers[id(child.weight)] = child
        if not layers:
            return self._lp_orig_class.forward(self, *args, **kwargs)
        with _Redirect(layers):
            return self._lp_orig_class.forward(self, *args, **kwargs)

    def restore_class(self) -> None:
        """Turn this module back into its original class, in place."""
        orig = self._lp_orig_class
        self.__dict__.pop("_lp_children", None)
        self.__dict__.pop("_lp_orig_class", None)
        self.__class__ = orig


_CLASSES: dict[type, type] = {}


def wrap_owner(mod: nn.Module) -> None:
    """Class-swap a known owner so its functional F.linear calls run its converted children (once)."""
    if isinstance(mod, QWeightOwner):
        return
    children = FUNCTIONAL_OWNERS[_qualname(type(mod))]
    cls = type(mod)
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Q{cls.__name__}", (QWeightOwner, cls), {"__module__": __name__})
    orig = cls
    mod.__class__ = _CLASSES[cls]
    mod._lp_children = children
    mod._lp_orig_class = orig
