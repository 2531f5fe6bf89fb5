"""Datasets: digits, Fashion-MNIST, CIFAR-10/100, ImageNet, behind one validated spec.

    spec = DataSpec(name="cifar10", root="/data")     # conf/data/<name>.yaml instantiates this
    check_spec(spec)                                  # paths only, milliseconds: fail before training
    ds = build_datasets(spec)                         # Datasets(train, test, num_classes, in_channels, image_size)

Every dataset yields ``(image: float32 Tensor[C, S, S], label: int64)`` with ``S = spec.image_size``,
normalized per channel.

- digits: ``sklearn.datasets.load_digits()`` (shipped with scikit-learn, no download), a FIXED
  1437/360 split (seed ``DIGITS_SPLIT_SEED``, independent of ``spec.seed`` so every run is scored on
  the same test images), upsampled from 8x8 to 32x32 by default so CIFAR-style nets apply.
  In memory as ``TensorDataset`` (already normalized and resized: indexing is all a step costs).
- fashion_mnist: the four IDX ``.gz`` files (Debian's ``dataset-fashion-mnist`` installs them in
  ``/usr/share/datasets/fashion-mnist``), read by ``read_idx`` below; in memory as ``TensorDataset``.
- cifar10 / cifar100: ``torchvision.datasets.CIFAR10/CIFAR100(root, download=False)``, unmodified
  (they verify each file's MD5). ``root`` is the folder that holds ``cifar-10-batches-py/`` or
  ``cifar-100-python/``.
- imagenet: ``torchvision.datasets.ImageFolder`` on ``root/train`` and ``root/val`` (one folder per
  class in each; val must have the same classes).
- shakespeare_char / text: character-level LM windows, ``lowprec.text_data`` (a ``TextDataSpec``;
  ``Datasets.task == "lm"``, ``num_classes`` = vocabulary size, ``image_size`` = window length T).

``augment`` (random crop + horizontal flip, train split only) applies to cifar/imagenet; it is off
for digits/fashion_mnist (asking for it there is an error, not a silent no-op).
``train_subset`` / ``test_subset`` keep a seeded random subset of N items (``spec.seed``; sorted
indices, so the same spec always gives the same items). Random rather than first-N because
ImageFolder lists samples class by class: its first N images would be a single class.

Everything a user can get wrong raises at ``DataSpec(...)`` (values) or ``check_spec`` (paths),
with one line naming the value or path and what was expected. Heavy imports (torchvision,
scikit-learn) happen only inside the builders.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .tasks import TaskDataSpec
from .text_data import TEXT_DATASETS, TextDataSpec, build_text, check_text_spec

__all__ = [
    "DATASET_NAMES",
    "TEXT_DATASETS",
    "TextDataSpec",
    "DataSpec",
    "Datasets",
    "build_datasets",
    "check_spec",
    "read_idx",
    "FASHION_MNIST_ROOT",
]

DATASET_NAMES = ("digits", "fashion_mnist", "cifar10", "cifar100", "imagenet")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_SIZE = 360  # of 1797 -> 1437 train

_DEFAULT_IMAGE_SIZE = {"digits": 32, "fashion_mnist": 28, "cifar10": 32, "cifar100": 32, "imagenet": 224}
_DEFAULT_AUGMENT = {"digits": False, "fashion_mnist": False, "cifar10": True, "cifar100": True, "imagenet": True}
_NUM_CLASSES = {"digits": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}
_IN_CHANNELS = {"digits": 1, "fashion_mnist": 1, "cifar10": 3, "cifar100": 3, "imagenet": 3}

# Per-channel statistics of the training sets (standard published values).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
_CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py",
                ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta"), "CIFAR-10 python batches"),
    "cifar100": ("cifar-100-python", ("train", "test", "meta"), "CIFAR-100 python files"),
}


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclass(frozen=True)
class DataSpec:
    """Which dataset, where, at what size. ``None`` fields resolve to the dataset's default in
    ``__post_init__`` (``image_size``, ``augment``, and ``root`` for fashion_mnist), so an
    instantiated spec always states what will actually be loaded."""

    name: str
    root: str | None = None
    image_size: int | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    augment: bool | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in DATASET_NAMES:
            raise ValueError(f"DataSpec.name={self.name!r} is not a dataset; allowed: {DATASET_NAMES}")
        root = self.root
        if root is not None and not isinstance(root, (str, os.PathLike)):
            raise ValueError(f"DataSpec.root={root!r} must be a path string or None")
        if root is None and self.name == "fashion_mnist":
            root = FASHION_MNIST_ROOT
        object.__setattr__(self, "root", None if root is None else os.fspath(root))

        size = _DEFAULT_IMAGE_SIZE[self.name] if self.image_size is None else self.image_size
        if not _is_int(size) or size < 1:
            raise ValueError(f"DataSpec.image_size={self.image_size!r} must be a positive int or None "
                             f"(None = {_DEFAULT_IMAGE_SIZE[self.name]} for {self.name})")
        object.__setattr__(self, "image_size", int(size))

        for field in ("train_subset", "test_subset"):
            v = getattr(self, field)
            if v is not None and (not _is_int(v) or v < 1):
                raise ValueError(f"DataSpec.{field}={v!r} must be a positive int or None (= everything)")
            if v is not None:
                object.__setattr__(self, field, int(v))

        augment = _DEFAULT_AUGMENT[self.name] if self.augment is None else self.augment
        if not isinstance(augment, (bool, np.bool_)):
            raise ValueError(f"DataSpec.augment={self.augment!r} must be true, false or null")
        if augment and self.name in ("digits", "fashion_mnist"):
            raise ValueError(f"DataSpec.augment={self.augment!r} is not supported for {self.name}; "
                             f"allowed: false or null (augmentation exists for cifar10, cifar100, imagenet)")
        object.__setattr__(self, "augment", bool(augment))

        if not _is_int(self.seed):
            raise ValueError(f"DataSpec.seed={self.seed!r} must be an int")
        object.__setattr__(self, "seed", int(self.seed))


@dataclass(frozen=True)
class Datasets:
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    # "classify": (image, label) items; "lm" (text_data): (x, y) int64 [T] windows, y = x shifted by
    # one, num_classes = vocabulary size, image_size = T, in_channels = 1
    task: str = "classify"
    metric = property(lambda self: "val_loss" if self.task == "lm" else "top1")

    def loss(self, model, x, y, step: int = 0, seed: int = 0):
        """The training loss: cross-entropy of the logits (a language model's [B, V, T])."""
        return torch.nn.functional.cross_entropy(model(x).float(), y)

    def evaluate(self, model, loader, **kw) -> dict:
        """top-1, top-5 and val_loss on ``loader`` (lowprec.evaluation.evaluate)."""
        from .evaluation import evaluate
        return evaluate(model, loader, **kw)


# ----------------------------------------------------------------------------------------------
# Path checks (fast; build_datasets runs them first)

def check_spec(spec: DataSpec) -> None:
    """Raise FileNotFoundError (one line: the path and what was expected) if ``spec``'s files are
    not where they should be. Looks only at paths, never reads the data: milliseconds."""
    if not isinstance(spec, DataSpec):
        if isinstance(spec, TextDataSpec):
            return check_text_spec(spec)
        raise ValueError(f"check_spec expects a DataSpec, got {type(spec).__name__}")
    name, root = spec.name, spec.root
    if name == "digits":
        return
    if root is None:
        hint = {"cifar10": "the folder holding cifar-10-batches-py/",
                "cifar100": "the folder holding cifar-100-python/",
                "imagenet": "the folder holding train/ and val/ class folders"}[name]
        raise FileNotFoundError(f"{name}: data.root is not set; pass data.root=<{hint}>")
    if name == "fashion_mnist":
        missing = [f for f in _FMNIST_FILES.values() if not os.path.isfile(os.path.join(root, f))]
        if missing:
            raise FileNotFoundError(
                f"fashion_mnist: no IDX file {os.path.join(root, missing[0])} (expected "
                f"{', '.join(_FMNIST_FILES.values())} under {root}; `apt-get install dataset-fashion-mnist` "
                f"puts them in {FASHION_MNIST_ROOT}); pass data.root=...")
    elif name in _CIFAR_FILES:
        folder, files, what = _CIFAR_FILES[name]
        for f in files:
            path = os.path.join(root, folder, f)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{name}: no {what} under {root} (expected {path}); pass data.root=...")
    elif name == "imagenet":
        for split in ("train", "val"):
            d = os.path.join(root, split)
            if not os.path.isdir(d):
                raise FileNotFoundError(f"imagenet: no folder {d} (expected {root}/train/<class>/*.JPEG "
                                        f"and {root}/val/<class>/*.JPEG); pass data.root=...")
            if not any(e.is_dir() for e in os.scandir(d)):
                raise FileNotFoundError(f"imagenet: {d} has no class folders (expected {d}/<class>/<image>)")


# ----------------------------------------------------------------------------------------------
# IDX (the MNIST file format): magic = 0x00 0x00 <dtype code> <ndim>, then ndim big-endian uint32
# sizes, then the data. Fashion-MNIST uses dtype 0x08 (uint8): images 2051 (3 dims), labels 2049.

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str, *, expect_magic: int | None = None) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw) into a numpy array of its declared shape. ValueError (one
    line, naming the file) on a wrong magic number, a truncated/oversized payload or a bad gzip."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: not a readable IDX file ({e})") from None
    if len(raw) < 4:
        raise ValueError(f"{path}: corrupt IDX file ({len(raw)} bytes, shorter than the 4-byte magic)")
    magic = int.from_bytes(raw[:4], "big")
    if expect_magic is not None and magic != expect_magic:
        raise ValueError(f"{path}: corrupt IDX file (magic number {magic}, expected {expect_magic})")
    code, ndim = raw[2], raw[3]
    if raw[0] != 0 or raw[1] != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path}: corrupt IDX file (magic number {magic} is not a valid IDX header)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: corrupt IDX file (truncated header)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: corrupt IDX file (header says shape {shape} = {expected} bytes of data, "
                         f"file has {len(raw) - header})")
    return np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=header).reshape(shape).copy()


