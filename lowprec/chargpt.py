"""A nanoGPT-style character-level decoder (``model=chargpt``).

    model = CharGPT(vocab_size=84, n_layer=2, n_head=2, n_embd=64, block_size=64)
    logits = model(idx)          # idx int64 [B, T] (T <= block_size) -> logits [B, V, T]

With C = n_embd, h_0 = E[idx] + P[0..T-1] (token and position embeddings), then per block
(pre-LayerNorm):

    h = h + c_proj(attn(c_attn(LN_1(h))))        attn: causal softmax(q kᵀ / √(C/n_head)) v per head
    h = h + c_proj(GELU(c_fc(LN_2(h))))          (the MLP, width 4C)

and logits = lm_head(LN_f(h)). Dropout (``dropout``, default 0) after the embeddings, on the
attention probabilities and after each residual branch, as in nanoGPT. Init as nanoGPT: weights
N(0, 0.02), biases 0, the residual projections' weights N(0, 0.02/√(2·n_layer)). Parameters:
V·C (token) + T_max·C (position) + n_layer·(12C² + 13C) + 2C (LN_f) + C·V (head, no bias, no
weight tying): 114,944 for V = 84 (Shakespeare), 112,512 for V = 65, at the default size.

Layout for lowprec.convert (its ``skip="first_last"`` keeps the first and last nn.Linear in module
order in high precision, as the papers keep a network's first and last layers):

- The token embedding ``wte`` is an ``nn.Linear(V, C, bias=False)`` applied to one-hot inputs:
  onehot(i)·Wᵀ = W[:, i], the same function, gradient and parameter count as nn.Embedding, but a
  Linear, so it is the model's first layer for convert: kept high precision by first_last, quantized
  like any other layer with ``skip=null``. (With nn.Embedding the first Linear would be block 0's
  c_attn, and first_last would wrongly keep it in fp32.) It costs one [B·T, V] x [V, C] GEMM.
- ``lm_head`` is registered last, so it is the last Linear.
- Every other Linear is in a block: c_attn (q, k, v in one), attn.c_proj, mlp.c_fc, mlp.c_proj,
  4 per block, all plain nn.Linear, all converted. The position embedding is an nn.Embedding
  (never converted).

Output: logits are returned as [B, V, T] (the class dimension second, a transposed view), the
layout ``F.cross_entropy(logits, y)`` with targets y [B, T] expects, and the one a classifier's
top-k on dim 1 against ``y[:, None]`` handles: a trainer written for [N, C] logits and [N] labels
works unchanged, every position counting as one prediction.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LM_MODELS", "CHARGPT_DEFAULTS", "CharGPT", "check_lm_kwargs", "build_lm"]

LM_MODELS = ("chargpt",)
CHARGPT_DEFAULTS = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "dropout": 0.0}


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CharGPT(nn.Module):
    def __init__(self, vocab_size: int, *, n_layer: int = 2, n_head: int = 2, n_embd: int = 64,
                 block_size: int = 64, dropout: float = 0.0):
        super().__init__()
        check_lm_kwargs("chargpt", dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                                        dropout=dropout))
        self.vocab_size, self.block_size = vocab_size, block_size
        self.wte = nn.Linear(vocab_size, n_embd, bias=False)  # on one-hot inputs (module docstring)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)  # registered last: the last Linear
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for b in self.blocks:  # GPT-2: residual projections scaled so the stream's variance stays O(1)
            for proj in (b.attn.c_proj, b.mlp.c_proj):
                nn.init.normal_(proj.weight, 0.0, 0.02 / math.sqrt(2 * n_layer))

    def no_weight_decay(self) -> set[str]:
        """Parameter names the optimizer must not decay beyond biases and norms (lowprec.train.
        make_optimizer): the token embedding, a Linear weight only in form (minGPT's rule: no
        decay on embeddings; wpe, an nn.Embedding, is excluded by its type)."""
        return {"wte.weight"}

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"CharGPT expects int64 token ids [B, T], got {idx.dtype} {tuple(idx.shape)}")
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds model.kwargs.block_size={self.block_size}")
        onehot = F.one_hot(idx, self.vocab_size).to(self.wte.weight.dtype)
        x = self.drop(self.wte(onehot) + self.wpe(torch.arange(T, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x)).transpose(1, 2)  # [B, V, T]: class dimension second


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def check_lm_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    """ValueError (one line, naming the key and value) for an unknown model or a bad kwarg."""
    if name not in LM_MODELS:
        raise ValueError(f"ModelSpec.name={name!r} is not an lm model; allowed: {LM_MODELS}")
    bad = sorted(set(kwargs) - set(CHARGPT_DEFAULTS))
    if bad:
        raise ValueError(f"ModelSpec.kwargs key {bad[0]!r} is not accepted by lm {name}; "
                         f"allowed: {tuple(CHARGPT_DEFAULTS)}")
    kw = {**CHARGPT_DEFAULTS, **kwargs}
    for k in ("n_layer", "n_head", "n_embd", "block_size"):
        if not _pos_int(kw[k]):
            raise ValueError(f"ModelSpec.kwargs.{k}={kw[k]!r} must be a positive int")
    if kw["n_embd"] % kw["n_head"]:
        raise ValueError(f"ModelSpec.kwargs.n_embd={kw['n_embd']} is not divisible by n_head={kw['n_head']}")
    d = kw["dropout"]
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
        raise ValueError(f"ModelSpec.kwargs.dropout={d!r} must be a number in [0, 1)")


def build_lm(name: str, kwargs: Mapping[str, Any], *, vocab_size: int, seq_len: int) -> CharGPT:
    """The model for a dataset of ``vocab_size`` characters and windows of ``seq_len`` (the dataset's
    ``image_size``), which must fit the position table."""
    check_lm_kwargs(name, kwargs)
    kw = {**CHARGPT_DEFAULTS, **kwargs}
    if seq_len > kw["block_size"]:
        raise ValueError(f"ModelSpec.kwargs.block_size={kw['block_size']} is shorter than the data's windows "
                         f"(data.block_size={seq_len})")
    return CharGPT(vocab_size, **kw)
