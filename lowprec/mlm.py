"""Masked-LM pretraining (BERT's): the masking, and fixed-length blocks of token ids from a local text
shard.

Masking (Devlin et al. 2019, sec. 3.1 and appendix A.1; Hugging Face's
``DataCollatorForLanguageModeling``): every maskable token (not a special token, not padding) is
selected independently with probability p = 0.15; of the selected, 80% become [MASK], 10% a token
drawn uniformly from the vocabulary, 10% stay as they are. Labels are the original ids at the
selected positions and -100 (ignored by the cross-entropy) elsewhere, so the validation MLM loss
is ``F.cross_entropy(logits [B, V, T], labels, ignore_index=-100)`` over the selected tokens.
Expected fractions of all maskable tokens: [MASK] 0.12, random 0.015, unchanged-but-predicted
0.015 (the random draw may hit the original token: 0.015/V more of those).

Blocks (``text_blocks``): the shard's lines (documents or sentences, empty lines dropped) are
tokenized, concatenated with [SEP] between them and cut into blocks of ``block_size - 2`` ids,
each wrapped as [CLS] ... [SEP] (RoBERTa's FULL-SENTENCES packing, without next-sentence
prediction); a last partial block is dropped.
"""

from __future__ import annotations

import os

import torch

__all__ = ["mask_tokens", "text_blocks"]


def mask_tokens(input_ids: torch.Tensor, *, vocab_size: int, mask_id: int, special_ids: tuple[int, ...] = (),
                probability: float = 0.15, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked inputs, labels) for ``input_ids`` (any shape, int64); see the module docstring."""
    if not 0 < probability < 1:
        raise ValueError(f"mlm probability={probability}: expected a number in (0, 1)")
    g = generator
    ids = input_ids.clone()
    maskable = torch.ones_like(ids, dtype=torch.bool)
    for s in special_ids:
        maskable &= ids != s
    u = torch.rand(ids.shape, generator=g, device=ids.device)
    selected = (u < probability) & maskable
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=g, device=ids.device)
    to_mask = selected & (r < 0.8)
    to_random = selected & (r >= 0.8) & (r < 0.9)
    ids[to_mask] = mask_id
    rand = torch.randint(vocab_size, ids.shape, generator=g, device=ids.device)
    ids[to_random] = rand[to_random]
    return ids, labels


def text_blocks(path: str | os.PathLike, tokenizer, *, block_size: int, cls_id: int, sep_id: int,
                prepare: str = "") -> torch.Tensor:
    """int64 [N, block_size] blocks of a text shard (module docstring), tokenized with a
    ``tokenizers.Tokenizer``."""
    from .tasks import read_lines, require_local

    p = require_local(path, "data.root", prepare or "a directory of UTF-8 text shards")
    if block_size < 3:
        raise ValueError(f"data.max_length={block_size}: a block needs at least 3 tokens")
    stream: list[int] = []
    for line in read_lines(p):
        if line.strip():
            stream += tokenizer.encode(line, add_special_tokens=False).ids + [sep_id]
    n = block_size - 2
    blocks = [[cls_id, *stream[i:i + n], sep_id] for i in range(0, len(stream) - n + 1, n)]
    if not blocks:
        raise ValueError(f"{path}: {len(stream)} tokens, fewer than one block of {block_size}")
    return torch.tensor(blocks, dtype=torch.long)
