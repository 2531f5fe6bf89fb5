"""The training loop: plain objects in, a summary dict out.

`train` reads top to bottom: set up (data, model, one `convert(...)` call — the only place
quantization appears — optimizer, loaders), resume, epochs (the low-precision ones, then the FNT
ones), save. Run preparation (lowprec.prepare) builds the data and the model once, hands them
here, and adds summary.json and the run-index row.

Length: `trainer.epochs` (+ `fnt_epochs`), or a step budget `trainer.max_steps` (+ `fnt_steps`):
then exactly that many optimizer steps are taken, passes over the data ("epochs") repeat as
needed, and the LR schedule (warm-up, cosine, step milestones) spans max_steps instead of
epochs × steps per epoch. That choice is made once, in a `lowprec.budget.Budget` the loop asks. Evaluation at every epoch end, every `trainer.eval_every` steps, and at
the end.

Metric (top-1; validation loss for a language model or masked LM; BLEU, SQuAD F1: the tasks'
loss and evaluation are lowprec.task_loop's), degradation and summary.json: lowprec/summary.py.

The configuration objects live in config.py, DDP set-up in distributed.py, checkpoints and RNG
in checkpoint.py.

Reproducibility: everything is seeded from trainer.seed; the data order of epoch e comes from a
sampler seeded with seed+e (DistributedSampler, also with one process), and a checkpoint
(checkpoint.py) written at epoch ends and every trainer.checkpoint_steps steps inside an epoch
(with the epoch's position and running sums; a resume skips the batches already taken in the
same order) holds everything later steps depend on. A run killed at any point and restarted
with trainer.resume=<run dir> re-trains from the last checkpoint and ends with the same weights,
metrics and top-1 / validation loss as an uninterrupted run.

DDP (torchrun): trainer.batch_size is the global batch (split over ranks); the model is wrapped
in DDP after convert(); only rank 0 evaluates, logs, checkpoints and writes the index.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from .adapt import Controller
from .allocator import info as allocator_info, keep_freed_memory
from ._common import NonFiniteError
from .checkpoint import (Progress, kill_point, load_checkpoint, rng_state,
                         save_checkpoint, seed_everything, set_rng_state, weights_hash)
from .config import Experiment
from .convert import collect_stats, convert, set_recipes
from .distributed import Dist, all_gather, all_true, broadcast, mean_over_ranks, setup_distributed
from .evaluation import metric_text as _metric_text
from .kernels.cpu import backend_info
from .logging import JsonlLogger, Logger, MultiLogger, make_wandb
from .budget import Budget
from .optim import make_optimizer
from .task_loop import check_task, move
from .summary import LN2, baseline_quality, describe, run_status, summarize, summary_lines  # noqa: F401

FNT_GRAD = "fp32"  # FNT epochs: exact δ


def fnt_fwd(fwd):
    """FNT (LUQ §FNT): everything in high precision except the weights, still quantized in forward."""
    return dataclasses.replace(fwd, name=f"{fwd.name}_weights_only", act=None)


def enter_fnt(model: nn.Module, exp: Experiment) -> None:
    if not (exp.grad.identity and exp.fwd.act is None):
        set_recipes(model, grad=FNT_GRAD, fwd=fnt_fwd(exp.fwd), reset_state=True)


# ----------------------------------------------------------------------------- the loop


def train(exp: Experiment, datasets=None, *, dist: Dist | None = None, finalize=None,
          model: "Built | None" = None) -> dict[str, Any]:
    """Train `exp` (resuming from run_dir/checkpoints/last.pt when trainer.resume); return the
    results: final/best top-1, top-5, steps, wall time, weights hash, or `finalize(results)`
    (the summary, also sent to the logger). Rank 0 writes metrics.jsonl and checkpoints.
    `dist`: the process's DDP set-up (None sets it up here); `model`: the model `build(exp, ds)`
    made during run preparation (None builds it here)."""
    d = dist if dist is not None else setup_distributed(exp.trainer.device)
    r = _set_up(exp, datasets, d, model)
    b = r.budget
    prog = _resume(exp, r, d) if exp.trainer.resume and r.ckpt_path.exists() else Progress()
    logger = _start_logging(exp, r.report, prog, d)
    net = r.core
    if d.world > 1:  # wrap AFTER convert: DDP must see the converted modules' parameters
        net = nn.parallel.DistributedDataParallel(
            r.core, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    net.train()
    t0 = time.time()

    def checkpoint(in_epoch: dict | None = None) -> None:
        """last.pt: at an epoch end (in_epoch None) or inside one (its position and accumulators)."""
        prog.extra.update(adapt=r.adapt.state_dict(), in_epoch=in_epoch, config=exp.config)
        save_checkpoint(r.ckpt_path, model=r.core, optimizer=r.opt, progress=prog,
                        elapsed=prog.elapsed + time.time() - t0, key=exp.key, names=exp.names, d=d)
        kill_point(f"checkpointed{prog.step}")

    for epoch in itertools.count(prog.epoch):
        mid = (prog.extra.get("in_epoch") or {}).get("epoch") == epoch  # resumed inside this epoch
        if b.done(epoch, prog.step) and not mid:  # (an older in-epoch checkpoint at the budget's
            break                                 # last step still ends its epoch's record)
        if b.fnt_before_epoch(epoch, mid):
            enter_fnt(r.core, exp)
        ep = _train_epoch(exp, r, net, prog, epoch, logger, d, checkpoint)
        _end_epoch(exp, r, prog, ep, logger, d)
        kill_point("epoch_logged")
        prog.epoch = epoch + 1
        if b.checkpoint_after_epoch(prog.epoch, prog.step) or ep.checkpoint_due:
            checkpoint()
    result = _results(exp, r, prog, d, time.time() - t0)
    if finalize is not None:
        result = finalize(result)
    logger.log_summary(result)
    logger.finish()
    return result


def _resume(exp: Experiment, r: "_Run", d: Dist) -> Progress:
    """Restore last.pt: weights, optimizer, RNG, the layers' state (in FNT's recipes when the
    checkpoint lies after FNT began) and the controller's."""
    def resumed_inside_fnt(epoch, step, extra):
        if r.budget.resumed_in_fnt(epoch, step, bool(extra.get("in_epoch"))):
            enter_fnt(r.core, exp)
    prog = load_checkpoint(r.ckpt_path, model=r.core, optimizer=r.opt, key=exp.key,
                           names=exp.names, d=d, before_layer_state=resumed_inside_fnt)
    r.adapt.load_state_dict(prog.extra.get("adapt"))  # after the layer state (adapt.py)
    return prog


