"""The adaptive-precision controller (lowprec.adapt): it acts on a crafted layer whose r is below
τ and not on one above; the events, metrics records and the update-MAC cost of a tiny LM run are
exactly the expected ones; a run killed mid-way and resumed records the same events and ends
with the same weights; a checkpoint carries the controller state."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch import nn

from lowprec import config
from lowprec import train as T
from lowprec.adapt import Controller, lowp_factor, signature
from lowprec.convert import convert
from lowprec.recipes import grad_recipe

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "sample.txt"


def _crafted(signal: bool):
    """One Linear whose weight gradient is g = Σ_t δ_t a_tᵀ with δ_t = v for every token and
    a_t = ±w: balanced signs make g = 0 exactly (r = 0 < τ); all + make g = T·v wᵀ, far above the
    noise of 64 independent LUQ draws (r ≫ τ)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 4))
    convert(m, grad="luq4", skip=None)
    w = torch.randn(8, generator=torch.Generator().manual_seed(1))
    v = torch.randn(4, generator=torch.Generator().manual_seed(2))
    s = torch.ones(64) if signal else torch.tensor([1.0, -1.0]).repeat(32)
    return m, s[:, None] * w, v.expand(64, 4).contiguous()


def _run(ctl, m, x, delta, steps):
    recs = []
    for i in range(steps):
        ctl.before_step(i)
        m.zero_grad(set_to_none=True)
        m(x).backward(delta)
        recs += ctl.after_step(i + 1, epoch=1, phase="train")
    return recs


@pytest.mark.parametrize("policy", ["smp", "fallback", "late_hp"])
def test_controller_acts_below_tau_only(policy):
    for signal in (False, True):
        m, x, delta = _crafted(signal)
        ctl = Controller(m, noise_every=1, policy=policy, patience=2, max_samples=4)
        recs = _run(ctl, m, x, delta, 6)
        noise = [r for r in recs if "noise/0/r" in r]
        assert len(noise) == 6
        if signal:
            assert all(r["noise/0/r"] > 10 * math.sqrt(3) for r in noise)
            assert ctl.events == [] and m[0].grad_recipe.name == "luq4"
            continue
        # r = 0 while LUQ runs; a layer switched to exact δ has no noise: r = inf
        assert [r["noise/0/r"] for r in noise] == [0.0] * 6 if policy == "smp" else [0.0] * 2 + [math.inf] * 4
        layer = "global" if policy == "late_hp" else "0"
        ev = ctl.events
        if policy == "smp":  # doubled after 2 and 4 measurements, then capped at 4
            assert [(e["step"], e["samples"]) for e in ev] == [(2, 2), (4, 4)]
            assert m[0].grad_recipe.samples == 4 and m[0].grad_recipe.update == grad_recipe("luq4").update
        else:  # switched once, after 2 measurements, then left alone
            assert [(e["step"], e["layer"]) for e in ev] == [(2, layer)]
            assert m[0].grad_recipe == grad_recipe("fp32")
            assert (ctl.late_hp_step == 2) == (policy == "late_hp")
        assert all(e["r"] == 0.0 for e in ev)
        logged = [r for r in recs if r.get("event") == "adapt"]
        assert [(r["layer"], r["step"], r[f"adapt/{layer}/r"]) for r in logged] == \
            [(e["layer"], e["step"], e["r"]) for e in ev]


def test_monitor_off_arms_nothing_and_options_are_checked():
    m, x, delta = _crafted(False)
    ctl = Controller(m)
    assert _run(ctl, m, x, delta, 3) == [] and ctl.summary()["lowp_fraction"] == 1.0
    with pytest.raises(ValueError, match="noise_every"):
        Controller(m, policy="smp")
    with pytest.raises(ValueError, match="trainer.adapt_fallback='nope'"):
        Controller(m, noise_every=1, policy="fallback", fallback="nope")
    assert lowp_factor(grad_recipe("luq4_smp2")) == 2 and lowp_factor(grad_recipe("mvue24_bwd")) == 0
    assert signature({"adapt": "none", "adapt_tau": 9}) == {"policy": "none"}


def _exp(run_dir, *ov):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            "model=chargpt", "data=text", f"data.path={SAMPLE}", "model.kwargs.n_embd=16",
            "model.kwargs.n_head=1", "model.kwargs.block_size=16", "data.val_windows=16",
            "trainer.batch_size=4", "trainer.limit_batches=4", "trainer.max_steps=8", "trainer.eval_every=0",
            "sched.warmup_steps=2", "trainer.threads=1", "logger=none", "grad=luq4", "trainer.device=cpu",
            "trainer.noise_every=2", "trainer.adapt=smp", "trainer.adapt_tau=1e9", "trainer.adapt_patience=1",
            "trainer.adapt_max_samples=8", *ov])
    GlobalHydra.instance().clear()
    return config.experiment_from_cfg(cfg, names={"model": "chargpt", "data": "text", "fwd": "fp32",
                                                  "grad": "luq4"}, run_dir=run_dir)


