"""A run's record can be trusted (issue 23): resume from any kill point, a resume that refuses
another configuration, finished results never rewritten, divergence caught for every task, index
rows validated when read, every checkpoint counter and clock round-tripped (issue 24), and the
user-facing record (headline numbers first, one final line, run.log, best vs final).

Most run in process (lowprec.prepare.Session) on a 2-steps-per-epoch digits run; the kill tests
run run.py as separate processes (LOWPREC_TEST_KILL_AT), forked from one warm interpreter by
tests/forkrun.py."""

from __future__ import annotations

import json
import os
import platform
import signal
import sqlite3
import time
from pathlib import Path

import pytest
import torch
from hydra import compose

import forkrun
from lowprec import allocator, config, prepare, runs
from lowprec import summary as S

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "sample.txt"
TINY = ["data.train_subset=64", "data.test_subset=32", "data.image_size=16",
        "model.kwargs.width=0.25", "trainer.batch_size=32", "trainer.eval_batch_size=64",
        "logger=none", "trainer.threads=1"]
LM = ["model=chargpt", "data=text", f"data.path={SAMPLE}", "model.kwargs.n_embd=32",
      "model.kwargs.block_size=32", "data.val_windows=64", "sched.warmup_steps=2",
      "trainer.threads=1", "logger=none", "trainer.baseline=skip"]


def _env(**extra):
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0", **extra)
    for k in ("LOWPREC_DEBUG", "LOWPREC_TEST_KILL_AT", "LOWPREC_TEST_RAISE_AT"):
        if k not in extra:
            env.pop(k, None)
    return env


def start(out: Path, *args, **env) -> forkrun.Case:
    """`python run.py out_root=<out> <args>` in <out>, run at `finish` (tests/forkrun.py)."""
    return forkrun.Case(out, args, env)


def finish(procs, timeout=300):
    return forkrun.finish(procs, _env, timeout)


def metrics(d: Path) -> list[dict]:
    drop = ("epoch_time", "img_per_s", "wall_time")
    return [{k: v for k, v in json.loads(x).items() if k not in drop}
            for x in (d / "metrics.jsonl").read_text().splitlines()]


def run_here(tmp: Path, *ov, run_dir="r", session=None):
    """One run through lowprec.prepare in this process; returns (final top-1, run dir)."""
    ov = [f"out_root={tmp}", *TINY, *ov]
    c = compose("config", overrides=ov, return_hydra_config=True)
    names = dict(c.hydra.runtime.choices)
    cfg = compose("config", overrides=ov)
    return (session or prepare.Session()).run(cfg, names=names, run_dir=tmp / run_dir), tmp / run_dir


# ----------------------------------------------------------------------------- kill + resume


@pytest.mark.slow
def test_kill_after_the_last_checkpoint_of_a_step_budget_or_an_epoch_resumes_exactly(tmp_path):
    """Before: with max_steps a multiple of checkpoint_steps the last step's checkpoint was written
    inside the loop, before the final validation; a kill there left a last.pt from which every
    resume failed ('no epoch was run'). And a mid-epoch checkpoint on an epoch's last step made a
    resume log that epoch's record twice. Now such a checkpoint is written after the epoch's
    record: the resumed runs equal the uninterrupted ones (weights, metrics.jsonl incl. the final
    record, one epoch record each)."""
    lm = [*LM, "trainer.max_steps=12", "trainer.checkpoint_steps=6", "trainer.eval_every=6"]
    img = [*TINY, "grad=luq4", "trainer.epochs=3", "trainer.checkpoint_steps=2",
           "trainer.checkpoint_every=2", "trainer.baseline=skip"]
    jobs = {"lm": (lm, "checkpointed12"), "img": (img, "step3")}
    procs = []
    for name, (args, point) in jobs.items():
        procs += [start(tmp_path / name / "straight", *args, f"hydra.run.dir={tmp_path / name / 's'}"),
                  start(tmp_path / name / "killed", *args, f"hydra.run.dir={tmp_path / name / 'k'}",
                        LOWPREC_TEST_KILL_AT=point)]
    res = finish(procs)
    for i, name in enumerate(jobs):
        assert res[2 * i][0] == 0, res[2 * i][2][-2000:]
        assert res[2 * i + 1][0] == -signal.SIGKILL, (name, res[2 * i + 1][2][-2000:])
    procs = [start(tmp_path / name / "killed", *args, f"trainer.resume={tmp_path / name / 'k'}")
             for name, (args, _) in jobs.items()]
    for name, (rc, out, err) in zip(jobs, finish(procs)):
        assert rc == 0, (name, out[-2000:], err[-2000:])
        s, k = tmp_path / name / "s", tmp_path / name / "k"
        want, got = (json.loads((d / "summary.json").read_text()) for d in (s, k))
        assert got["weights_sha256"] == want["weights_sha256"] and got["status"] == "ok", name
        assert metrics(k) == metrics(s), name
        ends = [r["epoch"] for r in metrics(k) if r.get("eval") != "step"]
        assert len(ends) == len(set(ends)), (name, ends)  # no epoch record twice
    assert [r["step"] for r in metrics(tmp_path / "lm" / "k") if r.get("eval") == "step"][-1] == 12