def _results(exp: Experiment, r: "_Run", prog: Progress, d: Dist, ran: float) -> dict[str, Any]:
    """The run's results (before the summary adds the baseline); `ran`: seconds in this process."""
    t = exp.trainer
    prog.last, prog.best = broadcast((prog.last, prog.best), d)  # only rank 0 evaluated
    if prog.last is None:  # nothing trained (max_steps=... already reached at the checkpoint)
        raise ValueError("no epoch was run: nothing to report")
    lm = r.ds.task == "lm"
    result = {"final_top1": prog.last["top1"], "final_top5": prog.last["top5"],
              "best_top1": prog.best, "task": r.ds.task, "num_classes": r.ds.num_classes,
              "metric": r.ds.metric, "val_loss": prog.last.get("val_loss"),
              "best_val_loss": prog.last.get("best_val_loss"),
              "bits_per_char": prog.last["val_loss"] / LN2 if lm and "val_loss" in prog.last else None,
              **{k: prog.last[k] for k in ("bleu", "exact_match", "f1") if k in prog.last},
              "max_steps": t.max_steps, "fnt_steps": t.fnt_steps,
              "steps": prog.step, "skipped_steps": prog.skipped,
              "wall_time": prog.elapsed + ran, "weights_sha256": weights_hash(r.core),
              "world_size": d.world, "device": str(d.device),
              "converted_layers": r.report.num_converted,
              "estimator_backend": backend_info(d.device),  # C twins, torch cores, Triton, reference
              "allocator": allocator_info(),  # glibc keeping freed memory (lowprec.allocator) or not
              **r.adapt.summary()}
    result["status"], result["status_reason"] = run_status(
        prog.skipped, prog.step, t.max_skip_frac, prog.last.get("val_loss"),
        prog.extra.get("train_loss"), r.ds.num_classes)
    if d.main and prog.skipped:
        print(f"skipped {prog.skipped} of {prog.step} steps ({100 * prog.skipped / prog.step:.1f}%, "
              f"non-finite loss or gradient; trainer.max_skip_frac={t.max_skip_frac}): "
              f"status {result['status']}", flush=True)
    return result