# ----------------------------------------------------------------------------------------------
# Builders

def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of an [N, C, H, W] float batch to size x size (antialiased when shrinking)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    down = size < max(x.shape[-2:])
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                           antialias=down)


def _subset(ds: Dataset, n: int | None, seed: int, split: str) -> Dataset:
    if n is None:
        return ds
    total = len(ds)
    if n > total:
        raise ValueError(f"DataSpec.{split}_subset={n} exceeds the {total} {split} items")
    g = torch.Generator().manual_seed(seed * 2 + (split == "test"))  # train and test draw independently
    idx = torch.randperm(total, generator=g)[:n].sort().values
    if isinstance(ds, TensorDataset):  # stay a TensorDataset: indexing stays one tensor lookup
        return TensorDataset(*(t[idx] for t in ds.tensors))
    return Subset(ds, idx.tolist())


def _digits(spec: DataSpec) -> tuple[Dataset, Dataset]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # [1797, 1, 8, 8] in [0, 1]
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    test_idx, train_idx = perm[:DIGITS_TEST_SIZE].sort().values, perm[DIGITS_TEST_SIZE:].sort().values
    mean, std = x[train_idx].mean(), x[train_idx].std()  # train-split statistics (scalars)
    x = _resize((x - mean) / std, spec.image_size)
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])


