"""The training loop: plain objects in, a summary dict out.

`experiment_from_cfg` is the one place a Hydra config becomes plain objects (DataSpec, ModelSpec,
GradRecipe, FwdRecipe via `instantiate`; TrainConfig / OptimConfig / SchedConfig / LoggerConfig
dataclasses for the rest). `train` is one top-to-bottom loop: build data and model, one
`convert(...)` call (the only place quantization appears), epochs, FNT epochs, checkpoints.
`train_and_record` adds summary.json and the run-index row.

Reproducibility: everything is seeded from trainer.seed; the data order of epoch e comes from a
sampler seeded with seed+e (DistributedSampler, also with one process), and a checkpoint holds
model, optimizer, schedule position, the layers' estimator state and every RNG state (torch, numpy,
python, cuda; one per DDP rank), written at epoch ends. A run killed at any point and restarted
with trainer.resume=true in the same directory re-trains from the last checkpoint and ends with
the same weights and the same top-1 as an uninterrupted run.

DDP (torchrun): process group from RANK/WORLD_SIZE/LOCAL_RANK (gloo on CPU, nccl on CUDA);
trainer.batch_size is the global batch (split over ranks); the model is wrapped in DDP after
convert(); only rank 0 evaluates, logs, checkpoints and writes the index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from . import runs
from ._common import NonFiniteError
from .logging import JsonlLogger, Logger, LoggerConfig, MultiLogger, make_wandb

# ----------------------------------------------------------------------------- plain configs

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
BASELINE_MODES = ("auto", "skip", "require")
FNT_GRAD = "fp32"  # FNT epochs: exact δ


def fnt_fwd(fwd):
    """FNT (LUQ §FNT): everything in high precision except the weights, still quantized in forward."""
    return dataclasses.replace(fwd, name=f"{fwd.name}_weights_only", act=None)


def enter_fnt(model: nn.Module, exp) -> None:
    from .layers import set_recipes

    if not (exp.grad.identity and exp.fwd.act is None):
        set_recipes(model, grad=FNT_GRAD, fwd=fnt_fwd(exp.fwd), reset_state=True)


@dataclass(frozen=True)
class OptimConfig:
    """conf/optim. Weight decay applies to weights (tensors with ndim > 1), not to biases or
    normalization parameters."""
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9          # sgd
    nesterov: bool = False         # sgd
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    eps: float = 1e-8              # adamw

    def __post_init__(self):
        _choice("optim.name", self.name, OPTIMIZERS)
        _positive("optim.lr", self.lr)
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"optim: weight_decay={self.weight_decay} must be >= 0 and "
                             f"momentum={self.momentum} in [0, 1)")
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ValueError("optim.nesterov=true needs optim=sgd with momentum > 0")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))


@dataclass(frozen=True)
class SchedConfig:
    """conf/sched: the learning-rate factor per optimizer step of the low-precision epochs.
    cosine: to lr*min_lr_ratio; step: times gamma at each milestone (fractions of the epochs);
    constant. Linear warmup from 0 over warmup_epochs for all three."""
    name: str = "cosine"
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0                    # cosine
    milestones: tuple[float, ...] = (0.5, 0.75)  # step
    gamma: float = 0.1                           # step

    def __post_init__(self):
        _choice("sched.name", self.name, SCHEDULES)
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        if self.warmup_epochs < 0 or not 0 <= self.min_lr_ratio <= 1 or not 0 < self.gamma <= 1:
            raise ValueError(f"sched: warmup_epochs={self.warmup_epochs} must be >= 0, min_lr_ratio="
                             f"{self.min_lr_ratio} in [0, 1], gamma={self.gamma} in (0, 1]")
        if any(not 0 < m < 1 for m in self.milestones):
            raise ValueError(f"sched.milestones={list(self.milestones)}: fractions of the epochs, "
                             "each in (0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """conf/trainer plus the optimizer and schedule: everything the loop needs besides the
    data, the model and the recipes."""
    epochs: int = 5
    fnt_epochs: int = 0
    batch_size: int = 128         # global batch (divided over DDP ranks)
    eval_batch_size: int = 512
    workers: int = 0
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    bf16: bool = False            # torch.autocast(bfloat16) for forward and loss
    deterministic: bool = True    # cudnn.deterministic; no effect on CPU
    checkpoint_every: int = 1     # epochs; 0: only at the end
    resume: bool = False
    baseline: str = "auto"        # auto | skip | require
    stats_every: int = 0          # steps between per-layer gradient statistics; 0: off
    max_steps: int = 0            # stop after this many optimizer steps (smoke tests); 0: off
    limit_batches: int = 0        # at most this many train and eval batches per epoch; 0: off
    skip_nonfinite: bool = False  # skip steps with a non-finite loss/grad instead of failing
    threads: int = 0              # torch CPU threads (torch.set_num_threads); 0: torch's default
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)

    def __post_init__(self):
        _choice("trainer.baseline", self.baseline, BASELINE_MODES)
        for k in ("epochs", "fnt_epochs", "workers", "checkpoint_every", "stats_every",
                  "max_steps", "limit_batches", "threads"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"trainer.{k}={v!r}: expected an integer >= 0")
        if self.epochs + self.fnt_epochs < 1:
            raise ValueError("trainer.epochs + trainer.fnt_epochs must be >= 1")
        _positive("trainer.batch_size", self.batch_size)
        _positive("trainer.eval_batch_size", self.eval_batch_size)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"trainer.device={self.device!r}; expected auto, cpu, cuda or cuda:N")


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


@dataclass
class Experiment:
    """Everything one run needs, as plain objects."""
    names: dict[str, str]     # config choice names: model, data, fwd, grad
    data: Any                 # lowprec.data.DataSpec
    model: Any                # lowprec.models.ModelSpec
    fwd: Any                  # FwdRecipe
    grad: Any                 # GradRecipe
    convert: dict[str, Any]   # convert() options: skip, weight_nm, weight_nm_every
    trainer: TrainConfig
    logger: LoggerConfig
    run_dir: Path
    index: Path
    key: str                  # hash of the settings a baseline must share (all but fwd/grad)
    config: dict[str, Any]    # the resolved config, for resolved_config.yaml and W&B

    @property
    def is_baseline(self) -> bool:
        """fp32 forward and exact gradients: this run is its own baseline."""
        return bool(self.grad.identity and self.fwd.weight is None and self.fwd.act is None)


# Trainer options that change what is trained (and so must match between a run and its baseline).
_KEY_TRAINER = ("epochs", "fnt_epochs", "batch_size", "seed", "bf16", "max_steps",
                "limit_batches", "skip_nonfinite")


def experiment_from_cfg(cfg, *, names: dict[str, str], run_dir: str | os.PathLike) -> Experiment:
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
    bad = sorted(set(conv) - {"skip", "weight_nm", "weight_nm_every", "weight_nm_transposable"})
    if bad:
        raise ValueError(f"convert: unknown option {bad[0]!r}; valid: skip, weight_nm, weight_nm_every, "
                         "weight_nm_transposable")
    if conv.get("weight_nm") is not None:
        conv["weight_nm"] = tuple(conv["weight_nm"])
    keyed = {"model": c["model"], "data": c["data"], "optim": c["optim"], "sched": c["sched"],
             "trainer": {k: c["trainer"].get(k) for k in _KEY_TRAINER},
             "weight_nm": [conv.get("weight_nm"), conv.get("weight_nm_every")]
             + ([bool(conv.get("weight_nm_transposable", True))] if conv.get("weight_nm") else [])}
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Experiment(
        names={k: str(names.get(k, "?")) for k in ("model", "data", "fwd", "grad")},
        data=data, model=model, fwd=fwd, grad=grad, convert=conv, trainer=trainer, logger=logger,
        run_dir=Path(run_dir).absolute(), index=Path(c["index"]).absolute(), key=key, config=c)


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Read torchrun's environment, pick the device, init the process group once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={device!r} but CUDA is not available")
    if device == "cuda":
        device = f"cuda:{local}"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def broadcast(obj, d: Dist):
    """rank 0's `obj` on every rank."""
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- pieces of the loop


