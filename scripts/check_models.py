#!/usr/bin/env python
"""Every model at its defaults: fp32 and luq4 top-1, degradation and time, on this machine.

    python scripts/check_models.py                        # every conf/model/*.yaml -> results/models_default.md
    python scripts/check_models.py --models resnet20 resnet50
    python scripts/check_models.py --quick --out /tmp/m.md   # CI: two small models, a few batches

For each model m this runs, in one process, the sweep

    python run.py -m model=m grad=fp32,luq4 trainer.threads=T logger=none

(the fp32 job first, so the luq4 job finds it in the index as its baseline) and writes one table
row: the fp32 and luq4 final top-1, degradation = fp32 top-1 - luq4 top-1 (points), each job's
training wall time (summary.json `wall_time`: training and evaluation, not start-up or data
loading), and the learning rate, warm-up and zero-init the model's defaults resolved to. A model
whose run fails gets a row saying so; the others still run. The acceptance bar of issue 13 is
fp32 top-1 >= 85% at the defaults (column "ok").

Everything goes under a fresh temporary out_root (its own run index), so earlier runs in outputs/
are neither reused nor disturbed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from lowprec.provenance import cpu_model

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "conf" / "model"
DEFAULT_OUT = ROOT / "results" / "models_default.md"
QUICK_OUT = ROOT / "outputs" / "models_quick.md"
GRADS = ("fp32", "luq4")
ACCEPT_TOP1 = 85.0  # issue 13: every model's fp32 default run reaches this on the default data
QUICK_MODELS = ("resnet20", "mobilenet_v2")
# Tiny budget for --quick: checks the plumbing, not the accuracy.
QUICK_OVERRIDES = ("trainer.epochs=1", "trainer.limit_batches=2", "trainer.checkpoint_every=0")


def is_language_model(cfg: dict) -> bool:
    """A model config that trains on text: `source: lm` (chargpt) or a Hugging Face `arch` other
    than image-classification (conf/model/hf.yaml: causal-lm)."""
    arch = cfg.get("arch")
    return cfg.get("source") == "lm" or (arch is not None and arch != "image-classification")


def model_names() -> tuple[list[str], list[str]]:
    """(image models, language models): conf/model/*.yaml by is_language_model. A language model
    (e.g. chargpt, hf's causal-lm) trains on text data, not on the default digits, so top-1 against
    an image bar means nothing for it: it is listed as skipped."""
    image, lm = [], []
    for p in sorted(MODEL_DIR.glob("*.yaml")):
        (lm if is_language_model(yaml.safe_load(p.read_text()) or {}) else image).append(p.stem)
    return image, lm


def run_model(model: str, out_root: Path, threads: int, extra: list[str]) -> dict:
    """Run the fp32,luq4 sweep of `model`; {grad: summary dict} or {"error": last stderr line}."""
    sweep = out_root / model
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", f"model={model}", "grad=" + ",".join(GRADS),
           f"trainer.threads={threads}", "logger=none", f"out_root={out_root}",
           f"hydra.sweep.dir={sweep}", *extra]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    total = time.time() - t0
    if p.returncode != 0:
        lines = [l for l in (p.stderr + p.stdout).strip().splitlines() if l.strip()]
        return {"error": lines[-1] if lines else f"exit status {p.returncode}", "total_s": total}
    out: dict = {"total_s": total}
    for f in sorted(sweep.glob("*/summary.json")):
        s = json.loads(f.read_text())
        cfg = yaml.safe_load((f.parent / "resolved_config.yaml").read_text())
        out[s["grad"]] = {**s, "_config": cfg}
    missing = [g for g in GRADS if g not in out]
    if missing:
        return {"error": f"no summary.json for grad={missing[0]} under {sweep}", "total_s": total}
    return out


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}"


def defaults_of(cfg: dict) -> str:
    """What the model's defaults resolved to: optimizer and LR, warm-up, zero-init, data, budget."""
    o, s, t, d = cfg["optim"], cfg["sched"], cfg["trainer"], cfg["data"]
    zi = (cfg["model"].get("kwargs") or {}).get("zero_init_residual", False)
    return (f"{o['name']} lr {o['lr']:g}, {s['name']} warm-up {s['warmup_epochs']:g}"
            f"{', zero-init' if zi else ''}; {d['name']} {d['image_size']} px, {t['epochs']} ep, "
            f"batch {t['batch_size']}")


