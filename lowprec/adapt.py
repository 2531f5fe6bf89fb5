"""The noise monitor's schedule, the adaptive-precision controller, and the update-GEMM cost.

Monitor (`trainer.noise_every = k > 0`): before every k-th optimizer step (steps k, 2k, … counted
from 1) every converted layer is armed (`QLinear.arm_noise`); after the step its weight-gradient
noise sums are read (`pop_noise`) and turned into r (exact) and r2 (two-draw) per layer and for
the whole model (lowprec.noise). Logged as one metrics.jsonl record with flat keys
`noise/<layer>/r`, `noise/<layer>/r2`, `noise/global/r`, `noise/global/r2` (W&B gets the same
names). Each layer's extra draw takes a torch.Generator seeded from (trainer.seed, rank, step,
layer index) and a copy of the layer's estimator state, so the training draws, and the trained
weights, are those of the same run with the monitor off. Cost when on: per measured step and
layer two more update GEMMs (the exact one and ĝ₂'s) plus the recipe's update draws once more;
off: nothing but the cost accounting below (a loop over the layers per step). Under DDP each rank
measures its local gradient and the sums are averaged over the ranks, so decisions agree.

The paper's whole-model ratio (lowprec.noise_full, `trainer.noise_window = W > 0`, default 8): at
the same steps, a second quantized backward of a copy of the model and two exact half-batch
backwards give one `noise.full_terms`; `noise/global/r_full` (and `_se`) over the last W of them
join the record. `measure_full` runs between the step's backward and its clipping (train._step).

Controller (`trainer.adapt`; reads r, or r2 with `trainer.adapt_r=two_draw`, or the whole-model
r_full with `trainer.adapt_r=full` — then smp and fallback read r_full for every layer; τ =
`trainer.adapt_tau`, default √3; "stays below" = `trainer.adapt_patience` consecutive
measurements with r < τ):
- none: only measure;
- smp: a layer whose r stays below τ gets its SMP count doubled (at most
  `trainer.adapt_max_samples`, default 16); the count of measurements below τ then restarts;
- fallback: such a layer's grad recipe becomes `trainer.adapt_fallback` (default fp32: exact δ)
  for the rest of training (its estimator state is reset);
- late_hp: when the whole-model r stays below τ, every layer switches to `trainer.adapt_fallback`
  for the rest of training; the step is recorded (`late_hp_step`);
- switch_at: the same switch at a fixed step, after `trainer.adapt_switch_step` steps, whatever r
  says (no measurement needed): the control for late_hp, with the LR schedule of the same run
  (FNT instead restarts its own schedule); `late_hp_step` records it too.
Only layers whose update GEMM is estimated are acted on (not FNT's exact phase, not a layer
already switched). Each decision is an event: a metrics.jsonl record {"event": "adapt", "layer",
"action", "r", "step", …} with W&B keys `adapt/<layer>/r` and `adapt/<layer>/samples`,
`adapt/<layer>/fallback` or `adapt/global/late_hp`; the summary lists them all (`adapt_events`).

Cost: `lowp_fraction` = Σ_steps Σ_layers s_l·M_l / Σ_steps Σ_layers M_l, M_l the update-GEMM
multiply-accumulates of converted layer l in that step (weight elements × tokens) and s_l its SMP
count when its update GEMM is low precision (an update estimator on δ or on a), else 0: fixed luq4
gives 1.0, SMP-2 everywhere 2.0, fp32 0. Only converted layers count (the first/last layers kept
in high precision are in neither sum).

State (`state_dict`, plain containers; the checkpoint's "extra"/"adapt"): per-layer SMP count,
fallback flag and below-τ count, the global count, late_hp_step, the events, the MAC sums, the
r_full window. On
resume `load_state_dict` re-applies the recipe changes to layers that still have the experiment's
recipe (not in FNT), without resetting the estimator state the checkpoint restored, so a resumed
run takes the same steps and records the same events.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .config import ADAPT_POLICIES
from .convert import converted_layers
from .distributed import Dist, all_gather
from .noise import global_ratios, layer_ratios
from .noise_full import FullMonitor
from .recipes import grad_recipe

__all__ = ["Controller", "signature", "lowp_factor"]

_R_KEYS = {"exact": "r", "two_draw": "r2", "full": "r_full"}  # trainer.adapt_r -> the ratio read


def signature(t: Any) -> dict[str, Any]:
    """The controller settings that change training, as plain data ({"policy": "none"} when off);
    `t` a TrainConfig or the trainer dict of a resolved config. Summaries record it, and tables
    tell a fixed run from an adaptive one of the same recipe by it."""
    get = (lambda k, dflt: t.get(k, dflt)) if isinstance(t, dict) else (lambda k, dflt: getattr(t, k, dflt))
    policy = get("adapt", "none")
    if policy == "none":
        return {"policy": "none"}
    if policy == "switch_at":
        return {"policy": policy, "step": int(get("adapt_switch_step", 0)),
                "fallback": str(get("adapt_fallback", "fp32"))}
    sig = {"policy": policy, "tau": float(get("adapt_tau", 3 ** 0.5)), "patience": int(get("adapt_patience", 3)),
           "r": get("adapt_r", "exact"), "every": int(get("noise_every", 0))}
    if sig["r"] == "full":
        sig["window"] = int(get("noise_window", 8))
    if policy == "smp":
        sig["max_samples"] = int(get("adapt_max_samples", 16))
    else:
        sig["fallback"] = str(get("adapt_fallback", "fp32"))
    return sig


def lowp_factor(recipe) -> int:
    """Update GEMMs in low precision per step: the SMP count if the update GEMM is estimated, else 0."""
    low = recipe.update is not None or getattr(recipe, "act_upd", None) is not None
    return int(recipe.samples) if low else 0


class Controller:
    """Noise monitor schedule + adaptive precision + cost accounting for one model (module docstring)."""

    def __init__(self, model: nn.Module, *, noise_every: int = 0, policy: str = "none",
                 tau: float = 3 ** 0.5, patience: int = 3, max_samples: int = 16, fallback: str = "fp32",
                 r: str = "exact", seed: int = 0, rank: int = 0, window: int = 8, switch_step: int = 0):
        if policy not in ADAPT_POLICIES:
            raise ValueError(f"trainer.adapt={policy!r}; expected one of {ADAPT_POLICIES}")
        if policy not in ("none", "switch_at") and not noise_every:
            raise ValueError(f"trainer.adapt={policy} needs trainer.noise_every > 0 (it acts on measured r)")
        if r == "full" and not window:
            raise ValueError("trainer.adapt_r=full needs trainer.noise_window > 0 (r_full is measured over it)")
        try:
            self.fallback = grad_recipe(fallback)
        except ValueError as e:
            raise ValueError(f"trainer.adapt_fallback={fallback!r}: {e}") from None
        self.model, self.layers = model, dict(converted_layers(model))
        self.base = {n: m.grad_recipe for n, m in self.layers.items()}
        self.sig = signature({"adapt": policy, "adapt_tau": tau, "adapt_patience": patience, "adapt_r": r,
                              "noise_every": noise_every, "adapt_max_samples": max_samples,
                              "adapt_fallback": fallback, "noise_window": window,
                              "adapt_switch_step": switch_step})
        self.every, self.policy, self.tau, self.patience = noise_every, policy, float(tau), patience
        self.switch_step = switch_step
        self.max_samples, self.r_key, self.seed, self.rank = max_samples, _R_KEYS[r], seed, rank
        self.full = FullMonitor(window if noise_every else 0, seed=seed, rank=rank)
        self.state = {n: {"samples": int(g.samples), "fallback": False, "below": 0} for n, g in self.base.items()}
        self.global_below = 0
        self.late_hp_step: int | None = None
        self.events: list[dict[str, Any]] = []
        self.macs_total = self.macs_lowp = 0
        self.armed = False

    @classmethod
    def from_trainer(cls, t, model: nn.Module, rank: int = 0) -> "Controller":
        return cls(model, noise_every=t.noise_every, policy=t.adapt, tau=t.adapt_tau, patience=t.adapt_patience,
                   max_samples=t.adapt_max_samples, fallback=t.adapt_fallback, r=t.adapt_r, seed=t.seed, rank=rank,
                   window=t.noise_window, switch_step=t.adapt_switch_step)

    # ---- per step
    def before_step(self, step: int, batch=None, bf16: bool = False) -> None:
        """Arm every layer when optimizer step `step` (0-based) is a measured one; with the step's
        batch `(x, y)`, also start the r_full measurement (before arming: the copy is unarmed)."""
        self.armed = bool(self.every) and (step + 1) % self.every == 0
        if not self.armed:
            return
        if batch is not None:
            self.full.start(self.model, step, *batch, bf16=bf16)
        for i, m in enumerate(self.layers.values()):
            gen = torch.Generator(device=m.weight.device)
            gen.manual_seed(((self.seed * 1_000_003 + self.rank) * 1_000_003 + step) * 1009 + i)
            m.arm_noise(gen)

    def measure_full(self, model: nn.Module, d: Dist | None = None) -> None:
        """After the step's backward, before clipping: one r_full measurement (if started)."""
        self.full.measure(model, d)

    def after_step(self, step: int, d: Dist | None = None, **context) -> list[dict[str, Any]]:
        """Account the step's update MACs; on a measured step read r, decide, and return the
        records to log (`step` = steps done; `context`, e.g. epoch and phase, goes into each)."""
        for n, m in self.layers.items():
            macs = m.pop_update_macs()
            self.macs_total += macs
            self.macs_lowp += macs * lowp_factor(m.grad_recipe)
        switched = self._switch_at(step, context)
        if not self.armed:
            return switched
        self.armed = False
        self.full.drop()  # started but not measured: a skipped step
        terms = {n: t for n, t in ((n, m.pop_noise()) for n, m in self.layers.items()) if t is not None}
        if d is not None and d.world > 1:
            every = all_gather(terms, d)
            terms = {n: {k: sum(t[n][k] for t in every) / len(every) for k in terms[n]} for n in terms}
        if not terms:  # e.g. a skipped step that never ran backward
            return []
        ratios = {n: layer_ratios(t) for n, t in terms.items()}
        ratios["global"] = global_ratios(terms)
        full = self.full.record()
        if full:
            ratios["global"]["r_full"] = full["noise/global/r_full"]
        rec = {**context, "noise_step": step}
        for n, rr in ratios.items():
            rec[f"noise/{n}/r"], rec[f"noise/{n}/r2"] = rr["r"], rr["r2"]
        rec.update(full)
        self.full.last = None
        return [rec, *switched, *(self._event(e, context) for e in self._decide(step, ratios))]

    def _switch_at(self, step: int, context: dict[str, Any]) -> list[dict[str, Any]]:
        """switch_at: every layer to the fallback once `step` steps are done (the fixed control)."""
        if self.policy != "switch_at" or self.late_hp_step is not None or step < self.switch_step:
            return []
        self.late_hp_step = step
        for n, st in self.state.items():
            st["fallback"] = True
            self._apply(n, reset=True)
        e = {"step": step, "layer": "global", "action": f"switch_at {self.fallback.name}", "r": None}
        self.events.append(e)
        return [self._event(e, context)]

    # ---- decisions
    def _low(self, n: str) -> bool:
        return not self.state[n]["fallback"] and self.layers[n].grad_recipe.update is not None

    def _decide(self, step: int, ratios: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
        new = []
        if self.r_key not in ratios["global"]:  # r_full not measured at this step
            return new
        if self.policy in ("smp", "fallback"):
            for n, st in self.state.items():
                if n not in ratios or not self._low(n):
                    continue
                r = ratios[n].get(self.r_key, ratios["global"][self.r_key])  # r_full: whole model
                st["below"] = st["below"] + 1 if r < self.tau else 0
                if st["below"] < self.patience:
                    continue
                if self.policy == "smp" and st["samples"] < self.max_samples:
                    old, st["samples"] = st["samples"], min(2 * st["samples"], self.max_samples)
                    self._apply(n)
                    new.append({"step": step, "layer": n, "action": f"smp {old}->{st['samples']}", "r": r,
                                "samples": st["samples"]})
                elif self.policy == "fallback":
                    st["fallback"] = True
                    self._apply(n, reset=True)
                    new.append({"step": step, "layer": n, "action": f"fallback {self.fallback.name}", "r": r})
                st["below"] = 0
        elif self.policy == "late_hp" and self.late_hp_step is None:
            r = ratios["global"][self.r_key]
            self.global_below = self.global_below + 1 if r < self.tau else 0
            if self.global_below >= self.patience and any(self._low(n) for n in self.state):
                self.late_hp_step = step
                for n, st in self.state.items():
                    st["fallback"] = True
                    self._apply(n, reset=True)
                new.append({"step": step, "layer": "global", "action": f"late_hp {self.fallback.name}", "r": r})
        self.events.extend(new)
        return new

    def _event(self, e: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        n = e["layer"]
        rec = {**context, "event": "adapt", "policy": self.policy, **e, f"adapt/{n}/r": e["r"]}
        if "samples" in e:
            rec[f"adapt/{n}/samples"] = e["samples"]
        elif n == "global":
            rec["adapt/global/late_hp"] = 1
        else:
            rec[f"adapt/{n}/fallback"] = 1
        return rec

    def _apply(self, n: str, *, reset: bool = False) -> None:
        """Give layer n the recipe its state says (reset: a new estimator starts from fresh state)."""
        m, st, base = self.layers[n], self.state[n], self.base[n]
        if st["fallback"]:
            m.grad_recipe = self.fallback
        elif st["samples"] != base.samples:
            m.grad_recipe = dataclasses.replace(base, name=f"{base.name}@smp{st['samples']}", samples=st["samples"])
        else:
            m.grad_recipe = base
        if reset:
            m.reset_lp_state()

    # ---- checkpoint and summary
    def state_dict(self) -> dict[str, Any]:
        return {"layers": {n: dict(st) for n, st in self.state.items()}, "global_below": self.global_below,
                "late_hp_step": self.late_hp_step, "events": [dict(e) for e in self.events],
                "macs_total": self.macs_total, "macs_lowp": self.macs_lowp, "full_window": self.full.state_dict()}

    def load_state_dict(self, sd: dict[str, Any] | None) -> None:
        """Restore `state_dict()` (None: a checkpoint without controller state, nothing to do) and
        re-apply its recipe changes to the layers that still run the experiment's recipe."""
        if not sd:
            return
        unknown = sorted(set(sd["layers"]) - set(self.state))
        if unknown:
            raise ValueError(f"adapt state: layer {unknown[0]!r} is not a converted layer of this model")
        self.state = {n: dict(st) for n, st in sd["layers"].items()}
        self.global_below, self.late_hp_step = sd["global_below"], sd["late_hp_step"]
        self.events = [dict(e) for e in sd["events"]]
        self.macs_total, self.macs_lowp = sd["macs_total"], sd["macs_lowp"]
        self.full.load_state_dict(sd.get("full_window"))  # absent in older checkpoints
        for n, m in self.layers.items():
            if m.grad_recipe == self.base[n]:
                self._apply(n)

    def summary(self) -> dict[str, Any]:
        return {"adapt": dict(self.sig),
                "lowp_fraction": self.macs_lowp / self.macs_total if self.macs_total else None,
                "update_macs": self.macs_total, "noise_every": self.every, "late_hp_step": self.late_hp_step,
                "adapt_events": [dict(e) for e in self.events],
                "adapt_layers": {n: {"grad": m.grad_recipe.name, "samples": int(m.grad_recipe.samples),
                                     "fallback": self.state[n]["fallback"]} for n, m in self.layers.items()}}
