"""The backward side of a converted layer (lowprec.qgemm) as pure functions of the recipe, the state and tensors.

A layer's backward computes two GEMMs from the incoming gradient δ (docs/routes.md):

    backward  g = Wᵀ δ_b       δ_b = grad.backward(δ)   (exact δ when None)
    update    ∂C/∂W = δ_u aᵀ   δ_u = mean of grad.samples draws of grad.update(δ)  (SMP)

Routing rules (one place: `route`):
- `grad.shared` (backward == update, e.g. LUQ): the FIRST update draw is δ_b, so one quantized δ
  feeds both GEMMs; without an update GEMM only that first draw is made (no extra RNG use).
- Estimators with `elementwise == False` (N:M, block formats) get δ as a 2-D [C_out, tokens] matrix
  through the layer's `to2d` (conv: permute(1,0,2,3).reshape(C, -1); linear: reshape(-1, out).t());
  `from2d` maps the result back. Those that declare `token_views` (N:M: blocks along the flattened
  tokens, whatever the view's shape) get `to2d(δ, view=True)` instead, a view without a copy
  (conv: [C_out, N, H·W]; linear: the transposed [C_out, tokens]), and return their result in its
  layout, so δ̂ comes back in δ's own memory order. On the CPU the block formats read the view too
  where it pays (`_reads_view`): a Linear's transposed view in both slots, a convolution's for the
  backward GEMM's blocks along C_out. The same numbers as on the copy (uniforms are indexed by the
  logical position), and δ̂ in δ's own order, which the GEMMs take without a transposing copy.
- State: the layer's `lp_state = {"backward": {}, "update": {}}`; each slot's dict is passed as
  `state=` to the estimator of that slot (a shared recipe uses the "update" slot only). SMP is
  `estimators.SMP.draws`: draws 2..s get a copy of the update state as it was before draw 1, so a
  stateful estimator (LUQ in-hindsight max) advances its state once per step and every draw uses
  the same scale.

Update-GEMM operands (`update_operands`, used when `grad.act_upd` or `grad.update_rht` is set,
`custom_update`): δ_u as [C_out, T] and a as [T, K] (linear: a.reshape(-1, in); conv: the im2col
matrix, `im2col_of`, so blocks along tokens are exact; an `Im2col`, made when asked: with update_rht
gathered straight into the rotation in one C pass on the CPU). `act_upd` quantizes the high-precision a
(the caller passes it). `update_rht = n` rotates both operands along tokens with the block random
Hadamard transform R of lowprec.hadamard (signs drawn by the caller, fresh each backward): with R
orthogonal, (δ R)(Rᵀ a) = δ a, so the rotation changes only the quantization noise; δ is rotated
before `grad.update` quantizes it (SMP draws included). The bias gradient is δ̂ᵤ·(R 1), the update
GEMM with an all-ones activation column: unbiased, no extra draw.

Noise monitor (`noise_record`, lowprec.noise): for an armed backward, the exact weight gradient
g = gemm(δ) and a second, independent estimate ĝ₂ (the recipe's update draws again, SMP count and
update-operand quantization included) from the monitor's own generator and a copy of the update
state taken when armed, so the training draws (torch's global RNG, the live state) are untouched;
returns `noise.noise_terms(g, ĝ, ĝ₂)`. An exact update GEMM (no update estimator, no custom
operands) has no noise: terms of (ĝ, ĝ, ĝ).

Statistics (`stats_record`): `rel_error`, `cosine`, `zero_frac`, `nnz_in` for δ_u vs δ; `bwd_*`
for δ_b vs δ when δ_b is a separate estimate; `gw_*` for the weight gradient vs the exact one;
`absmax` = max|δ|; `state_update_*` for scalar entries of the update state (e.g. LUQ's max).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .estimators import NVFP4, SMP
from .dispatch import block_rht, runs_twins  # the FWHT: its C twin on CPU tensors
from .kernels import cpu as cpu_twins  # im2col, transposing copies: one C pass on CPU tensors
from .kernels import cpu_rht  # NVFP4 after the rotation in one C call
from .noise import noise_terms
from .stats import compare

__all__ = ["token_matrix", "estimate", "update_draws", "route", "custom_update", "Im2col", "im2col_of",
           "update_operands", "noise_record", "stats_record"]


def token_matrix(to2d, delta):
    """δ as the [C_out, tokens] matrix: the layer's token view when that is a matrix (a Linear's
    transposed view: no transposing copy; the block estimators and the FWHT read it in its own memory
    order, same numbers), else ``to2d``'s copy (a convolution's [C_out, N, H·W] view is no matrix)."""
    v = to2d(delta, view=True)
    return v if v.dim() == 2 else to2d(delta)


def estimate(est, delta, state, to2d, from2d, generator=None, view=False):
    """``est(δ)``; a block estimator (``elementwise == False``) sees δ as ``to2d(δ)`` (a view when it
    takes ``token_views`` or ``view`` is set: `_reads_view`; else the copy `route` makes once per
    backward)."""
    if getattr(est, "elementwise", True):
        return est(delta, state=state, generator=generator)
    view = view or getattr(est, "token_views", False)
    return from2d(est(to2d(delta, view=view), state=state, generator=generator))


def _reads_view(est, delta, to2d, update=False) -> bool:
    """Whether a block estimate reads δ's token view instead of the [C_out, tokens] copy (on the CPU,
    where the twins read any dense layout in its own memory order; the numbers are the copy's, as the
    uniforms are indexed by the logical position):
    - a Linear's view (a matrix: the transposed [C_out, tokens], C_out innermost in memory), either
      slot: no transposing copy of δ, and δ̂ comes back in δ's [tokens, C_out] order, whose GEMMs run
      ~1.4x faster than on the transposed copy (dgrad [1024, 256] x [256, 64]: 0.50 vs 0.35 ms). A
      bias gradient sums δ̂_u over tokens in that order, as autograd sums an nn.Linear's;
    - a convolution's [C_out, N, H·W] view, blocks along C_out (``dim == 0``) of the backward GEMM where
      C_out is not innermost (NCHW): δ̂_b in δ's NCHW order, which convolution_backward takes as it is.
      Not a channels-last map (C_out innermost: short rows across a strided dim);
    - that view in the update slot, a block format (``block``) along tokens whose blocks tile each
      image's H·W: then they are the [C_out, tokens] copy's blocks, each element at the same logical
      index (c·N·H·W + n·H·W + hw either way), so the same numbers without either copy (to2d's, and
      convolution_backward's of the transposed result); not when a block would cross an image.
    Not off the CPU: the GPU kernels' layouts are not checked for this."""
    if getattr(est, "elementwise", True) or delta.device.type != "cpu":
        return False
    v = to2d(delta, view=True)
    if v.dim() == 2:
        return True
    if update:  # blocks of b along tokens tiling each image's H·W: those of the copy, the same uniforms
        b = getattr(est, "block", None)
        return b is not None and getattr(est, "dim", None) == -1 and not getattr(est, "block_2d", False) \
            and v.shape[-1] % b == 0
    return getattr(est, "dim", None) == 0 and v.shape[0] > 1 and v.stride(0) != 1


def update_draws(g, delta, samples: int, to2d, from2d, state, generator=None):
    """(first draw, SMP mean) of ``g.update``; the state rules are estimators.SMP's."""
    est = g.update
    view = _reads_view(est, delta, to2d, True)

    def draw(x, *, generator=None, state=None):
        return estimate(est, x, state, to2d, from2d, generator, view)

    return SMP(draw, samples).draws(delta, generator=generator, state=state)


def _once(to2d, delta):
    """``to2d`` with its copy of ``delta`` made once: the backward and update estimates (and SMP draws)
    share it, as estimators do not write their input (a Linear's copy is a transposing one, ~5x a
    plain copy; on the char GPT with nvfp4_rtn the two copies per layer took ~0.8x the C format's time),
    a matrix view copied by the C transposition (`cpu_twins.contiguous`: the same tensor, ~3x faster);
    the token view of ``delta`` is made once too."""
    memo, views = [], []

    def f(t, view=False):
        if t is not delta:
            return to2d(t, view=view)
        if not views:  # the token view, asked for by each slot's `_reads_view` and estimate
            views.append(to2d(t, view=True))
        if view:
            return views[0]
        if not memo:  # to2d(t) is the view made contiguous when it is a matrix
            memo.append(cpu_twins.contiguous(views[0]) if views[0].dim() == 2 else to2d(t))
        return memo[0]
    return f


def route(g, lp_state, delta, need_b: bool, need_u: bool, to2d, from2d):
    """(δ_b, δ_u) of recipe ``g`` with the layer's ``lp_state``; either may be ``delta`` itself
    (exact), both may be the same object."""
    d_b = d_u = delta
    if g.backward is None and g.update is None:
        return d_b, d_u
    to2d = _once(to2d, delta)
    s = int(g.samples)
    if g.shared and g.update is not None:
        if not (need_b or need_u):
            return d_b, d_u
        # without an update GEMM only the first draw is needed: no extra draws, no extra RNG use
        first, mean = update_draws(g, delta, s if need_u else 1, to2d, from2d, lp_state["update"])
        d_b = first
        if need_u:
            d_u = mean
        return d_b, d_u
    if need_b and g.backward is not None:
        d_b = estimate(g.backward, delta, lp_state["backward"], to2d, from2d, view=_reads_view(g.backward, delta, to2d))
    if need_u and g.update is not None:
        d_u = update_draws(g, delta, s, to2d, from2d, lp_state["update"])[1]
    return d_b, d_u


def custom_update(g) -> bool:
    """Whether the update GEMM needs `update_operands` (act_upd or update_rht set)."""
    return getattr(g, "act_upd", None) is not None or getattr(g, "update_rht", None) is not None


class Im2col:
    """The im2col matrix [tokens, C_in·kh·kw] of ``t`` (a 2-d convolution's input), made when asked:
    `matrix()`, or `rotated(signs)` = ``block_rht(matrix(), signs, 0)`` in one C pass on the CPU (the
    rows gathered straight into the FWHT: the matrix, 9x the input for a 3x3 kernel, is never written),
    `rotated(signs, est)` = est of that (NVFP4 along tokens: lowprec.kernels.cpu_rht)."""

    def __init__(self, t, k, s, p, d):
        self.t, self.geom = t, (k, s, p, d)

    def matrix(self):
        return cpu_twins.im2col(self.t, *self.geom)  # F.unfold and a transposing copy off the CPU

    def rotated(self, signs, est=None, generator=None):
        """``est(rotation)`` (None: the rotation); NVFP4 along tokens on the CPU twins from one C call where
        the geometry allows (the rotated matrix neither gathered nor read back), the same numbers."""
        if self.t.device.type != "cpu":
            r = block_rht(self.matrix(), signs, 0)
        elif isinstance(est, NVFP4) and est.dim == 0 and not est.block_2d and runs_twins(self.t):
            return cpu_rht.im2col_rht_nvfp4(self.t, *self.geom, signs, rounding=est.rounding, generator=generator,
                                            nonfinite=est.nonfinite)
        else:
            r = cpu_twins.im2col_rht(self.t, *self.geom, signs)
        return r if est is None else est(r, generator=generator)


def _matrix(a2):
    return a2.matrix() if isinstance(a2, Im2col) else a2


def im2col_of(w, conv):
    """t -> the `Im2col` of the convolution with weight w, args `conv` (stride, padding, dilation, ...:
    the layout of aten.convolution_backward's arguments)."""
    k, (s, p, d) = tuple(w.shape[2:]), conv[:3]
    if len(k) == 1:  # a 1-d convolution is a 2-d one of height 1
        k, s, p, d = (1, *k), (1, *s), (0, *p), (1, *d)

    def im2col(t):
        return Im2col(t.unsqueeze(2) if t.dim() == 3 else t, k, s, p, d)
    return im2col


def _rotated(est, x, signs, dim: int, samples: int, generator, state):
    """The SMP mean of ``samples`` draws of ``est(block_rht(x, signs, dim))`` (est None: the rotation);
    one pass over x where the estimator rotates its input itself (``after_rht``, blocks along ``dim``)."""
    if est is None:
        return block_rht(x, signs, dim)
    if samples == 1 and hasattr(est, "after_rht") and est.dim % x.dim() == dim % x.dim():
        return est.after_rht(x, signs, generator=generator)
    return SMP(est, samples).draws(block_rht(x, signs, dim), generator=generator, state=state)[1]


def update_operands(g, delta, d_u, a2, signs, to2d, from2d, *, state, generator=None):
    """(δ_u [C_out, T'], a_u [T', K], ones [T', 1] or None, δ_u in δ's layout for statistics) of the
    update GEMM of recipe ``g`` (module docstring). ``a2``: the activation as the [T, K] operand
    (high-precision when act_upd is set); ``signs``: the RHT signs (None without update_rht);
    ``state``/``generator``: the update state and the RNG of the draws (None: torch's RNG)."""
    ones = None
    if g.update_rht is None:
        a2 = _matrix(a2)
        d_u2 = to2d(d_u)
        unrotated = d_u
        a_u = a2 if g.act_upd is None else g.act_upd(a2, generator=generator)
    else:  # δ as the [C_out, tokens] view the update estimator expects, a as [T, K]: rotated, then quantized
        d_u2 = _rotated(g.update, token_matrix(to2d, delta), signs, -1, int(g.samples), generator, state)
        if isinstance(a2, Im2col):
            a_u = a2.rotated(signs, g.act_upd, generator)
        else:
            a_u = _rotated(g.act_upd, a2, signs, 0, 1, generator, None)
        tokens = delta.numel() // d_u2.shape[0]
        ones = block_rht(torch.ones(tokens, 1, dtype=a_u.dtype, device=a_u.device), signs, 0)

        def unrotated():
            return from2d(block_rht(d_u2, signs, -1, inverse=True)[:, :tokens])
    return d_u2, a_u, ones, unrotated


def noise_record(g, delta, gw_hat, gemm: Callable[[torch.Tensor], torch.Tensor], a2, signs, to2d, from2d, *,
                 state, generator) -> dict[str, float]:
    """The noise sums of one armed backward (module docstring): ``gemm(d)`` is the update GEMM
    with δ-estimate d; ``a2``/``signs`` as for `update_operands` (used only when `custom_update`);
    ``state``: a copy of the update state taken when armed (consumed)."""
    if g.update is None and not custom_update(g):  # exact update GEMM: no noise
        return noise_terms(gw_hat, gw_hat, gw_hat)
    d_u = delta
    if g.update is not None and g.update_rht is None:
        d_u = update_draws(g, delta, int(g.samples), to2d, from2d, state, generator)[1]
    if custom_update(g):
        d_u2, a_u, _, _ = update_operands(g, delta, d_u, a2, signs, to2d, from2d, state=state, generator=generator)
        gw2 = d_u2.mm(a_u).reshape(gw_hat.shape)
    else:
        gw2 = gemm(d_u)
    return noise_terms(gemm(delta), gw_hat, gw2)


def _scalar(v) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1 and v.dtype != torch.bool:
        return float(v)
    return None


def stats_record(delta, d_b, d_u, need_b: bool, need_u: bool, gw_hat, exact_gw: Callable[[], torch.Tensor],
                 update_state: dict[str, Any]) -> dict[str, float]:
    """One statistics record (module docstring); ``exact_gw()`` computes the exact weight gradient."""
    d = delta.float()
    rec: dict[str, float] = {"absmax": float(d.abs().max())}
    if need_u:
        rec.update({k: float(v) for k, v in compare(d, d_u.float()).items()})
        if gw_hat is not None and d_u is not delta:
            rec.update({f"gw_{k}": float(v) for k, v in compare(exact_gw().float(), gw_hat.float()).items()})
    if need_b and d_b is not delta and d_b is not d_u:
        rec.update({f"bwd_{k}": float(v) for k, v in compare(d, d_b.float()).items()})
    for k, v in update_state.items():
        f = _scalar(v)
        if f is not None:
            rec[f"state_update_{k}"] = f
    return rec
