"""Translation (WMT En-De): parallel data from local files, fairseq's label-smoothed cross-entropy,
greedy/beam decoding of an encoder-decoder, and detokenized BLEU through sacrebleu.

Data, either format, read from a local directory (never downloaded):

- plain parallel text, WMT's and fairseq's raw format: ``<split>.<src>`` and ``<split>.<tgt>``,
  line i of one the translation of line i of the other (e.g. train.en / train.de);
- JSON lines as Hugging Face's wmt16 builder writes them: ``<split>.jsonl``, one
  ``{"translation": {"en": ..., "de": ...}}`` per line, read with ``datasets``' local "json" builder.

Label-smoothed cross-entropy (Szegedy et al. 2016, fairseq's ``label_smoothed_nll_loss``): with
log-probabilities lp over V classes and target y,

    loss = (1 - eps) * (-lp[y]) + eps * mean_v(-lp[v])         (eps/V on every class, 1-eps on y)

summed over non-padding targets (ignore_index) and divided by their count; eps = 0 is the plain
cross-entropy.

BLEU: ``sacrebleu.corpus_bleu(hypotheses, [references])`` on detokenized strings (sacrebleu's own
13a tokenization, the WMT standard), so the score is comparable with published BLEU.

Decoding (``greedy_decode``; ``beam_search`` for beam > 1): start from ``decoder_start_id``, extend
by the most probable token (or the ``beam`` best partial sequences by total log-probability,
normalized by length**lenpen at the end, GNMT's/fairseq's convention) until ``eos_id`` or
``max_len``. The model is lowprec.hf_models.HFSeq2Seq: model(src, decoder_ids) -> [B, V, T].
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

__all__ = ["load_pairs", "label_smoothed_nll_loss", "bleu", "greedy_decode", "beam_search"]


def load_pairs(root: str | os.PathLike, split: str, src: str = "en", tgt: str = "de",
               prepare: str = "") -> list[tuple[str, str]]:
    """(source, target) sentence pairs of ``split`` from ``root`` (module docstring)."""
    from .tasks import read_lines, require_local

    r = require_local(root, "data.root", prepare or "a directory with <split>.<src>/<split>.<tgt> or <split>.jsonl")
    a, b = r / f"{split}.{src}", r / f"{split}.{tgt}"
    if a.is_file() and b.is_file():
        xs, ys = read_lines(a), read_lines(b)
        if len(xs) != len(ys):
            raise ValueError(f"{a} has {len(xs)} lines and {b} {len(ys)}: not parallel")
        return list(zip(xs, ys))
    j = r / f"{split}.jsonl"
    if j.is_file():
        from datasets import load_dataset

        ds = load_dataset("json", data_files=str(j), split="train")
        try:
            return [(row["translation"][src], row["translation"][tgt]) for row in ds]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{j}: expected {{'translation': {{'{src}': ..., '{tgt}': ...}}}} per line "
                             f"({type(e).__name__}: {e})") from None
    raise FileNotFoundError(f"data.root={root}: neither {a.name}/{b.name} nor {j.name} there; prepare: "
                            f"{prepare or 'the data set'}")


def label_smoothed_nll_loss(logits: torch.Tensor, target: torch.Tensor, eps: float,
                            ignore_index: int = -100) -> torch.Tensor:
    """Mean label-smoothed cross-entropy; logits [B, V, T] (class dim second) or [N, V], target [B, T] / [N]."""
    lp = F.log_softmax(logits.float(), dim=1)
    keep = target != ignore_index
    y = target.masked_fill(~keep, 0)
    nll = -lp.gather(1, y.unsqueeze(1)).squeeze(1)
    smooth = -lp.mean(dim=1)
    loss = (1.0 - eps) * nll + eps * smooth
    return (loss * keep).sum() / keep.sum().clamp(min=1)


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu, 13a tokenization) of detokenized strings."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


@torch.no_grad()
def greedy_decode(model, src: torch.Tensor, *, decoder_start_id: int, eos_id: int, max_len: int,
                  attention_mask: torch.Tensor | None = None) -> list[list[int]]:
    """Token ids (without the start token, up to and without eos) per source row."""
    B = src.shape[0]
    out = torch.full((B, 1), decoder_start_id, dtype=torch.long, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    for _ in range(max_len):
        nxt = model(src, out, attention_mask=attention_mask)[:, :, -1].argmax(1)
        nxt = nxt.masked_fill(done, eos_id)
        out = torch.cat([out, nxt[:, None]], 1)
        done |= nxt == eos_id
        if done.all():
            break
    res = []
    for row in out[:, 1:].tolist():
        res.append(row[:row.index(eos_id)] if eos_id in row else row)
    return res


@torch.no_grad()
def beam_search(model, src: torch.Tensor, *, decoder_start_id: int, eos_id: int, max_len: int, beam: int,
                lenpen: float = 1.0) -> list[int]:
    """Beam search for one source row [1, S]; the finished hypothesis with the best
    log-probability / length**lenpen (the length counts eos)."""
    if beam == 1:
        return greedy_decode(model, src, decoder_start_id=decoder_start_id, eos_id=eos_id, max_len=max_len)[0]
    hyps = [([decoder_start_id], 0.0)]
    finished: list[tuple[list[int], float]] = []
    for _ in range(max_len):
        seqs = torch.tensor([h for h, _ in hyps], device=src.device)
        lp = F.log_softmax(model(src.expand(len(hyps), -1), seqs)[:, :, -1].float(), dim=1)
        cand = []
        for i, (h, s) in enumerate(hyps):
            top = lp[i].topk(beam)
            cand += [(h + [int(t)], s + float(v)) for v, t in zip(top.values, top.indices)]
        cand.sort(key=lambda c: -c[1])
        hyps = []
        for h, s in cand:
            if h[-1] == eos_id:
                finished.append((h, s / (len(h) - 1) ** lenpen))
            elif len(hyps) < beam:
                hyps.append((h, s))
            if len(hyps) == beam and len(finished) >= beam:
                break
        if not hyps or len(finished) >= beam:
            break
    finished += [(h, s / (len(h) - 1) ** lenpen) for h, s in hyps]
    best = max(finished, key=lambda c: c[1])[0][1:]
    return best[:best.index(eos_id)] if eos_id in best else best