# ----------------------------------------------------------------------------- resume checks


def test_resume_refuses_another_config_and_never_rewrites_a_finished_run(conf, tmp_path):
    """Before: resume compared only the identity key and the choice names, so grad.backward.bits=3
    (or another thread count) resumed a luq4 checkpoint; and a failed resume of a finished run
    turned its ok summary.json and row into failed. Now: one ValueError naming every changed key;
    a finished run's directory and row are left byte for byte."""
    base = ["grad=luq4", "trainer.epochs=1", "trainer.baseline=skip"]
    run_here(tmp_path, *base)
    d = tmp_path / "r"
    before = (d / "summary.json").read_bytes()
    row = runs.rows(tmp_path / "runs.sqlite")

    with pytest.raises(ValueError, match=r"grad\.backward\.bits=4 \(now 3\)"):
        run_here(tmp_path, *base, "grad.backward.bits=3", "trainer.resume=true")
    with pytest.raises(ValueError, match=r"trainer\.threads=1 \(now 2\)"):
        run_here(tmp_path, *base, "trainer.threads=2", "trainer.resume=true")
    run_here(tmp_path, *base, "trainer.resume=true")  # the same config: nothing to do
    (d / "checkpoints" / "last.pt").write_bytes(b"garbage")  # a resume that fails
    with pytest.raises(ValueError, match="last.pt"):
        run_here(tmp_path, *base, "trainer.resume=true")
    assert (d / "summary.json").read_bytes() == before
    assert runs.rows(tmp_path / "runs.sqlite") == row


def test_changed_keys_are_listed():
    a = {"trainer": {"threads": 1, "resume": False, "seed": 0}, "grad": {"backward": {"bits": 4}}}
    b = {"trainer": {"threads": 2, "resume": True, "seed": 0}, "grad": {"backward": {"bits": 3}}}
    assert [k for k, *_ in prepare.config_changes(a, b)] == ["grad.backward.bits", "trainer.threads"]
    assert prepare.config_changes(a, a) == []


# ----------------------------------------------------------------------------- divergence


def test_divergence_rule_for_every_task():
    """Before: only skipped steps made a run diverged, so lr=1e4 on digits (val loss ~2e4, at
    chance) was indexed ok and became a baseline. Now a non-finite or far-above-start final loss
    is diverged for classification and language models alike."""
    ok = S.run_status(0, 100, 0.01, 0.3, 0.2, 10)
    assert ok == ("ok", None)
    assert S.run_status(2, 100, 0.01, 0.3, 0.2, 10)[0] == "diverged"             # skipped
    assert S.run_status(0, 100, 0.01, float("nan"), 0.2, 10)[0] == "diverged"    # non-finite end
    assert S.run_status(0, 100, 0.01, 2e4, 2e4, 10)[0] == "diverged"             # lr=1e4
    assert S.run_status(0, 100, 0.01, 41.8, 1.0, 10)[0] == "ok"   # overfit: val high, train low
    assert S.run_status(0, 100, 0.01, 5.0, float("inf"), 10)[0] == "diverged"
    assert S.run_status(0, 100, 0.01, 5.0, float("nan"), 10)[0] == "ok"  # no step taken: skip rule's
    assert S.run_status(0, 100, 0.01, 4.0, 41.0, 65)[0] == "ok"     # LM: 10 x ln 65 = 41.7
    assert S.run_status(0, 100, 0.01, 4.0, 42.0, 65)[0] == "diverged"
    assert S.run_status(0, 100, 0.01, 2.0, 22.9, 10)[0] == "ok"     # 10 x ln 10 = 23.03 (not 2^k)
    assert S.run_status(0, 100, 0.01, 2.0, 23.1, 10)[0] == "diverged"


