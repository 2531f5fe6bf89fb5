"""The translation, question-answering and masked-LM tasks in the trainer: data, loss, evaluation.

``build_task_data(spec)`` (lowprec.data.build_datasets for a ``TaskDataSpec``) reads the local
files, tokenizes them (lowprec.tasks) and returns a ``TaskData``: the train and validation sets as
``(x, y)`` items (``x`` the input ids [L]; ``y`` a tuple of the other tensors, empty for masked-LM
training) that the trainer's loop feeds to ``TaskData.loss(model, x, y, step, seed)``, and
``TaskData.evaluate`` for the validation set. Classification and the character LM keep
lowprec.data.Datasets, whose ``loss``/``evaluate`` are the plain cross-entropy and
lowprec.evaluation.evaluate.

Per task (the data spec's ``task``; the model's ``arch`` must match, ``check_task``):

* translation (``model.arch=seq2seq``): x = source ids + </s>, padded with [PAD]; y = (decoder
  input = <s> + target[:-1], target = target ids + </s>), padded. Loss: label-smoothed
  cross-entropy over the non-pad targets (lowprec.translation). Evaluation: the plain cross-entropy
  (no smoothing) of the validation targets (teacher forcing), next-token top-1/top-5, and corpus
  BLEU (sacrebleu, 13a) of the detokenized greedy (``beam`` 1) or beam-search hypotheses against
  the raw reference lines (a target longer than max_target_length cannot be matched in full). Metric ``bleu``, higher is better.
* qa (``model.arch=question-answering``): run_qa windows (lowprec.squad.qa_features); x = ids,
  y = (attention mask, token types, start, end). Loss: (CE(start) + CE(end)) / 2. Evaluation:
  every window's logits, the best span per question over its windows (squad.best_answer) and the
  official SQuAD v1.1 EM and F1 against all its reference answers. Metric ``f1``, higher is better.
* mlm (``model.arch=masked-lm``): [CLS] ... [SEP] blocks of the text shards (lowprec.mlm); the
  training masks (15%, 80/10/10) are drawn at each step from a generator seeded by
  ``seed * 1_000_003 + step``, so a resumed run draws the same masks; the validation masks are
  drawn once from ``data.seed`` (the same for every evaluation and every run; validation items:
  x the masked input, y = (labels,)). Metric ``val_loss``
  (mean cross-entropy over the masked tokens), lower is better; top-1 = masked-token accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["TaskData", "build_task_data", "check_task", "move", "ARCH_OF"]

ARCH_OF = {"translation": "seq2seq", "qa": "question-answering", "mlm": "masked-lm"}
METRIC = {"translation": "bleu", "qa": "f1", "mlm": "val_loss"}
DECODE_EXTRA = 16  # decoding stops at the longest reference + this many tokens (or at </s>)


def move(y: Any, dev: torch.device) -> Any:
    """``y`` (a tensor or a tuple/list of tensors) on ``dev``."""
    if isinstance(y, (tuple, list)):
        return tuple(t.to(dev, non_blocking=True) for t in y)
    return y.to(dev, non_blocking=True)


def check_task(exp, ds) -> None:
    """The model must fit the data's task (one ValueError line): a language model needs text data
    and an image model image data; translation, qa and mlm need model=hf with their arch."""
    task, arch = getattr(ds, "task", "classify"), getattr(exp.model, "arch", None)
    if task in ARCH_OF or arch in ARCH_OF.values():
        if arch != ARCH_OF.get(task):
            need = (f"model=hf model.arch={ARCH_OF[task]}" if task in ARCH_OF else
                    f"data=tasks/<a {[k for k, v in ARCH_OF.items() if v == arch][0]} data set>")
            raise ValueError(f"model={exp.names['model']} (arch {arch!r}) does not fit "
                             f"data={exp.names['data']} (task {task!r}): it needs {need}")
        t = exp.trainer
        if getattr(t, "noise_every", 0) and getattr(t, "noise_window", 0):  # noise_full's backward: CE
            raise ValueError(f"trainer.noise_window={t.noise_window}: the whole-model noise measurement "
                             f"(r_full) takes the cross-entropy of image or character-LM batches, not "
                             f"{task} batches; set trainer.noise_window=0 (the per-layer r still works)")
        return
    lm_model, lm_data = exp.model.source == "lm", task == "lm"
    if lm_model != lm_data:
        raise ValueError(
            f"model={exp.names['model']} (source {exp.model.source!r}) does not fit "
            f"data={exp.names['data']} (task {task!r}): "
            + ("a language model needs data=shakespeare_char or data=text data.path=FILE"
               if lm_model else "text data needs a language model (model=chargpt)"))


class _Items(Dataset):
    """(x, y) items from a [N, ...] tensor x and a tuple of [N, ...] tensors y."""

    def __init__(self, x: torch.Tensor, *ys: torch.Tensor):
        self.x, self.ys = x, ys

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.x[i], tuple(y[i] for y in self.ys)


@dataclass
class TaskData:
    """What lowprec.data.Datasets gives the trainer, for a task (module docstring)."""
    train: Dataset
    test: Dataset
    num_classes: int           # the tokenizer's vocabulary size
    in_channels: int
    image_size: int            # data.max_length
    task: str
    spec: Any
    tokenizer: Any
    ids: dict                  # special token ids: pad, unk, cls, sep, mask, bos, eos
    extra: dict = field(default_factory=dict)  # refs (translation); examples, windows (qa)

    @property
    def metric(self) -> str:
        return METRIC[self.task]

    def loss(self, model, x: torch.Tensor, y, step: int = 0, seed: int = 0) -> torch.Tensor:
        if self.task == "translation":
            from .translation import label_smoothed_nll_loss
            return label_smoothed_nll_loss(model(x, y[0], attention_mask=(x != self.ids["pad"]).long()),
                                           y[1], self.spec.label_smoothing, ignore_index=self.ids["pad"])
        if self.task == "qa":
            return qa_loss(model(x, attention_mask=y[0], token_type_ids=y[1]), y[2], y[3])
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)  # the same masks after a resume
        xm, lab = self._mask(x.cpu(), g)
        return F.cross_entropy(model(xm.to(x.device)).float(), lab.to(x.device), ignore_index=-100)

    def _mask(self, ids: torch.Tensor, g: torch.Generator):
        from .mlm import mask_tokens
        sp = tuple(v for k, v in self.ids.items() if k != "unk")
        return mask_tokens(ids, vocab_size=self.num_classes, mask_id=self.ids["mask"], special_ids=sp,
                           probability=self.spec.mlm_probability, generator=g)

    @torch.no_grad()
    def evaluate(self, model, loader, *, device, bf16: bool, limit: int = 0) -> dict[str, float]:
        """{"val_loss", "top1", "top5" (%), and bleu | exact_match, f1} on the validation set
        (all of it: the metric needs every question / sentence); leaves ``model`` in train mode."""
        model.eval()
        ac = dict(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
        loss_sum, n, c1, c5, outs = 0.0, 0, 0, 0, []
        for x, y in loader:
            x, y = x.to(device), move(y, device)
            with torch.autocast(**ac):
                if self.task == "translation":
                    logits, tgt = model(x, y[0], attention_mask=(x != self.ids["pad"]).long()), y[1]
                elif self.task == "qa":
                    s, e = model(x, attention_mask=y[0], token_type_ids=y[1])
                    outs += list(zip(s.float().cpu(), e.float().cpu()))
                    logits, tgt = torch.stack([s, e], 2), torch.stack([y[2], y[3]], 1)  # [B, L, 2], [B, 2]
                else:  # the fixed masked input and its labels
                    logits, tgt = model(x), y[0]
            keep = tgt != (self.ids["pad"] if self.task == "translation" else -100)
            lp = logits.float()
            ce = F.cross_entropy(lp, tgt.masked_fill(~keep, 0), reduction="none")
            loss_sum += float((ce * keep).sum())
            top = lp.topk(min(5, lp.shape[1]), dim=1).indices  # [B, k, ...]
            hit = (top == tgt.unsqueeze(1)) & keep.unsqueeze(1)
            c1 += int(hit[:, 0].sum())
            c5 += int(hit.any(1).sum())
            n += int(keep.sum())
        m = {"val_loss": loss_sum / max(n, 1), "top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1)}
        if self.task == "mlm":
            m["masked_tokens"] = n
        if self.task == "translation":
            m["bleu"] = self._bleu(model, device)
        elif self.task == "qa":
            m.update(self._squad(outs))
        model.train()
        return m

    def _bleu(self, model, device) -> float:
        from .translation import beam_search, bleu, greedy_decode
        refs, srcs, sp = self.extra["refs"], self.test.x, self.spec
        max_len = min(sp.max_target_length, self.extra["longest"] + DECODE_EXTRA)
        hyps = []
        for i in range(0, len(srcs), 16):
            src = srcs[i:i + 16].to(device)
            if sp.beam == 1:
                hyps += greedy_decode(model, src, decoder_start_id=self.ids["bos"], eos_id=self.ids["eos"],
                                      max_len=max_len, attention_mask=(src != self.ids["pad"]).long())
            else:  # one row at a time, its padding cut off
                hyps += [beam_search(model, r[r != self.ids["pad"]][None], decoder_start_id=self.ids["bos"],
                                     eos_id=self.ids["eos"], max_len=max_len, beam=sp.beam, lenpen=sp.lenpen)
                         for r in src]
        return bleu([self.tokenizer.decode(h, skip_special_tokens=True) for h in hyps], refs)

    def _squad(self, outs: list) -> dict[str, float]:
        from .squad import best_answer, squad_metrics
        exs, win = self.extra["examples"], self.extra["windows"]
        by_ex: dict[int, list[int]] = {}
        for w, i in enumerate(win["example"][:len(outs)]):
            by_ex.setdefault(i, []).append(w)
        preds = {exs[i]["id"]: best_answer(exs[i]["context"], [outs[w][0] for w in ws], [outs[w][1] for w in ws],
                                           [win["offsets"][w] for w in ws],
                                           max_answer_length=self.spec.max_answer_length)
                 for i, ws in by_ex.items()}
        return squad_metrics([exs[i] for i in by_ex], preds)


def qa_loss(out: tuple[torch.Tensor, torch.Tensor], start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """(CE(start) + CE(end)) / 2: transformers' BertForQuestionAnswering loss."""
    return (F.cross_entropy(out[0].float(), start) + F.cross_entropy(out[1].float(), end)) / 2


