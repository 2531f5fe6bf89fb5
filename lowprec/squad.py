"""Extractive question answering on SQuAD v1.1: the official metric, the data file, and the step from
start/end logits to an answer string.

Metric (the official ``evaluate-v1.1.py``): both strings are normalized by

    lowercase -> drop punctuation (string.punctuation) -> drop the articles a/an/the (whole words)
    -> collapse whitespace

EM = 1 if the normalized prediction equals a normalized ground truth; F1 over the bags of tokens
(whitespace split) of the normalized strings: with c = |pred ∩ truth| (multiset), P = c/|pred|,
R = c/|truth|, F1 = 2PR/(P+R) (0 when c = 0). A question's score is its maximum over its ground
truths; the data set's is the mean over questions, in %.

Data: the official JSON, ``{"version": ..., "data": [{"title", "paragraphs": [{"context", "qas":
[{"id", "question", "answers": [{"text", "answer_start"}]}]}]}]}``. ``load_squad`` flattens it to
one dict per question.

Features (``qa_features``, Hugging Face ``run_qa``'s): question and context tokenized as a pair,
the context truncated into windows of ``max_length`` tokens overlapping by ``doc_stride``; each
window's answer span in tokens from the character offsets (start = end = 0, the [CLS] position,
when the answer is not inside the window). ``best_answer``: over a question's windows, the span
(s, e) of context tokens with s <= e < s + max_answer_length maximizing start[s] + end[e],
mapped back to the context's characters.
"""

from __future__ import annotations

import collections
import json
import os
import re
import string
from typing import Any, Iterable, Mapping, Sequence

import torch

__all__ = ["normalize_answer", "exact_match", "f1_score", "squad_metrics", "load_squad", "qa_features",
           "best_answer"]

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, remove punctuation, articles and extra whitespace (official order)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1_score(prediction: str, truth: str) -> float:
    p, t = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(p) & collections.Counter(t)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(t)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(examples: Iterable[Mapping[str, Any]], predictions: Mapping[str, str]) -> dict[str, float]:
    """{"exact_match", "f1"} in % over ``examples`` (load_squad's dicts); a question without a
    prediction scores 0 (as the official script, which also warns)."""
    em = f1 = 0.0
    n = 0
    for ex in examples:
        n += 1
        pred = predictions.get(ex["id"])
        if pred is None:
            continue
        truths = ex["answers"]
        em += max(exact_match(pred, t) for t in truths)
        f1 += max(f1_score(pred, t) for t in truths)
    return {"exact_match": 100.0 * em / max(n, 1), "f1": 100.0 * f1 / max(n, 1)}


def load_squad(path: str | os.PathLike) -> list[dict[str, Any]]:
    """One dict per question: id, title, context, question, answers (texts), answer_starts."""
    from .tasks import require_local

    p = require_local(path, "data.root", "the official SQuAD v1.1 train-v1.1.json / dev-v1.1.json files")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        out = []
        for art in doc["data"]:
            for para in art["paragraphs"]:
                for qa in para["qas"]:
                    out.append({"id": qa["id"], "title": art.get("title", ""), "context": para["context"],
                                "question": qa["question"], "answers": [a["text"] for a in qa["answers"]],
                                "answer_starts": [a["answer_start"] for a in qa["answers"]]})
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a SQuAD v1.1 JSON file ({type(e).__name__}: {e})") from None
    if not out:
        raise ValueError(f"{path}: not a SQuAD v1.1 JSON file (no questions)")
    return out


def qa_features(examples: Sequence[Mapping[str, Any]], tokenizer, *, max_length: int, doc_stride: int,
                cls_id: int, sep_id: int, pad_id: int = 0) -> dict[str, Any]:
    """Windows over (question, context) pairs, tokenized with a ``tokenizers.Tokenizer``:
    [CLS] question [SEP] context-window [SEP], padded to max_length. Returns tensors input_ids,
    attention_mask, token_type_ids, start_positions, end_positions [W, max_length or W], and per
    window its example index and the character offsets of its context tokens (None elsewhere)."""
    ids, masks, types, starts, ends, example_of, offsets = [], [], [], [], [], [], []
    for i, ex in enumerate(examples):
        q = tokenizer.encode(ex["question"], add_special_tokens=False).ids
        c = tokenizer.encode(ex["context"], add_special_tokens=False)
        room = max_length - len(q) - 3
        if room < 1:
            raise ValueError(f"data.max_length={max_length} leaves no room for the context of question {ex['id']}")
        a_start = ex["answer_starts"][0] if ex.get("answer_starts") else None
        a_end = a_start + len(ex["answers"][0]) if a_start is not None else None
        pos = 0
        while True:
            win = range(pos, min(pos + room, len(c.ids)))
            seq = [cls_id, *q, sep_id, *(c.ids[j] for j in win), sep_id]
            off = [None] * (len(q) + 2) + [c.offsets[j] for j in win] + [None]
            s = e = 0
            if a_start is not None:
                inside = [k for k, o in enumerate(off) if o is not None and o[0] < a_end and o[1] > a_start]
                if inside and off[inside[0]][0] <= a_start and off[inside[-1]][1] >= a_end:
                    s, e = inside[0], inside[-1]
            pad = max_length - len(seq)
            ids.append(seq + [pad_id] * pad)
            masks.append([1] * len(seq) + [0] * pad)
            types.append([0] * (len(q) + 2) + [1] * (len(seq) - len(q) - 2) + [0] * pad)
            starts.append(s)
            ends.append(e)
            example_of.append(i)
            offsets.append(off + [None] * pad)
            if win.stop >= len(c.ids):
                break
            pos += room - doc_stride if room > doc_stride else room
    t = torch.tensor
    return {"input_ids": t(ids), "attention_mask": t(masks), "token_type_ids": t(types),
            "start_positions": t(starts), "end_positions": t(ends), "example": example_of, "offsets": offsets}


def best_answer(context: str, start_logits: Sequence[torch.Tensor], end_logits: Sequence[torch.Tensor],
                offsets: Sequence[Sequence], *, max_answer_length: int = 30) -> str:
    """The context substring of the best valid span over a question's windows (module docstring)."""
    best, text = -float("inf"), ""
    for sl, el, off in zip(start_logits, end_logits, offsets):
        ok = torch.tensor([o is not None for o in off])
        s_sc = torch.where(ok, sl.float(), torch.tensor(-float("inf")))
        e_sc = torch.where(ok, el.float(), torch.tensor(-float("inf")))
        score = s_sc[:, None] + e_sc[None, :]  # [s, e]
        n = score.shape[0]
        idx = torch.arange(n)
        valid = (idx[None, :] >= idx[:, None]) & (idx[None, :] < idx[:, None] + max_answer_length)
        score = torch.where(valid, score, torch.tensor(-float("inf")))
        k = int(score.argmax())
        s, e = divmod(k, n)
        if score[s, e] > best:
            best, text = float(score[s, e]), context[off[s][0]:off[e][1]]
    return text