def lr_factor(s: SchedConfig, step: int, *, steps_per_epoch: int, epochs: int,
              fnt_epochs: int) -> float:
    """LR multiplier at optimizer step `step` (0-based). The low-precision epochs follow `s`;
    FNT epochs ramp linearly from the final factor up to 1 over the first half, then linearly
    down to 0 (LUQ's fine-tuning schedule)."""
    main = epochs * steps_per_epoch
    if step >= main:
        total = fnt_epochs * steps_per_epoch
        half = total / 2
        i = step - main
        end = _main_factor(s, main, main, steps_per_epoch)
        if i < half:
            return end + (1 - end) * i / half
        return max(0.0, 1 - (i - half) / (total - half))
    return _main_factor(s, step, main, steps_per_epoch)


def _main_factor(s: SchedConfig, step: int, main: int, spe: int) -> float:
    warm = round(s.warmup_epochs * spe)
    if step < warm:
        return (step + 1) / warm
    if s.name == "constant":
        return 1.0
    if s.name == "step":
        return s.gamma ** sum(step >= m * main for m in s.milestones)
    progress = min(1.0, (step - warm) / max(1, main - warm))
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
          "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# Run-time state of converted layers that is not in state_dict but shapes later steps: the
# estimators' per-layer state (LUQ's in-hindsight max), and the weight-N:M mask with the forward
# count that schedules its recomputation. Checkpoints carry it so that resume is exact.
_LAYER_STATE = ("lp_state", "_lp_nm_calls", "weight_mask")


