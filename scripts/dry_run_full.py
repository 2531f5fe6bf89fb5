#!/usr/bin/env python
"""Dry-run every full-scale experiment (conf/experiment/full/**) and write results/full_dry_run.md:
per row its model, task, converted layers, parameters, the seconds per step on this CPU at the dry
run's batch, the peak memory, and a rough estimate of its GPU-days from the paper's length.

    python scripts/dry_run_full.py                      # every full row, 2 steps each, 1 thread
    python scripts/dry_run_full.py --rows 'luq_table/resnet50*' --out /tmp/x.md

Each row runs as ``python run.py experiment=<row> trainer.dry_run=<steps>`` would (lowprec.dry_run,
nothing is written but the markdown file). A model is built once per architecture
and copied for each of its rows, in one process per model
(so that each model's peak memory is its own).

GPU-days (rough): samples = (epochs + FNT epochs) x the training set's size, or (max_steps +
fnt_steps) x batch_size for a step budget; CPU seconds = samples x (seconds per step / dry-run
batch); GPU seconds = CPU seconds / R, where R is the ratio of one GPU's training throughput to this
CPU's, calibrated on one model: the published ResNet-50 training rate of one A100
(--gpu-images-per-s) over the fp32 ResNet-50 row's images/s measured here, in each model's process
before and after its rows (the load of a shared machine drifts). R comes from ResNet-50 in fp32 for
every row (models and recipes whose CPU/GPU speed ratio differs from it are off by that
difference), so the estimate is an order of magnitude, not a plan.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import fnmatch
import gc
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL = ROOT / "conf" / "experiment" / "full"
# Training set sizes (samples per epoch) of the data sets the full rows read.
TRAIN_SIZE = {"imagenet": 1_281_167, "cifar10": 50_000, "squad_v1": 88_641}
# A100 ResNet-50 training throughput, images/s: NVIDIA DeepLearningExamples, ResNet-50 v1.5 (PyTorch),
# one A100 80GB, TF32, batch 256 (order 1,000-1,400 images/s as published; mixed precision ~2.5x
# that). The calibration row: the fp32 ResNet-50 ImageNet row.
GPU_IMAGES_PER_S = 1200.0
CALIBRATION_ROW = "luq_table/resnet50_imagenet_fp32"


def rows(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(FULL).with_suffix("")) for p in FULL.rglob("*.yaml")
                  if not p.name.startswith("_") and fnmatch.fnmatch(str(p.relative_to(FULL).with_suffix("")), pattern))


def experiment(row: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lowprec.config import experiment_from_cfg, register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment=full/{row}", *overrides], return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    from omegaconf import open_dict

    with open_dict(cfg):
        del cfg["hydra"]
    GlobalHydra.instance().clear()
    return experiment_from_cfg(cfg, names=choices, run_dir="/nonexistent/dry-run", name=f"full/{row}")


def samples(exp) -> tuple[int | None, str]:
    """Training samples of the full run, and how they were counted."""
    t = exp.trainer
    if t.max_steps:
        n = (t.max_steps + t.fnt_steps) * t.batch_size
        return n, f"{t.max_steps + t.fnt_steps:,} steps x {t.batch_size}"
    size = TRAIN_SIZE.get(getattr(exp.data, "name", ""))
    if size is None:
        return None, "training set size unknown"
    ep = t.epochs + t.fnt_epochs
    return ep * size, f"{ep} epochs x {size:,}"


def model_key(exp) -> str:
    return json.dumps([exp.identity["model"], exp.identity["data"], exp.trainer.seed], sort_keys=True, default=str)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="*", help="glob over the rows under conf/experiment/full/ (default: all)")
    ap.add_argument("--steps", type=int, default=2, help="dry-run steps per row (the first pays one-time costs)")
    ap.add_argument("--batch", type=int, default=0, help="trainer.dry_run_batch (0: automatic, min(batch, 2))")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (trainer.threads)")
    ap.add_argument("--gpu-images-per-s", type=float, default=GPU_IMAGES_PER_S,
                    help="one GPU's ResNet-50 training images/s, for the GPU-days ratio")
    ap.add_argument("--out", default=str(ROOT / "results" / "full_dry_run.md"))
    ap.add_argument("--group", help=argparse.SUPPRESS)  # internal: rows of one model, in this process
    ap.add_argument("--json", help=argparse.SUPPRESS)   # internal: where --group writes its results
    a = ap.parse_args(argv)
    over = [f"trainer.dry_run={a.steps}", f"trainer.dry_run_batch={a.batch}", f"trainer.threads={a.threads}",
            "trainer.device=cpu"]
    if a.group:
        results = run_rows(a.group.split(","), over, a.steps)
        Path(a.json).write_text(json.dumps(results))
        return 0
    names = rows(a.rows)
    if not names:
        print(f"error: --rows {a.rows!r} matches no row under {FULL}", file=sys.stderr)
        return 2
    commit, dirty = provenance()
    # One process per model: each model's peak memory is its own (a process keeps what it freed).
    groups: dict[str, list[str]] = {}
    for row in names:
        groups.setdefault(model_key(experiment(row, over)), []).append(row)
    results = {}
    t_all = time.time()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for i, g in enumerate(groups.values()):
            js = Path(tmp) / f"{i}.json"
            cmd = [sys.executable, __file__, "--group", ",".join(g), "--json", str(js), "--steps", str(a.steps),
                   "--batch", str(a.batch), "--threads", str(a.threads)]
            subprocess.run(cmd, cwd=ROOT, check=False)
            got = json.loads(js.read_text()) if js.exists() else {}
            for row in g:
                results[row] = got.get(row) or {"error": "the row's process died (see its output above)",
                                                "samples": None, "samples_how": "", "model_name": "?",
                                                "grad": "?", "fwd": "?"}
    write(a, results, time.time() - t_all, argv if argv is not None else sys.argv[1:], commit, dirty)
    print(f"wrote {a.out}")
    return 1 if any("error" in r for r in results.values()) else 0


def provenance() -> tuple[str, str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lowprec", "conf", "scripts"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        commit, dirty = "?", ""
    return commit, dirty


def run_rows(names: list[str], over: list[str], steps: int) -> dict:
    """Dry-run ``names`` (rows of one model) in this process: {row: dry_run's numbers}."""
    from lowprec.dry_run import build_dry_model, dry_model_spec, dry_run

    results, cache = {}, {}
    before = calibrate(over)
    for row in names:
        exp = experiment(row, over)
        if (exp.trainer.fnt_steps if exp.trainer.max_steps else exp.trainer.fnt_epochs) and steps >= 2:
            # one more step: the last runs FNT's recipes, s/step is the main phase's
            exp = experiment(row, [*over, f"trainer.dry_run={steps + 1}"])
        key = model_key(exp)
        print(f"=== {row}", flush=True)
        try:
            if key not in cache:
                cache.clear()
                gc.collect()
                cache[key] = build_dry_model(exp)[0]
            r = dry_run(exp, model=copy.deepcopy(cache[key]), out=lambda s: None)
            print(f"    {r['params']:,} params, {r['converted']} converted, {r['seconds_per_step']:.2f} s/step "
                  f"at batch {r['batch']}, peak {r['peak_memory_bytes'] / 2**30:.2f} GiB", flush=True)
        except Exception as e:  # a row that fails is reported in the table, not hidden
            r = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"}
            print(f"    FAILED {r['error']}", flush=True)
        r["samples"], r["samples_how"] = samples(exp)
        r["model_name"] = getattr(dry_model_spec(exp.model)[0], "name", "?")
        r["grad"], r["fwd"] = exp.names["grad"], exp.names["fwd"]
        r.pop("report", None)
        results[row] = r
        gc.collect()
    cache.clear()
    gc.collect()
    cal = (before + calibrate(over)) / 2  # the load of a shared machine drifts: measured around the rows
    for r in results.values():
        r["calibration_images_per_s"] = cal
    return results


def calibrate(over: list[str]) -> float:
    """This CPU's training images/s, now: the calibration row (fp32 ResNet-50, 224 px), one step after
    a first one that pays the one-time costs, at the dry-run batch, no evaluation."""
    from lowprec.dry_run import dry_run

    exp = experiment(CALIBRATION_ROW, [*over, "trainer.dry_run=2"])
    r = dry_run(exp, out=lambda s: None, evaluate=False)
    gc.collect()
    return r["batch"] / r["seconds_per_step"]


def write(a, results: dict, seconds: float, argv: list[str], commit: str, dirty: str) -> None:
    cals = [r["calibration_images_per_s"] for r in results.values() if r.get("calibration_images_per_s")]
    import torch

    L = ["# Full-scale experiments: dry run", "",
         f"Written by `python scripts/dry_run_full.py{(' ' + ' '.join(argv)) if argv else ''}` at commit {commit}"
         f"{' (with uncommitted changes in lowprec/, conf/ or scripts/)' if dirty else ''} on "
         f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, in {seconds / 60:.1f} min.", "",
         f"Every row under `conf/experiment/full/` dry-run as `python run.py experiment=full/<row> "
         f"trainer.dry_run={a.steps}` does (lowprec/dry_run.py): the real model at the real input shapes "
         "(224-px ImageNet images, the tasks' sequence lengths and vocabularies), converted with the row's "
         f"recipes, {a.steps} optimizer steps and one evaluation on synthetic inputs. Machine: "
         f"{platform.machine()}, {a.threads} torch thread(s) of a 2-core CPU **shared with "
         "other jobs running at the same time** (the step times are noisy, and slower than on a quiet "
         "machine), torch " + torch.__version__ + ".", "",
         "Columns: *converted* = layers `convert` runs in low precision / kept in high precision "
         "(first and last); *s/step* = seconds per optimizer step at the dry-run batch (the mean of the "
         "steps after the first; a row with FNT takes one more step, in FNT, left out of the mean); *peak* = the process's peak resident memory during the row (model, "
         "optimizer state, activations at that batch, and the process itself: its resident memory at the "
         "row's start in parentheses, which holds the model already built; one process per model); "
         "*GPU-days* = a rough estimate for the paper's length (below).", ""]
    L += ["| row | model | task | grad / fwd | parameters | converted | batch | s/step | peak GiB | length | GPU-days |",
          "|---|---|---|---|---:|---|---:|---:|---:|---|---:|"]
    notes = {}
    for row, r in results.items():
        if "error" in r:
            L.append(f"| {row} | {r['model_name']} | | {r['grad']} / {r['fwd']} | | FAILED: {r['error']} | | | | "
                     f"{r['samples_how']} | |")
            continue
        gpu = "?"
        if r.get("calibration_images_per_s") and r["samples"]:
            ratio = a.gpu_images_per_s / r["calibration_images_per_s"]
            days = r["samples"] * r["seconds_per_step"] / r["batch"] / ratio / 86400
            gpu = f"{days:.0f}" if days >= 10 else f"{days:.1f}" if days >= 1 else f"{days:.2f}"
        if r.get("model_note"):
            notes.setdefault(r["model_note"], []).append(row)
        L.append(f"| {row} | {r['model_name']} | {r['task']} | {r['grad']} / {r['fwd']} | {r['params']:,} | "
                 f"{r['converted']} / {r['skipped']} | {r['batch']} | {r['seconds_per_step']:.2f} | "
                 f"{r['peak_memory_bytes'] / 2**30:.2f}"
                 + (f" ({r['start_memory_bytes'] / 2**30:.2f})" if r.get("start_memory_bytes") else "")
                 + f" | {r['samples_how']} | {gpu} |")
    L += ["", "## GPU-days: how they are estimated (rough)", ""]
    if cals:
        L += [f"R = one GPU's training throughput / this CPU's, calibrated on ResNet-50: {a.gpu_images_per_s:,.0f} "
              "images/s (an assumed single-A100 ResNet-50 training rate: NVIDIA's DeepLearningExamples "
              "publish on the order of 1,000-1,400 images/s in TF32 and ~2.5x that in mixed precision) over "
              f"the images/s this CPU trained `{CALIBRATION_ROW}` at (batch {a.batch or 2}, no evaluation), "
              "measured in each model's process before and after its rows, because the load of the shared "
              f"machine drifted: {min(cals):.2f}-{max(cals):.2f} images/s, R = {a.gpu_images_per_s / max(cals):,.0f}"
              f"-{a.gpu_images_per_s / min(cals):,.0f}. Each row: "
              "GPU-days = samples x (s/step / batch) / R / 86,400 with its own process's R, where samples = (epochs + FNT epochs) x "
              "training-set size (ImageNet 1,281,167; CIFAR-10 50,000; SQuAD v1.1 ~88,641 windows of 384 "
              "tokens) or (max_steps + fnt_steps) x batch_size for a step budget.", "",
              "It is an order-of-magnitude estimate: R comes from ResNet-50 in fp32 for every model and recipe, while "
              "a GPU's advantage over a CPU differs between them (attention and large vocabularies, the "
              "quantizers as fused Triton kernels vs C twins, mixed precision, data loading and "
              "evaluation not counted), and the CPU measurement is one busy machine's. Runs on several "
              "GPUs divide the wall time, not the GPU-days."]
    else:
        L += [f"Not estimated: the calibration row `{CALIBRATION_ROW}` was not measured in this run."]
    if notes:
        L += ["", "## Models built without their checkpoint", ""]
        L += [f"- {n}: {', '.join(rs)}" for n, rs in notes.items()]
    L += ["", "Nothing was trained for real: the losses are those of synthetic inputs; the numbers say "
          "that each full row builds, converts, steps and evaluates at its real shapes, and what a step "
          "costs. To re-check one row: `python run.py experiment=full/<row> trainer.dry_run=2`."]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(L) + "\n")


if __name__ == "__main__":
    sys.exit(main())