def _special(tok) -> dict[str, int]:
    def tid(*names):
        for s in names:
            i = tok.token_to_id(s)
            if i is not None:
                return i
        raise ValueError(f"data.tokenizer: has none of the special tokens {names}")
    return {"pad": tid("[PAD]", "<pad>"), "unk": tid("[UNK]", "<unk>"), "cls": tid("[CLS]", "<s>"),
            "sep": tid("[SEP]", "</s>"), "mask": tid("[MASK]", "<mask>"), "bos": tid("<s>", "[CLS]"),
            "eos": tid("</s>", "[SEP]")}


def _text_tokenizer(spec, text: str, root: Path):
    """``_tokenizer`` on ``text`` (the cache key hashes the text, not the temporary file's name)."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "text.txt"
        f.write_text(text, encoding="utf-8")
        return _tokenizer(spec, [f], root)


def _tokenizer(spec, files, root: Path):
    """data.tokenizer, or one trained on ``files`` and kept in ``root`` as
    .tokenizer-<kind>-<vocab>-<hash of the files and options>.json: every later run on the same
    files (the fp32 baseline, a resume, the other recipes) reads the same token ids, which
    retraining would not guarantee (WordPiece training breaks ties between equally frequent pairs
    in hash order: two trainings in one process gave different vocabularies). A read-only root:
    trained in each run."""
    import hashlib
    import os

    from tokenizers import Tokenizer

    from .tasks import load_tokenizer, train_tokenizer
    if spec.tokenizer:
        return load_tokenizer(spec.tokenizer, prepare=spec.prepare)
    h = hashlib.sha256(f"{spec.tokenizer_kind} {spec.vocab_size} {spec.lowercase}".encode())
    for f in files:
        h.update(Path(f).read_bytes())
    cache = root / f".tokenizer-{spec.tokenizer_kind}-{spec.vocab_size}-{h.hexdigest()[:16]}.json"
    if cache.is_file():
        return Tokenizer.from_file(str(cache))
    tok = train_tokenizer(files, vocab_size=spec.vocab_size, kind=spec.tokenizer_kind, lowercase=spec.lowercase)
    try:
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tok.save(str(tmp))
        os.replace(tmp, cache)  # atomic: a concurrent run reads a whole file or trains its own
    except OSError:
        pass
    return tok


def _pad(rows: list[list[int]], n: int, pad: int) -> torch.Tensor:
    return torch.tensor([r[:n] + [pad] * (n - len(r[:n])) for r in rows], dtype=torch.long)


def build_task_data(spec) -> TaskData:
    """Read, tokenize and window ``spec``'s local files (module docstring)."""
    from .tasks import require_local
    root = require_local(spec.root, "data.root", spec.prepare)
    make = {"translation": _translation, "qa": _qa, "mlm": _mlm}[spec.task]
    return make(spec, root)