def layer_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {n: {a: getattr(m, a) for a in _LAYER_STATE if hasattr(m, a)}
            for n, m in model.named_modules() if hasattr(m, "lp_state")}


def load_layer_state(model: nn.Module, states: dict[str, dict[str, Any]]) -> None:
    """After load_state_dict (which resets the weight mask to be recomputed)."""
    mods = dict(model.named_modules())
    for n, st in states.items():
        dev = next(mods[n].parameters()).device
        for a, v in st.items():
            setattr(mods[n], a, _to_device(v, dev))


def _to_device(obj, dev):
    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if isinstance(obj, dict):
        return {k: _to_device(v, dev) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, dev) for v in obj)
    return obj


def weights_hash(model: nn.Module) -> str:
    """sha256 of every parameter and buffer (names and bytes): equal hashes = equal weights."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if isinstance(v, torch.Tensor):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, fsync, then os.replace: a kill leaves the old or the new
    file, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device, bf16: bool, limit: int) -> tuple[float, float]:
    """(top-1 %, top-5 %) on `loader` (top-k with k = min(5, classes))."""
    model.eval()
    n = c1 = c5 = 0
    for i, (x, y) in enumerate(loader):
        if limit and i >= limit:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        top = out.float().topk(min(5, out.shape[1]), dim=1).indices
        hit = top == y[:, None]
        c1 += hit[:, 0].sum().item()
        c5 += hit.any(dim=1).sum().item()
        n += y.numel()
    model.train()
    return 100.0 * c1 / max(n, 1), 100.0 * c5 / max(n, 1)


def describe(obj) -> Any:
    """A recipe / estimator as plain data: class, name, and scalar fields (bits, levels, n, m, ...)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (tuple, list)):
        return [describe(o) for o in obj]
    if dataclasses.is_dataclass(obj):
        out = {"type": type(obj).__name__}
        for prop in ("name", "num_levels"):  # derived values, e.g. LUQ levels=None -> 7
            if hasattr(obj, prop):
                out[prop] = getattr(obj, prop)
        for f in dataclasses.fields(obj):
            out[f.name] = describe(getattr(obj, f.name))
        return out
    return repr(obj)


# ----------------------------------------------------------------------------- the loop


