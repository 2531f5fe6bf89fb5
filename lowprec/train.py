"""The training loop: plain objects in, a summary dict out.

`train` reads top to bottom: set up (data, model, one `convert(...)` call — the only place
quantization appears — optimizer, loaders), resume, epochs (the low-precision ones, then the FNT
ones), save. `train_and_record` adds summary.json and the run-index row. The configuration
objects live in config.py, DDP set-up in distributed.py, checkpoints and RNG in checkpoint.py.

Reproducibility: everything is seeded from trainer.seed; the data order of epoch e comes from a
sampler seeded with seed+e (DistributedSampler, also with one process), and a checkpoint
(checkpoint.py) written at epoch ends holds everything later steps depend on. A run killed at
any point and restarted with trainer.resume=true in the same directory re-trains from the last
checkpoint and ends with the same weights and the same top-1 as an uninterrupted run.

DDP (torchrun): trainer.batch_size is the global batch (split over ranks); the model is wrapped
in DDP after convert(); only rank 0 evaluates, logs, checkpoints and writes the index.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from . import runs
from ._common import NonFiniteError
from .checkpoint import (Progress, atomic_write_text, kill_point, load_checkpoint,
                         save_checkpoint, seed_everything, weights_hash)
from .config import Experiment, OptimConfig, SchedConfig
from .convert import collect_stats, convert, set_recipes
from .distributed import Dist, all_true, broadcast, mean_over_ranks, setup_distributed
from .logging import JsonlLogger, Logger, MultiLogger, make_wandb

FNT_GRAD = "fp32"  # FNT epochs: exact δ


def fnt_fwd(fwd):
    """FNT (LUQ §FNT): everything in high precision except the weights, still quantized in forward."""
    return dataclasses.replace(fwd, name=f"{fwd.name}_weights_only", act=None)


def enter_fnt(model: nn.Module, exp: Experiment) -> None:
    if not (exp.grad.identity and exp.fwd.act is None):
        set_recipes(model, grad=FNT_GRAD, fwd=fnt_fwd(exp.fwd), reset_state=True)


# ----------------------------------------------------------------------------- the loop


def train(exp: Experiment, datasets=None, *, dist: Dist | None = None,
          finalize=None) -> dict[str, Any]:
    """Train `exp` (resuming from run_dir/checkpoints/last.pt when trainer.resume); return the
    results: final/best top-1, top-5, steps, wall time, weights hash, or `finalize(results)`
    (the summary, also sent to the logger). Rank 0 writes metrics.jsonl and checkpoints.
    `dist`: the process's DDP set-up (run.py makes it once); None sets it up here."""
    t = exp.trainer
    d = dist if dist is not None else setup_distributed(t.device)
    r = _set_up(exp, datasets, d)
    prog = Progress()
    if t.resume and r.ckpt_path.exists():
        def resumed_inside_fnt(epoch):
            if epoch > t.epochs:
                enter_fnt(r.core, exp)
        prog = load_checkpoint(r.ckpt_path, model=r.core, optimizer=r.opt, key=exp.key,
                               names=exp.names, d=d, before_layer_state=resumed_inside_fnt)
    logger = _start_logging(exp, r.report, prog, d)
    model = r.core
    if d.world > 1:  # wrap AFTER convert: DDP must see the converted modules' parameters
        model = nn.parallel.DistributedDataParallel(
            r.core, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    model.train()
    t0 = time.time()
    for epoch in range(prog.epoch, r.total_epochs):
        if t.max_steps and prog.step >= t.max_steps:
            break
        if epoch == t.epochs:
            enter_fnt(r.core, exp)
        _end_epoch(exp, r, prog, _train_epoch(exp, r, model, prog, epoch, logger, d), logger, d)
        kill_point("epoch_logged")
        prog.epoch = epoch + 1
        stop = prog.epoch == r.total_epochs or bool(t.max_steps and prog.step >= t.max_steps)
        if stop or (t.checkpoint_every and prog.epoch % t.checkpoint_every == 0):
            save_checkpoint(r.ckpt_path, model=r.core, optimizer=r.opt, progress=prog,
                            elapsed=prog.elapsed + time.time() - t0, key=exp.key,
                            names=exp.names, d=d)
    prog.last, prog.best = broadcast((prog.last, prog.best), d)  # only rank 0 evaluated
    if prog.last is None:  # nothing trained (max_steps=... already reached at the checkpoint)
        raise ValueError("no epoch was run: nothing to report")
    result = {"final_top1": prog.last["top1"], "final_top5": prog.last["top5"],
              "best_top1": prog.best, "steps": prog.step, "skipped_steps": prog.skipped,
              "wall_time": prog.elapsed + time.time() - t0, "weights_sha256": weights_hash(r.core),
              "world_size": d.world, "device": str(d.device),
              "converted_layers": r.report.num_converted,
              "status": run_status(prog.skipped, prog.step, t.max_skip_frac)}
    if d.main and prog.skipped:
        print(f"skipped {prog.skipped} of {prog.step} steps ({100 * prog.skipped / prog.step:.1f}%, "
              f"non-finite loss or gradient; trainer.max_skip_frac={t.max_skip_frac}): "
              f"status {result['status']}", flush=True)
    if finalize is not None:
        result = finalize(result)
    logger.log_summary(result)
    logger.finish()
    return result


def run_status(skipped: int, steps: int, max_skip_frac: float) -> str:
    """ok, or diverged when more than max_skip_frac of the steps were skipped as non-finite."""
    return "diverged" if steps and skipped / steps > max_skip_frac else "ok"


# ----------------------------------------------------------------------------- set-up


@dataclass
class _Run:
    """What the epoch helpers share: the converted model, its optimizer, data and sizes."""
    core: nn.Module            # the converted model (not DDP-wrapped)
    report: Any                # convert()'s ConvertReport
    opt: torch.optim.Optimizer
    ds: Any                    # lowprec.data.Datasets
    sampler: DistributedSampler
    test_loader: DataLoader
    per_rank: int              # batch size per rank
    drop_last: bool
    spe: int                   # optimizer steps per epoch
    total_epochs: int
    ckpt_path: Path


def _set_up(exp: Experiment, datasets, d: Dist) -> _Run:
    """Data, model, convert(), optimizer and loaders, seeded from trainer.seed."""
    from .data import build_datasets
    from .models import build_model

    t, dev = exp.trainer, d.device
    if t.threads:
        torch.set_num_threads(t.threads)
    if dev.type == "cuda":
        torch.backends.cudnn.deterministic = t.deterministic
        torch.backends.cudnn.benchmark = not t.deterministic
    if t.batch_size % d.world:
        raise ValueError(f"trainer.batch_size={t.batch_size} is not divisible by {d.world} ranks")
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
    test_loader = DataLoader(ds.test, batch_size=t.eval_batch_size, shuffle=False,
                             num_workers=t.workers, pin_memory=dev.type == "cuda")
    return _Run(core=model, report=report, opt=opt, ds=ds, sampler=sampler,
                test_loader=test_loader, per_rank=per_rank, drop_last=drop_last,
                spe=min(n_batches, t.limit_batches) if t.limit_batches else n_batches,
                total_epochs=t.epochs + t.fnt_epochs,
                ckpt_path=exp.run_dir / "checkpoints" / "last.pt")


def _start_logging(exp: Experiment, report, prog: Progress, d: Dist) -> Logger:
    """Rank 0: print the conversion report, the resume status; metrics.jsonl and W&B."""
    if not d.main:
        return Logger()
    print(report if len(str(report).splitlines()) <= 12 else str(report).splitlines()[0])
    if exp.trainer.resume:
        print(f"resume: {'from epoch ' + str(prog.epoch) if prog.resumed else 'no checkpoint, from scratch'}"
              f" in {exp.run_dir}")
    n = exp.names
    logger = MultiLogger(
        JsonlLogger(exp.run_dir / "metrics.jsonl",
                    keep_until_epoch=prog.epoch if prog.resumed else None),
        make_wandb(exp.logger, run_dir=exp.run_dir,
                   name=f"{n['model']}-{n['data']}-{n['fwd']}-{n['grad']}-s{exp.trainer.seed}"))
    logger.log_config(exp.config)
    return logger


def make_optimizer(model: nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)


# ----------------------------------------------------------------------------- learning rate


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


def _set_lr(opt: torch.optim.Optimizer, exp: Experiment, step: int, spe: int) -> float:
    t = exp.trainer
    lr = t.optim.lr * lr_factor(t.sched, step, steps_per_epoch=spe, epochs=t.epochs,
                                fnt_epochs=t.fnt_epochs)
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


# ----------------------------------------------------------------------------- one epoch


@dataclass
class _Epoch:
    """One epoch's training record (before evaluation)."""
    epoch: int
    phase: str                 # train | fnt
    loss_sum: torch.Tensor
    n_steps: int = 0           # steps taken (not skipped)
    images: int = 0
    lr: float = 0.0
    time: float = 0.0
    stat_sum: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)