# ----------------------------------------------------------------------------- set-up


@dataclass(frozen=True)
class Built:
    """A model built for a run by `build` (run preparation builds it once, so an impossible model
    option is an input error before anything trains) and the RNG state right after building it,
    which `train` restores: the same numbers as building it there."""
    model: nn.Module
    rng: dict


def build(exp: Experiment, ds) -> Built:
    """Seed every RNG from trainer.seed and build the model for `ds` (on the CPU)."""
    from .models import build_model

    seed_everything(exp.trainer.seed)
    model = build_model(exp.model, num_classes=ds.num_classes, in_channels=ds.in_channels,
                        image_size=ds.image_size)
    return Built(model=model, rng=rng_state())


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
    budget: Budget             # the run's clock: length, FNT, checkpoint and evaluation points
    ckpt_path: Path
    evaluated: tuple[int, dict] | None = None  # (step, metrics) of the latest evaluation
    adapt: Any = None          # lowprec.adapt.Controller: noise monitor, adaptive precision, cost


def _set_up(exp: Experiment, datasets, d: Dist, built: Built | None = None) -> _Run:
    """Data, model, convert(), optimizer and loaders, seeded from trainer.seed."""
    from .data import build_datasets

    t, dev = exp.trainer, d.device
    if t.threads:
        torch.set_num_threads(t.threads)
    keep_freed_memory()  # steps reuse freed memory instead of faulting it in again (lowprec.allocator)
    if dev.type == "cuda":
        torch.backends.cudnn.deterministic = t.deterministic
        torch.backends.cudnn.benchmark = not t.deterministic
    ds = datasets if datasets is not None else build_datasets(exp.data)
    if built is None:  # called without run preparation (tests, notebooks)
        check_world(exp, d)
        check_task(exp, ds)
        built = build(exp, ds)
    set_rng_state(built.rng)
    model = built.model.to(dev)
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
    spe = min(n_batches, t.limit_batches) if t.limit_batches else n_batches
    return _Run(core=model, report=report, opt=opt, ds=ds, sampler=sampler,
                test_loader=test_loader, per_rank=per_rank, drop_last=drop_last,
                budget=Budget.from_trainer(t, spe),
                ckpt_path=exp.run_dir / "checkpoints" / "last.pt",
                adapt=Controller.from_trainer(t, model, rank=d.rank))


def _start_logging(exp: Experiment, report, prog: Progress, d: Dist) -> Logger:
    """Rank 0: print the conversion report, the resume status; metrics.jsonl and W&B."""
    if not d.main:
        return Logger()
    print(report if len(str(report).splitlines()) <= 12 else str(report).splitlines()[0])
    if exp.trainer.resume:
        print(f"resume: {f'from epoch {prog.epoch} (step {prog.step})' if prog.resumed else 'no checkpoint, from scratch'}"
              f" in {exp.run_dir}")
    n = exp.names
    logger = MultiLogger(
        JsonlLogger(exp.run_dir / "metrics.jsonl",
                    keep_until_step=prog.step if prog.resumed else None),
        make_wandb(exp.logger, run_dir=exp.run_dir,
                   name=f"{n['model']}-{n['data']}-{n['fwd']}-{n['grad']}-s{exp.trainer.seed}"))
    logger.log_config(exp.config)
    return logger


def check_world(exp: Experiment, d: Dist) -> None:
    """The global batch must split evenly over the DDP ranks."""
    if exp.trainer.batch_size % d.world:
        raise ValueError(f"trainer.batch_size={exp.trainer.batch_size} is not divisible by "
                         f"{d.world} ranks")


def _set_lr(opt: torch.optim.Optimizer, exp: Experiment, step: int, b: Budget) -> float:
    lr = exp.trainer.optim.lr * b.lr_factor(exp.trainer.sched, step)
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
    since_sum: float = 0.0     # train loss summed since the last step evaluation
    since_n: int = 0
    checkpoint_due: bool = False  # a step checkpoint fell on the last step: write it at the end