def _translation(spec, root: Path) -> TaskData:
    from .translation import load_pairs
    train = load_pairs(root, "train", spec.src_lang, spec.tgt_lang, spec.prepare)
    val = load_pairs(root, "validation", spec.src_lang, spec.tgt_lang, spec.prepare)
    tok = _text_tokenizer(spec, "\n".join(s for p in train for s in p) + "\n", root)  # both sides (joined BPE)
    ids = _special(tok)

    def tensors(pairs):
        enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
        src = _pad([enc(a)[:spec.max_length - 1] + [ids["eos"]] for a, _ in pairs], spec.max_length, ids["pad"])
        tgt = [enc(b)[:spec.max_target_length - 1] + [ids["eos"]] for _, b in pairs]
        dec = _pad([[ids["bos"]] + t[:-1] for t in tgt], spec.max_target_length, ids["pad"])
        return src, dec, _pad(tgt, spec.max_target_length, ids["pad"]), max(len(t) for t in tgt)
    s, d, t, _ = tensors(train)
    vs, vd, vt, longest = tensors(val)
    return TaskData(_Items(s, d, t), _Items(vs, vd, vt), tok.get_vocab_size(), 1, spec.max_length, "translation",
                    spec, tok, ids, {"refs": [b for _, b in val], "longest": longest})


