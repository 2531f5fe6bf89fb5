"""The paper's whole-model ratio wired into training (lowprec.noise_full, lowprec.adapt):
r_full is logged at the monitor's steps of a tiny LM run and training is bit-identical with the
monitor on and off; the second quantized pass replays the step's forward (an exact recipe gives
noise² = 0 exactly) and the halves' term is ⟨g_A, g_B⟩ of a plain-PyTorch reference; the window
survives a checkpoint; `trainer.adapt_r=full` drives the controller; bad keys are input errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowprec import train as T
from lowprec.adapt import Controller
from lowprec.convert import convert
from lowprec.noise_full import FullMonitor

from test_adapt import _exp  # the tiny chargpt run of the controller's tests


def _records(exp):
    return [json.loads(x) for x in (exp.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_r_full_logged_and_training_bit_identical(tmp_path):
    """noise_every=2, window 2 on luq4 with dropout on (the replayed forward must reuse the
    step's dropout masks): r_full, its s.e. and the terms at steps 2, 4, 6; the s.e. is nan with
    one measurement and finite after; r_full is the ratio of the window's sums; weights equal
    to the run with the monitor off (same weights hash)."""
    ov = ("trainer.adapt=none", "trainer.max_steps=6", "trainer.noise_window=2", "model.kwargs.dropout=0.1")
    on = T.train(_exp(tmp_path / "on", *ov))
    off = T.train(_exp(tmp_path / "off", *ov, "trainer.noise_every=0"))
    assert on["weights_sha256"] == off["weights_sha256"]
    recs = [r for r in _records(_exp(tmp_path / "on", *ov)) if "noise/global/r" in r]
    assert [r["step"] for r in recs] == [2, 4, 6]
    s = [r["noise/global/full_signal2"] for r in recs]
    q = [r["noise/global/full_noise2"] for r in recs]
    assert all(v > 0 for v in q)
    assert recs[0]["noise/global/r_full_se"] is None  # nan, which metrics.jsonl writes as null
    assert math.isfinite(recs[2]["noise/global/r_full_se"])
    want = math.sqrt(max(s[1] + s[2], 0) / (q[1] + q[2]))  # window of 2: steps 4 and 6
    assert recs[2]["noise/global/r_full"] == pytest.approx(want, rel=1e-12)


def _tiny(grad):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    ref = copy.deepcopy(m)
    convert(m, grad=grad, skip=None)
    return m, ref


def _step(m, mon, x, y):
    mon.start(m, 0, x, y)
    m.zero_grad(set_to_none=True)
    F.cross_entropy(m(x).float(), y).backward()
    return mon.measure(m)


def test_second_pass_replays_the_forward_and_halves_match_a_reference():
    """fp32 recipes: ĝ₂ = ĝ₁ exactly (noise² = 0), guarding a second pass that redraws the
    forward (the dropout masks) or uses another batch; with dropout on, signal² = ⟨g_A, g_B⟩ of
    the unconverted model on the two halves under the measurement's seed; luq4: noise² > 0 and the model's .grad is still the step's own (the monitor works on
    a copy)."""
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    m, ref = _tiny("fp32")
    t = _step(m, FullMonitor(4), x, y)
    assert t["noise2"] == 0.0
    ga, gb = [], []
    torch.manual_seed(0)  # FullMonitor's seed at seed 0, rank 0, step 0; fp32's backward draws nothing
    for sl, out in ((slice(0, 4), ga), (slice(4, 8), gb)):
        ref.zero_grad(set_to_none=True)
        F.cross_entropy(ref(x[sl]), y[sl]).backward()
        out.append(torch.cat([p.grad.double().reshape(-1) for p in ref.parameters()]))
    assert t["signal2"] == pytest.approx(float(ga[0].dot(gb[0])), rel=1e-6)

    m, _ = _tiny("luq4")
    mon = FullMonitor(4)
    mon.start(m, 0, x, y)
    m.zero_grad(set_to_none=True)
    F.cross_entropy(m(x), y).backward()
    own = [p.grad.clone() for p in m.parameters()]
    rng = torch.get_rng_state()
    assert mon.measure(m)["noise2"] > 0
    assert all(torch.equal(a, p.grad) for a, p in zip(own, m.parameters()))
    assert torch.equal(rng, torch.get_rng_state())  # the training RNG is put back


def test_window_and_checkpoint_state():
    """The window keeps the last W terms; the controller's state_dict carries it and a fresh
    controller loaded from it reports the same r_full."""
    m, _ = _tiny("luq4")
    ctl = Controller(m, noise_every=1, window=2)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for step in range(3):
        ctl.before_step(step, (x, y))
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
        ctl.measure_full(m)
        rec = ctl.after_step(step + 1)[0]
    assert len(ctl.full.window) == 2
    ctl2 = Controller(m, noise_every=1, window=2)
    ctl2.load_state_dict(ctl.state_dict())
    assert ctl2.full.record() == {} and ctl2.full.state_dict() == ctl.full.state_dict()
    from lowprec.noise import full_ratio
    assert rec["noise/global/r_full"] == full_ratio(ctl2.full.state_dict())


@pytest.mark.parametrize("policy", ["late_hp", "fallback"])
def test_adapt_r_full_drives_the_controller(policy):
    """adapt_r=full acts on r_full below τ while lowprec's r stays far above it, and not on a
    step where r_full was not measured; r=exact on the same ratios does not act."""
    def ratios(r_full):
        g = {"r": 9.0, "r2": 9.0, **({"r_full": r_full} if r_full is not None else {})}
        return {**{n: {"r": 9.0, "r2": 9.0} for n in ctl.layers}, "global": g}

    m, _ = _tiny("luq4")
    ctl = Controller(m, noise_every=1, policy=policy, r="full", patience=2)
    assert ctl.sig["r"] == "full" and ctl.sig["window"] == 8
    assert not ctl._decide(0, ratios(1.0))
    assert not ctl._decide(1, ratios(None))  # not measured: nothing counted
    assert ctl._decide(2, ratios(1.0))
    m, _ = _tiny("luq4")
    ctl = Controller(m, noise_every=1, policy=policy, r="exact", patience=1)
    assert not ctl._decide(0, ratios(1.0))


@pytest.mark.parametrize("ov, msg", [(("trainer.adapt_r=full", "trainer.noise_window=0"), "noise_window > 0"),
                                     (("trainer.noise_window=-1",), "noise_window=-1"),
                                     (("trainer.adapt_r=fulll",), "adapt_r")])
def test_bad_keys_are_input_errors(tmp_path, ov, msg):
    with pytest.raises(ValueError, match=msg):
        _exp(tmp_path, *ov)
