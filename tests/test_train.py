"""Unit tests of the runner pieces: every config file composes and converts to plain objects,
LR schedules, the run index under concurrent writers, checkpoints, and the W&B fallbacks."""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from lowprec import checkpoint, config, recipes, runs
from lowprec import train as T
from lowprec.logging import JsonlLogger, Logger, LoggerConfig, make_wandb, resolve_mode
from lowprec.optim import lr_factor, make_optimizer

CONF = Path(__file__).resolve().parents[1] / "conf"
SAMPLE = Path(__file__).resolve().parent / "data" / "sample.txt"


def _options():
    """(group, option) for every YAML under conf/ except the primary config. Below hydra/ a
    folder is a group (hydra/launcher); elsewhere subfolders are part of the option name
    (experiment=small/luq_table/luq4)."""
    out = []
    for f in sorted(CONF.rglob("*.yaml")):
        parts = f.relative_to(CONF).with_suffix("").parts
        if len(parts) > 1:
            split = len(parts) - 1 if parts[0] == "hydra" else 1
            out.append(("/".join(parts[:split]), "/".join(parts[split:])))
    out += [(g, n) for g in ("grad", "fwd") for n in recipes.config_options(g)]  # ConfigStore, no files
    return out


@pytest.fixture
def hydra_conf():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def test_option_list_covers_every_group():
    groups = {g for g, _ in _options()}
    assert {"model", "data", "fwd", "grad", "optim", "sched", "trainer", "logger", "hydra",
            "hydra/launcher"} <= groups


@pytest.mark.parametrize("group, option", _options(), ids=lambda v: str(v))
def test_every_config_file_composes(hydra_conf, group, option):
    """A new YAML anywhere under conf/ is composed (and, outside hydra/, turned into the plain
    objects a run uses: recipes, specs, TrainConfig) without editing this test."""
    if group.startswith("hydra"):
        if option == "default":
            cfg = compose("config", return_hydra_config=True)
            assert cfg.hydra.job.chdir is False
        else:
            cfg = compose("config", overrides=[f"{group}={option}"], return_hydra_config=True)
            assert cfg.hydra.launcher._target_
        return
    # data=text has no default file (data.path is required): the shipped sample stands in.
    extra = [f"data.path={SAMPLE}"] if (group, option) == ("data", "text") else []
    cfg = compose("config", overrides=[f"{group}={option}", *extra], return_hydra_config=True)
    names = dict(cfg.hydra.runtime.choices)
    assert names[group] == option
    del cfg.hydra
    exp = config.experiment_from_cfg(cfg, names=names, run_dir="unused")
    assert isinstance(exp.trainer, config.TrainConfig) and exp.grad.name and exp.fwd.name is not None


@pytest.mark.parametrize("launcher", ["submitit_slurm", "slurm"])
def test_submitit_launcher_composes(hydra_conf, launcher):
    cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.tasks_per_node == 1


def test_default_config_is_the_documented_one(hydra_conf):
    cfg = compose("config", return_hydra_config=True)
    ch = cfg.hydra.runtime.choices
    assert [ch[g] for g in ("model", "data", "fwd", "grad", "optim", "sched", "trainer", "logger")] == \
        ["resnet20", "digits", "fp32", "luq4", "sgd", "cosine", "default", "wandb"]
    assert ch["hydra/launcher"] == "basic"
    o = cfg.optim
    assert (o.momentum, o.weight_decay, o.nesterov) == (0.9, 5e-4, False)
    assert "trainer.seed" in cfg.hydra.job.config.override_dirname.exclude_keys


def test_baseline_key_ignores_only_recipes_and_bookkeeping(hydra_conf):
    def key(*ov):
        cfg = compose("config", overrides=list(ov))
        return config.experiment_from_cfg(cfg, names={}, run_dir="x").key

    k = key()
    assert key("grad=fp32", "fwd=int4", "trainer.resume=true", "logger.mode=disabled",
               "trainer.baseline=skip", "trainer.workers=3") == k
    for ov in ("trainer.seed=1", "trainer.epochs=3", "optim.lr=0.05", "sched=step",
               "data.train_subset=10", "model.kwargs.width=0.5", "trainer.fnt_epochs=1"):
        assert key(ov) != k, ov


