"""lowprec.data: every dataset loads from files written here in the real on-disk format."""

import gzip
import io
import os
import pickle
import struct
import time

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from lowprec import data as D
from lowprec.data import TEXT_DATASETS, DataSpec, build_datasets, check_spec, read_idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------- spec

@pytest.mark.parametrize("kwargs, needle", [
    (dict(name="mnist"), "'mnist'"),
    (dict(name="digits", image_size=0), "image_size=0"),
    (dict(name="digits", image_size=32.5), "image_size=32.5"),
    (dict(name="digits", image_size=True), "image_size=True"),
    (dict(name="cifar10", train_subset=0), "train_subset=0"),
    (dict(name="cifar10", test_subset=-3), "test_subset=-3"),
    (dict(name="digits", augment=True), "augment=True"),
    (dict(name="fashion_mnist", augment=True), "augment=True"),
    (dict(name="cifar10", augment="yes"), "augment='yes'"),
    (dict(name="digits", seed="0"), "seed='0'"),
    (dict(name="cifar10", root=3), "root=3"),
])
def test_bad_spec_names_value(kwargs, needle):
    with pytest.raises(ValueError, match=None) as e:
        DataSpec(**kwargs)
    assert needle in str(e.value)


def test_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match="allowed") as e:
        DataSpec(name="svhn")
    for n in D.DATASET_NAMES:
        assert n in str(e.value)


def test_spec_defaults_resolve():
    assert DataSpec("digits").image_size == 32 and DataSpec("digits").augment is False
    assert DataSpec("fashion_mnist").image_size == 28
    assert DataSpec("fashion_mnist").root == D.FASHION_MNIST_ROOT
    assert DataSpec("cifar100").image_size == 32 and DataSpec("cifar100").augment is True
    assert DataSpec("imagenet").image_size == 224 and DataSpec("imagenet").root is None
    with pytest.raises(Exception):
        DataSpec("digits").seed = 3  # frozen


# ---------------------------------------------------------------------------------------------- digits

def test_digits_split_sizes_labels_and_determinism():
    a = build_datasets(DataSpec("digits"))
    assert (len(a.train), len(a.test)) == (1437, 360)
    assert (a.num_classes, a.in_channels, a.image_size) == (10, 1, 32)
    assert isinstance(a.train, TensorDataset)
    x, y = a.train.tensors
    assert x.shape == (1437, 1, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and int(y.min()) == 0 and int(y.max()) == 9
    assert set(a.test.tensors[1].tolist()) == set(range(10))
    assert abs(float(x.mean())) < 0.05 and 0.8 < float(x.std()) < 1.2  # normalized
    # Same split every time, and the same whatever spec.seed is (fixed test set across seeds).
    b = build_datasets(DataSpec("digits", seed=7))
    assert torch.equal(a.test.tensors[0], b.test.tensors[0]) and torch.equal(a.train.tensors[1], b.train.tensors[1])
    # Train and test are disjoint images: no 8x8 test image occurs in train.
    raw = build_datasets(DataSpec("digits", image_size=8))
    tr = {r.numpy().tobytes() for r in raw.train.tensors[0]}
    assert sum(r.numpy().tobytes() in tr for r in raw.test.tensors[0]) < 5  # sklearn digits has a few duplicates
    # The split is a partition of sklearn's digits: label counts add up, and a test image is (up to
    # the affine normalization) the sklearn image with the same label.
    from sklearn.datasets import load_digits
    d = load_digits()
    ys = torch.cat([a.train.tensors[1], a.test.tensors[1]])
    assert torch.bincount(ys).tolist() == np.bincount(d.target).tolist()

    def unit(v):
        v = np.asarray(v, dtype=np.float64).ravel()
        return (v - v.min()) / (v.max() - v.min())

    z = unit(raw.test.tensors[0][0, 0].numpy())
    hits = [i for i in range(len(d.images)) if np.allclose(unit(d.images[i]), z, atol=1e-5)]
    assert hits and all(int(d.target[i]) == int(raw.test.tensors[1][0]) for i in hits)


@pytest.mark.parametrize("size", [8, 16, 28])
def test_digits_image_size(size):
    ds = build_datasets(DataSpec("digits", image_size=size))
    assert ds.image_size == size and ds.train[0][0].shape == (1, size, size) and ds.test[3][0].shape == (1, size, size)


def test_digits_subset_seeded_and_deterministic():
    a = build_datasets(DataSpec("digits", train_subset=100, test_subset=50, seed=1))
    b = build_datasets(DataSpec("digits", train_subset=100, test_subset=50, seed=1))
    c = build_datasets(DataSpec("digits", train_subset=100, test_subset=50, seed=2))
    assert (len(a.train), len(a.test)) == (100, 50) and isinstance(a.train, TensorDataset)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0]) and torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    assert len(set(a.train.tensors[1].tolist())) > 5  # random, not the first 100 of one class
    with pytest.raises(ValueError, match="train_subset=5000"):
        build_datasets(DataSpec("digits", train_subset=5000))


