"""What the translation, question-answering and masked-LM tasks share: their data spec, local files
only, and tokenizers trained from (or loaded from) local files.

    spec = TaskDataSpec(name="wmt16_en_de", task="translation", root="/data/wmt16_en_de", ...)
    require_local(spec.root, "data.root", spec.prepare)      # one-line FileNotFoundError if absent
    tok = train_tokenizer([file1, file2], vocab_size=32000, kind="bpe")   # never downloaded

Nothing here reaches the network: a dataset is read from a local directory (plain text, JSON
lines through ``datasets``' local "json" builder, or SQuAD's JSON), and a tokenizer is either a
local ``tokenizer.json`` / ``vocab.txt`` or trained from the training files with ``tokenizers``.
A missing file is one line naming the key, the path and the command that prepares it (``prepare``)
on a machine with network access; run.py prints it as its ``error:`` line.

Task options that belong to the data (sequence lengths, masking rate, label smoothing, beam) are
fields of the spec, so they are part of the experiment's identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable

__all__ = ["TASKS", "TaskDataSpec", "require_local", "train_tokenizer", "load_tokenizer", "read_lines"]

TASKS = ("translation", "qa", "mlm")


def require_local(path: str | os.PathLike | None, key: str, prepare: str) -> Path:
    """``path`` as a Path if it exists; else FileNotFoundError (one line: key, path, the command)."""
    if path is None or not Path(path).expanduser().exists():
        raise FileNotFoundError(f"{key}={path}: not found (nothing is downloaded at run time); prepare it on a "
                                f"machine with network access: {prepare}")
    return Path(path).expanduser()


@dataclass(frozen=True)
class TaskDataSpec:
    """conf/data/tasks/<name>.yaml. ``root``: the local directory of the data; ``tokenizer``: a local
    tokenizer.json, a directory with one (or with a BERT vocab.txt), or null = train one on the
    training files (``vocab_size``, ``tokenizer_kind``). ``prepare``: the command that fills root."""
    name: str
    task: str
    root: str | None = None
    prepare: str = ""
    tokenizer: str | None = None
    vocab_size: int = 32000
    tokenizer_kind: str = "bpe"          # bpe | wordpiece (when trained here)
    lowercase: bool = False
    max_length: int = 128                # tokens per (source) sequence
    max_target_length: int = 128         # translation: tokens per target sequence
    doc_stride: int = 128                # qa: overlap of the windows over a long context
    max_answer_length: int = 30          # qa: longest span the post-processing picks
    mlm_probability: float = 0.15        # mlm: fraction of tokens masked (80/10/10)
    label_smoothing: float = 0.0         # translation: eps of the label-smoothed cross-entropy
    beam: int = 1                        # translation: beam width (1: greedy)
    lenpen: float = 1.0                  # translation: length penalty
    src_lang: str = "en"
    tgt_lang: str = "de"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"data.task={self.task!r}; allowed: {TASKS}")
        if self.tokenizer_kind not in ("bpe", "wordpiece"):
            raise ValueError(f"data.tokenizer_kind={self.tokenizer_kind!r}; allowed: bpe, wordpiece")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", "float") and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise ValueError(f"data.{f.name}={v!r}: expected a number >= 0")
        for k in ("vocab_size", "max_length", "max_target_length", "max_answer_length", "beam"):
            if getattr(self, k) < 1:
                raise ValueError(f"data.{k}={getattr(self, k)!r}: expected an integer >= 1")
        if not 0 < self.mlm_probability < 1 or not 0 <= self.label_smoothing < 1:
            raise ValueError(f"data.mlm_probability={self.mlm_probability} must be in (0, 1) and "
                             f"data.label_smoothing={self.label_smoothing} in [0, 1)")
        if self.task == "qa" and self.doc_stride >= self.max_length:
            raise ValueError(f"data.doc_stride={self.doc_stride} must be < data.max_length={self.max_length}")


def read_lines(path: str | os.PathLike) -> list[str]:
    """The lines of a UTF-8 text file, newline stripped (one sentence or document per line)."""
    return Path(path).read_text(encoding="utf-8").splitlines()


_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>")


def train_tokenizer(files: Iterable[str | os.PathLike], *, vocab_size: int, kind: str = "bpe",
                    lowercase: bool = False):
    """A ``tokenizers.Tokenizer`` trained on local text files: byte-level BPE (``bpe``, as fairseq's
    and RoBERTa's) or WordPiece (``wordpiece``, BERT's), with the special tokens [PAD] (id 0),
    [UNK], [CLS], [SEP], [MASK], <s>, </s> first. BPE with the byte alphabet gave the same
    vocabulary in repeated trainings; WordPiece did not (ties in hash order), so lowprec.task_loop
    keeps a trained tokenizer next to the data for every later run."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    files = [str(f) for f in files]
    for f in files:
        require_local(f, "tokenizer training file", "the data set's prepare command")
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(_SPECIAL), show_progress=False)
    else:
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        if lowercase:
            tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(_SPECIAL),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(files, trainer)
    return tok


def load_tokenizer(path: str | os.PathLike, key: str = "data.tokenizer", prepare: str = "") -> Any:
    """A local tokenizer: a tokenizer.json file, or a directory holding tokenizer.json or a BERT
    vocab.txt (WordPiece, lowercased as bert-base-uncased's)."""
    from tokenizers import Tokenizer

    p = require_local(path, key, prepare or "save a tokenizer.json (tokenizers) or a vocab.txt there")
    if p.is_file():
        return Tokenizer.from_file(str(p))
    if (p / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(p / "tokenizer.json"))
    if (p / "vocab.txt").is_file():
        from tokenizers import decoders, normalizers, pre_tokenizers
        from tokenizers.models import WordPiece

        tok = Tokenizer(WordPiece.from_file(str(p / "vocab.txt"), unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        return tok
    raise FileNotFoundError(f"{key}={path}: holds neither tokenizer.json nor vocab.txt")