def _train_epoch(exp: Experiment, r: _Run, model: nn.Module, prog: Progress, epoch: int,
                 logger: Logger, d: Dist) -> _Epoch:
    t, dev = exp.trainer, d.device
    ep = _Epoch(epoch=epoch, phase="train" if epoch < t.epochs else "fnt",
                loss_sum=torch.zeros((), device=dev))
    r.sampler.set_epoch(epoch)
    loader = DataLoader(r.ds.train, batch_size=r.per_rank, sampler=r.sampler,
                        num_workers=t.workers, drop_last=r.drop_last,
                        pin_memory=dev.type == "cuda",
                        generator=torch.Generator().manual_seed(t.seed + epoch))
    bar = None
    if d.main and sys.stdout.isatty():
        from tqdm import tqdm
        bar = tqdm(total=r.spe * t.batch_size, unit="img", unit_scale=True, leave=False,
                   desc=f"epoch {epoch + 1}/{r.total_epochs} {ep.phase}", dynamic_ncols=True)
    te = time.time()
    for i, (x, y) in enumerate(loader):
        if i >= r.spe or (t.max_steps and prog.step >= t.max_steps):
            break
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        ep.lr = _set_lr(r.opt, exp, prog.step, r.spe)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=t.bf16):
            loss = F.cross_entropy(model(x).float(), y)
        if _step(loss, r, prog, d, t.skip_nonfinite):
            ep.loss_sum += loss.detach()
            ep.n_steps += 1
        else:
            prog.skipped += 1
        prog.step += 1
        ep.images += x.shape[0] * d.world
        kill_point(f"step{prog.step}")
        if t.stats_every and prog.step % t.stats_every == 0:
            _collect_stats(r.core, ep, logger, prog.step)
        if bar is not None:
            bar.update(x.shape[0] * d.world)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{ep.lr:.3g}", refresh=False)
    if bar is not None:
        bar.close()
    ep.time = time.time() - te
    return ep