@pytest.mark.parametrize("ov, msg", [
    (["optim.name=lion"], "optim.name"),
    (["trainer.epochs=-1"], "trainer.epochs"),
    (["+trainer.epoch=3"], "unknown option 'epoch'"),
    (["sched=step", "sched.milestones=[2]"], "milestones"),
    (["logger.mode=sometimes"], "logger.mode"),
])
def test_bad_runner_options_are_value_errors(hydra_conf, ov, msg):
    cfg = compose("config", overrides=ov)
    with pytest.raises(ValueError, match=msg):
        config.experiment_from_cfg(cfg, names={}, run_dir="x")


# ----------------------------------------------------------------------------- schedules


def _lrs(sched, epochs=4, fnt=0, spe=10):
    return [lr_factor(sched, s, steps_per_epoch=spe, epochs=epochs, fnt_epochs=fnt)
            for s in range((epochs + fnt) * spe)]


def test_cosine_with_warmup():
    f = _lrs(config.SchedConfig("cosine", warmup_epochs=1, min_lr_ratio=0.1))
    assert f[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert f[10] == pytest.approx(1.0)
    assert f[25] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the 30 cosine steps
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] > 0.1


def test_step_and_constant():
    f = _lrs(config.SchedConfig("step", milestones=(0.5, 0.75), gamma=0.1))
    assert f[19] == 1.0 and f[20] == pytest.approx(0.1) and f[30] == pytest.approx(0.01)
    assert set(_lrs(config.SchedConfig("constant"))) == {1.0}


def test_fnt_ramps_from_final_lr_to_base_then_to_zero():
    s = config.SchedConfig("step", milestones=(0.5,), gamma=0.1)
    f = _lrs(s, epochs=2, fnt=2, spe=10)  # main: 20 steps ending at 0.1; FNT: 20 steps
    fnt = f[20:]
    assert fnt[0] == pytest.approx(0.1)       # starts at the final LR of the main schedule
    assert fnt[5] == pytest.approx(0.1 + 0.9 * 0.5)
    assert fnt[10] == pytest.approx(1.0)      # base LR after T/2
    assert fnt[15] == pytest.approx(0.5)
    assert fnt[-1] == pytest.approx(0.1) and all(a > b for a, b in zip(fnt[10:], fnt[11:]))


def test_step_budget_schedule_spans_max_steps_then_fnt_steps():
    s = config.SchedConfig("cosine", warmup_steps=10)
    f = [lr_factor(s, i, steps_per_epoch=7, epochs=99, fnt_epochs=0, max_steps=50, fnt_steps=20)
         for i in range(70)]
    assert f[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])  # warm-up over steps
    assert f[10] == pytest.approx(1.0)
    assert f[30] == pytest.approx(0.5)       # halfway through the 40 cosine steps
    assert f[49] > 0 and f[50] == pytest.approx(0.0)  # cosine ends at max_steps, not at epochs
    assert f[60] == pytest.approx(1.0) and f[69] == pytest.approx(0.1)  # FNT over fnt_steps
    # without a budget, the same schedule spans epochs x steps per epoch
    g = [lr_factor(s, i, steps_per_epoch=10, epochs=5, fnt_epochs=0) for i in range(50)]
    assert g[30] == pytest.approx(0.5)


@pytest.mark.parametrize("ov, msg", [
    ({"fnt_steps": 5}, "trainer.fnt_steps"),
    ({"max_steps": 5, "fnt_epochs": 1}, "trainer.fnt_epochs"),
    ({"eval_every": -1}, "trainer.eval_every"),
])
def test_step_budget_options_are_checked(ov, msg):
    with pytest.raises(ValueError, match=msg):
        config.TrainConfig(**ov)
    with pytest.raises(ValueError, match="optim.clip_grad"):
        config.OptimConfig(clip_grad=-1.0)
    with pytest.raises(ValueError, match="set one of them"):
        config.SchedConfig(warmup_epochs=1, warmup_steps=5)


def test_new_options_at_their_defaults_keep_the_old_keys(hydra_conf):
    """fnt_steps, clip_grad and warmup_steps came after run indexes existed: at their defaults
    they are left out of the identity (old runs keep finding their baselines); set, they count."""
    def ident(*ov):
        return config.experiment_from_cfg(compose("config", overrides=list(ov)), names={},
                                          run_dir="x").identity

    i = ident()
    assert "clip_grad" not in i["optim"] and "warmup_steps" not in i["sched"]
    assert "fnt_steps" not in i["trainer"]
    assert ident("optim.clip_grad=1.0")["optim"]["clip_grad"] == 1.0
    assert ident("trainer.max_steps=9", "trainer.fnt_steps=3")["trainer"]["fnt_steps"] == 3
    assert ident("sched.warmup_steps=4")["sched"]["warmup_steps"] == 4


