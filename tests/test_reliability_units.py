"""In-process reliability tests (issue 14): checkpoints are weights-only (a planted callable is
refused, nothing runs), corrupt checkpoints are one ValueError naming the file, RNG states are
tensors and restore exactly, killed writes leave no temporary file, the index refuses corrupt
files and never offers a failed or diverged run as a baseline, metrics are strict JSON, run dir
names need no quoting, the run dir lock is exclusive, and W&B is checked once per process."""

from __future__ import annotations

import json
import random
import sqlite3
import time

import numpy as np
import pytest
import torch

from lowprec import checkpoint, logging as lplog, runs
from lowprec.logging import JsonlLogger, LoggerConfig


class Planted:
    """Unpickling this runs `touch <marker>`: what a hostile last.pt would carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def _ckpt(**extra):
    return {"model": {"w": torch.ones(2)}, "optimizer": {}, "scheduler": {"step": 0}, "epoch": 1,
            "skipped": 0, "best_top1": 1.0, "last": None, "rng": [checkpoint.rng_state()],
            "layer_state": {}, "elapsed": 0.0, "key": "k", "names": {}, **extra}


def test_checkpoint_with_a_pickled_callable_is_refused_and_nothing_runs(tmp_path):
    path = tmp_path / "last.pt"
    marker = tmp_path / "pwned"
    torch.save(_ckpt(evil=Planted(marker)), path)
    with pytest.raises(ValueError, match="refused") as e:
        checkpoint.read_checkpoint(path)
    assert str(path) in str(e.value) and len(str(e.value).splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["truncated", "zero_bytes", "random", "not_a_checkpoint"])
def test_corrupt_checkpoint_is_one_value_error_naming_the_file(tmp_path, kind):
    path = tmp_path / "last.pt"
    torch.save(_ckpt(), path)
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        torch.save({"model": {}}, path)
    with pytest.raises(ValueError) as e:
        checkpoint.read_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and len(msg.splitlines()) == 1 and "delete it" in msg


def test_rng_state_is_weights_only_and_restores_every_generator(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = tmp_path / "rng.pt"
    checkpoint.atomic_save({"rng": checkpoint.rng_state()}, path)
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    st = torch.load(path, weights_only=True)["rng"]  # would raise on numpy arrays or code
    checkpoint.set_rng_state(st)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_old_checkpoint_with_numpy_rng_still_loads(tmp_path):
    """Checkpoints written before RNG states were tensors hold numpy's state as an ndarray."""
    path = tmp_path / "old.pt"
    old = _ckpt()
    old["rng"] = [{"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                   "python": random.getstate()}]
    torch.save(old, path)
    ck = checkpoint.read_checkpoint(path)
    np.random.seed(5)
    checkpoint.set_rng_state(ck["rng"][0])
    assert np.random.get_state()[1].tolist() == old["rng"][0]["numpy"][1].tolist()


def test_killed_write_leaves_a_tmp_file_that_the_next_start_removes(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    (d / "last.pt").write_bytes(b"good")
    (d / "last.pt.tmp4242").write_bytes(b"torn")
    assert checkpoint.remove_stale_tmp(d) == [d / "last.pt.tmp4242"]
    assert [p.name for p in d.iterdir()] == ["last.pt"]


# ----------------------------------------------------------------------------- index


def _summary(run_dir, status="ok", **kw):
    s = {"run_dir": str(run_dir), "model": "resnet20", "data": "digits", "fwd": "fp32",
         "grad": "fp32", "epochs": 1, "fnt_epochs": 0, "seed": 0, "batch_size": 32,
         "is_baseline": True, "key": "k", "final_top1": 50.0, "best_top1": 50.0,
         "baseline_top1": 50.0, "degradation": 0.0, "wall_time": 1.0, "status": status}
    return {**s, **kw}


def test_failed_and_diverged_rows_are_never_baselines(tmp_path):
    idx = tmp_path / "runs.sqlite"
    match = dict(model="resnet20", data="digits", epochs=1, fnt_epochs=0, seed=0, batch_size=32,
                 key="k")
    runs.insert(idx, _summary(tmp_path / "a", "diverged", final_top1=float("nan")))
    runs.insert(idx, _summary(tmp_path / "b", "failed", final_top1=None, best_top1=None))
    assert runs.find_baseline(idx, **match) is None
    assert [r["status"] for r in runs.rows(idx)] == ["diverged", "failed"]
    assert runs.rows(idx)[0]["final_top1"] is None  # NaN stored as NULL
    json.loads(runs.rows(idx)[0]["summary"], parse_constant=_no_nan)
    runs.insert(idx, _summary(tmp_path / "c", "ok"))
    assert runs.find_baseline(idx, **match)["run_dir"] == str(tmp_path / "c")
    with pytest.raises(ValueError, match="'maybe'"):
        runs.insert(idx, _summary(tmp_path / "d", "maybe"))


def test_old_index_gets_the_new_columns_and_its_rows_stay_baselines(tmp_path):
    idx = tmp_path / "runs.sqlite"
    runs.insert(idx, _summary(tmp_path / "a"))
    con = sqlite3.connect(idx)
    for col in ("status", "metric", "val_loss", "baseline_val_loss"):  # as written before the columns
        con.execute(f"ALTER TABLE runs DROP COLUMN {col}")
    con.commit()
    con.close()
    runs.check_index(idx)  # migrates
    assert all(runs.rows(idx)[0][c] is None for c in ("status", "metric", "val_loss", "baseline_val_loss"))
    runs.insert(idx, {**_summary(tmp_path / "b"), "metric": "val_loss", "val_loss": 2.5, "baseline_val_loss": 2.4})
    assert [(r["metric"], r["val_loss"], r["baseline_val_loss"]) for r in runs.rows(idx)][1] == ("val_loss", 2.5, 2.4)
    assert runs.find_baseline(idx, model="resnet20", data="digits", epochs=1, fnt_epochs=0,
                              seed=0, batch_size=32, key="k") is not None


@pytest.mark.parametrize("content", [b"not a database at all" * 100, b"SQLite format 3\x00" + b"\x01" * 600])
def test_corrupt_index_is_one_value_error_naming_it(tmp_path, content):
    idx = tmp_path / "runs.sqlite"
    idx.write_bytes(content)
    with pytest.raises(ValueError) as e:
        runs.check_index(idx)
    assert str(idx) in str(e.value) and len(str(e.value).splitlines()) == 1


def _no_nan(token):
    raise AssertionError(f"non-strict JSON constant {token}")


def test_metrics_jsonl_is_strict_json(tmp_path):
    lg = JsonlLogger(tmp_path / "metrics.jsonl")
    lg.log_metrics({"epoch": 1, "train_loss": float("nan"), "top1": float("inf"),
                    "layer_stats": {"l": {"rel_error": float("-inf"), "x": 1.5}},
                    "t": torch.tensor(2.0)}, step=3)
    rec = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=_no_nan)
    assert rec == {"epoch": 1, "train_loss": None, "top1": None, "step": 3, "t": 2.0,
                   "layer_stats": {"l": {"rel_error": None, "x": 1.5}}}


def test_run_dir_names_need_no_quoting_and_differ_per_process():
    name = runs.run_dir_name("convert.weight_nm=[2,4],grad=luq4,experiment=small/a b", "x", 3)
    stem, seed, tag = name.rsplit("_", 2)
    assert stem == "convert.weight_nm-2_4-_grad-luq4_experiment-small-a-b" and seed == "s3"
    assert all(c.isalnum() or c in "._+-" for c in name), name
    assert runs.run_dir_name("", "resnet20_digits_luq4", 0).startswith("resnet20_digits_luq4_s0_")
    long = runs.run_dir_name("a=" + "b" * 300, "x", 0)
    assert len(long) < 120


def test_run_dir_lock_is_exclusive(tmp_path):
    with runs.run_dir_lock(tmp_path / "r"):
        with pytest.raises(runs.RunDirBusy, match="in use"):
            with runs.run_dir_lock(tmp_path / "r"):
                pass
    with runs.run_dir_lock(tmp_path / "r"):  # released at the end of the block
        pass


# ----------------------------------------------------------------------------- W&B


def test_wandb_is_checked_once_per_process_then_offline_with_one_warning(tmp_path, monkeypatch,
                                                                          capsys):
    """A bad key or unreachable server: one check of at most WANDB_CHECK_TIMEOUT_S seconds for
    the whole process (a baseline trained first, then the run), one warning, offline logging."""
    calls, modes = [], []

    def hanging_probe():
        calls.append(1)
        time.sleep(30)

    class FakeWandb(lplog.Logger):
        def __init__(self, cfg, *, run_dir, name, mode):
            modes.append(mode)

    monkeypatch.setattr(lplog, "probe_wandb", hanging_probe)
    monkeypatch.setattr(lplog, "WandbLogger", FakeWandb)
    monkeypatch.setattr(lplog, "WANDB_CHECK_TIMEOUT_S", 0.3)
    monkeypatch.setattr(lplog, "ONLINE_CHECK", {})
    t0 = time.time()
    for name in ("baseline", "run"):
        lplog.make_wandb(LoggerConfig(mode="online"), run_dir=tmp_path, name=name)
    assert time.time() - t0 < 3
    assert calls == [1] and modes == ["offline", "offline"]
    err = capsys.readouterr().err
    assert err.count("W&B online check failed") == 1 and "logging offline" in err


def test_wandb_online_stays_online_when_the_check_passes(tmp_path, monkeypatch):
    modes = []

    class FakeWandb(lplog.Logger):
        def __init__(self, cfg, *, run_dir, name, mode):
            modes.append(mode)

    monkeypatch.setattr(lplog, "probe_wandb", lambda: None)
    monkeypatch.setattr(lplog, "WandbLogger", FakeWandb)
    monkeypatch.setattr(lplog, "ONLINE_CHECK", {})
    lplog.make_wandb(LoggerConfig(mode="online"), run_dir=tmp_path, name="x")
    assert modes == ["online"]


def test_skip_fraction_exactly_at_the_limit_is_ok_and_one_more_diverges():
    """The divergence rule is 'more than trainer.max_skip_frac of the steps skipped': exactly at the
    limit is ok (guards `>` turned into `>=`, which only the boundary tells apart), one more is
    diverged; 0.07 is not a power of two."""
    from lowprec.summary import run_status

    assert run_status(7, 100, 0.07, 1.0, 1.0, 10) == ("ok", None)
    status, why = run_status(8, 100, 0.07, 1.0, 1.0, 10)
    assert status == "diverged" and "8 of 100" in why
