"""End-to-end reliability of run.py (issue 14), with the users' commands on tiny digits runs (2
steps per epoch) as separate processes: forked together from one warm interpreter by
tests/forkrun.py (run.py's own cli, exit status and signals; no ~4 CPU-s of imports each), the
README's resume command and two input errors as real processes.

- kill -9 at 6 named points (LOWPREC_TEST_KILL_AT: mid-epoch before and after a checkpoint,
  after an epoch's metrics, during the checkpoint write, between summary.json and the index row,
  after the row), with per-layer statistics on, then the README's resume command
  verbatim on the default-named run dir: metrics.jsonl (stats included), weights and top-1 equal
  an uninterrupted run's, one index row, no last.pt.tmp* left;
- 3 runs started in the same second: 3 directories, 3 rows, each summary's seed its own;
- a run dir held by another process, or holding a finished run: one error line, exit 2, nothing
  written;
- corrupt / hostile checkpoints and a corrupt index: one error line naming the file, exit 2,
  nothing trained, nothing executed;
- every bad override of the issue: one `error:` line naming key and value, exit 2, no run dir
  (two also as real processes: the same status and line);
  an internal error during training: its traceback, exit 1, an index row with status failed;
- a diverged baseline trained first: exit 3 naming the baseline, a `diverged` row never used as a
  baseline, strict-JSON metrics; a non-finite failure without skip_nonfinite: a `failed` row.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import forkrun
from lowprec import runs

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.train_subset=64", "data.test_subset=32", "data.image_size=16",
        "model.kwargs.width=0.25", "trainer.batch_size=32", "trainer.eval_batch_size=64",
        "logger.mode=disabled", "trainer.threads=1"]
TIMING = ("epoch_time", "img_per_s", "samples_per_s", "wall_time", "eval_time")

pytestmark = pytest.mark.slow


def _env(**extra):
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0",
               **extra)
    for k in ("LOWPREC_DEBUG", "LOWPREC_TEST_KILL_AT", "LOWPREC_TEST_RAISE_AT"):
        if k not in extra:
            env.pop(k, None)
    return env


def start(out_root: Path, *args: str, **env) -> forkrun.Case:
    """`python run.py out_root=<out_root> <args>` in <out_root>, run at `finish`: forked from one warm
    interpreter with the others of that call (tests/forkrun.py: the same cli and exit status,
    without ~4 CPU-s of imports per command line)."""
    return forkrun.Case(out_root, args, env)


def spawn(out_root: Path, *args: str, **env) -> subprocess.Popen:
    """The same command line as a real process, started now."""
    cmd = [sys.executable, str(ROOT / "run.py"), f"out_root={out_root}", *args]
    out_root.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, cwd=out_root, env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(procs: list, timeout: float = 300) -> list[tuple[int, str, str]]:
    return forkrun.finish(procs, _env, timeout)


def one_error_line(rc: int, err: str, status: int = 2) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == status and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    assert "Traceback" not in err
    return lines[0]


def index_rows(idx: Path) -> list[dict]:
    con = sqlite3.connect(idx)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM runs ORDER BY id")]
    finally:
        con.close()


def _strict(token):
    raise AssertionError(f"non-strict JSON: {token}")


def metrics(run_dir: Path) -> list[dict]:
    recs = [json.loads(ln, parse_constant=_strict)
            for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


def run_dirs(out_root: Path) -> list[Path]:
    return sorted(p for p in out_root.glob("20*/*") if p.is_dir())


def readme_resume_command() -> str:
    """The resume command as the README gives it (one line of a code block)."""
    lines = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines()
             if ln.strip().startswith("python run.py") and "trainer.resume=" in ln]
    assert len(lines) == 1, lines
    return lines[0]


# ----------------------------------------------------------------------------- kill -9 + resume

KILL_ARGS = [*TINY, "grad=luq4", "grad.backward.hindsight=0.5", "trainer.epochs=2",
             "trainer.stats_every=1", "trainer.baseline=skip"]
KILL_POINTS = ["step1", "epoch_logged", "ckpt_write", "step3", "summary_written", "indexed"]


def test_kill9_at_every_point_then_readme_resume_is_exact(tmp_path):
    """SIGKILL at 6 points (LOWPREC_TEST_KILL_AT), resumed with the README's command on the
    default-named run dir: the same metrics.jsonl (per-layer stats included), weights and top-1
    as an uninterrupted run, one index row with status ok, no temporary checkpoint left."""
    procs = [start(tmp_path / "straight", *KILL_ARGS)]
    procs += [start(tmp_path / p, *KILL_ARGS, LOWPREC_TEST_KILL_AT=p) for p in KILL_POINTS]
    res = finish(procs)
    assert res[0][0] == 0, res[0]
    (straight,) = run_dirs(tmp_path / "straight")
    want = json.loads((straight / "summary.json").read_text())
    assert want["status"] == "ok" and want["steps"] == 4
    want_metrics = metrics(straight)
    assert [r["epoch"] for r in want_metrics] == [1, 2] and all("layer_stats" in r for r in want_metrics)

    killed = {}
    for point, (rc, out, err) in zip(KILL_POINTS, res[1:]):
        assert rc == -signal.SIGKILL, (point, rc, err)
        (d,) = run_dirs(tmp_path / point)
        assert re.fullmatch(r"[A-Za-z0-9._+-]+", d.name), d.name  # usable unquoted
        killed[point] = d
    assert list((killed["ckpt_write"] / "checkpoints").glob("last.pt.tmp*")), "not killed mid-write"

    template = readme_resume_command()
    procs = []
    for point, d in killed.items():
        cmd = template.replace("<the same overrides>",
                               f"out_root={tmp_path / point} " + " ".join(KILL_ARGS))
        cmd = cmd.replace("<its run dir>", str(d)).replace("python run.py",
                                                           f"{sys.executable} run.py", 1)
        procs.append(subprocess.Popen(["bash", "-c", cmd], cwd=ROOT, env=_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for (point, d), (rc, out, err) in zip(killed.items(), finish(procs)):
        assert rc == 0, (point, out[-2000:], err[-2000:])
        got = json.loads((d / "summary.json").read_text())
        assert got["weights_sha256"] == want["weights_sha256"], point
        assert got["final_top1"] == want["final_top1"] and got["steps"] == 4, point
        assert metrics(d) == want_metrics, point
        rows = index_rows(tmp_path / point / "runs.sqlite")
        assert [(r["run_dir"], r["status"]) for r in rows] == [(str(d), "ok")], point
        assert not list((d / "checkpoints").glob("*.tmp*")), point
        assert run_dirs(tmp_path / point) == [d], point  # the resume wrote into the same dir


# ----------------------------------------------------------------------------- run dirs


def test_three_runs_in_the_same_second_get_three_dirs_and_rows(tmp_path):
    # forked together from one interpreter: they reach the run-dir naming within milliseconds
    procs = [start(tmp_path, *TINY, "grad=luq4", f"trainer.seed={s}", "trainer.epochs=1",
                   "trainer.baseline=skip") for s in (1, 2, 3)]
    for rc, out, err in finish(procs):
        assert rc == 0, err[-2000:]
    dirs = run_dirs(tmp_path)
    assert len(dirs) == 3
    for d in dirs:
        s = json.loads((d / "summary.json").read_text())
        assert f"trainer.seed={s['seed']}" in (d / ".hydra/overrides.yaml").read_text()
        assert f"_s{s['seed']}_" in d.name and len(metrics(d)) == 1
    rows = index_rows(tmp_path / "runs.sqlite")
    assert sorted(r["seed"] for r in rows) == [1, 2, 3]
    assert sorted(r["run_dir"] for r in rows) == [str(d) for d in dirs]


def test_locked_or_finished_run_dir_is_refused_before_anything_is_written(tmp_path):
    busy, done = tmp_path / "busy", tmp_path / "done"
    done.mkdir()
    (done / "summary.json").write_text("{}")
    with runs.run_dir_lock(busy):  # another live run holds it
        before = sorted(p.name for p in busy.iterdir())
        res = finish([start(tmp_path, *TINY, "trainer.baseline=skip", f"hydra.run.dir={busy}"),
                      start(tmp_path, *TINY, "trainer.baseline=skip", f"hydra.run.dir={done}")])
        assert sorted(p.name for p in busy.iterdir()) == before == [".lock"]
    assert str(busy) in one_error_line(res[0][0], res[0][2]) and "in use" in res[0][2]
    line = one_error_line(res[1][0], res[1][2])
    assert str(done) in line and "trainer.resume=true" in line
    assert sorted(p.name for p in done.iterdir()) == ["summary.json"]
    assert not (tmp_path / "runs.sqlite").exists()


# ----------------------------------------------------------------------------- corrupt files


class Planted:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_corrupt_checkpoints_and_index_are_one_line_naming_the_file(tmp_path):
    """Truncated, zero-byte, random and hostile last.pt (resume), and a corrupt runs.sqlite:
    exit 2, one line naming the file, no training, the planted callable never runs."""
    marker = tmp_path / "pwned"
    cases = {}
    for kind in ("truncated", "zero", "random", "hostile"):
        d = tmp_path / kind / "run"
        ck = d / "checkpoints" / "last.pt"
        ck.parent.mkdir(parents=True)
        torch.save({"model": {"w": torch.ones(1000)}, "x": Planted(marker) if kind == "hostile"
                    else 1}, ck)
        if kind == "truncated":
            ck.write_bytes(ck.read_bytes()[:1500])
        elif kind == "zero":
            ck.write_bytes(b"")
        elif kind == "random":
            ck.write_bytes(os.urandom(3000))
        cases[kind] = (ck, start(tmp_path / kind, *TINY, "trainer.baseline=skip",
                                 "trainer.resume=true", f"hydra.run.dir={d}"))
    bad_index = tmp_path / "idx" / "runs.sqlite"
    bad_index.parent.mkdir()
    bad_index.write_bytes(b"garbage, not SQLite " * 50)
    cases["index"] = (bad_index, start(tmp_path / "idx", *TINY, "trainer.baseline=skip"))
    for (kind, (path, _)), (rc, out, err) in zip(cases.items(), finish([c for _, c in cases.values()])):
        line = one_error_line(rc, err)
        assert str(path) in line, (kind, line)
        assert not list((tmp_path / kind).rglob("metrics.jsonl")), kind
    assert not marker.exists()
    assert not run_dirs(tmp_path / "idx"), "an input error leaves no run dir"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write read-only files")
def test_read_only_index_is_one_line(tmp_path):
    runs.insert(tmp_path / "runs.sqlite", {"run_dir": "x", "model": "m", "data": "d", "fwd": "f",
                                           "grad": "g", "epochs": 1, "fnt_epochs": 0, "seed": 0,
                                           "batch_size": 1, "is_baseline": 1, "key": "k",
                                           "final_top1": 1.0, "best_top1": 1.0,
                                           "baseline_top1": 1.0, "degradation": 0.0,
                                           "wall_time": 1.0})
    (tmp_path / "runs.sqlite").chmod(0o444)
    (rc, out, err), = finish([start(tmp_path, *TINY, "trainer.baseline=skip")])
    assert "runs.sqlite" in one_error_line(rc, err)
    assert not list(tmp_path.rglob("metrics.jsonl"))


# ----------------------------------------------------------------------------- bad input

BAD = [  # (overrides, what the one line must name)
    (["trainer.unknown_key=1"], ["trainer.unknown_key", "1"]),
    (["model.width=3"], ["model.width", "3"]),
    (["optim=adamw", "optim.nesterov=true"], ["optim.nesterov", "true"]),
    (["grad.update.bits=1"], ["grad.update.bits", "1"]),
    (["model=vit_tiny", "model.kwargs.patch_size=0"], ["patch_size", "0"]),
    (["trainer.bf16=maybe"], ["trainer.bf16", "maybe"]),
    (["out_root=/proc/nope"], ["out_root", "/proc/nope"]),
    (["convert.weight_nm=[2,4,8]"], ["convert.weight_nm", "[2, 4, 8]"]),
    (["data=digits", "data.root=/nonexistent"], ["data.root", "/nonexistent"]),
    (["trainer.resume=/no/such/run"], ["trainer.resume", "/no/such/run"]),
    # issue 23: these escaped (traceback, a run dir, a failed row) or hung
    (["convert.weight_nm=[3,2]"], ["convert.weight_nm", "[3, 2]"]),
    (["convert.weight_nm=[0,4]"], ["convert.weight_nm", "[0, 4]"]),
    (["convert.weight_nm_every=0"], ["convert.weight_nm_every", "0"]),
    (["convert.skip=bogus"], ["convert.skip", "bogus"]),
    (["trainer.adapt_fallback=bogus"], ["trainer.adapt_fallback", "bogus"]),
    (["optim=adamw", "optim.betas=[2,0.5]"], ["optim.betas", "[2, 0.5]"]),
    (["optim=adamw", "optim.eps=-1"], ["optim.eps", "-1"]),
    (["optim.lr=1e308"], ["optim.lr", "1e+308"]),
    (["optim.lr=inf"], ["optim.lr", "inf"]),
    (["sched.warmup_epochs=nan"], ["sched.warmup_epochs", "nan"]),
    (["trainer.seed=abc"], ["trainer.seed", "abc"]),
    (["trainer.seed=2**70"], ["trainer.seed", "2**70"]),
    (["trainer.seed=null"], ["trainer.seed", "None"]),
    (["trainer.seed=true"], ["trainer.seed", "True"]),
    (["trainer.threads=100000"], ["trainer.threads", "100000"]),
]
BAD_BARE = [  # (environment, overrides without TINY, what the line must name)
    ({"LOWPREC_BACKEND": "bogus"}, [], ["LOWPREC_BACKEND", "bogus"]),
    ({"LOWPREC_CPU_NATIVE": "maybe"}, [], ["LOWPREC_CPU_NATIVE", "maybe"]),
    ({"LOWPREC_MALLOC": "sometimes"}, [], ["LOWPREC_MALLOC", "sometimes"]),
    ({}, ["model=chargpt", "model.kwargs.block_size=100000", "logger=none"],  # hung
     ["model.kwargs.block_size", "100000"]),
]


def test_bad_overrides_are_one_line_exit_2_nothing_written(tmp_path):
    small = [a for a in TINY if not a.startswith("model.kwargs")]
    cases = [(tmp_path / str(i), [*small, *args], {}) for i, (args, _) in enumerate(BAD)]
    cases += [(tmp_path / f"bare{i}", args or TINY, env) for i, (env, args, _) in enumerate(BAD_BARE)]
    names = [n for _, n in BAD] + [n for _, _, n in BAD_BARE]
    # one override error and one environment error also as real processes: they must give the
    # same exit status and line as through the forking driver (a check of the driver itself)
    real = [0, len(BAD)]
    procs = [spawn(tmp_path / f"proc{k}", *cases[k][1], **cases[k][2]) for k in real]
    got = finish([start(root, *args, **env) for root, args, env in cases])
    for (root, args, _), want, (rc, out, err) in zip(cases, names, got):
        line = one_error_line(rc, err)
        assert all(n in line for n in want), (args, line)
        assert not list(root.rglob("*")), (args, list(root.rglob("*")))
    for k, (rc, _, err) in zip(real, finish(procs)):
        assert (rc, err.replace(str(tmp_path / f"proc{k}"), str(cases[k][0]))) == (got[k][0], got[k][2])
        assert not list((tmp_path / f"proc{k}").rglob("*"))


def test_internal_error_during_training_keeps_its_traceback(tmp_path):
    """A ValueError raised inside the training loop (a planted bug) is not an input error:
    traceback, exit 1, and the run's index row says failed."""
    (rc, out, err), = finish([start(tmp_path, *TINY, "trainer.baseline=skip", "trainer.epochs=1",
                                    LOWPREC_TEST_RAISE_AT="step1")])
    assert rc == 1 and "Traceback" in err and "planted error at step1" in err, (rc, err[-2000:])
    assert not err.strip().splitlines()[0].startswith("error:")
    (row,) = index_rows(tmp_path / "runs.sqlite")
    assert row["status"] == "failed" and "planted error" in json.loads(row["summary"])["error"]


