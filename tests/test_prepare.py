"""Run preparation in process (lowprec.prepare; run.py is a thin CLI over it) and the run's clock
(lowprec.budget): what used to be testable only through subprocesses.

Guards: the preflight checks (unknown option, resume form, compose errors naming the override,
a finished run dir refused) raise one ValueError before anything is written; a Session trains a
tiny run in process, trains its fp32 baseline first and finds it the second time; a model that
cannot be built is an input error before training; `train()` with the prepared model gives the
same weights as `train()` building it itself; the Budget answers what the loop used to compute
in ten places (FNT start, checkpoint and evaluation points, the LR factor)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from hydra import compose

from lowprec import config, prepare, runs
from lowprec import train as T
from lowprec.budget import Budget
from lowprec.optim import lr_factor

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.train_subset=64", "data.test_subset=32", "data.image_size=16",
        "model.kwargs.width=0.25", "trainer.batch_size=32", "trainer.eval_batch_size=64",
        "logger=none", "trainer.epochs=1", "trainer.threads=1"]


def _names(cfg_overrides):
    c = compose("config", overrides=cfg_overrides, return_hydra_config=True)
    return dict(c.hydra.runtime.choices)


def _run(session, tmp, *ov, run_dir="r"):
    ov = [f"out_root={tmp}", *TINY, *ov]
    cfg = compose("config", overrides=ov)
    return session.run(cfg, names=_names(ov), run_dir=tmp / run_dir)


def test_preflight_errors_are_one_value_error_each(tmp_path):
    s = prepare.Session()
    with pytest.raises(ValueError, match="did you mean 'luq4'"):
        s.preflight(["grad=luq5"])
    with pytest.raises(ValueError, match="no such run directory"):
        s.preflight([f"trainer.resume={tmp_path / 'nope'}"])
    with pytest.raises(ValueError, match=r"^trainer\.epochz=3: "):
        s.preflight([f"out_root={tmp_path}", "trainer.epochz=3"])
    done = tmp_path / "done"
    done.mkdir()
    (done / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="holds a finished run"):
        s.preflight([f"out_root={tmp_path}", f"hydra.run.dir={done}"])
    assert prepare.resume_form([f"trainer.resume={done}"]) == \
        ["trainer.resume=true", f"hydra.run.dir={done}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done"]  # nothing else written


def test_session_trains_the_baseline_first_then_finds_it(conf, tmp_path):
    s = prepare.Session()
    top1 = _run(s, tmp_path, "grad=luq4", run_dir="a")
    rows = runs.rows(tmp_path / "runs.sqlite")
    assert [r["grad"] for r in rows] == ["fp32", "luq4"] and rows[-1]["final_top1"] == top1
    summ = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summ["baseline"] == "trained" and not s.held and not s.training
    _run(s, tmp_path, "grad=luq4", "trainer.seed=0", run_dir="b")
    summ = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summ["baseline"] == "found" and len(runs.rows(tmp_path / "runs.sqlite")) == 3


def test_unbuildable_model_is_an_input_error_before_training(conf, tmp_path, monkeypatch):
    import lowprec.models

    def broken(*a, **k):
        raise ZeroDivisionError("patch_size=0")
    monkeypatch.setattr(lowprec.models, "build_model", broken)
    with pytest.raises(ValueError, match="cannot build the model"):
        _run(prepare.Session(), tmp_path, "trainer.baseline=skip")
    assert not list(tmp_path.rglob("metrics.jsonl")) and not (tmp_path / "runs.sqlite").exists()


def test_prepared_model_trains_like_one_built_in_train(conf, tmp_path):
    """The model run preparation builds (and the RNG state it leaves) is handed to train(): the
    same weights as train() building it itself, even after other RNG use in between."""
    import torch
    cfg = compose("config", overrides=[*TINY, "grad=luq4", f"out_root={tmp_path}"])
    hashes = []
    for i, prepared in enumerate((False, True)):
        exp = config.experiment_from_cfg(cfg, names={}, run_dir=tmp_path / str(i))
        ds = None
        built = None
        if prepared:
            from lowprec.data import build_datasets
            ds = build_datasets(exp.data)
            built = T.build(exp, ds)
            torch.rand(100)  # a baseline trained in between uses the RNG
        hashes.append(T.train(exp, ds, model=built)["weights_sha256"])
    assert hashes[0] == hashes[1]


# ----------------------------------------------------------------------------- the budget


def _t(**kw):
    return config.TrainConfig(**kw)


def test_budget_epochs_and_steps():
    b = Budget.from_trainer(_t(epochs=3, fnt_epochs=2, checkpoint_every=2), 10)
    assert not b.by_steps and b.total_epochs == 5 and b.total_steps == 50 and b.main_steps == 30
    assert [e for e in range(6) if b.done(e, 0)] == [5]
    assert b.fnt_before_epoch(3, False) and not b.fnt_before_epoch(3, True)
    assert [b.phase(e, 0) for e in range(5)] == ["train"] * 3 + ["fnt"] * 2
    assert [e for e in range(1, 6) if b.checkpoint_after_epoch(e, 0)] == [2, 4, 5]
    assert b.resumed_in_fnt(3, 30, True) and not b.resumed_in_fnt(3, 30, False)
    s = Budget.from_trainer(_t(max_steps=7, fnt_steps=3, eval_every=3, checkpoint_steps=4), 5)
    assert s.by_steps and s.total_steps == 10 and s.main_steps == 7
    assert [k for k in range(12) if s.fnt_before_step(k)] == [7]
    assert s.done(0, 10) and not s.done(99, 9) and s.epoch_full(10)
    assert [k for k in range(1, 11) if s.eval_at_step(k)] == [3, 6, 9]
    assert s.phase(1, 6) == "train" and s.phase(1, 7) == "fnt"
    assert s.where_epoch(1, 5) == "step 5/10" and b.where_epoch(1, 20) == "epoch 2/5"


@pytest.mark.parametrize("kw", [dict(epochs=3, fnt_epochs=2), dict(max_steps=23, fnt_steps=6)])
def test_budget_lr_factor_is_the_schedule(kw):
    t = _t(**kw, sched=dataclasses.replace(config.SchedConfig(), warmup_steps=3))
    b = Budget.from_trainer(t, 7)
    assert [b.lr_factor(t.sched, k) for k in range(b.total_steps)] == [
        lr_factor(t.sched, k, steps_per_epoch=7, epochs=t.epochs, fnt_epochs=t.fnt_epochs,
                  max_steps=t.max_steps, fnt_steps=t.fnt_steps) for k in range(b.total_steps)]


def test_run_py_is_thin():
    src = (ROOT / "run.py").read_text()
    assert len(src.splitlines()) <= 150
    assert "global " not in src and "_TRAINING" not in src
    assert os.path.getsize(ROOT / "lowprec" / "train.py") and \
        len((ROOT / "lowprec" / "train.py").read_text().splitlines()) <= 500


def test_trainer_defaults_have_one_owner():
    """conf/trainer/default.yaml is the only copy of the trainer defaults: TrainConfig has exactly
    its keys (plus optim, sched), takes every default from it, and spells none of its own."""
    import inspect
    import re

    d = config.trainer_defaults()
    fields = {f.name for f in dataclasses.fields(config.TrainConfig)} - {"optim", "sched"}
    assert set(d) == fields
    t = config.TrainConfig()
    assert {k: getattr(t, k) for k in fields} == d
    src = inspect.getsource(config.TrainConfig).split("def __post_init__")[0]
    own = [ln for ln in src.splitlines() if re.match(r"\s+\w+: [\w\[\], |]+ = ", ln)
           and "_D[" not in ln and "default_factory" not in ln]
    assert not own, own
