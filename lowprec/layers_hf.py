"""transformers' Conv1D (GPT-2 and its relatives) with per-GEMM control of its GEMMs.

`transformers.pytorch_utils.Conv1D` is a linear layer with its weight stored transposed,
[nx, nf] = [in, out]: z = a W + b. A converted one (`QConv1D`, a class swap: Parameters, hooks and
state_dict keys kept) runs lowprec.qgemm's one skeleton on the GEMM weight Wᵀ ([C_out, K], a view,
no copy), so every recipe, operand slot, weight N:M mask (blocks along nx, the input features),
statistic and the noise monitor act exactly as on a QLinear of the same shape; `gemm_weight()` and
`effective_weight()` are [nf, nx]. The input is flattened to [tokens, nx] first, as Conv1D does, so
with grad=fp32 the forward is the same `addmm` and the gradients equal the unconverted module's
bit for bit (the weight gradient computed as aᵀ δ, the orientation of autograd's for [in, out]).

transformers is optional: this module never imports it; lowprec.convert recognizes Conv1D only when
`transformers.pytorch_utils` is already imported (a model holding one has imported it).
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

from .qgemm import GemmState, LinearOp, QGemmFn, resolve_fwd, resolve_grad, swap_class
from .weight_nm import check_weight_nm

__all__ = ["QConv1D", "hf_conv1d_class"]

_OP = LinearOp(grad_weight_t=True)


def hf_conv1d_class() -> type | None:
    """transformers.pytorch_utils.Conv1D if transformers is imported, else None (no import)."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None)


class QConv1D(GemmState, nn.Module):
    """A converted transformers Conv1D (module docstring); made by `convert()` or `QConv1D.from_hf`."""

    @classmethod
    def from_hf(cls, mod: nn.Module, *, fwd="fp32", grad="fp32", weight_nm=None, weight_nm_every: int = 100,
                stats_every: int = 0) -> "QConv1D":
        base = hf_conv1d_class()
        if base is None or not isinstance(mod, base):
            raise ValueError(f"QConv1D.from_hf needs a transformers Conv1D, got {type(mod).__name__}")
        swap_class(mod, cls, resolve_fwd(fwd), resolve_grad(grad), check_weight_nm(weight_nm),
                   weight_nm_every, stats_every)
        return mod

    def gemm_weight(self) -> torch.Tensor:
        return self.weight.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = QGemmFn.apply(x.view(-1, x.size(-1)), self.weight.t(), self.bias, self, self.current_mask(), _OP)
        return z.view(x.size()[:-1] + (self.nf,))

    def __repr__(self) -> str:
        return f"QConv1D(nf={self.nf}, nx={self.nx}, {self.lp_repr()})"

    def restore_class(self) -> None:
        """Back to transformers' Conv1D, in place."""
        if hasattr(self, "weight_mask"):
            del self.weight_mask
        orig = self._lp_orig_class
        for attr in self._LP_ATTRS:
            self.__dict__.pop(attr, None)
        self.__class__ = orig

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.weight_mask = None

