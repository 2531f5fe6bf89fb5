"""The language-model workload end to end and its summary arithmetic: a 50-step chargpt run
through run.py on the shipped sample text, the sign of `degradation` for both metrics,
`baseline_quality` ("near chance"), no degradation without a baseline, make_tables on LM
summaries, and the one-line error for a model/data mismatch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import forkrun
from lowprec import config, runs
from lowprec import tables as X
from lowprec import train as T
from script_utils import load_script

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "sample.txt"
# A small chargpt on the 6 kB sample: 50 steps, evaluation every 25.
LM = ["model=chargpt", "data=text", f"data.path={SAMPLE}", "model.kwargs.n_embd=32",
      "model.kwargs.block_size=32", "data.val_windows=128", "trainer.max_steps=50",
      "trainer.eval_every=25", "sched.warmup_steps=5", "trainer.threads=1", "logger=none"]


def _env():
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    env.pop("LOWPREC_DEBUG", None)
    return env


def run_py(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), f"out_root={tmp}", *args],
                          cwd=tmp, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_lm_run_end_to_end(tmp_path):
    p = run_py(tmp_path, *LM, "grad=luq4")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = runs.rows(tmp_path / "runs.sqlite")
    assert [r["grad"] for r in rows] == ["fp32", "luq4"]  # the baseline was trained first
    s = json.loads(rows[-1]["summary"])
    b = json.loads(rows[0]["summary"])
    assert s["metric"] == b["metric"] == "val_loss" and s["task"] == "lm"
    assert (rows[-1]["metric"], rows[-1]["val_loss"], rows[-1]["baseline_val_loss"]) == \
        ("val_loss", s["val_loss"], b["val_loss"])  # the index columns
    assert s["steps"] == 50 and s["max_steps"] == 50
    assert s["baseline_val_loss"] == b["val_loss"]
    assert s["degradation"] == pytest.approx(s["val_loss"] - b["val_loss"])
    assert s["bits_per_char"] == pytest.approx(s["val_loss"] / math.log(2))
    # trained: well below uniform guessing over the sample's characters
    assert s["val_loss"] < math.log(s["num_classes"]) - 0.5 and s["baseline_quality"] == "ok"
    recs = [json.loads(x) for x in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r.get("eval") == "step"] == [25, 50]
    assert recs[-1]["val_loss"] == s["val_loss"]  # the end-of-run record: the final model
    deg = next(l for l in p.stdout.splitlines() if l.startswith("degradation"))
    assert f"{s['degradation']:+.4f} nats" in deg and "val loss" in p.stdout


@pytest.mark.parametrize("args, expect", [
    (["model=chargpt", "data=digits"], "model=chargpt (source 'lm') does not fit data=digits"),
    (["data=text", f"data.path={SAMPLE}"], "text data needs a language model"),
])
def test_model_data_mismatch_is_one_error_line(tmp_path, args, expect):
    p = run_py(tmp_path, *args, "grad=fp32", "logger=none", "trainer.threads=1")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], p.stderr
    assert not (tmp_path / "runs.sqlite").exists() or not runs.rows(tmp_path / "runs.sqlite")


# ----------------------------------------------------------------------------- summarize


def _exp(*ov):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=list(ov))
    GlobalHydra.instance().clear()
    return config.experiment_from_cfg(cfg, names={"model": "m", "data": "d", "fwd": "fp32",
                                                  "grad": "luq4"}, run_dir="/tmp/x")


def _result(**kw):
    return {"final_top1": 80.0, "best_top1": 81.0, "wall_time": 1.0, "steps": 10, **kw}


def _base_row(top1, val_loss):
    return {"final_top1": top1, "run_dir": "/b", "summary": json.dumps({"val_loss": val_loss})}


def test_degradation_sign_classification_is_baseline_minus_top1():
    s = T.summarize(_exp(), _result(metric="top1", val_loss=0.7, num_classes=10),
                    _base_row(90.0, 0.3), "found")
    assert s["degradation"] == pytest.approx(10.0)      # 90 - 80: worse is positive
    assert s["baseline_top1"] == 90.0 and s["baseline_quality"] == "ok"
    s = T.summarize(_exp(), _result(metric="top1", final_top1=95.0, num_classes=10),
                    _base_row(90.0, None), "found")
    assert s["degradation"] == pytest.approx(-5.0)


def test_degradation_sign_lm_is_val_loss_minus_baseline():
    s = T.summarize(_exp(), _result(metric="val_loss", val_loss=1.75, num_classes=65),
                    _base_row(40.0, 1.5), "found")
    assert s["degradation"] == pytest.approx(0.25)      # 1.75 - 1.5 nats: worse is positive
    assert s["baseline_val_loss"] == 1.5 and s["metric"] == "val_loss"
    s = T.summarize(_exp(), _result(metric="val_loss", val_loss=1.25, num_classes=65),
                    _base_row(40.0, 1.5), "found")
    assert s["degradation"] == pytest.approx(-0.25)


def test_near_chance_baseline_is_flagged():
    # classification: top-1 below 2 x chance (10 classes: 20%)
    assert T.baseline_quality("top1", 19.9, 10) == "near chance"
    assert T.baseline_quality("top1", 20.0, 10) == "ok"
    # LM: val loss >= ln V - ln 2 (perplexity above V/2)
    edge = math.log(64) - math.log(2)
    assert T.baseline_quality("val_loss", edge, 64) == "near chance"
    assert T.baseline_quality("val_loss", edge - 1e-3, 64) == "ok"
    assert T.baseline_quality("val_loss", float("nan"), 64) == "near chance"
    assert T.baseline_quality("top1", None, 10) is None
    s = T.summarize(_exp(), _result(metric="top1", final_top1=12.0, num_classes=10),
                    _base_row(13.9, None), "found")
    assert s["baseline_quality"] == "near chance"
    lines = "\n".join(T.summary_lines(s))
    assert "NEAR CHANCE" in lines and "+1.90 points" in lines
    s = T.summarize(_exp(), _result(metric="val_loss", val_loss=4.2, num_classes=65),
                    _base_row(3.0, 4.1), "found")
    assert s["baseline_quality"] == "near chance" and "NEAR CHANCE" in "\n".join(T.summary_lines(s))


def test_no_baseline_no_degradation():
    for metric in ("top1", "val_loss"):
        s = T.summarize(_exp(), _result(metric=metric, val_loss=1.0, num_classes=10), None,
                        "skipped")
        assert s["degradation"] is None and s["baseline_quality"] is None
        assert s["baseline"] == "no baseline"
        deg = next(l for l in T.summary_lines(s) if l.startswith("degradation"))
        assert "n/a" in deg and "+" not in deg.split("(")[0]


def test_fp32_run_prints_no_degradation_against_itself():
    for metric in ("top1", "val_loss"):
        s = dict(T.summarize(_exp(), _result(metric=metric, val_loss=1.0, num_classes=10), None, "skipped"),
                 baseline="self", degradation=0.0)
        deg = next(l for l in T.summary_lines(s) if l.startswith("degradation"))
        assert "n/a" in deg and "this run is the fp32 baseline" in deg and "+0.00" not in deg


# ----------------------------------------------------------------------------- make_tables


def _fake_lm_run(tmp_path, spec, seed, val_loss, base):
    d = tmp_path / "runs" / f"{spec.label}_s{seed}"
    d.mkdir(parents=True)
    with open(d / "metrics.jsonl", "w") as f:
        for step in (100, 200, 300, 400):
            f.write(json.dumps({"eval": "step", "epoch": 1, "step": step, "top1": 40.0,
                                "val_loss": val_loss + (400 - step) / 100}) + "\n")
        f.write(json.dumps({"epoch": 1, "step": 400, "top1": 40.0, "val_loss": val_loss,
                            "train_loss": 1.0}) + "\n")
    fp32 = spec.grad == "fp32" and spec.fwd == "fp32"
    return {"run_dir": str(d), "model": spec.model, "data": spec.data, "fwd": spec.fwd,
            "grad": spec.grad, "epochs": spec.epochs, "fnt_epochs": 0, "seed": seed,
            "batch_size": spec.batch_size, "is_baseline": fp32, "key": "k", "final_top1": 40.0,
            "best_top1": 40.0, "baseline_top1": 40.0, "degradation": val_loss - base,
            "wall_time": 60.0, "metric": "val_loss", "val_loss": val_loss,
            "baseline_val_loss": base, "bits_per_char": val_loss / math.log(2),
            "num_classes": 84, "identity": {**spec.identity,
                                            "trainer": {**spec.identity["trainer"], "seed": seed}}}


def test_make_tables_on_lm_summaries(tmp_path):
    make_tables = load_script("make_tables")
    idx = tmp_path / "runs.sqlite"
    # per-seed val loss: fp32 1.50/1.52/1.54; fp4_rdn clearly worse; luq4 worse by 0.01 exactly
    loss = {"fp32": 0.0, "luq4": 0.01, "fp4_rdn": 0.5, "mvue24": 0.0, "mse24": 0.2,
            "mvue24_bwd": 0.05}
    for label, dl in loss.items():
        spec = X.compose_row(f"small/lm_table/{label}")
        for seed, jitter in ((0, 0.0), (1, 0.02), (2, 0.04)):
            noise = 0.003 * seed if label == "mse24" else 0.0
            runs.insert(idx, _fake_lm_run(tmp_path, spec, seed, 1.5 + jitter + dl + noise,
                                          1.5 + jitter))
    (tmp_path / "commands.jsonl").write_text("".join(json.dumps(
        {"table": "lm_table", "scale": "small", "command": "python scripts/reproduce.py lm_table",
         "commit": "abc", "started": "t0", **extra}) + "\n" for extra in ({}, {"wall_s": 1800.0})))
    out = tmp_path / "results"
    assert make_tables.main(["lm_table", "--index", str(idx), "--out", str(out)]) == 0
    md = (out / "lm_table.md").read_text()
    header = next(l for l in md.splitlines() if l.startswith("| row |"))
    assert "Δ val loss vs fp32" in header and "bits/char" in header and "δ route" in header
    lines = {l.split("|")[1].strip(): l for l in md.splitlines() if l.startswith("| ")}
    assert "1.5200 ± 0.0200" in lines["fp32"] and "0 (baseline)" in lines["fp32"]
    assert "0.5000 ± 0.0000" in lines["fp4_rdn"] and "| backward |" in lines["mvue24_bwd"]
    assert "none" in lines["luq3"]
    assert "biased FP4 (round-to-nearest) worse than LUQ: shown" in md
    assert "MSE mask worse than MVUE (2:4, update route): shown" in md
    assert "measured wall time" in md and "30.0 min" in md
    assert (out / "lm_table.png").stat().st_size > 1000
    assert (out / "lm_table_delta.png").stat().st_size > 1000


TIMING = ("epoch_time", "img_per_s", "samples_per_s", "wall_time", "eval_time")


def _records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING}
            for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_lm_run_killed_mid_epoch_resumes_exactly(tmp_path):
    """A step-budget run lives inside one epoch (the sample has ~340 steps per epoch): checkpoints
    every trainer.checkpoint_steps let a run killed at step 12 (inside training), at step 28 (inside
    the FNT steps) or while writing its first checkpoint resume with trainer.resume=<run dir> and end
    with the weights, summary and metrics.jsonl of an uninterrupted run."""
    args = [*LM, "grad=luq4", "trainer.max_steps=20", "trainer.fnt_steps=10", "trainer.eval_every=5",
            "trainer.checkpoint_steps=5", "trainer.baseline=skip"]
    points = ["step12", "step28", "ckpt_write"]
    env_of = lambda **extra: {**_env(), **extra}  # noqa: E731
    # 4 runs at once, forked from one warm interpreter (tests/forkrun.py); slow when loaded
    outs = forkrun.finish([forkrun.Case(tmp_path / "straight", tuple(args))] +
                          [forkrun.Case(tmp_path / p, tuple(args), {"LOWPREC_TEST_KILL_AT": p}) for p in points],
                          env_of, timeout=900)
    assert outs[0][0] == 0, outs[0][2][-2000:]
    (straight,) = [Path(r["run_dir"]) for r in runs.rows(tmp_path / "straight" / "runs.sqlite")]
    want = json.loads((straight / "summary.json").read_text())
    assert want["steps"] == 30 and want["status"] == "ok"
    killed = {}
    for point, (rc, _, err) in zip(points, outs[1:]):
        assert rc == -9, (point, rc, err[-2000:])
        (killed[point],) = [p for p in (tmp_path / point).glob("20*/*") if p.is_dir()]
    resumed = forkrun.finish([forkrun.Case(tmp_path / p, (*args, f"trainer.resume={d}"))
                              for p, d in killed.items()], env_of, timeout=900)
    for (point, d), (rc, out, err) in zip(killed.items(), resumed):
        assert rc == 0, (point, out[-2000:], err[-2000:])
        if point != "ckpt_write":
            assert "resume: from epoch 0 (step" in out, (point, out[-500:])
        got = json.loads((d / "summary.json").read_text())
        assert got["weights_sha256"] == want["weights_sha256"], point
        assert (got["val_loss"], got["steps"]) == (want["val_loss"], 30), point
        assert _records(d) == _records(straight), point