def test_a_diverged_run_exits_3_is_recorded_and_never_a_baseline(conf, tmp_path):
    with pytest.raises(prepare.RunFailed, match="diverged: final (training|validation) loss"):
        run_here(tmp_path, "grad=fp32", "trainer.epochs=2", "optim.lr=1e4")
    (row,) = runs.rows(tmp_path / "runs.sqlite")
    assert row["status"] == "diverged"
    m = config.experiment_from_cfg(compose("config", overrides=[f"out_root={tmp_path}", *TINY,
                                   "trainer.epochs=2", "optim.lr=1e4"]), names={"model": "resnet20",
                                   "data": "digits"}, run_dir="x").baseline_match
    assert runs.find_baseline(tmp_path / "runs.sqlite", **m) is None


def test_near_chance_requested_run_is_flagged():
    s = {"metric": "top1", "final_top1": 11.0, "best_top1": 11.0, "model": "m", "data": "d",
         "fwd": "fp32", "grad": "luq4", "seed": 0, "epochs": 1, "fnt_epochs": 0, "baseline": "found",
         "baseline_run": "b", "baseline_top1": 90.0, "degradation": 79.0, "run_dir": "r",
         "quality": "near chance", "status": "ok", "length": "1 epochs"}
    lines = S.summary_lines(s)
    assert any(ln.startswith("caution") and "NEAR CHANCE" in ln for ln in lines)
    assert lines[-1].startswith("result: ok; NEAR CHANCE")


# ----------------------------------------------------------------------------- the index


def test_bad_index_rows_are_skipped_with_one_warning(tmp_path, capsys):
    """Before: a baseline row with non-JSON summary or text in a numeric column crashed the run
    after training, and absurd ok values (top-1 1e6, negative val loss) were used as baselines."""
    idx = tmp_path / "runs.sqlite"
    base = {"model": "m", "data": "d", "fwd": "fp32", "grad": "fp32", "epochs": 1, "fnt_epochs": 0,
            "seed": 0, "batch_size": 1, "is_baseline": 1, "key": "k", "final_top1": 50.0,
            "best_top1": 50.0, "baseline_top1": 50.0, "degradation": 0.0, "wall_time": 1.0}
    runs.insert(idx, {**base, "run_dir": "good"})
    for i, (col, val) in enumerate([("summary", "not json"), ("final_top1", "abc"),
                                    ("final_top1", 1e6), ("val_loss", -1.0)]):
        runs.insert(idx, {**base, "run_dir": f"bad{i}"})
        con = sqlite3.connect(idx)
        con.execute(f"UPDATE runs SET {col} = ? WHERE run_dir = ?", (val, f"bad{i}"))
        con.commit()
        con.close()
        capsys.readouterr()
        row = runs.find_baseline(idx, model="m", data="d", epochs=1, fnt_epochs=0, seed=0,
                                 batch_size=1, key="k")
        assert row["run_dir"] == "good", (col, val)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 + i and all(e.startswith("warning: ") for e in err), err


# ----------------------------------------------------------------------------- checkpoint fields


def test_every_checkpoint_counter_and_clock_survives_save_and_resume(tmp_path):
    """Guards against "resume resets the skipped-step count / the elapsed time / the stats counter
    / the controller's state to 0": every field of Progress, the layers' run-time state (the
    statistics counter among it) and the extra components are saved with non-zero values and
    read back equal."""
    from lowprec import checkpoint as C
    from lowprec.convert import convert, layer_state
    from lowprec.distributed import Dist

    d = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
                                torch.nn.Linear(8, 4))
    convert(model, grad="luq4", skip=None, stats_every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        model(torch.randn(5, 8)).square().mean().backward()
        opt.step()
    prog = C.Progress(epoch=3, step=17, skipped=4, best=71.5, last={"top1": 70.0, "top5": 99.0,
                      "val_loss": 0.9, "best_val_loss": 0.8}, elapsed=0.0,
                      extra={"adapt": {"events": [[5, "x"]], "count": 2}, "in_epoch": {"epoch": 3, "batches": 1}})
    C.save_checkpoint(tmp_path / "last.pt", model=model, optimizer=opt, progress=prog,
                      elapsed=123.25, key="k", names={"grad": "luq4"}, d=d)
    model2 = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
                                 torch.nn.Linear(8, 4))
    convert(model2, grad="luq4", skip=None, stats_every=1)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    got = C.load_checkpoint(tmp_path / "last.pt", model=model2, optimizer=opt2, key="k",
                            names={"grad": "luq4"}, d=d)
    assert (got.epoch, got.step, got.skipped, got.best, got.last) == \
        (3, 17, 4, 71.5, prog.last)
    assert got.elapsed == 123.25 and got.resumed and got.extra == prog.extra
    assert str(layer_state(model2)) == str(layer_state(model))
    assert C.weights_hash(model2) == C.weights_hash(model)
    assert str(opt2.state_dict()) == str(opt.state_dict())