def _step(loss: torch.Tensor, r: _Run, prog: Progress, d: Dist, skip_nonfinite: bool) -> bool:
    """Backward and optimizer step; False when the step is skipped for a non-finite loss, δ or
    gradient (trainer.skip_nonfinite; otherwise such a step raises)."""
    if not _finite(loss, d, skip_nonfinite):
        if not skip_nonfinite:
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {prog.step}; "
                                     "trainer.skip_nonfinite=true skips such steps")
        return False
    r.opt.zero_grad(set_to_none=True)
    if _backward(loss, skip_nonfinite) and _grads_finite(r.core, skip_nonfinite):
        r.opt.step()
        return True
    return False


def _finite(loss: torch.Tensor, d: Dist, agree: bool) -> bool:
    ok = torch.isfinite(loss.detach()).float()
    if agree:  # every rank must take (or skip) the same step, or DDP hangs
        ok = all_true(ok, d)
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


def _collect_stats(core: nn.Module, ep: _Epoch, logger: Logger, step: int) -> None:
    """Per-layer gradient statistics at this step: logged, and summed for the epoch's means."""
    stats = collect_stats(core)
    if stats:
        logger.log_layer_stats(stats, step)
        for layer, s in stats.items():
            for k, v in s.items():
                ep.stat_sum.setdefault(layer, {}).setdefault(k, []).append(v)


