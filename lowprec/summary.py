"""A finished run's summary (summary.json, the index row, the lines run.py prints).

Metric. Classification: test top-1 (%); degradation = baseline top-1 − top-1 (points, > 0 worse).
Language models (data task "lm", model source "lm"): mean validation cross-entropy over every
predicted character of the fixed validation windows, L in nats (bits per character = L / ln 2);
degradation = L − L_baseline (nats, > 0 worse). A baseline is "near chance" when its top-1 is
below 2 × chance (100 / classes %), or, for a language model, when L_baseline ≥ ln V − ln 2,
i.e. its perplexity e^L is above V/2 (V = vocabulary size; uniform guessing gives L = ln V):
the LM analogue of "accuracy below twice chance". summary.json says so (`baseline_quality`).

`describe` turns recipes into plain data for the summary.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from .config import Experiment

LN2 = math.log(2.0)


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


def baseline_quality(metric: str, value: float | None, num_classes: int) -> str | None:
    """"near chance" / "ok" for a baseline's final metric (module docstring); None: no baseline."""
    if value is None:
        return None
    if metric == "val_loss":
        near = value >= math.log(num_classes) - LN2 or not math.isfinite(value)
    else:
        near = value < 2 * 100.0 / num_classes
    return "near chance" if near else "ok"


def summarize(exp: Experiment, result: dict[str, Any], baseline: dict[str, Any] | None,
              baseline_status: str) -> dict[str, Any]:
    """summary.json content. `metric` is "top1" (classification) or "val_loss" (language
    models); degradation = baseline top-1 − final top-1 (points) or val_loss − baseline val_loss
    (nats); > 0: worse; null without a baseline. `baseline` is the baseline's index row (its
    val_loss is in its summary). `name`, `identity` and `key` are the experiment's."""
    t = exp.trainer
    base_val = None
    if exp.is_baseline:
        base_top1, baseline_status, base_dir = result["final_top1"], "self", str(exp.run_dir)
        base_val = result.get("val_loss")
    elif baseline is not None:
        base_top1, base_dir = baseline["final_top1"], baseline["run_dir"]
        bs = baseline.get("summary")
        base_val = (json.loads(bs) if isinstance(bs, str) else (bs or {})).get("val_loss")
    else:
        base_top1 = base_dir = None
    metric = result.get("metric", "top1")
    if base_top1 is None:
        deg = None
    elif metric == "val_loss":
        deg = None if base_val is None or result.get("val_loss") is None \
            else result["val_loss"] - base_val
    else:
        deg = base_top1 - result["final_top1"]
    quality = baseline_quality(metric, base_val if metric == "val_loss" else base_top1,
                               result.get("num_classes") or 0) if base_top1 is not None else None
    return {
        **{k: exp.names[k] for k in ("model", "data", "fwd", "grad")},
        "name": exp.name, "identity": exp.identity,
        "epochs": t.epochs, "fnt_epochs": t.fnt_epochs, "seed": t.seed,
        "batch_size": t.batch_size, "is_baseline": exp.is_baseline, "key": exp.key,
        **result,
        "baseline_top1": base_top1, "baseline_val_loss": base_val,
        "degradation": deg, "baseline_quality": quality,
        "baseline": baseline_status if base_top1 is not None else "no baseline",
        "baseline_run": base_dir,
        "grad_recipe": describe(exp.grad), "fwd_recipe": describe(exp.fwd),
        "convert": {k: describe(v) for k, v in exp.convert.items()},
        "run_dir": str(exp.run_dir),
    }


def summary_lines(s: dict[str, Any]) -> list[str]:
    """The lines run.py prints for a finished run's summary: the metric, the baseline (with a
    warning when it is near chance) and the degradation (n/a without a baseline)."""
    def pct(v):
        return "   n/a" if v is None else f"{v:6.2f}%"

    lm = s.get("metric") == "val_loss"
    base = {"self": "this run", "found": f"from the index: {s['baseline_run']}",
            "trained": f"trained first: {s['baseline_run']}"}.get(s["baseline"], "no baseline")
    if s.get("baseline_quality") == "near chance":
        base += ("; NEAR CHANCE: perplexity above vocabulary/2, the degradation means little"
                 if lm else "; NEAR CHANCE: top-1 below 2x chance, the degradation means little")
    length = (f"{s['max_steps']} steps + {s.get('fnt_steps') or 0} FNT" if s.get("max_steps")
              else f"{s['epochs']} epochs + {s['fnt_epochs']} FNT")
    out = [f"== {s['model']} on {s['data']}, fwd={s['fwd']} grad={s['grad']}, {length}, "
           f"seed {s['seed']}"]
    deg = s.get("degradation")
    # An fp32 run is its own baseline: its 0 is stored for the index, but nothing was compared.
    shown = None if s["baseline"] == "self" else deg
    cmp = "(this run is the fp32 baseline)" if s["baseline"] == "self" else None
    if lm:
        def nats(v):
            return "   n/a" if v is None else f"{v:.4f} nats ({v / LN2:.3f} bits/char)"
        out += [f"val loss       {nats(s.get('val_loss'))}   (top-1 {pct(s['final_top1']).strip()})",
                f"fp32 baseline  {nats(s.get('baseline_val_loss'))}   ({base})",
                f"degradation    {'n/a' if shown is None else f'{shown:+.4f} nats'}   "
                f"{cmp or '(val loss - baseline)'}"]
    else:
        best = "" if s.get("best_top1") is None else f"   (best {s['best_top1']:.2f}%)"
        out += [f"top-1          {pct(s['final_top1'])}{best}",
                f"fp32 baseline  {pct(s['baseline_top1'])}   ({base})",
                f"degradation    {'n/a' if shown is None else f'{shown:+.2f} points'}   "
                f"{cmp or '(baseline - top-1)'}"]
    return out + [f"run dir        {s['run_dir']}"]
