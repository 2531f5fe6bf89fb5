"""Plain configuration objects, and the one conversion from a composed Hydra config to them.

`experiment_from_cfg` is the one place a Hydra config becomes plain objects (DataSpec, ModelSpec,
GradRecipe, FwdRecipe via `instantiate`; TrainConfig / OptimConfig / SchedConfig / LoggerConfig
dataclasses for the rest).

Experiment identity. A run is compared with the fp32/fp32 run that shares every setting that
changes what is trained except the recipes: `Experiment.identity` is that set, as plain data (the
model and data options, optimizer, schedule, the trainer options in IDENTITY_TRAINER, and the
weight-N:M settings); `Experiment.key` is its hash (sha256 of the sorted JSON, first 16 hex
digits). Recipes (fwd/grad) and run-local settings (resume, device, workers, threads, logging,
paths, baseline mode, eval batch size, checkpoint cadence, stats) are not part of it.
`Experiment.baseline_match` is the one projection of it onto the run index's columns; run.py,
the index and the summaries all use these three.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .logging import LoggerConfig

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
BASELINE_MODES = ("auto", "skip", "require")
CONVERT_OPTIONS = ("skip", "weight_nm", "weight_nm_every", "weight_nm_transposable")
ADAPT_POLICIES = ("none", "smp", "fallback", "late_hp", "switch_at")  # lowprec.adapt

# Trainer options that change what is trained (and so must match between a run and its baseline).
IDENTITY_TRAINER = ("epochs", "fnt_epochs", "batch_size", "seed", "bf16", "max_steps",
                    "limit_batches", "skip_nonfinite", "fnt_steps")
# Options added after run indexes existed: left out of the identity while at these defaults, so
# the keys (and baselines) of runs made before them stay valid.
IDENTITY_NEW_DEFAULTS = {"trainer": {"fnt_steps": 0}, "optim": {"clip_grad": 0.0},
                         "sched": {"warmup_steps": 0}}
# The identity's trainer fields that are also index columns (readable, and indexed for lookup).
MATCH_TRAINER = ("epochs", "fnt_epochs", "seed", "batch_size")


def register_resolvers() -> None:
    """Register the OmegaConf resolvers conf/ uses (idempotent; call before composing).

    ${lowprec_or:a,b,...}: the first non-empty argument (run dir name when there are no overrides).
    ${lowprec_run_name:overrides,default,seed}: a run dir name (lowprec.runs.run_dir_name).
    """
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver(
        "lowprec_or", lambda *xs: next((str(x) for x in xs if x not in (None, "")), ""),
        replace=True)
    from .runs import run_dir_name

    OmegaConf.register_new_resolver(
        "lowprec_run_name", lambda overrides, default, seed: run_dir_name(str(overrides or ""),
                                                                          str(default), seed),
        replace=True)


@dataclass(frozen=True)
class OptimConfig:
    """conf/optim. Weight decay applies to weights (tensors with ndim > 1), not to biases,
    normalization parameters or embeddings (lowprec.optim.make_optimizer). clip_grad: the global
    gradient norm is clipped to it before each step (0: off)."""
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9          # sgd
    nesterov: bool = False         # sgd
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    eps: float = 1e-8              # adamw
    clip_grad: float = 0.0         # max global L2 norm of the gradient; 0: no clipping

    def __post_init__(self):
        _choice("optim.name", self.name, OPTIMIZERS)
        if isinstance(self.clip_grad, bool) or not isinstance(self.clip_grad, (int, float)) \
                or not self.clip_grad >= 0:
            raise ValueError(f"optim.clip_grad={self.clip_grad!r}: expected a number >= 0 (0: off)")
        _positive("optim.lr", self.lr)
        if not self.lr <= MAX_LR:
            raise ValueError(f"optim.lr={self.lr!r}: expected a finite number <= {MAX_LR:g} (the "
                             "fp32 weights could not hold the update)")
        _positive("optim.eps", self.eps)
        if not math.isfinite(self.eps):
            raise ValueError(f"optim.eps={self.eps!r}: expected a finite number > 0")
        betas = self.betas
        if (not isinstance(betas, (list, tuple)) or len(betas) != 2
                or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1
                       for b in betas)):
            raise ValueError(f"optim.betas={list(betas) if isinstance(betas, tuple) else betas!r}: "
                             "expected [beta1, beta2], each in [0, 1)")
        if not (0 <= self.weight_decay < math.inf) or not 0 <= self.momentum < 1:
            raise ValueError(f"optim: weight_decay={self.weight_decay} must be >= 0 and "
                             f"momentum={self.momentum} in [0, 1)")
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ValueError("optim.nesterov=true needs optim=sgd with momentum > 0")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))


@dataclass(frozen=True)
class SchedConfig:
    """conf/sched: the learning-rate factor per optimizer step of the low-precision epochs.
    cosine: to lr*min_lr_ratio; step: times gamma at each milestone (fractions of the epochs);
    constant. Linear warmup from 0 over warmup_epochs, or over warmup_steps optimizer steps (for
    a step budget, trainer.max_steps), for all three."""
    name: str = "cosine"
    warmup_epochs: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0                    # cosine
    milestones: tuple[float, ...] = (0.5, 0.75)  # step
    gamma: float = 0.1                           # step

    def __post_init__(self):
        _choice("sched.name", self.name, SCHEDULES)
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        for k, ok, want in (("warmup_epochs", 0 <= self.warmup_epochs < math.inf, "a finite number >= 0"),
                            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "a number in [0, 1]"),
                            ("gamma", 0 < self.gamma <= 1, "a number in (0, 1]")):
            if not ok:
                raise ValueError(f"sched.{k}={getattr(self, k)!r}: expected {want}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) \
                or self.warmup_steps < 0:
            raise ValueError(f"sched.warmup_steps={self.warmup_steps!r}: expected an integer >= 0")
        if self.warmup_steps and self.warmup_epochs:
            raise ValueError(f"sched.warmup_steps={self.warmup_steps} and sched.warmup_epochs="
                             f"{self.warmup_epochs}: set one of them")
        if any(not 0 < m < 1 for m in self.milestones):
            raise ValueError(f"sched.milestones={list(self.milestones)}: fractions of the epochs, "
                             "each in (0, 1)")


# The trainer defaults have one owner: conf/trainer/default.yaml (with their documentation).
# TrainConfig reads them from it, resolved without a model (a model's `train_defaults`, which
# the YAML selects with ${oc.select:model.train_defaults.<key>,<default>}, apply only in a run).
TRAINER_DEFAULTS_YAML = Path(__file__).resolve().parents[1] / "conf" / "trainer" / "default.yaml"


def trainer_defaults() -> dict[str, Any]:
    """conf/trainer/default.yaml as plain values (the defaults of TrainConfig)."""
    from omegaconf import OmegaConf

    root = OmegaConf.create({"model": {}, "trainer": OmegaConf.load(TRAINER_DEFAULTS_YAML)})
    return OmegaConf.to_container(root, resolve=True)["trainer"]


_D = trainer_defaults()


@dataclass(frozen=True)
class TrainConfig:
    """conf/trainer plus the optimizer and schedule: everything the loop needs besides the
    data, the model and the recipes. Defaults and their meaning: conf/trainer/default.yaml."""
    epochs: int = _D["epochs"]
    fnt_epochs: int = _D["fnt_epochs"]
    batch_size: int = _D["batch_size"]        # global batch (divided over DDP ranks)
    eval_batch_size: int = _D["eval_batch_size"]
    workers: int = _D["workers"]
    seed: int = _D["seed"]
    device: str = _D["device"]                # auto | cpu | cuda | cuda:N
    bf16: bool = _D["bf16"]
    deterministic: bool = _D["deterministic"]
    checkpoint_every: int = _D["checkpoint_every"]  # epochs; 0: only at the end
    checkpoint_steps: int = _D["checkpoint_steps"]  # steps inside an epoch; 0: off
    resume: bool = _D["resume"]
    baseline: str = _D["baseline"]            # auto | skip | require
    stats_every: int = _D["stats_every"]
    max_steps: int = _D["max_steps"]          # > 0: a step budget (lowprec.budget)
    fnt_steps: int = _D["fnt_steps"]
    eval_every: int = _D["eval_every"]
    limit_batches: int = _D["limit_batches"]
    dry_run: int = _D["dry_run"]              # > 0: N steps on synthetic inputs (lowprec.dry_run)
    dry_run_batch: int = _D["dry_run_batch"]  # 0: automatic
    skip_nonfinite: bool = _D["skip_nonfinite"]
    max_skip_frac: float = _D["max_skip_frac"]
    threads: int = _D["threads"]
    # Noise monitor and adaptive precision (lowprec.adapt; not in the identity: a fixed and an
    # adaptive run share their fp32 baseline, and the monitor does not change training)
    noise_every: int = _D["noise_every"]
    adapt: str = _D["adapt"]                  # none | smp | fallback | late_hp | switch_at
    adapt_switch_step: int = _D["adapt_switch_step"]  # switch_at: steps done before the switch
    adapt_tau: float = _D["adapt_tau"]
    adapt_patience: int = _D["adapt_patience"]
    adapt_max_samples: int = _D["adapt_max_samples"]
    adapt_fallback: str = _D["adapt_fallback"]
    adapt_r: str = _D["adapt_r"]              # exact | two_draw | full
    noise_window: int = _D["noise_window"]    # r_full's window (lowprec.noise_full); 0: not measured
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)

    def __post_init__(self):
        _choice("trainer.baseline", self.baseline, BASELINE_MODES)
        for k in ("bf16", "deterministic", "resume", "skip_nonfinite"):
            if not isinstance(getattr(self, k), bool):
                raise ValueError(f"trainer.{k}={getattr(self, k)!r}: expected true or false")
        if isinstance(self.max_skip_frac, bool) or not isinstance(self.max_skip_frac, (int, float)) \
                or not 0 <= self.max_skip_frac <= 1:
            raise ValueError(f"trainer.max_skip_frac={self.max_skip_frac!r}: expected a number in [0, 1]")
        _choice("trainer.adapt", self.adapt, ADAPT_POLICIES)
        _choice("trainer.adapt_r", self.adapt_r, ("exact", "two_draw", "full"))
        if self.adapt_r == "full" and self.noise_window == 0:
            raise ValueError("trainer.adapt_r=full needs trainer.noise_window > 0 (r_full is measured over it)")
        _positive("trainer.adapt_tau", self.adapt_tau)
        if self.adapt not in ("none", "switch_at") and not self.noise_every:
            raise ValueError(f"trainer.adapt={self.adapt} needs trainer.noise_every > 0 (it acts on measured r)")
        if self.adapt == "switch_at" and (isinstance(self.adapt_switch_step, bool) or not isinstance(
                self.adapt_switch_step, int) or self.adapt_switch_step < 1):
            raise ValueError(f"trainer.adapt_switch_step={self.adapt_switch_step!r}: trainer.adapt=switch_at "
                             "needs an integer >= 1 (the steps done before every layer switches)")
        for k in ("adapt_patience", "adapt_max_samples"):
            if isinstance(getattr(self, k), bool) or not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise ValueError(f"trainer.{k}={getattr(self, k)!r}: expected an integer >= 1")
        for k in ("epochs", "fnt_epochs", "workers", "checkpoint_every", "checkpoint_steps", "stats_every",
                  "max_steps", "limit_batches", "threads", "fnt_steps", "eval_every", "noise_every", "noise_window",
                  "adapt_switch_step",
                  "dry_run", "dry_run_batch"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"trainer.{k}={v!r}: expected an integer >= 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"trainer.seed={self.seed!r}: expected an integer in [0, 2**63)")
        if self.threads > max_threads():
            raise ValueError(f"trainer.threads={self.threads}: at most {max_threads()} on this "
                             f"machine (4 x its {os.cpu_count()} CPUs); 0: torch's default")
        from .recipes import grad_recipe  # the names trainer.adapt_fallback may take
        try:
            grad_recipe(self.adapt_fallback)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"trainer.adapt_fallback={self.adapt_fallback!r}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else 'unknown'}") from None
        if self.epochs + self.fnt_epochs < 1:
            raise ValueError("trainer.epochs + trainer.fnt_epochs must be >= 1")
        if self.fnt_steps and not self.max_steps:
            raise ValueError(f"trainer.fnt_steps={self.fnt_steps} needs a step budget "
                             "(trainer.max_steps > 0); with epochs use trainer.fnt_epochs")
        if self.max_steps and self.fnt_epochs:
            raise ValueError(f"trainer.fnt_epochs={self.fnt_epochs} with trainer.max_steps="
                             f"{self.max_steps}: a step budget takes trainer.fnt_steps")
        _positive("trainer.batch_size", self.batch_size)
        _positive("trainer.eval_batch_size", self.eval_batch_size)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"trainer.device={self.device!r}; expected auto, cpu, cuda or cuda:N")


MAX_LR = 1e30  # optim.lr above it is an input error (fp32 tops out at 3.4e38)


def max_threads() -> int:
    """The largest trainer.threads accepted: 4 x the CPUs of this machine."""
    return 4 * (os.cpu_count() or 1)


def _choice(name, v, allowed):
    if v not in allowed:
        raise ValueError(f"{name}={v!r}; expected one of {allowed}")


def _positive(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ValueError(f"{name}={v!r}: expected a number > 0")


def _from_node(cls, node: dict, group: str, **extra):
    """Build a config dataclass; an unknown key is a ValueError naming the valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(node) - names)
    if bad:
        raise ValueError(f"{group}: unknown option {bad[0]!r}; valid: {sorted(names - set(extra))}")
    return cls(**node, **extra)