def _records(exp):
    return [json.loads(x) for x in (exp.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_events_cost_and_resume_on_a_tiny_lm(tmp_path, monkeypatch):
    """τ huge and patience 1: every measurement (steps 2, 4, 6, 8) doubles every layer's SMP
    count up to 8, so steps 1-2 run 1 draw, 3-4 two, 5-6 four, 7-8 eight: lowp_fraction =
    (2·1 + 2·2 + 2·4 + 2·8) / 8 = 3.75 exactly, whatever the layer sizes. The update MACs are
    Σ_layers weight elements × tokens (4 windows × 16) × 8 steps. Then the same run killed at
    step 7 (checkpoint after epoch 1 = step 4) and resumed: same events, same weights."""
    exp = _exp(tmp_path / "a")
    s = T.train(exp)
    assert s["lowp_fraction"] == 3.75 and s["steps"] == 8
    layers = s["adapt_layers"]
    assert len(layers) == s["converted_layers"] == 8  # chargpt: 4 Linears per block, 2 blocks
    assert all(v["samples"] == 8 and not v["fallback"] for v in layers.values())
    model_macs = sum(p.numel() for n, p in _weights(exp).items() if n.rsplit(".", 1)[0] in layers)
    assert s["update_macs"] == model_macs * 4 * 16 * 8
    ev = s["adapt_events"]
    assert [(e["step"], e["samples"]) for e in ev] == [(st, k) for st, k in ((2, 2), (4, 4), (6, 8))
                                                       for _ in layers]
    recs = _records(exp)
    noise = [r for r in recs if "noise/global/r" in r]
    assert [r["step"] for r in noise] == [2, 4, 6, 8]
    assert all(f"noise/{n}/r" in r and f"noise/{n}/r2" in r for r in noise for n in layers)
    logged = [(r["step"], r["layer"], r["r"]) for r in recs if r.get("event") == "adapt"]
    assert logged == [(e["step"], e["layer"], e["r"]) for e in ev]
    assert s["adapt"] == {"policy": "smp", "tau": 1e9, "patience": 1, "r": "exact", "every": 2,
                          "max_samples": 8}

    # kill (a planted error) at step 7, resume from the step-4 checkpoint in the same directory
    b = _exp(tmp_path / "b")
    monkeypatch.setenv("LOWPREC_TEST_RAISE_AT", "step7")
    with pytest.raises(ValueError, match="planted"):
        T.train(b)
    monkeypatch.delenv("LOWPREC_TEST_RAISE_AT")
    ck = torch.load(b.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ck["scheduler"]["step"] == 4 and len(ck["extra"]["adapt"]["events"]) == 2 * len(layers)
    s2 = T.train(_exp(tmp_path / "b", "trainer.resume=true"))
    for k in ("adapt_events", "adapt_layers", "lowp_fraction", "update_macs", "weights_sha256", "val_loss"):
        assert s2[k] == s[k], k
    strip = [{k: v for k, v in r.items() if k not in ("epoch_time", "img_per_s")} for r in _records(b)]
    assert strip == [{k: v for k, v in r.items() if k not in ("epoch_time", "img_per_s")} for r in recs]


def _weights(exp):
    from lowprec.models import build_model

    m = build_model(exp.model, num_classes=100, in_channels=1, image_size=16)
    return {n: p for n, p in m.named_parameters() if n.endswith("weight") and p.ndim == 2}


def test_monitor_does_not_change_training(tmp_path):
    """noise_every on (adapt=none) trains the same weights as off."""
    a = T.train(_exp(tmp_path / "on", "trainer.adapt=none", "trainer.max_steps=4"))
    b = T.train(_exp(tmp_path / "off", "trainer.adapt=none", "trainer.noise_every=0", "trainer.max_steps=4"))
    assert a["weights_sha256"] == b["weights_sha256"] and a["lowp_fraction"] == b["lowp_fraction"] == 1.0


def test_smp_cap_that_is_not_a_power_of_two_is_never_exceeded():
    """Guards `min(2·s, max)` dropped from the SMP doubling: with a cap of 6 the draws go
    1 → 2 → 4 → 6 and stay there (caps 4, 8, 16 are reached by doubling exactly, so they cannot
    tell). The crafted layer has g = 0, r = 0 < τ at every measurement."""
    m, x, delta = _crafted(False)
    ctl = Controller(m, noise_every=1, policy="smp", patience=1, max_samples=6)
    recs = _run(ctl, m, x, delta, 6)
    acts = [r["action"] for r in recs if r.get("event") == "adapt"]
    assert acts == ["smp 1->2", "smp 2->4", "smp 4->6"]
    assert m[0].grad_recipe.samples == 6 and ctl.summary()["adapt_layers"]["0"]["samples"] == 6


def _fake_ratios(r):
    return {"0": {"r": r, "r2": r}, "global": {"r": r, "r2": r}}


@pytest.mark.parametrize("policy", ["smp", "fallback", "late_hp"])
def test_tau_patience_and_cadence_at_values_that_are_not_powers_of_two(policy):
    """Guards `<` → `<=` at τ (τ = 1.5), `>=` → `>` on the patience count or a fixed count
    (patience = 3), the below-τ count not restarting at r = τ, and the measurement cadence
    (noise_every = 3 measures after steps 3, 6, 9, not 1, 4, 7). Decisions are driven directly
    with given ratios so the thresholds are exact."""
    m, _, _ = _crafted(False)
    ctl = Controller(m, noise_every=3, policy=policy, tau=1.5, patience=3, max_samples=6)
    armed = []
    for step in range(9):
        ctl.before_step(step)
        armed.append(ctl.armed)
        ctl.armed = False
    assert [i for i, a in enumerate(armed) if a] == [2, 5, 8]
    seq = [1.49, 1.49, 1.5, 1.49, 1.49, 1.49, 1.49, 1.49]  # r = τ is not below τ: the count restarts
    acted = [i for i, r in enumerate(seq) if ctl._decide(i, _fake_ratios(r))]
    assert acted[0] == 5  # the third consecutive measurement below τ after the reset at index 2
    if policy == "smp":
        assert acted == [5]  # the count restarts after an action: next at index 8


def test_adapt_table_reports_where_r_and_r_full_cross_sqrt3(tmp_path):
    """adapt_table's section: the first step below √3 of lowprec's whole-model r and of the
    paper's r_full (noise/global/r_full), averaged over the seeds that crossed, 'never' when none
    did, '—' when no seed logged it; the figure draws both. Guards `<` vs `<=` at √3 too: a
    value of exactly √3 is not a crossing."""
    from types import SimpleNamespace

    from lowprec import adapt_table
    from lowprec.noise import TAU

    def run(seed, r_full):
        d = tmp_path / f"s{seed}"
        d.mkdir()
        recs = [{"step": st, "noise/global/r": 4.0, "noise/0/r": 4.0,
                 **({"noise/global/r_full": v} if v is not None else {})}
                for st, v in zip((10, 20, 30, 40), r_full)]
        recs.append({"step": 40, "val_loss": 2.5})
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in recs) + "\n")
        return {"seed": seed, "run_dir": str(d), "summary": json.dumps({"lowp_fraction": 1.0})}

    spec = SimpleNamespace(label="luq4", grad="luq4", fwd="fp32")
    t = {"spec": spec, "runs": [run(0, (3.0, TAU, 1.5, 1.0)), run(1, (2.0, 1.7, 1.2, 1.0)),
                                run(2, (3.0, 3.0, 3.0, 3.0))]}
    line = adapt_table.section_md([t]).splitlines()[-1]
    assert line.endswith("| never (3 seeds) | 25 (2 of 3 seeds) |"), line
    t2 = {"spec": spec, "runs": [run(3, (None,) * 4)]}
    assert adapt_table.section_md([t2]).splitlines()[-1].endswith("| never (1 seeds) | — |")
    adapt_table.plot_r_gap([t], tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_switch_at_switches_every_layer_at_its_step_whatever_r_says():
    for signal in (False, True):  # r = 0 or r >> tau: the fixed switch does not read it
        m, x, delta = _crafted(signal)
        ctl = Controller(m, policy="switch_at", switch_step=3)  # no monitor needed
        names = []
        for i in range(5):
            ctl.before_step(i)
            m.zero_grad(set_to_none=True)
            m(x).backward(delta)
            recs = ctl.after_step(i + 1, epoch=1, phase="train")
            names.append(m[0].grad_recipe.name)
            assert [r["step"] for r in recs] == ([3] if i + 1 == 3 else [])
        assert names == ["luq4", "luq4", "fp32", "fp32", "fp32"]
        assert ctl.late_hp_step == 3 and [(e["step"], e["layer"], e["r"]) for e in ctl.events] == [(3, "global", None)]
        assert ctl.summary()["adapt"] == {"policy": "switch_at", "step": 3, "fallback": "fp32"}
    with pytest.raises(ValueError, match="trainer.adapt_switch_step=0"):
        config.TrainConfig(adapt="switch_at")


def test_switch_at_trains_the_fixed_run_until_its_step(tmp_path):
    """A switch after the last step is the fixed run, weight for weight; a switch half-way keeps
    the update GEMMs low precision for exactly half of the MACs and then trains differently."""
    fixed = T.train(_exp(tmp_path / "fixed", "trainer.adapt=none", "trainer.noise_every=0"))
    late = T.train(_exp(tmp_path / "late", "trainer.adapt=switch_at", "trainer.adapt_switch_step=8",
                        "trainer.noise_every=0"))
    half = T.train(_exp(tmp_path / "half", "trainer.adapt=switch_at", "trainer.adapt_switch_step=4",
                        "trainer.noise_every=0"))
    assert late["weights_sha256"] == fixed["weights_sha256"] and late["late_hp_step"] == 8
    assert half["weights_sha256"] != fixed["weights_sha256"]
    assert half["late_hp_step"] == 4 and half["lowp_fraction"] == 0.5