def _train_epoch(exp: Experiment, r: _Run, model: nn.Module, prog: Progress, epoch: int,
                 logger: Logger, d: Dist, checkpoint=None) -> _Epoch:
    t, dev = exp.trainer, d.device
    b = r.budget
    ep = _Epoch(epoch=epoch, phase=b.phase(epoch, prog.step), loss_sum=torch.zeros((), device=dev))
    done = _restore_epoch(ep, prog, d)  # batches of this epoch a mid-epoch checkpoint had taken
    r.sampler.set_epoch(epoch)
    loader = DataLoader(r.ds.train, batch_size=r.per_rank, sampler=r.sampler,
                        num_workers=t.workers, drop_last=r.drop_last,
                        pin_memory=dev.type == "cuda",
                        generator=torch.Generator().manual_seed(t.seed + epoch))
    bar = None
    if d.main and sys.stdout.isatty():
        from tqdm import tqdm
        bar = tqdm(total=b.steps_per_epoch * t.batch_size, unit="img", unit_scale=True, leave=False,
                   desc=f"epoch {epoch + 1}/{b.total_epochs} {ep.phase}", dynamic_ncols=True)
    te = time.time() - ep.time
    for i, (x, y) in enumerate(loader):
        if i >= b.steps_per_epoch or b.epoch_full(prog.step):
            break
        if i < done:  # the same sampler order (seeded by epoch): these were trained before the kill
            continue
        if b.fnt_before_step(prog.step):  # the step budget's FNT phase starts
            enter_fnt(r.core, exp)
            ep.phase = "fnt"
        x, y = x.to(dev, non_blocking=True), move(y, dev)
        ep.lr = _set_lr(r.opt, exp, prog.step, b)
        r.adapt.before_step(prog.step, (x, y), t.bf16)  # (x, y): the r_full measurement's batch
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=t.bf16):
            loss = r.ds.loss(model, x, y, prog.step, t.seed)  # lowprec.data / task_loop
        if _step(loss, r, prog, d, t.skip_nonfinite, t.optim.clip_grad):
            ep.loss_sum += loss.detach()
            ep.n_steps += 1
            ep.since_sum += loss.item() if t.eval_every else 0.0
            ep.since_n += 1
        else:
            prog.skipped += 1
        prog.step += 1
        for rec in r.adapt.after_step(prog.step, d, epoch=ep.epoch + 1, phase=ep.phase):
            logger.log_metrics(rec, prog.step)
        if b.eval_at_step(prog.step):
            _eval_step(exp, r, prog, ep, logger, d)
        ep.images += x.shape[0] * d.world
        kill_point(f"step{prog.step}")
        if b.stats_at_step(prog.step):
            _collect_stats(r.core, ep, logger, prog.step)
        if checkpoint is not None and b.checkpoint_at_step(prog.step):
            if i + 1 >= b.steps_per_epoch or b.epoch_full(prog.step):
                ep.checkpoint_due = True  # the epoch's last step: after its record (resumable)
            else:
                ep.time = time.time() - te
                checkpoint(_epoch_state(ep, i + 1, d))
        if bar is not None:
            bar.update(x.shape[0] * d.world)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{ep.lr:.3g}", refresh=False)
    if bar is not None:
        bar.close()
    ep.time = time.time() - te
    return ep


def _epoch_state(ep: _Epoch, batches: int, d: Dist) -> dict:
    """What a mid-epoch checkpoint keeps of the epoch in progress (plain data; the loss sums of
    every rank, which rank 0 writes)."""
    return {"epoch": ep.epoch, "batches": batches, "phase": ep.phase, "n_steps": ep.n_steps,
            "loss_sum": all_gather(float(ep.loss_sum), d), "since_sum": all_gather(ep.since_sum, d),
            "images": ep.images, "lr": ep.lr, "time": ep.time, "stat_sum": ep.stat_sum, "since_n": ep.since_n}