def test_chargpt_defaults_are_the_small_lm_setting(hydra_conf):
    """model=chargpt brings its data, optimizer and step budget (issue 10's small setting);
    the command line still wins."""
    cfg = compose("config", overrides=["model=chargpt"], return_hydra_config=True)
    ch = cfg.hydra.runtime.choices
    assert (ch["data"], ch["optim"]) == ("shakespeare_char", "adamw")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.clip_grad) == (3e-3, 0.1, 1.0)
    assert (cfg.trainer.batch_size, cfg.trainer.max_steps, cfg.sched.warmup_steps) == (16, 2000, 100)
    assert cfg.sched.name == "cosine" and cfg.data.block_size == 64
    cfg = compose("config", overrides=["model=chargpt", "optim=sgd", "data=text",
                                       f"data.path={SAMPLE}", "trainer.max_steps=7"],
                  return_hydra_config=True)
    assert (cfg.hydra.runtime.choices["optim"], cfg.hydra.runtime.choices["data"]) == ("sgd", "text")
    assert cfg.trainer.max_steps == 7 and cfg.optim.lr == 0.1


def test_weight_decay_skips_chargpt_embeddings_and_norms():
    """Today's rule (ndim <= 1: biases, LayerNorm) plus embeddings: wpe (an nn.Embedding) by its
    type, wte (a Linear on one-hot inputs) by the model's no_weight_decay()."""
    from lowprec.chargpt import CharGPT

    m = CharGPT(12, n_layer=1, n_head=2, n_embd=8, block_size=8)
    opt = make_optimizer(m, config.OptimConfig("adamw", lr=1e-3, weight_decay=0.1))
    wd = {n: g["weight_decay"] for g in opt.param_groups for p in g["params"]
          for n, q in m.named_parameters() if q is p}
    assert wd["wte.weight"] == wd["wpe.weight"] == wd["ln_f.weight"] == 0.0
    assert wd["blocks.0.attn.c_attn.bias"] == wd["blocks.0.ln_1.weight"] == 0.0
    assert wd["blocks.0.attn.c_attn.weight"] == wd["lm_head.weight"] == 0.1
    assert len(wd) == len(list(m.parameters()))


def test_weight_decay_only_on_weights():
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Linear(2, 2))
    opt = make_optimizer(m, config.OptimConfig(weight_decay=1e-3, nesterov=True))
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd[id(m[0].weight)] == wd[id(m[2].weight)] == 1e-3
    assert wd[id(m[0].bias)] == wd[id(m[1].weight)] == wd[id(m[2].bias)] == 0.0
    assert opt.param_groups[0]["nesterov"] is True
    assert isinstance(make_optimizer(m, config.OptimConfig("adamw", lr=1e-3)), torch.optim.AdamW)


# ----------------------------------------------------------------------------- index


def _row(i: int, **kw) -> dict:
    return {"run_dir": f"/r/{i}", "model": "resnet20", "data": "digits", "fwd": "fp32",
            "grad": "fp32", "epochs": 2, "fnt_epochs": 0, "seed": 0, "batch_size": 64,
            "is_baseline": True, "key": "k", "final_top1": float(i), "best_top1": float(i),
            "baseline_top1": None, "degradation": None, "wall_time": 1.0, **kw}


def _writer(path: str, start: int, n: int) -> None:
    for i in range(start, start + n):
        runs.insert(path, _row(i, grad="luq4", is_baseline=False))