# ---------------------------------------------------------------------------------------------- fashion_mnist

def _idx_bytes(arr: np.ndarray) -> bytes:
    """The IDX format as the MNIST / Fashion-MNIST files have it: 0,0,0x08(uint8),ndim, big-endian dims."""
    assert arr.dtype == np.uint8
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write_fmnist(root, n_train=5, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    os.makedirs(root, exist_ok=True)
    for key, fname in D._FMNIST_FILES.items():
        with gzip.open(os.path.join(root, fname), "wb") as f:
            f.write(_idx_bytes(arrays[key]))
    return arrays


def test_idx_header_is_the_real_one(tmp_path):
    arr = _write_fmnist(tmp_path)["train_images"]
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "rb") as f:
        head = f.read(16)
    assert struct.unpack(">4I", head) == (2051, 5, 28, 28)  # the published magic number and dims
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "rb") as f:
        assert struct.unpack(">2I", f.read(8)) == (2049, 5)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "train-images-idx3-ubyte.gz"), expect_magic=2051), arr)


def test_fashion_mnist_round_trip(tmp_path):
    arrays = _write_fmnist(tmp_path)
    ds = build_datasets(DataSpec("fashion_mnist", root=str(tmp_path)))
    assert (len(ds.train), len(ds.test), ds.num_classes, ds.in_channels, ds.image_size) == (5, 3, 10, 1, 28)
    for split, dset in (("train", ds.train), ("test", ds.test)):
        x, y = dset.tensors
        assert x.shape == (len(arrays[f"{split}_labels"]), 1, 28, 28)
        np.testing.assert_array_equal(y.numpy(), arrays[f"{split}_labels"].astype(np.int64))
        assert y.dtype == torch.int64
        # Undo the normalization: exactly the bytes written (to float rounding, then round to uint8).
        back = x[:, 0].double() * D.FASHION_MNIST_STD[0] + D.FASHION_MNIST_MEAN[0]
        back = (back * 255).round().to(torch.uint8).numpy()
        np.testing.assert_array_equal(back, arrays[f"{split}_images"])


def test_fashion_mnist_resize(tmp_path):
    _write_fmnist(tmp_path)
    ds = build_datasets(DataSpec("fashion_mnist", root=str(tmp_path), image_size=32, train_subset=4))
    assert ds.train.tensors[0].shape == (4, 1, 32, 32) and ds.image_size == 32


