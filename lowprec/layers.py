"""Linear and convolution layers with per-GEMM control of the neural gradient.

The three GEMMs, the per-GEMM state and the one backward are lowprec.qgemm's (`GemmState`,
`QGemmFn`); δ routing, SMP, the update-GEMM operands, the noise monitor and statistics are
lowprec.backward's; the forward operands lowprec.forward's. Here: the module classes.

Operand slots: the six operands are fwd.weight / fwd.act (forward GEMM), grad.backward /
grad.weight_bwd (δ and W in the backward GEMM), grad.update / grad.act_upd (δ and a in the update
GEMM). Estimators with `elementwise == False` (block formats) see 2-D views whose `dim` is chosen
by the recipe: W as [C_out, K] (K = C_in·k...; forward reduction dim -1, backward dim 0), a as
[tokens, C_in] in the forward (conv: channels last; blocks along C approximate im2col blocks) and
as [tokens, K] in the update GEMM (conv: the im2col matrix, so blocks along tokens are exact; groups
must be 1), δ as [C_out, tokens]. `weight_bwd` re-quantizes the high-precision (masked) W and
`act_upd` the high-precision a, not their forward-quantized copies. `update_rht = n`: the layer
draws n random signs per backward from torch's RNG (`random_signs`, after δ_b) and lowprec.backward
rotates both update-GEMM operands with them.

Weight N:M masks (`weight_nm=(N, M)`, transposable by default; the search is lowprec.weight_nm):
magnitude top-N in every block of M consecutive weights along the flattened input-feature
dimension of the [C_out, K] GEMM weight (linear: `in_features`; conv: C_in/groups·k... in
PyTorch's weight layout; transformers' Conv1D: its [in, out] weight transposed), recomputed on the
first forward and then every `weight_nm_every`-th forward in training mode (and on the first
forward after `load_state_dict`). The forward and the backward GEMM use `W ⊙ mask` (quantized
after masking when a weight quantizer is on); the weight gradient is dense (straight-through), so
pruned weights keep learning and can re-enter at the next recompute. The mask is a non-persistent
buffer: state_dict keys are unchanged by `convert()`.

Statistics (`stats_every=k > 0`): every k-th backward of a layer appends one record
(`backward.stats_record`). `lowprec.convert.collect_stats(model)` averages and clears them.

Noise monitor (lowprec.noise, driven by lowprec.adapt): `arm_noise(generator)` makes the next
backward that computes a weight gradient also compute the exact one and a second, independent
estimate (`backward.noise_record`) from `generator` and a copy of the update state as it was when
armed, so training is the same as with the monitor off; `pop_noise()` returns the four sums of
`noise.noise_terms`. A layer applied several times in one step measures its first backward.
`update_macs` counts the update-GEMM multiply-accumulates (weight elements × tokens).

Layers are made by `lowprec.convert.convert()` (a class swap of an existing nn.Linear / nn.Conv1d /
nn.Conv2d: the module object, its Parameters, buffers and hooks are kept; state_dict keys are
unchanged) or `QLinear.from_linear` / `QConv2d.from_conv` / `QConv1d.from_conv`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .qgemm import ConvOp, GemmState, LinearOp, QGemmFn, recipe_name, resolve_fwd, resolve_grad, swap_class
from .weight_nm import check_weight_nm

__all__ = ["QLinear", "QConv1d", "QConv2d", "QModule", "resolve_fwd", "resolve_grad", "recipe_name"]

_LINEAR = LinearOp()
_OWN = object()  # QLinear.forward's default bias: the module's own


class QModule(GemmState):
    """GemmState for a module converted by a class swap (its own `weight` is the GEMM weight)."""

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.lp_repr()

    def restore_class(self) -> None:
        """Turn this layer back into the class it was converted from, in place (inverse of the
        class swap: Parameters, persistent buffers and hooks are kept)."""
        orig = self._lp_orig_class
        if hasattr(self, "weight_mask"):
            del self.weight_mask  # nn.Module.__delattr__ unregisters the buffer
        for attr in self._LP_ATTRS:
            self.__dict__.pop(attr, None)
        self.__class__ = orig

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.weight_mask = None  # recompute from the loaded weights at the next forward

    @classmethod
    def _convert(cls, mod, fwd, grad, weight_nm, weight_nm_every, stats_every):
        swap_class(mod, cls, resolve_fwd(fwd), resolve_grad(grad), check_weight_nm(weight_nm), weight_nm_every,
                   stats_every)
        return mod


class QLinear(QModule, nn.Linear):
    """nn.Linear whose GEMMs follow `fwd_recipe` / `grad_recipe`. Made by `convert()` (class swap
    of an existing nn.Linear: same Parameters) or `QLinear.from_linear(lin, fwd=..., grad=...)`."""

    @classmethod
    def from_linear(cls, lin: nn.Linear, *, fwd="fp32", grad="fp32", weight_nm=None,
                    weight_nm_every: int = 100, stats_every: int = 0) -> "QLinear":
        return cls._convert(lin, fwd, grad, weight_nm, weight_nm_every, stats_every)

    def forward(self, x: torch.Tensor, *, lp_bias=_OWN) -> torch.Tensor:
        # lp_bias: another bias than self.bias (a module applying this weight functionally with a
        # bias of its own making, lowprec.layers_fn)
        b = self.bias if lp_bias is _OWN else lp_bias
        return QGemmFn.apply(x, self.weight, b, self, self.current_mask(), _LINEAR)


class _QConvNd(QModule):
    """Shared forward of QConv1d / QConv2d: any stride, padding incl. 'same'/'valid' and non-zero
    padding modes, dilation, groups incl. depthwise, bias or not, unbatched input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nd = len(self.kernel_size)
        unbatched = x.dim() == nd + 1
        if unbatched:
            x = x.unsqueeze(0)
        padding = self.padding
        rp = self._reversed_padding_repeated_twice  # (left, right) per dim, last dim first
        if self.padding_mode != "zeros":
            # padding outside the Function: autograd handles its backward; the activation
            # quantizer then sees the padded tensor (documented edge case)
            x = F.pad(x, rp, mode=self.padding_mode)
            padding = (0,) * nd
        elif isinstance(padding, str):
            lefts, rights = rp[0::2], rp[1::2]
            if padding == "valid" or lefts == rights:
                padding = tuple(reversed(lefts))
            else:  # asymmetric 'same' (even effective kernel): pad explicitly, as aten does
                x = F.pad(x, rp)
                padding = (0,) * nd
        op = ConvOp(self.stride, padding, self.dilation, self.groups)
        z = QGemmFn.apply(x, self.weight, self.bias, self, self.current_mask(), op)
        return z.squeeze(0) if unbatched else z


class QConv2d(_QConvNd, nn.Conv2d):
    """nn.Conv2d whose GEMMs follow `fwd_recipe` / `grad_recipe`."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, fwd="fp32", grad="fp32", weight_nm=None,
                  weight_nm_every: int = 100, stats_every: int = 0) -> "QConv2d":
        return cls._convert(conv, fwd, grad, weight_nm, weight_nm_every, stats_every)

    forward = _QConvNd.forward


class QConv1d(_QConvNd, nn.Conv1d):
    """nn.Conv1d whose GEMMs follow `fwd_recipe` / `grad_recipe` (audio front ends, token mixers,
    depthwise Mamba-style convolutions)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv1d, *, fwd="fp32", grad="fp32", weight_nm=None,
                  weight_nm_every: int = 100, stats_every: int = 0) -> "QConv1d":
        return cls._convert(conv, fwd, grad, weight_nm, weight_nm_every, stats_every)

    forward = _QConvNd.forward