def test_concurrent_inserts_lose_no_rows(tmp_path):
    db = str(tmp_path / "runs.sqlite")
    ctx = mp.get_context("fork")  # the writers only touch sqlite
    procs = [ctx.Process(target=_writer, args=(db, 1000 * k, 40)) for k in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    got = sorted(r["run_dir"] for r in runs.rows(db))
    assert got == sorted(f"/r/{1000 * k + i}" for k in range(6) for i in range(40))
    con = runs.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def test_find_baseline_matches_all_fields(tmp_path):
    db = tmp_path / "i.sqlite"
    assert runs.find_baseline(db, model="resnet20", data="digits", epochs=2, fnt_epochs=0,
                              seed=0, batch_size=64) is None  # no index yet
    runs.insert(db, _row(1))
    runs.insert(db, _row(2, seed=1))
    runs.insert(db, _row(3, grad="luq4", is_baseline=False))
    runs.insert(db, _row(4, fnt_epochs=1))
    runs.insert(db, _row(5, key="other"))
    q = dict(model="resnet20", data="digits", epochs=2, fnt_epochs=0, seed=0, batch_size=64)
    assert runs.find_baseline(db, **q, key="k")["run_dir"] == "/r/1"
    assert runs.find_baseline(db, **q)["run_dir"] == "/r/5"  # newest, any key
    assert runs.find_baseline(db, **{**q, "batch_size": 32}) is None
    assert runs.find_baseline(db, **{**q, "seed": 1}, key="k")["run_dir"] == "/r/2"
    runs.insert(db, _row(1, final_top1=99.0))  # the same run dir finishing again: replaced
    assert runs.find_baseline(db, **q, key="k")["final_top1"] == 99.0
    assert len(runs.rows(db)) == 5
    with pytest.raises(ValueError, match="lacks"):
        runs.insert(db, {"run_dir": "x"})


def _hold_then_die(path: str, started) -> None:
    with runs.file_lock(path):
        started.set()
        time.sleep(60)  # killed long before


def test_baseline_lock_waits_and_survives_a_killed_holder(tmp_path):
    """The per-key lock that serializes baseline training blocks a second holder, and a holder
    killed by SIGKILL releases it (no stale lock wedges a sweep)."""
    path = str(tmp_path / "b.lock")
    ctx = mp.get_context("fork")
    started = ctx.Event()
    holder = ctx.Process(target=_hold_then_die, args=(path, started))
    holder.start()
    assert started.wait(30)
    f = open(path)
    with pytest.raises(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(30)
    t0 = time.time()
    with runs.file_lock(path):
        assert time.time() - t0 < 5
    f.close()


# ----------------------------------------------------------------------------- checkpoints, logging


def test_atomic_save_never_leaves_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "c/last.pt"
    checkpoint.atomic_save({"a": torch.ones(3)}, path)

    def boom(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # killed in the middle of writing
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_save({"a": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path)["a"], torch.ones(3))


def test_rng_state_roundtrip():
    checkpoint.seed_everything(3)
    st = checkpoint.rng_state()
    a = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    checkpoint.set_rng_state(st)
    b = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_jsonl_resume_drops_steps_after_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lg = JsonlLogger(path)
    for e in (1, 2, 3):
        lg.log_metrics({"epoch": e}, step=2 * e)
    with open(path, "a") as f:
        f.write('{"epoch": 4, "trunc')  # cut short by a kill
    JsonlLogger(path, keep_until_step=5)  # a checkpoint at step 5, inside epoch 3
    assert [l for l in path.read_text().splitlines()] == ['{"epoch": 1, "step": 2}', '{"epoch": 2, "step": 4}']
    JsonlLogger(path)  # a fresh run starts a fresh file
    assert not path.exists()


def test_wandb_mode_resolution(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_mode("auto") == "offline"  # never a login prompt
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled" and resolve_mode("offline") == "offline"


def test_wandb_unavailable_is_a_noop(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    lg = make_wandb(LoggerConfig(mode="offline"), run_dir=tmp_path, name="x")
    assert type(lg) is Logger
    lg.log_metrics({"top1": 1.0}, 1)
    lg.finish()
    assert "W&B off" in capsys.readouterr().err
    assert type(make_wandb(LoggerConfig(mode="disabled"), run_dir=tmp_path, name="x")) is Logger


@pytest.mark.slow
def test_wandb_offline_writes_under_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    lg = make_wandb(LoggerConfig(histogram_every=1), run_dir=tmp_path, name="t")
    assert type(lg).__name__ == "WandbLogger", "offline W&B should start without a key"
    lg.log_config({"a": 1})
    lg.log_layer_stats({"layer1": {"rel_error": 0.5}}, step=1)
    lg.log_metrics({"epoch": 1, "top1": 50.0, "phase": "train",
                    "layer_stats": {"l1": {"rel_error": 0.5}, "l2": {"rel_error": 0.7}}}, step=2)
    lg.log_summary({"final_top1": 50.0, "grad": "luq4"})
    lg.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_fnt_keeps_only_the_forward_weight_quantizer():
    from lowprec import fwd_recipe

    f = T.fnt_fwd(fwd_recipe("int4"))
    assert f.weight == fwd_recipe("int4").weight and f.act is None