def row(model: str, r: dict) -> str:
    if "error" in r:
        return f"| {model} | failed: {r['error'].replace('|', '/')} | | | | | | |"
    f, q = r["fp32"], r["luq4"]
    deg = q["degradation"]
    deg_s = "n/a" if deg is None else f"{deg:+.2f}"
    ok = "yes" if f["final_top1"] >= ACCEPT_TOP1 else "**no**"
    return (f"| {model} | {defaults_of(f['_config'])} | {f['final_top1']:.2f} | {q['final_top1']:.2f} | "
            f"{deg_s} | {f['wall_time']:.0f} | {q['wall_time']:.0f} | {ok} |")


def render(results: dict[str, dict], *, threads: int, extra: list[str], quick: bool, elapsed: float,
           skipped: list[str]) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = " ".join(["python run.py -m model=<m> grad=" + ",".join(GRADS), f"trainer.threads={threads}",
                    "logger=none", *extra])
    lines = [
        "# Every model at its defaults (default data, default budget)" + (" — QUICK MODE, not results" if quick else ""),
        "",
        f"Written by `python scripts/check_models.py{' --quick' if quick else ''}` on {date}.",
        f"Machine: {machine()}; torch threads per run: {threads}; "
        f"total {elapsed / 60:.1f} min for {len(results)} models, one at a time.",
        "",
        f"Each row: `{cmd}` (the fp32 job is the luq4 job's baseline). top-1 in %, degradation = "
        "fp32 top-1 − luq4 top-1 in points, time = training + evaluation seconds of that job "
        "(summary.json `wall_time`). *ok*: fp32 top-1 ≥ "
        f"{ACCEPT_TOP1:g}% (issue 13). Defaults come from conf/model/<m>.yaml (`train_defaults`, "
        "`kwargs.zero_init_residual`) and the default optim/sched/data/trainer groups.",
        "",
        "| model | defaults | fp32 top-1 | luq4 top-1 | degradation | fp32 time (s) | luq4 time (s) | ok |",
        "|---|---|---:|---:|---:|---:|---:|---|",
        *(row(m, r) for m, r in results.items()),
        "",
    ]
    if skipped:
        lines += [f"Not run: {', '.join(skipped)} (language model on text data: `data=shakespeare_char`; "
                  "the default digits are images).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", help="model names (conf/model/<name>.yaml); default: all")
    ap.add_argument("--quick", action="store_true",
                    help=f"{', '.join(QUICK_MODELS)} with {' '.join(QUICK_OVERRIDES)} (CI smoke test)")
    ap.add_argument("--threads", type=int, default=1, help="trainer.threads per run (default 1)")
    ap.add_argument("--out", type=Path, help=f"markdown file (default {DEFAULT_OUT.relative_to(ROOT)}, "
                                             f"--quick: {QUICK_OUT.relative_to(ROOT)})")
    a = ap.parse_args(argv)
    image, lm = model_names()
    known = image + lm
    models = a.models or (list(QUICK_MODELS) if a.quick else image)
    bad = [m for m in models if m not in known]
    if bad:
        print(f"error: --models {bad[0]!r} is not in conf/model/; valid: {', '.join(known)}", file=sys.stderr)
        return 2
    if a.threads < 1:
        print(f"error: --threads={a.threads}: expected an integer >= 1", file=sys.stderr)
        return 2
    extra = list(QUICK_OVERRIDES) if a.quick else []
    out = a.out or (QUICK_OUT if a.quick else DEFAULT_OUT)
    results: dict[str, dict] = {}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="check_models_") as tmp:
        for m in models:
            print(f"{m} ...", end=" ", flush=True)
            results[m] = r = run_model(m, Path(tmp), a.threads, extra)
            print(r["error"] if "error" in r else
                  f"fp32 {r['fp32']['final_top1']:.2f}  luq4 {r['luq4']['final_top1']:.2f}  "
                  f"({r['total_s']:.0f} s)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results, threads=a.threads, extra=extra, quick=a.quick, elapsed=time.time() - t0,
                          skipped=[] if a.models or a.quick else lm))
    print(f"wrote {out}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