def _fashion_mnist(spec: DataSpec) -> tuple[Dataset, Dataset]:
    out = []
    for split in ("train", "test"):
        p_img = os.path.join(spec.root, _FMNIST_FILES[f"{split}_images"])
        p_lab = os.path.join(spec.root, _FMNIST_FILES[f"{split}_labels"])
        images = read_idx(p_img, expect_magic=2051)
        labels = read_idx(p_lab, expect_magic=2049)
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"fashion_mnist: {p_img} has shape {images.shape} but {p_lab} has shape "
                             f"{labels.shape} (expected [N, H, W] images and N labels)")
        if labels.size and labels.max() > 9:
            raise ValueError(f"fashion_mnist: {p_lab} has label {int(labels.max())} (expected 0..9)")
        x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)
        x = (x - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
        out.append(TensorDataset(_resize(x, spec.image_size), torch.from_numpy(labels.astype(np.int64))))
    return out[0], out[1]


def _cifar(spec: DataSpec) -> tuple[Dataset, Dataset]:
    from torchvision import datasets, transforms as T

    cls = datasets.CIFAR10 if spec.name == "cifar10" else datasets.CIFAR100
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if spec.name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    s = spec.image_size
    resize = [] if s == 32 else [T.Resize(s, antialias=True)]
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    aug = [T.RandomCrop(s, padding=s // 8), T.RandomHorizontalFlip()] if spec.augment else []
    out = []
    for train, tf in ((True, resize + aug + tail), (False, resize + tail)):
        try:
            out.append(cls(spec.root, train=train, transform=T.Compose(tf), download=False))
        except RuntimeError as e:  # torchvision's "not found or corrupted": files exist (checked), MD5 differs
            folder = _CIFAR_FILES[spec.name][0]
            raise ValueError(f"{spec.name}: files under {os.path.join(spec.root, folder)} failed torchvision's "
                             f"MD5 check (corrupt or partial copy?): {e}") from None
    return out[0], out[1]


def _imagenet(spec: DataSpec) -> tuple[Dataset, Dataset, int]:
    from torchvision import datasets, transforms as T

    s = spec.image_size
    tail = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    evaluate = [T.Resize(round(s / 0.875), antialias=True), T.CenterCrop(s)]  # 256 -> 224 at s = 224
    train_tf = [T.RandomResizedCrop(s, antialias=True), T.RandomHorizontalFlip()] if spec.augment else evaluate
    train = datasets.ImageFolder(os.path.join(spec.root, "train"), transform=T.Compose(train_tf + tail))
    test = datasets.ImageFolder(os.path.join(spec.root, "val"), transform=T.Compose(evaluate + tail))
    if train.classes != test.classes:
        extra = sorted(set(train.classes) ^ set(test.classes))[:5]
        raise ValueError(f"imagenet: {spec.root}/train and {spec.root}/val have different class folders "
                         f"({len(train.classes)} vs {len(test.classes)}; e.g. {extra})")
    return train, test, len(train.classes)


def build_datasets(spec: DataSpec) -> Datasets:
    """Load ``spec``'s train and test sets (paths are checked first, see ``check_spec``); a
    translation, qa or mlm spec (lowprec.tasks.TaskDataSpec): lowprec.task_loop.build_task_data."""
    if isinstance(spec, TaskDataSpec):
        from .task_loop import build_task_data
        return build_task_data(spec)
    check_spec(spec)
    if isinstance(spec, TextDataSpec):
        t = build_text(spec)
        return Datasets(train=t.train, test=t.test, num_classes=len(t.vocab), in_channels=1,
                        image_size=t.block_size, task="lm")
    if spec.name == "digits":
        train, test = _digits(spec)
    elif spec.name == "fashion_mnist":
        train, test = _fashion_mnist(spec)
    elif spec.name in ("cifar10", "cifar100"):
        train, test = _cifar(spec)
    else:
        train, test, n_cls = _imagenet(spec)
    num_classes = n_cls if spec.name == "imagenet" else _NUM_CLASSES[spec.name]
    return Datasets(
        train=_subset(train, spec.train_subset, spec.seed, "train"),
        test=_subset(test, spec.test_subset, spec.seed, "test"),
        num_classes=num_classes,
        in_channels=_IN_CHANNELS[spec.name],
        image_size=spec.image_size,
    )