def train(exp: Experiment, datasets=None, *, finalize=None) -> dict[str, Any]:
    """Train `exp` (resuming from run_dir/checkpoints/last.pt when trainer.resume); return the
    results: final/best top-1, top-5, steps, wall time, weights hash, or `finalize(results)`
    (the summary, also sent to the logger). Rank 0 writes metrics.jsonl and checkpoints."""
    from .data import build_datasets
    from .layers import collect_stats, convert, set_recipes
    from .models import build_model

    t = exp.trainer
    if t.threads:
        torch.set_num_threads(t.threads)
    d = setup_distributed(t.device)
    dev = d.device
    if dev.type == "cuda":
        torch.backends.cudnn.deterministic = t.deterministic
        torch.backends.cudnn.benchmark = not t.deterministic
    if t.batch_size % d.world:
        raise ValueError(f"trainer.batch_size={t.batch_size} is not divisible by {d.world} ranks")
    ckpt_path = exp.run_dir / "checkpoints" / "last.pt"

    ds = datasets if datasets is not None else build_datasets(exp.data)
    seed_everything(t.seed)
    model = build_model(exp.model, num_classes=ds.num_classes, in_channels=ds.in_channels,
                        image_size=ds.image_size).to(dev)
    report = convert(model, fwd=exp.fwd, grad=exp.grad, stats_every=t.stats_every, **exp.convert)
    opt = make_optimizer(model, t.optim)
    if d.world > 1:  # decorrelate the estimators' noise across ranks (init above is identical)
        torch.manual_seed(t.seed + 1_000_003 * d.rank)

    sampler = DistributedSampler(ds.train, num_replicas=d.world, rank=d.rank, shuffle=True,
                                 seed=t.seed, drop_last=True)
    per_rank = t.batch_size // d.world
    drop_last = len(sampler) >= per_rank  # a last partial batch of 1 would break BatchNorm
    n_batches = len(sampler) // per_rank if drop_last else math.ceil(len(sampler) / per_rank)
    spe = min(n_batches, t.limit_batches) if t.limit_batches else n_batches
    total_epochs = t.epochs + t.fnt_epochs
    test_loader = DataLoader(ds.test, batch_size=t.eval_batch_size, shuffle=False,
                             num_workers=t.workers, pin_memory=dev.type == "cuda")

    # ---- resume
    start_epoch, step, skipped, best, last, elapsed = 0, 0, 0, -1.0, None, 0.0
    resumed = t.resume and ckpt_path.exists()
    if resumed:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck["key"] != exp.key or ck["names"] != exp.names:
            raise ValueError(f"{ckpt_path} was written by a different configuration "
                             f"({ck['names']}); use another hydra.run.dir or trainer.resume=false")
        model.load_state_dict(ck["model"])
        if ck["epoch"] > t.epochs:  # resumed inside FNT
            enter_fnt(model, exp)
        load_layer_state(model, ck["layer_state"])
        opt.load_state_dict(ck["optimizer"])
        start_epoch, step = ck["epoch"], ck["scheduler"]["step"]
        skipped, best, last, elapsed = ck["skipped"], ck["best_top1"], ck["last"], ck["elapsed"]
        rngs = ck["rng"]
        if len(rngs) == d.world:
            set_rng_state(rngs[d.rank])
        elif d.main:
            print(f"resume: checkpoint from {len(rngs)} ranks, now {d.world}: RNG reseeded",
                  file=sys.stderr)
    if d.main:
        print(report if len(str(report).splitlines()) <= 12 else str(report).splitlines()[0])
        if t.resume:
            print(f"resume: {'from epoch ' + str(start_epoch) if resumed else 'no checkpoint, from scratch'}"
                  f" in {exp.run_dir}")

    logger: Logger = Logger()
    if d.main:
        name = f"{exp.names['model']}-{exp.names['data']}-{exp.names['fwd']}-{exp.names['grad']}"
        logger = MultiLogger(
            JsonlLogger(exp.run_dir / "metrics.jsonl", keep_until_epoch=start_epoch if resumed else None),
            make_wandb(exp.logger, run_dir=exp.run_dir, name=f"{name}-s{t.seed}"))
        logger.log_config(exp.config)

    core = model
    if d.world > 1:  # wrap AFTER convert: DDP must see the converted modules' parameters
        model = nn.parallel.DistributedDataParallel(
            core, device_ids=[dev.index] if dev.type == "cuda" else None)
    model.train()
    tty = d.main and sys.stdout.isatty()
    t0 = time.time()
    for epoch in range(start_epoch, total_epochs):
        if t.max_steps and step >= t.max_steps:
            break
        phase = "train" if epoch < t.epochs else "fnt"
        if epoch == t.epochs:
            enter_fnt(core, exp)
        sampler.set_epoch(epoch)
        loader = DataLoader(ds.train, batch_size=per_rank, sampler=sampler, num_workers=t.workers,
                            drop_last=drop_last, pin_memory=dev.type == "cuda",
                            generator=torch.Generator().manual_seed(t.seed + epoch))
        bar = None
        if tty:
            from tqdm import tqdm
            bar = tqdm(total=spe * t.batch_size, unit="img", unit_scale=True, leave=False,
                       desc=f"epoch {epoch + 1}/{total_epochs} {phase}", dynamic_ncols=True)
        te = time.time()
        loss_sum, n_steps, images = torch.zeros((), device=dev), 0, 0
        stat_sum: dict[str, dict[str, list[float]]] = {}
        lr = 0.0
        for i, (x, y) in enumerate(loader):
            if i >= spe or (t.max_steps and step >= t.max_steps):
                break
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            lr = t.optim.lr * lr_factor(t.sched, step, steps_per_epoch=spe, epochs=t.epochs,
                                        fnt_epochs=t.fnt_epochs)
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=t.bf16):
                loss = F.cross_entropy(model(x).float(), y)
            if not _finite(loss, d, t.skip_nonfinite):
                if not t.skip_nonfinite:
                    raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}; "
                                             "trainer.skip_nonfinite=true skips such steps")
                skipped += 1
            else:
                opt.zero_grad(set_to_none=True)
                if _backward(loss, t.skip_nonfinite) and _grads_finite(core, t.skip_nonfinite):
                    opt.step()
                    loss_sum += loss.detach()
                    n_steps += 1
                else:
                    skipped += 1
            step += 1
            images += x.shape[0] * d.world
            if t.stats_every and step % t.stats_every == 0:
                stats = collect_stats(core)
                if stats:
                    logger.log_layer_stats(stats, step)
                    for layer, s in stats.items():
                        for k, v in s.items():
                            stat_sum.setdefault(layer, {}).setdefault(k, []).append(v)
            if bar is not None:
                bar.update(x.shape[0] * d.world)
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}", refresh=False)
        if bar is not None:
            bar.close()
        epoch_time = time.time() - te
        train_loss = (loss_sum / n_steps).item() if n_steps else float("nan")
        if d.world > 1:  # mean over ranks, as the gradient is
            tl = torch.tensor([train_loss], device=dev)
            dist.all_reduce(tl)
            train_loss = tl.item() / d.world
        top1 = top5 = float("nan")
        if d.main:
            top1, top5 = evaluate(core, test_loader, device=dev, bf16=t.bf16, limit=t.limit_batches)
            model.train()
            best = max(best, top1)
            last = {"top1": top1, "top5": top5}
            rec = {"epoch": epoch + 1, "phase": phase, "train_loss": train_loss, "top1": top1,
                   "top5": top5, "lr": lr, "epoch_time": epoch_time,
                   "img_per_s": images / max(epoch_time, 1e-9), "skipped_steps": skipped}
            if stat_sum:
                rec["layer_stats"] = {l: {k: sum(v) / len(v) for k, v in s.items()}
                                      for l, s in stat_sum.items()}
            logger.log_metrics(rec, step)
            print(f"epoch {epoch + 1}/{total_epochs} {phase:5s} loss {train_loss:.4f} "
                  f"top1 {top1:6.2f} top5 {top5:6.2f} lr {lr:.4g} {epoch_time:5.1f}s "
                  f"{rec['img_per_s']:.0f} img/s", flush=True)
        done = epoch + 1
        stop = done == total_epochs or bool(t.max_steps and step >= t.max_steps)
        if stop or (t.checkpoint_every and done % t.checkpoint_every == 0):
            rngs = [rng_state()]
            if d.world > 1:
                rngs = [None] * d.world
                dist.all_gather_object(rngs, rng_state())
            if d.main:
                atomic_save({
                    "model": core.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": {"step": step}, "epoch": done, "skipped": skipped,
                    "best_top1": best, "last": last, "rng": rngs,
                    "layer_state": layer_state(core),
                    "elapsed": elapsed + time.time() - t0, "key": exp.key, "names": exp.names,
                }, ckpt_path)
    last, best = broadcast((last, best), d)  # only rank 0 evaluated
    if last is None:  # nothing trained (max_steps=... already reached at the checkpoint)
        raise ValueError("no epoch was run: nothing to report")
    result = {"final_top1": last["top1"], "final_top5": last["top5"], "best_top1": best,
              "steps": step, "skipped_steps": skipped, "wall_time": elapsed + time.time() - t0,
              "weights_sha256": weights_hash(core), "world_size": d.world, "device": str(dev),
              "converted_layers": report.num_converted}
    if finalize is not None:
        result = finalize(result)
    logger.log_summary(result)
    logger.finish()
    return result