# ----------------------------------------------------------------------------- divergence


def test_diverged_baseline_and_failed_run_are_named_recorded_and_never_baselines(tmp_path):
    """optim.lr=1e30 with skip_nonfinite: the fp32 baseline trained first skips 3 of 4 steps ->
    exit 3 naming the baseline, a `diverged` row, strict-JSON metrics; a later run needing that
    baseline does not get it. Without skip_nonfinite the run fails: exit 3, a `failed` row."""
    div = [*TINY, "grad=luq4", "optim.lr=1e30", "trainer.epochs=2"]
    res = finish([start(tmp_path / "div", *div, "trainer.skip_nonfinite=true"),
                  start(tmp_path / "fail", *div, "trainer.baseline=skip")])
    line = one_error_line(res[0][0], res[0][2], status=3)
    assert line.startswith("error: baseline run (fp32/fp32") and "diverged" in line
    assert "3 of 4 steps" in line and "max_skip_frac=0.01" in line
    assert "skipped 3 of 4 steps" in res[0][1]
    (row,) = index_rows(tmp_path / "div" / "runs.sqlite")
    assert (row["grad"], row["is_baseline"], row["status"]) == ("fp32", 1, "diverged")
    base = Path(row["run_dir"])
    s = json.loads((base / "summary.json").read_text(), parse_constant=_strict)
    assert s["status"] == "diverged" and s["skipped_steps"] == 3
    assert metrics(base)[-1]["train_loss"] is None  # all steps of epoch 2 skipped: null, not NaN

    (rc, out, err), = finish([start(tmp_path / "div", *div, "trainer.skip_nonfinite=true",
                                    "trainer.baseline=require")])
    assert "no fp32/fp32 baseline" in one_error_line(rc, err)

    line = one_error_line(res[1][0], res[1][2], status=3)
    assert line.startswith("error: run (grad=luq4") and "failed" in line
    (row,) = index_rows(tmp_path / "fail" / "runs.sqlite")
    assert (row["grad"], row["status"]) == ("luq4", "failed")