def _qa(spec, root: Path) -> TaskData:
    from .squad import load_squad, qa_features
    train, dev = load_squad(root / "train-v1.1.json"), load_squad(root / "dev-v1.1.json")
    tok = _text_tokenizer(spec, "\n".join(e["question"] + "\n" + e["context"] for e in train), root)
    ids = _special(tok)
    kw = dict(max_length=spec.max_length, doc_stride=spec.doc_stride, cls_id=ids["cls"], sep_id=ids["sep"],
              pad_id=ids["pad"])
    tr, dv = qa_features(train, tok, **kw), qa_features(dev, tok, **kw)
    keys = ("attention_mask", "token_type_ids", "start_positions", "end_positions")
    return TaskData(_Items(tr["input_ids"], *(tr[k] for k in keys)), _Items(dv["input_ids"], *(dv[k] for k in keys)),
                    tok.get_vocab_size(), 1, spec.max_length, "qa", spec, tok, ids,
                    {"examples": dev, "windows": {"example": dv["example"], "offsets": dv["offsets"]}})


def _mlm(spec, root: Path) -> TaskData:
    from .mlm import text_blocks
    shards = sorted(p for p in root.glob("*.txt") if p.stem not in ("validation", "valid"))
    held = [p for p in (root / "validation.txt", root / "valid.txt") if p.is_file()]
    if not shards:
        raise FileNotFoundError(f"data.root={spec.root}: no *.txt text shards there; prepare: {spec.prepare}")
    tok = _tokenizer(spec, shards, root)
    ids = _special(tok)
    kw = dict(block_size=spec.max_length, cls_id=ids["cls"], sep_id=ids["sep"], prepare=spec.prepare)
    blocks = torch.cat([text_blocks(p, tok, **kw) for p in shards])
    if held:
        val = text_blocks(held[0], tok, **kw)
    else:  # no validation shard: the last 5% of the blocks (at least one)
        k = max(1, len(blocks) // 20)
        if len(blocks) < 2:
            raise ValueError(f"data.root={spec.root}: one block of {spec.max_length} tokens; "
                             "need 2 (train, validation)")
        blocks, val = blocks[:-k], blocks[-k:]
    # training items carry no y: the loss masks x at each step (moving a copy would be wasted)
    td = TaskData(_Items(blocks), None, tok.get_vocab_size(), 1, spec.max_length, "mlm", spec, tok, ids)
    td.test = _Items(*td._mask(val, torch.Generator().manual_seed(spec.seed)))  # fixed validation masks
    return td