def _finite(loss: torch.Tensor, d: Dist, agree: bool) -> bool:
    ok = torch.isfinite(loss.detach()).float()
    if agree and d.world > 1:  # every rank must take (or skip) the same step, or DDP hangs
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _backward(loss: torch.Tensor, skip_nonfinite: bool) -> bool:
    """loss.backward(); False when an estimator met a non-finite δ and such steps are skipped
    (the estimators raise NonFiniteError, a ValueError, on NaN/Inf input).
    Under DDP the ranks agree on skipping a non-finite loss (_finite); a δ that turns
    non-finite on one rank only is not coordinated."""
    try:
        loss.backward()
    except NonFiniteError:
        if skip_nonfinite:
            return False
        raise
    return True


def _grads_finite(model: nn.Module, check: bool) -> bool:
    if not check:
        return True
    gs = [p.grad.detach().abs().max() for p in model.parameters() if p.grad is not None]
    return bool(torch.isfinite(torch.stack(gs)).all()) if gs else True


# ----------------------------------------------------------------------------- summary + index


def summarize(exp: Experiment, result: dict[str, Any], baseline: dict[str, Any] | None,
              baseline_status: str) -> dict[str, Any]:
    """summary.json content. degradation = baseline top-1 - final top-1 (points; > 0: worse)."""
    t = exp.trainer
    if exp.is_baseline:
        base_top1, baseline_status, base_dir = result["final_top1"], "self", str(exp.run_dir)
    elif baseline is not None:
        base_top1, base_dir = baseline["final_top1"], baseline["run_dir"]
    else:
        base_top1 = base_dir = None
    return {
        **{k: exp.names[k] for k in ("model", "data", "fwd", "grad")},
        "epochs": t.epochs, "fnt_epochs": t.fnt_epochs, "seed": t.seed,
        "batch_size": t.batch_size, "is_baseline": exp.is_baseline, "key": exp.key,
        **result,
        "baseline_top1": base_top1,
        "degradation": None if base_top1 is None else base_top1 - result["final_top1"],
        "baseline": baseline_status if base_top1 is not None else "no baseline",
        "baseline_run": base_dir,
        "grad_recipe": describe(exp.grad), "fwd_recipe": describe(exp.fwd),
        "convert": {k: describe(v) for k, v in exp.convert.items()},
        "run_dir": str(exp.run_dir),
    }


def train_and_record(exp: Experiment, datasets=None, *, baseline: dict[str, Any] | None = None,
                     baseline_status: str = "no baseline") -> dict[str, Any]:
    """Train, then (rank 0) write resolved_config.yaml, summary.json and the index row."""
    from omegaconf import OmegaConf

    d = setup_distributed(exp.trainer.device)
    if d.main:
        exp.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(OmegaConf.to_yaml(OmegaConf.create(exp.config)),
                          exp.run_dir / "resolved_config.yaml")
    summary = train(exp, datasets,
                    finalize=lambda result: summarize(exp, result, baseline, baseline_status))
    if d.main:
        atomic_write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n",
                          exp.run_dir / "summary.json")
        runs.insert(exp.index, summary)
    return summary