def test_kill9_inside_an_fnt_epoch_resumes_from_its_mid_epoch_checkpoint(tmp_path):
    """trainer.checkpoint_steps=1: a checkpoint after every step, so a run killed inside its FNT epoch
    resumes inside that epoch: FNT re-entered from the checkpoint, the
    epoch's remaining batch, its sums and per-layer stats: the uninterrupted run's weights and metrics.
    (2 steps per epoch; killed after step 4, before its checkpoint: the last one is step 3's.)"""
    args = [*TINY, "grad=luq4", "grad.backward.hindsight=0.5", "trainer.epochs=1", "trainer.fnt_epochs=1",
            "trainer.stats_every=1", "trainer.checkpoint_steps=1", "trainer.baseline=skip"]
    (rc0, _, err0), (rc1, _, err1) = finish([start(tmp_path / "straight", *args),
                                            start(tmp_path / "killed", *args, LOWPREC_TEST_KILL_AT="step4")])
    assert rc0 == 0 and rc1 == -signal.SIGKILL, (err0[-2000:], err1[-2000:])
    (straight,), (d,) = run_dirs(tmp_path / "straight"), run_dirs(tmp_path / "killed")
    p = start(tmp_path / "killed", *args, f"trainer.resume={d}")
    ((rc, out, err),) = finish([p])
    assert rc == 0 and "resume: from epoch 1 (step 3)" in out, (out[-2000:], err[-2000:])
    want, got = (json.loads((x / "summary.json").read_text()) for x in (straight, d))
    assert got["weights_sha256"] == want["weights_sha256"] and got["final_top1"] == want["final_top1"]
    assert metrics(d) == metrics(straight) and [r["phase"] for r in metrics(d)] == ["train", "fnt"]
