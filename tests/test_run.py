"""End-to-end tests of run.py (subprocesses, tiny runs on digits): outputs, baseline lookup,
kill -9 + resume, multirun, config errors, torchrun DDP."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from forkrun import run_many

ROOT = Path(__file__).resolve().parents[1]
# 4-channel resnet20 on 64 16x16 digits, batch 32: 2 steps per epoch, well under a second each.
TINY = ["data.train_subset=64", "data.test_subset=32", "data.image_size=16",
        "model.kwargs.width=0.25", "trainer.batch_size=32", "trainer.eval_batch_size=64",
        "logger.mode=disabled"]
SUMMARY_KEYS = {"final_top1", "best_top1", "baseline_top1", "degradation", "wall_time", "model",
                "data", "fwd", "grad", "epochs", "fnt_epochs", "seed", "grad_recipe",
                "fwd_recipe", "weights_sha256", "baseline", "run_dir"}
EPOCH_KEYS = {"epoch", "phase", "train_loss", "top1", "top5", "lr", "epoch_time"}

pytestmark = pytest.mark.slow


def _env():
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    env.pop("LOWPREC_DEBUG", None)
    return env


def run_py(tmp: Path, *args: str, timeout: float = 240, launcher: list[str] | None = None):
    flags = [a for a in args if a.startswith("-")]  # -m must precede the overrides
    cmd = [*(launcher or [sys.executable]), str(ROOT / "run.py"), *flags, f"out_root={tmp}",
           *[a for a in args if not a.startswith("-")]]
    return subprocess.run(cmd, cwd=tmp, env=_env(), capture_output=True, text=True, timeout=timeout)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"rc={p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    return p


def index_rows(tmp: Path) -> list[dict]:
    con = sqlite3.connect(tmp / "runs.sqlite")
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM runs ORDER BY id")]
    finally:
        con.close()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_end_to_end_auto_baseline_and_fnt(tmp_path):
    """Plain run with no baseline in the index: trains fp32/fp32 first, then luq4 with one FNT
    epoch; every output file, the index rows and the printed comparison are right, and the FNT
    epoch really uses exact gradients (δ statistics: error > 0 with LUQ, exactly 0 in FNT)."""
    run_dir = tmp_path / "run"
    p = ok(run_py(tmp_path, *TINY, "grad=luq4", "trainer.epochs=2", "trainer.fnt_epochs=1",
                  "trainer.stats_every=1", f"hydra.run.dir={run_dir}"))
    s = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(s)
    assert (s["grad"], s["fwd"], s["epochs"], s["fnt_epochs"]) == ("luq4", "fp32", 2, 1)
    assert s["grad_recipe"]["update"]["bits"] == 4 and s["grad_recipe"]["update"]["num_levels"] == 7
    assert s["baseline"] == "trained"
    assert s["degradation"] == pytest.approx(s["baseline_top1"] - s["final_top1"])
    assert (run_dir / "resolved_config.yaml").exists() and (run_dir / ".hydra/config.yaml").exists()
    assert (run_dir / "checkpoints/last.pt").exists()

    m = metrics(run_dir)
    assert [r["epoch"] for r in m] == [1, 2, 3] and [r["phase"] for r in m] == ["train", "train", "fnt"]
    assert all(EPOCH_KEYS <= set(r) for r in m)
    assert s["final_top1"] == m[-1]["top1"] and s["best_top1"] == max(r["top1"] for r in m)
    # FNT LR: ramps from the final cosine LR (0) to the base LR over T/2 = 1 of 2 steps, then
    # decays linearly: the last FNT step (i=1 of 2) has factor 1 - (1-1)/(2-1) = 1.0.
    assert m[-1]["lr"] == pytest.approx(0.1)
    layer = next(iter(m[0]["layer_stats"]))
    assert m[0]["layer_stats"][layer]["rel_error"] > 0.01
    assert m[2]["layer_stats"][layer]["rel_error"] == 0

    rows = index_rows(tmp_path)
    assert [(r["grad"], r["is_baseline"]) for r in rows] == [("fp32", 1), ("luq4", 0)]
    assert rows[1]["baseline_top1"] == rows[0]["final_top1"] == s["baseline_top1"]
    base_dir = Path(rows[0]["run_dir"])
    assert base_dir.parent == tmp_path / "baselines" and len(metrics(base_dir)) == 3
    for needle in (f"top-1           {s['final_top1']:5.2f}%", "fp32 baseline", "degradation"):
        assert needle in p.stdout, p.stdout


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    """kill -9 after the first checkpoint, restart with trainer.resume=true: same final weights
    and top-1 as one uninterrupted run. Stochastic LUQ with in-hindsight state, and N:M weight
    masks recomputed every 3rd forward (the schedule crosses epoch ends): layer state that is
    not in state_dict must be in the checkpoint."""
    args = [*TINY, "grad=luq4", "grad.backward.hindsight=0.5", "convert.weight_nm=[2,4]",
            "convert.weight_nm_every=3", "trainer.epochs=4",
            "trainer.baseline=skip", "trainer.checkpoint_every=1"]
    ok(run_py(tmp_path, *args, f"hydra.run.dir={tmp_path / 'straight'}"))
    straight = json.loads((tmp_path / "straight/summary.json").read_text())

    killed = tmp_path / "killed"
    ckpt = killed / "checkpoints/last.pt"
    cmd = [sys.executable, str(ROOT / "run.py"), f"out_root={tmp_path}", *args, f"hydra.run.dir={killed}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.exists() and not (killed / "summary.json").exists(), "killed too late to test resume"

    p = ok(run_py(tmp_path, *args, "trainer.resume=true", f"hydra.run.dir={killed}"))
    assert "resume: from epoch" in p.stdout
    resumed = json.loads((killed / "summary.json").read_text())
    assert resumed["final_top1"] == straight["final_top1"]
    assert resumed["weights_sha256"] == straight["weights_sha256"]
    assert resumed["steps"] == straight["steps"] == 8
    assert [r["epoch"] for r in metrics(killed)] == [1, 2, 3, 4]
    assert [r["train_loss"] for r in metrics(killed)] == [r["train_loss"] for r in metrics(tmp_path / "straight")]



def test_multirun_each_job_finds_its_baseline(tmp_path):
    sweep = tmp_path / "sweep"
    ok(run_py(tmp_path, "-m", *TINY, "grad=fp32,luq4", "trainer.epochs=1", f"hydra.sweep.dir={sweep}"))
    (fp32_dir,), (luq4_dir,) = sweep.glob("0_*grad-fp32*"), sweep.glob("1_*grad-luq4*")
    fp32 = json.loads((fp32_dir / "summary.json").read_text())
    luq4 = json.loads((luq4_dir / "summary.json").read_text())
    assert fp32["baseline"] == "self" and fp32["degradation"] == 0
    assert luq4["baseline"] == "found" and luq4["baseline_top1"] == fp32["final_top1"]
    assert luq4["baseline_run"] == fp32["run_dir"]
    assert [r["grad"] for r in index_rows(tmp_path)] == ["fp32", "luq4"]  # no extra baseline run
    assert not (tmp_path / "baselines").exists() or not any((tmp_path / "baselines").glob("*/summary.json"))


def test_skip_nonfinite_skips_diverged_steps(tmp_path):
    """lr=1e8 diverges at once: non-finite δ in LUQ (or loss) -> the steps are skipped, the run
    completes and is recorded; with trainer.max_skip_frac=1 the skipped fraction alone would keep
    it ok, but its training loss ends far above the loss of a uniform guess (lowprec.summary's
    divergence rule), so it is `diverged`, exit 3, with the reason named."""
    run_dir = tmp_path / "nf"
    p = run_py(tmp_path, *TINY, "grad=luq4", "optim.lr=1e8", "trainer.epochs=2",
               "trainer.skip_nonfinite=true", "trainer.max_skip_frac=1",
               "trainer.baseline=skip", f"hydra.run.dir={run_dir}")
    assert p.returncode == 3 and "above 10 x ln 10" in p.stderr, p.stderr[-2000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert 0 < s["skipped_steps"] < s["steps"] == 4 and s["status"] == "diverged"
    assert f"skipped {s['skipped_steps']} of 4 steps" in p.stdout
    assert index_rows(tmp_path)[0]["status"] == "diverged"


BAD_INPUT = [  # (overrides, what the one line must say); {tmp}: the case's out_root
    (["grad=luq5"], "did you mean 'luq4'"),                          # unknown group option
    (["-m", "grad=fp32,mvue42"], "unknown grad option 'mvue42'"),     # ... in a sweep
    (["experiment=small/luq_table/luq9"], "small/luq_table/luq4"),   # ... nested experiment names
    (["data=cifar10", "data.root={tmp}/no_such_dir"], "no_such_dir"),  # missing dataset path
    (["grad=mvue24", "grad.update.n=5"], "N must not exceed M"),     # impossible N:M
    (["trainer.baseline=sometimes"], "sometimes"),                   # impossible trainer option
    (["trainer.baseline=require"], "no fp32/fp32 baseline"),         # empty index
]


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory):
    """Every BAD_INPUT command line as `python run.py ...`, forked from one warm interpreter
    (tests/forkrun.py): [(out_root, (rc, stdout, stderr))]."""
    roots = [tmp_path_factory.mktemp(f"bad{i}") for i in range(len(BAD_INPUT))]
    cases = []
    for root, (args, _) in zip(roots, BAD_INPUT):
        args = [a.format(tmp=root) for a in args]
        argv = [a for a in args if a.startswith("-")] + [f"out_root={root}", f"hydra.run.dir={root / 'r'}",
                                                          *[a for a in args if not a.startswith("-")]]
        cases.append({"argv": argv, "env": _env(), "cwd": str(root)})
    return list(zip(roots, run_many(cases)))


@pytest.mark.parametrize("i", range(len(BAD_INPUT)), ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_fails_fast_with_one_line(bad_input_results, i):
    root, (rc, _, stderr) = bad_input_results[i]
    err = [line for line in stderr.splitlines() if line.strip()]
    assert any(BAD_INPUT[i][1] in line for line in err), stderr
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), (rc, stderr)
    assert "Traceback" not in stderr
    assert not list(root.rglob("metrics.jsonl")) and not list(root.rglob("last.pt"))  # nothing trained


def test_torchrun_two_ranks_cpu(tmp_path):
    run_dir = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ok(run_py(tmp_path, *TINY, "grad=luq4", "trainer.epochs=2", "trainer.baseline=skip",
              "trainer.device=cpu", f"hydra.run.dir={run_dir}", launcher=launcher))
    assert list(tmp_path.rglob("summary.json")) == [run_dir / "summary.json"]
    s = json.loads((run_dir / "summary.json").read_text())
    # trainer.batch_size is global: 16 per rank, 32 of the 64 images per rank -> 2 steps/epoch
    assert s["world_size"] == 2 and s["steps"] == 4
    assert len(index_rows(tmp_path)) == 1
    assert [r["epoch"] for r in metrics(run_dir)] == [1, 2]