def _restore_epoch(ep: _Epoch, prog: Progress, d: Dist) -> int:
    """Refill `ep` from a mid-epoch checkpoint of this epoch (consumed once); the batches it had taken."""
    st = prog.extra.get("in_epoch")
    if not st or st["epoch"] != ep.epoch:
        return 0
    prog.extra["in_epoch"] = None
    rank = d.rank if len(st["loss_sum"]) == d.world else 0  # another world size: rank 0's sums
    ep.loss_sum = torch.tensor(st["loss_sum"][rank], dtype=torch.float32, device=d.device)
    ep.since_sum = st["since_sum"][rank]
    for k in ("phase", "n_steps", "images", "lr", "time", "stat_sum", "since_n"):
        setattr(ep, k, st[k])
    return st["batches"]


def _step(loss: torch.Tensor, r: _Run, prog: Progress, d: Dist, skip_nonfinite: bool,
          clip_grad: float = 0.0) -> bool:
    """Backward, gradient-norm clipping (optim.clip_grad > 0) and optimizer step; False when the
    step is skipped for a non-finite loss, δ or gradient (trainer.skip_nonfinite; otherwise such
    a step raises)."""
    if not _finite(loss, d, skip_nonfinite):
        if not skip_nonfinite:
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {prog.step}; "
                                     "trainer.skip_nonfinite=true skips such steps")
        return False
    r.opt.zero_grad(set_to_none=True)
    if _backward(loss, skip_nonfinite) and _grads_finite(r.core, skip_nonfinite):
        r.adapt.measure_full(r.core, d)  # r_full at a monitored step: on a copy, .grad untouched
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(r.core.parameters(), clip_grad)
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
    if not math.isnan(train_loss):  # the divergence rule reads the last epoch that took steps
        prog.extra["train_loss"] = train_loss
    if not d.main:
        return
    m = _evaluated(exp, r, prog, d)
    rec = {"epoch": ep.epoch + 1, "phase": ep.phase, "train_loss": train_loss, **m,
           "lr": ep.lr, "epoch_time": ep.time,
           "img_per_s": ep.images / max(ep.time, 1e-9), "skipped_steps": prog.skipped}
    if ep.stat_sum:
        rec["layer_stats"] = {l: {k: sum(v) / len(v) for k, v in s.items()}
                              for l, s in ep.stat_sum.items()}
    logger.log_metrics(rec, prog.step)
    print(f"{r.budget.where_epoch(ep.epoch, prog.step)} {ep.phase:5s} train loss {train_loss:.4f} "
          f"(epoch mean) {_metric_text(m)} lr {ep.lr:.4g} "
          f"{ep.time:5.1f}s {rec['img_per_s']:.0f} samples/s", flush=True)


def _evaluated(exp: Experiment, r: _Run, prog: Progress, d: Dist) -> dict:
    """Rank 0: evaluate at this step (once per step) and update prog.best / prog.last."""
    if r.evaluated is not None and r.evaluated[0] == prog.step:
        return r.evaluated[1]
    m = r.ds.evaluate(r.core, r.test_loader, device=d.device, bf16=exp.trainer.bf16,
                 limit=exp.trainer.limit_batches)
    if r.ds.task == "lm":
        m["bits_per_char"] = m["val_loss"] / LN2
    prev = (prog.last or {}).get("best_val_loss")
    prog.best = max(prog.best, m["top1"])
    prog.last = {**m, "best_val_loss": m["val_loss"] if prev is None else min(prev, m["val_loss"])}
    r.evaluated = (prog.step, m)
    return m


def _eval_step(exp: Experiment, r: _Run, prog: Progress, ep: _Epoch, logger: Logger,
               d: Dist) -> None:
    """Every trainer.eval_every steps: evaluate and log (record with "eval": "step"; the train
    loss is the mean since the previous step evaluation)."""
    train_loss = mean_over_ranks(ep.since_sum / ep.since_n if ep.since_n else float("nan"), d)
    ep.since_sum, ep.since_n = 0.0, 0
    if not d.main:
        return
    m = _evaluated(exp, r, prog, d)
    logger.log_metrics({"eval": "step", "epoch": ep.epoch + 1, "phase": ep.phase,
                        "train_loss": train_loss, **m, "lr": ep.lr,
                        "skipped_steps": prog.skipped}, prog.step)
    print(f"{r.budget.where_step(prog.step)} {ep.phase:5s} train loss {train_loss:.4f} (since "
          f"the last evaluation) {_metric_text(m)} lr {ep.lr:.4g}", flush=True)