# ----------------------------------------------------------------------------- experiment


def identity_key(identity: dict[str, Any]) -> str:
    """The hash of an experiment identity (the index's `key` column)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Experiment:
    """Everything one run needs, as plain objects."""
    names: dict[str, str]     # config choice names: model, data, fwd, grad
    data: Any                 # lowprec.data.DataSpec
    model: Any                # lowprec.models.ModelSpec
    fwd: Any                  # FwdRecipe
    grad: Any                 # GradRecipe
    convert: dict[str, Any]   # convert() options: skip, weight_nm, weight_nm_every, ...
    trainer: TrainConfig
    logger: LoggerConfig
    run_dir: Path
    index: Path
    identity: dict[str, Any]  # the settings a baseline must share (module docstring)
    config: dict[str, Any]    # the resolved config, for resolved_config.yaml and W&B
    name: str | None = None   # the `experiment=` option (e.g. small/luq_table/luq4); None: none

    @property
    def key(self) -> str:
        return identity_key(self.identity)

    @property
    def baseline_match(self) -> dict[str, Any]:
        """The index columns a baseline row must equal: model and data names, the identity's
        readable trainer fields, and the key (which covers the rest of the identity)."""
        return {"model": self.names["model"], "data": self.names["data"],
                **{k: self.identity["trainer"][k] for k in MATCH_TRAINER}, "key": self.key}

    @property
    def is_baseline(self) -> bool:
        """fp32 forward and exact gradients: this run is its own baseline."""
        return bool(self.grad.identity and self.fwd.weight is None and self.fwd.act is None)


def experiment_identity(c: dict[str, Any]) -> dict[str, Any]:
    """The identity of a resolved config (a plain dict, as OmegaConf.to_container gives)."""
    conv = c.get("convert") or {}
    nm = conv.get("weight_nm")

    def known(group, d):  # drop the newer options at their defaults (IDENTITY_NEW_DEFAULTS)
        new = IDENTITY_NEW_DEFAULTS[group]
        return {k: v for k, v in d.items() if not (k in new and v in (None, new[k]))}

    return {"model": c["model"], "data": c["data"], "optim": known("optim", c["optim"]),
            "sched": known("sched", c["sched"]),
            "trainer": known("trainer", {k: c["trainer"].get(k) for k in IDENTITY_TRAINER}),
            "weight_nm": [None if nm is None else list(nm), conv.get("weight_nm_every")]
            + ([bool(conv.get("weight_nm_transposable", True))] if nm else [])}


def experiment_from_cfg(cfg, *, names: dict[str, str], run_dir: str | os.PathLike,
                        name: str | None = None) -> Experiment:
    """The one conversion from a composed Hydra config to plain objects. Raises ValueError (also
    via Hydra's InstantiationException) for impossible options, before anything is built."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=True)
    c.pop("hydra", None)
    grad, fwd = instantiate(cfg.grad), instantiate(cfg.fwd)
    data, model = instantiate(cfg.data), instantiate(cfg.model)
    optim = _from_node(OptimConfig, c["optim"], "optim")
    sched = _from_node(SchedConfig, c["sched"], "sched")
    trainer = _from_node(TrainConfig, c["trainer"], "trainer", optim=optim, sched=sched)
    logger = _from_node(LoggerConfig, c["logger"], "logger")
    conv = dict(c.get("convert") or {})
    bad = sorted(set(conv) - set(CONVERT_OPTIONS))
    if bad:
        raise ValueError(f"convert: unknown option {bad[0]!r}; valid: {', '.join(CONVERT_OPTIONS)}")
    if conv.get("weight_nm") is not None:
        nm = conv["weight_nm"]
        if (not isinstance(nm, (list, tuple)) or len(nm) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) for v in nm)):
            raise ValueError(f"convert.weight_nm={nm!r}: expected [N, M] (two integers) or null")
        if not 1 <= nm[0] <= nm[1]:
            raise ValueError(f"convert.weight_nm={list(nm)}: expected [N, M] with 1 <= N <= M")
        conv["weight_nm"] = tuple(nm)
    every = conv.get("weight_nm_every", 1)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"convert.weight_nm_every={every!r}: expected an integer >= 1 (forward "
                         "calls between weight-mask recomputations)")
    skip = conv.get("skip")
    if not (skip is None or skip == "first_last" or (isinstance(skip, (list, tuple))
                                                     and all(isinstance(n, str) for n in skip))):
        raise ValueError(f"convert.skip={skip!r}: expected first_last, null, or a list of "
                         "qualified layer names")
    return Experiment(
        names={k: str(names.get(k, "?")) for k in ("model", "data", "fwd", "grad")},
        data=data, model=model, fwd=fwd, grad=grad, convert=conv, trainer=trainer, logger=logger,
        run_dir=Path(run_dir).absolute(), index=Path(c["index"]).absolute(),
        identity=experiment_identity(c), config=c, name=name)