def _end_epoch(exp: Experiment, r: _Run, prog: Progress, ep: _Epoch, logger: Logger,
               d: Dist) -> None:
    """Mean train loss over the ranks; rank 0 evaluates, updates best/last, logs and prints."""
    train_loss = (ep.loss_sum / ep.n_steps).item() if ep.n_steps else float("nan")
    train_loss = mean_over_ranks(train_loss, d)  # as the gradient is
    if not d.main:
        return
    top1, top5 = evaluate(r.core, r.test_loader, device=d.device, bf16=exp.trainer.bf16,
                          limit=exp.trainer.limit_batches)
    prog.best = max(prog.best, top1)
    prog.last = {"top1": top1, "top5": top5}
    rec = {"epoch": ep.epoch + 1, "phase": ep.phase, "train_loss": train_loss, "top1": top1,
           "top5": top5, "lr": ep.lr, "epoch_time": ep.time,
           "img_per_s": ep.images / max(ep.time, 1e-9), "skipped_steps": prog.skipped}
    if ep.stat_sum:
        rec["layer_stats"] = {l: {k: sum(v) / len(v) for k, v in s.items()}
                              for l, s in ep.stat_sum.items()}
    logger.log_metrics(rec, prog.step)
    print(f"epoch {ep.epoch + 1}/{r.total_epochs} {ep.phase:5s} loss {train_loss:.4f} "
          f"top1 {top1:6.2f} top5 {top5:6.2f} lr {ep.lr:.4g} {ep.time:5.1f}s "
          f"{rec['img_per_s']:.0f} img/s", flush=True)


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device, bf16: bool, limit: int) -> tuple[float, float]:
    """(top-1 %, top-5 %) on `loader` (top-k with k = min(5, classes)); leaves `model` in
    train mode."""
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


# ----------------------------------------------------------------------------- summary + index


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


def summarize(exp: Experiment, result: dict[str, Any], baseline: dict[str, Any] | None,
              baseline_status: str) -> dict[str, Any]:
    """summary.json content. degradation = baseline top-1 - final top-1 (points; > 0: worse).
    `name`, `identity` and `key` are the experiment's (config.Experiment)."""
    t = exp.trainer
    if exp.is_baseline:
        base_top1, baseline_status, base_dir = result["final_top1"], "self", str(exp.run_dir)
    elif baseline is not None:
        base_top1, base_dir = baseline["final_top1"], baseline["run_dir"]
    else:
        base_top1 = base_dir = None
    return {
        **{k: exp.names[k] for k in ("model", "data", "fwd", "grad")},
        "name": exp.name, "identity": exp.identity,
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
                     baseline_status: str = "no baseline", dist: Dist | None = None) -> dict[str, Any]:
    """Train, then (rank 0) write resolved_config.yaml, summary.json and the index row."""
    from omegaconf import OmegaConf

    d = dist if dist is not None else setup_distributed(exp.trainer.device)
    if d.main:
        exp.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(OmegaConf.to_yaml(OmegaConf.create(exp.config)),
                          exp.run_dir / "resolved_config.yaml")
    try:
        summary = train(exp, datasets, dist=d,
                        finalize=lambda result: summarize(exp, result, baseline, baseline_status))
    except Exception as e:  # the run failed: record it (status failed), then let it propagate
        if d.main:
            _record(exp, summarize(exp, {"final_top1": None, "best_top1": None, "wall_time": None,
                                         "status": "failed",
                                         "error": f"{type(e).__name__}: {str(e).strip()[:500]}"},
                                   None, "no baseline"))
        raise
    if d.main:
        _record(exp, summary)
    return summary


def _record(exp: Experiment, summary: dict[str, Any]) -> None:
    """summary.json (strict JSON) and the index row, in that order (a kill between them is
    repaired by resuming: the row is written again)."""
    atomic_write_text(runs.dumps(summary, indent=2, sort_keys=True) + "\n",
                      exp.run_dir / "summary.json")
    kill_point("summary_written")
    runs.insert(exp.index, summary)
    kill_point("indexed")