def test_fashion_mnist_corrupt_magic(tmp_path):
    arrays = _write_fmnist(tmp_path)
    bad = bytearray(_idx_bytes(arrays["test_images"]))
    bad[2:4] = bytes([0x08, 0x01])  # a labels-style header (2049) on the images file
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes(bad))
    with pytest.raises(ValueError) as e:
        build_datasets(DataSpec("fashion_mnist", root=str(tmp_path)))
    msg = str(e.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and "magic" in msg and "2051" in msg and "\n" not in msg


def test_fashion_mnist_truncated_and_not_gzip(tmp_path):
    arrays = _write_fmnist(tmp_path)
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(_idx_bytes(arrays["train_labels"])[:-1])  # one label short
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz.*corrupt"):
        build_datasets(DataSpec("fashion_mnist", root=str(tmp_path)))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz"):
        build_datasets(DataSpec("fashion_mnist", root=str(tmp_path)))


def test_fashion_mnist_mismatched_counts(tmp_path):
    arrays = _write_fmnist(tmp_path)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(_idx_bytes(arrays["test_labels"][:2]))
    with pytest.raises(ValueError, match="t10k-images.*shape"):
        build_datasets(DataSpec("fashion_mnist", root=str(tmp_path)))


def test_fashion_mnist_missing(tmp_path):
    missing = tmp_path / "nope"
    t = time.perf_counter()
    with pytest.raises(FileNotFoundError) as e:
        build_datasets(DataSpec("fashion_mnist", root=str(missing)))
    assert time.perf_counter() - t < 1.0
    msg = str(e.value)
    assert str(missing) in msg and "train-images-idx3-ubyte.gz" in msg and "data.root" in msg and "\n" not in msg
    _write_fmnist(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        check_spec(DataSpec("fashion_mnist", root=str(tmp_path)))


@pytest.mark.skipif(not os.path.isdir(D.FASHION_MNIST_ROOT), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_real_files_headers():
    check_spec(DataSpec("fashion_mnist"))
    lab = read_idx(os.path.join(D.FASHION_MNIST_ROOT, "t10k-labels-idx1-ubyte.gz"), expect_magic=2049)
    assert lab.shape == (10000,) and np.bincount(lab).tolist() == [1000] * 10


# ---------------------------------------------------------------------------------------------- cifar

class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (SHORT_BINSTRING/BINSTRING), as the published CIFAR pickles
    (written by Python 2's cPickle) have them: loaded with encoding='bytes' the keys are b'data',
    with encoding='latin1' (torchvision) they are 'data'."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _py2_dump(obj, path):
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def _write_cifar(root, kind, n_per_batch=2, seed=0):
    """Tiny CIFAR files in the real layout. Returns (train_data, train_labels, test_data, test_labels)."""
    rng = np.random.default_rng(seed)
    ncls = 10 if kind == "cifar10" else 100
    label_key = b"labels" if kind == "cifar10" else b"fine_labels"

    def batch(n, tag):
        d = {b"batch_label": tag, b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             label_key: [int(v) for v in rng.integers(0, ncls, n)],
             b"filenames": [b"img_%d.png" % i for i in range(n)]}
        if kind == "cifar100":
            d[b"coarse_labels"] = [v // 5 for v in d[label_key]]
        return d

    if kind == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        train = [batch(n_per_batch, b"training batch %d of 5" % (i + 1)) for i in range(5)]
        for i, b in enumerate(train):
            _py2_dump(b, folder / f"data_batch_{i + 1}")
        test = batch(n_per_batch + 1, b"testing batch 1 of 1")
        _py2_dump(test, folder / "test_batch")
        _py2_dump({b"label_names": [b"class%d" % i for i in range(10)], b"num_cases_per_batch": 10000,
                   b"num_vis": 3072}, folder / "batches.meta")
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        train = [batch(3 * n_per_batch, b"training batch 1 of 1")]
        _py2_dump(train[0], folder / "train")
        test = batch(n_per_batch + 1, b"testing batch 1 of 1")
        _py2_dump(test, folder / "test")
        _py2_dump({b"fine_label_names": [b"fine%d" % i for i in range(100)],
                   b"coarse_label_names": [b"coarse%d" % i for i in range(20)]}, folder / "meta")
    tr_x = np.concatenate([b[b"data"] for b in train])
    tr_y = sum((b[label_key] for b in train), [])
    return tr_x, tr_y, test[b"data"], test[label_key]


@pytest.fixture
def no_md5(monkeypatch):
    """Our tiny files can't have the published MD5s: keep torchvision's file-exists check, skip the hash."""
    import torchvision.datasets.cifar as tvc
    monkeypatch.setattr(tvc, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def _chw(row: np.ndarray) -> np.ndarray:
    return row.reshape(3, 32, 32)  # CIFAR rows: 1024 R, then 1024 G, then 1024 B, each row-major


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_round_trip(tmp_path, no_md5, kind):
    tr_x, tr_y, te_x, te_y = _write_cifar(tmp_path, kind)
    # The fixture really is in the published format: Python-2 str keys, read back as bytes.
    fname = "cifar-10-batches-py/test_batch" if kind == "cifar10" else "cifar-100-python/test"
    with open(tmp_path / fname, "rb") as f:
        assert b"data" in pickle.load(f, encoding="bytes")

    ds = build_datasets(DataSpec(kind, root=str(tmp_path), augment=False))
    assert (len(ds.train), len(ds.test)) == (len(tr_y), len(te_y))
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10 if kind == "cifar10" else 100, 3, 32)
    mean, std = (D.CIFAR10_MEAN, D.CIFAR10_STD) if kind == "cifar10" else (D.CIFAR100_MEAN, D.CIFAR100_STD)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    for dset, xs, ys, k in ((ds.train, tr_x, tr_y, len(tr_y) - 1), (ds.test, te_x, te_y, 1)):
        img, label = dset[k]
        assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and label == ys[k]
        back = ((img * s + m) * 255).round().to(torch.uint8).numpy()
        np.testing.assert_array_equal(back, _chw(xs[k]))


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_augment_and_resize(tmp_path, no_md5, kind):
    _write_cifar(tmp_path, kind)
    ds = build_datasets(DataSpec(kind, root=str(tmp_path), image_size=16, test_subset=2, seed=3))
    assert ds.train[0][0].shape == (3, 16, 16) and ds.test[0][0].shape == (3, 16, 16) and len(ds.test) == 2
    torch.manual_seed(0)
    draws = [ds.train[0][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # random crop/flip on train
    assert torch.equal(ds.test[0][0], ds.test[0][0])  # test is deterministic


def test_cifar_missing_root_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar10: data.root is not set"):
        build_datasets(DataSpec("cifar10"))
    t = time.perf_counter()
    with pytest.raises(FileNotFoundError) as e:
        build_datasets(DataSpec("cifar10", root=str(tmp_path)))
    assert time.perf_counter() - t < 1.0
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in msg and "data.root" in msg and "\n" not in msg
    with pytest.raises(FileNotFoundError, match="cifar-100-python/train"):
        check_spec(DataSpec("cifar100", root=str(tmp_path)))


def test_cifar_md5_mismatch_is_clear(tmp_path):
    _write_cifar(tmp_path, "cifar10")  # real torchvision check: our files are not the published ones
    with pytest.raises(ValueError, match="cifar10: .*MD5"):
        build_datasets(DataSpec("cifar10", root=str(tmp_path)))


# ---------------------------------------------------------------------------------------------- imagenet

def _write_imagefolder(root, classes=("n01", "n02", "n03"), per_class=2, size=(20, 24)):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{c}_{i}.png")


def test_imagenet_folder(tmp_path):
    _write_imagefolder(tmp_path)
    ds = build_datasets(DataSpec("imagenet", root=str(tmp_path), image_size=16))
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (3, 3, 16)
    assert ds.train.classes == ["n01", "n02", "n03"] and len(ds.train) == 6 and len(ds.test) == 6
    img, label = ds.test[5]
    assert img.shape == (3, 16, 16) and label == 2
    assert ds.train[0][0].shape == (3, 16, 16)
    sub = build_datasets(DataSpec("imagenet", root=str(tmp_path), image_size=16, train_subset=3, seed=0))
    assert len(sub.train) == 3


def test_imagenet_eval_transform_matches_pixels(tmp_path):
    from PIL import Image
    _write_imagefolder(tmp_path, size=(16, 16))
    ds = build_datasets(DataSpec("imagenet", root=str(tmp_path), image_size=14, augment=False))
    # Resize 14/0.875 = 16 is a no-op on 16x16 images, then a centre crop of 14.
    raw = np.asarray(Image.open(tmp_path / "val" / "n02" / "n02_1.png").convert("RGB"))
    img, label = ds.test[3]
    m, s = torch.tensor(D.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(D.IMAGENET_STD).view(3, 1, 1)
    back = ((img * s + m) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert label == 1
    np.testing.assert_array_equal(back, raw[1:15, 1:15])


def test_imagenet_missing_and_mismatched(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/train"):
        build_datasets(DataSpec("imagenet", root=str(tmp_path)))
    _write_imagefolder(tmp_path)
    import shutil
    shutil.rmtree(tmp_path / "val" / "n03")
    with pytest.raises(ValueError, match="different class folders"):
        build_datasets(DataSpec("imagenet", root=str(tmp_path)))


# ---------------------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("path", sorted(
    os.path.join(ROOT, "conf", "data", f) for f in os.listdir(os.path.join(ROOT, "conf", "data"))
    if f.endswith(".yaml") and f[:-5] not in TEXT_DATASETS))  # those: tests/test_text_data.py
def test_data_yaml_instantiates(path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    spec = instantiate(OmegaConf.load(path))
    assert isinstance(spec, DataSpec) and spec.name == os.path.basename(path)[:-5]
    if spec.name == "digits":
        check_spec(spec)
