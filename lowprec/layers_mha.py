"""nn.MultiheadAttention with per-GEMM control of its weight GEMMs.

nn.MultiheadAttention uses its input projection functionally (`F.multi_head_attention_forward`),
so converting its `out_proj` alone leaves most of its weight GEMMs in high precision. A converted
one (`QMultiheadAttention`, a class swap: Parameters, buffers, hooks and state_dict keys kept) runs
its own forward, the slow path of `F.multi_head_attention_forward` step for step, with:

- the input projection as converted GEMMs (lowprec.qgemm's `QGemmFn`, one skeleton for every layer
  kind), each with its own state (`GemmSlot`): `in_proj` over the packed `in_proj_weight` [3E, E]
  (one GEMM for self-attention; for cross-attention the q and the kv (or q, k, v) rows of the same
  weight, its N:M mask sliced likewise), or `q_proj`, `k_proj`, `v_proj` over the separate weights
  when kdim/vdim differ from embed_dim. The bias is `in_proj_bias` (split the same way);
- `out_proj`, an nn.Linear child, called as a module: `convert()` converts it like any Linear
  (a QLinear), so it is its own converted layer;
- the attention score (q kᵀ) and value (softmax · v) products, which have no weights, in high
  precision, as NVIDIA's and TransformerEngine's recipes keep them.

Everything nn.MultiheadAttention accepts works: batch_first, unbatched input, kdim/vdim,
bias=False, add_bias_kv, add_zero_attn, dropout, key_padding_mask and attn_mask (bool or float,
2-D or 3-D), is_causal, need_weights with average_attn_weights. With grad=fp32 (and no forward
quantizer) outputs and gradients equal the unconverted module's in training mode bit for bit. The
inference fast paths (`torch._native_multi_head_attention`, nn.TransformerEncoderLayer's fused
kernel) would read in_proj_weight directly and skip the quantizers, so a converted module always
runs this forward: its `_qkv_same_embed_dim` reads False (torch's fast-path checks test it; the
packing is in `lp_packed`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .qgemm import GemmSlot, LinearOp, QGemmFn, resolve_fwd, resolve_grad
from .weight_nm import check_weight_nm

__all__ = ["QMultiheadAttention"]

_LINEAR = LinearOp()


def _float_mask(mask, dtype):
    """A bool mask as an additive float one (-inf where True); float masks unchanged."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    if mask.dtype != torch.bool:
        raise AssertionError("only bool and floating types of masks are supported")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _split3(t, E):
    """[..., k·E] -> k tensors [..., E], contiguous (F._in_projection_packed's unpacking)."""
    return t.unflatten(-1, (t.shape[-1] // E, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()


class QMultiheadAttention(nn.MultiheadAttention):
    """A converted nn.MultiheadAttention (module docstring). `lp_slots`: {"in_proj": GemmSlot} or
    {"q_proj", "k_proj", "v_proj"}; made by `convert()` or `QMultiheadAttention.from_mha`."""

    lp_converted = True

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, *, fwd="fp32", grad="fp32", weight_nm=None,
                 weight_nm_every: int = 100, stats_every: int = 0) -> "QMultiheadAttention":
        """Convert the input projection of `mha` in place (its out_proj is left as it is)."""
        if getattr(mha, "lp_converted", False):
            raise ValueError("MultiheadAttention is already converted; use set_recipes() or unconvert()")
        fwd, grad, nm = resolve_fwd(fwd), resolve_grad(grad), check_weight_nm(weight_nm)
        packed = mha._qkv_same_embed_dim
        orig = type(mha)
        mha.__class__ = cls
        mha._lp_orig_class, mha.lp_packed = orig, packed
        names = ("in_proj",) if packed else ("q_proj", "k_proj", "v_proj")
        mha.lp_slots = {n: GemmSlot(mha, f"{n}_weight", fwd, grad, weight_nm=nm, weight_nm_every=weight_nm_every,
                                    stats_every=stats_every) for n in names}
        mha._qkv_same_embed_dim = False  # torch's fast paths check it (module docstring)
        return mha

    def restore_class(self) -> None:
        """Back to the class it was converted from, in place."""
        self._qkv_same_embed_dim = self.lp_packed
        orig = self._lp_orig_class
        for attr in ("lp_slots", "lp_packed", "_lp_orig_class"):
            self.__dict__.pop(attr, None)
        self.__class__ = orig

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        for s in self.lp_slots.values():
            s.weight_mask = None  # recompute from the loaded weights at the next forward

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {s.lp_repr()}" for n, s in self.lp_slots.items())

    # ------------------------------------------------------------------ forward
    def _proj(self, name, x, w, b, mask):
        return QGemmFn.apply(x, w, b, self.lp_slots[name], mask, _LINEAR)

    def _in_projection(self, query, key, value):
        b = self.in_proj_bias
        if not self.lp_packed:
            bq = bk = bv = None
            if b is not None:
                bq, bk, bv = b.chunk(3)
            s = self.lp_slots
            return (self._proj("q_proj", query, self.q_proj_weight, bq, s["q_proj"].current_mask()),
                    self._proj("k_proj", key, self.k_proj_weight, bk, s["k_proj"].current_mask()),
                    self._proj("v_proj", value, self.v_proj_weight, bv, s["v_proj"].current_mask()))
        w, E = self.in_proj_weight, query.size(-1)
        mask = self.lp_slots["in_proj"].current_mask()  # once per forward: it schedules recomputation
        if key is value and query is key:  # self-attention: one GEMM
            proj = _split3(self._proj("in_proj", query, w, b, mask), E)
            return proj[0], proj[1], proj[2]
        if key is value:  # encoder-decoder: q rows, then the kv rows
            ws, bs = w.split([E, 2 * E]), (None, None) if b is None else b.split([E, 2 * E])
            ms = (None, None) if mask is None else mask.split([E, 2 * E])
            q = self._proj("in_proj", query, ws[0], bs[0], ms[0])
            kv = _split3(self._proj("in_proj", key, ws[1], bs[1], ms[1]), E)
            return q, kv[0], kv[1]
        ws, bs = w.chunk(3), (None,) * 3 if b is None else b.chunk(3)
        ms = (None,) * 3 if mask is None else mask.chunk(3)
        return tuple(self._proj("in_proj", x, ws[i], bs[i], ms[i]) for i, x in enumerate((query, key, value)))

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        is_batched = query.dim() == 3
        key_padding_mask = _float_mask(key_padding_mask, query.dtype)
        attn_mask = _float_mask(attn_mask, query.dtype)
        if self.batch_first and is_batched:  # keep the `is` relations the projection tests
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = self._attention(query, key, value, key_padding_mask, need_weights, attn_mask,
                                       average_attn_weights, is_causal)
        if self.batch_first and is_batched:
            return out.transpose(1, 0), weights
        return out, weights

    def _attention(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                   is_causal):
        """F.multi_head_attention_forward's slow path with converted projections."""
        is_batched = query.dim() == 3
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        num_heads, head_dim = self.num_heads, self.head_dim
        if embed_dim != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}")
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # SDPA takes the is_causal hint instead
        elif key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer causal
        if (key.shape[:2] != value.shape[:2]) if not self.lp_packed else (key.shape != value.shape):
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        q, k, v = self._in_projection(query, key, value)

        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, key.shape[0]):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(tgt_len, key.shape[0])}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() != 3:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
            elif attn_mask.shape != (bsz * num_heads, tgt_len, key.shape[0]):
                raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                   f"{(bsz * num_heads, tgt_len, key.shape[0])}.")
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = (bsz * num_heads, 1, head_dim)
            k = torch.cat([k, torch.zeros(zeros, dtype=k.dtype, device=k.device)], dim=1)
            v = torch.cat([v, torch.zeros(zeros, dtype=v.dtype, device=v.device)], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, src_len):
                raise AssertionError(f"Expected key_padding_mask of shape {(bsz, src_len)}, got "
                                     f"{tuple(key_padding_mask.shape)}")
            key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
                                .reshape(bsz * num_heads, 1, src_len))
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0

        # the score and value products: no weights, high precision
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            out = self.out_proj(out).view(tgt_len, bsz, -1)
            weights = weights.view(bsz, num_heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                out, weights = out.squeeze(1), weights.squeeze(0)
            return out, weights
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        out = self.out_proj(out).view(tgt_len, bsz, -1)
        if not is_batched:
            out = out.squeeze(1)
        return out, None