@pytest.mark.slow
def test_skipped_steps_and_elapsed_time_survive_a_kill(tmp_path):
    """A run that skips steps (lr=1e30, skip_nonfinite) killed after its first epoch and resumed
    reports the uninterrupted run's skipped count, and a wall time that includes the time before
    the kill (resume resetting them to 0 is the bug guarded)."""
    args = [*TINY, "grad=fp32", "optim.lr=1e30", "trainer.epochs=2", "trainer.skip_nonfinite=true",
            "trainer.max_skip_frac=1", "trainer.baseline=skip"]
    res = finish([start(tmp_path / "s", *args, f"hydra.run.dir={tmp_path / 's' / 'r'}"),
                  start(tmp_path / "k", *args, f"hydra.run.dir={tmp_path / 'k' / 'r'}",
                        LOWPREC_TEST_KILL_AT="checkpointed2")])
    # its end is non-finite, so both end `diverged` (exit 3); the counts are what is compared
    assert res[0][0] == 3 and res[1][0] == -signal.SIGKILL, (res[0][2][-1500:], res[1][2][-1500:])
    ck = torch.load(tmp_path / "k" / "r" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["skipped"] > 0 and ck["elapsed"] > 0
    time.sleep(0.01)
    (rc, out, err), = finish([start(tmp_path / "k", *args, f"trainer.resume={tmp_path / 'k' / 'r'}")])
    assert rc == 3, err[-2000:]
    want, got = (json.loads((tmp_path / x / "r" / "summary.json").read_text()) for x in "sk")
    assert got["status"] == want["status"] == "diverged"
    assert got["skipped_steps"] == want["skipped_steps"] > ck["skipped"]
    assert got["wall_time"] > ck["elapsed"]


# ----------------------------------------------------------------------------- the record


def test_summary_opens_with_headline_run_log_holds_the_log_and_one_final_line(conf, tmp_path, capsys):
    run_here(tmp_path, "grad=luq4", "trainer.epochs=1", "trainer.baseline=skip")
    d = tmp_path / "r"
    keys = list(json.loads((d / "summary.json").read_text()))
    assert keys[:4] == ["status", "status_reason", "metric", "final_top1"]
    out = capsys.readouterr().out
    log = (d / "run.log").read_text()
    assert "epoch 1/1" in log and "result: ok" in log
    assert [ln for ln in out.splitlines() if ln.startswith("result: ")] == \
        [ln for ln in log.splitlines() if ln.startswith("result: ")] and out.count("result: ") == 1
    s = json.loads((d / "summary.json").read_text())
    assert s["length"] == "1 epochs" and s["estimator_backend"]["estimators"] in (
        "c", "torch", "reference", "triton")
    assert s["allocator"] == allocator.info() and s["allocator"]["malloc"] in ("keep", "default")
    if platform.libc_ver()[0] == "glibc" and allocator.mode() == "keep":  # the trainer set it
        assert s["allocator"]["malloc"] == "keep", s["allocator"]


def test_step_budget_is_labelled_in_steps_and_best_vs_final_reported():
    s = {"metric": "val_loss", "val_loss": 2.0, "best_val_loss": 1.5, "final_top1": 1.0,
         "model": "chargpt", "data": "t", "fwd": "fp32", "grad": "fp4_rdn", "seed": 0,
         "max_steps": 30, "fnt_steps": 0, "baseline": "no baseline", "baseline_run": None,
         "degradation": None, "run_dir": "r", "length": "30 steps"}
    lines = S.summary_lines(s)
    assert "30 steps" in lines[0] and "epochs" not in lines[0]
    assert any(ln.startswith("best vs final") and "1.5000" in ln for ln in lines)
    assert S.best_vs_final({**s, "val_loss": 1.51}) is None  # within noise


def test_newer_trainer_keys_at_default_and_run_local_keys_are_not_changes():
    """Guards the resume check against refusing every checkpoint written before a trainer key
    existed (a key the checkpoint lacks, now at its default, is the behaviour the run had), and
    against counting run-local keys (trainer.dry_run) as a change of the run; a newer key set to a
    non-default value is still refused."""
    from lowprec.config import trainer_defaults

    d = trainer_defaults()
    saved = {"trainer": {"threads": 1, "seed": 0}}
    now = {"trainer": {"threads": 1, "seed": 0, "noise_window": d["noise_window"], "dry_run": 3}}
    assert prepare.config_changes(saved, now) == []
    now["trainer"]["noise_window"] = d["noise_window"] + 3
    assert [k for k, *_ in prepare.config_changes(saved, now)] == ["trainer.noise_window"]
