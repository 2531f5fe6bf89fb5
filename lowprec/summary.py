"""A finished run's summary (summary.json, the index row, the lines run.py prints).

Metric. Classification: test top-1 (%); degradation = baseline top-1 − top-1 (points, > 0 worse).
Language models (data task "lm", model source "lm"): mean validation cross-entropy over every
predicted character of the fixed validation windows, L in nats (bits per character = L / ln 2);
degradation = L − L_baseline (nats, > 0 worse). A baseline is "near chance" when its top-1 is
below 2 × chance (100 / classes %), or, for a language model, when L_baseline ≥ ln V − ln 2,
i.e. its perplexity e^L is above V/2 (V = vocabulary size; uniform guessing gives L = ln V):
the LM analogue of "accuracy below twice chance". summary.json says so (`baseline_quality`).

Status (`run_status`). A run ends `ok` or `diverged`; diverged when any of:
- more than trainer.max_skip_frac of its steps were skipped as non-finite;
- its final validation loss is not finite;
- its final training loss (the mean of the last epoch that took a step) is above DIVERGE_FACTOR × ln C, C the number
  of classes (the vocabulary for a language model): ln C is the loss of a uniform guess, where an
  initialized network starts, so the loss ended far above its start (every task; an lr of 1e4 on
  digits ends near 2e4 nats). The training loss, not the validation loss: a tiny run that merely
  overfits can reach a validation loss of 40 nats while it trains well.
A diverged run exits 3 and is never a baseline. A run that ends near chance (the baseline
quality rule below, applied to the run itself) is `ok` but flagged (`quality`: "near chance")
and printed with a caution, as a near-chance baseline is.

Tasks (lowprec.task_loop): translation reports corpus BLEU (``metric`` "bleu"), question answering
the SQuAD v1.1 F1 (``metric`` "f1", its EM beside it), both higher is better: degradation =
baseline − run (points, > 0 worse), the baseline's value read from its summary. A masked LM reports
its validation MLM loss (``metric`` "val_loss", lower is better), as a language model does.
``higher_is_better`` in summary.json says the direction. No chance rule for BLEU or F1 (quality null).

`describe` turns recipes into plain data for the summary.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from .config import Experiment

LN2 = math.log(2.0)
HIGHER_SCORES = ("bleu", "f1")  # task metrics in points, higher is better (besides top1)


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


DIVERGE_FACTOR = 10.0


def run_status(skipped: int, steps: int, max_skip_frac: float, val_loss: float | None,
               train_loss: float | None, num_classes: int) -> tuple[str, str | None]:
    """("ok", None) or ("diverged", why) by the module docstring's rule. `train_loss`: the mean
    training loss of the last epoch that took a step (NaN or None: not counted)."""
    if steps and skipped / steps > max_skip_frac:
        return "diverged", (f"{skipped} of {steps} steps skipped as non-finite (more than "
                            f"trainer.max_skip_frac={max_skip_frac})")
    if val_loss is not None and not math.isfinite(val_loss):
        return "diverged", f"final validation loss {val_loss}"
    bound = DIVERGE_FACTOR * math.log(num_classes) if num_classes > 1 else math.inf
    if train_loss is not None and not math.isnan(train_loss) and not train_loss <= bound:
        return "diverged", (f"final training loss {train_loss:.4g} is above {DIVERGE_FACTOR:g} x "
                            f"ln {num_classes} = {bound:.3g}, the loss of a uniform guess it "
                            "started near")
    return "ok", None


def baseline_quality(metric: str, value: float | None, num_classes: int) -> str | None:
    """"near chance" / "ok" for a baseline's final metric (module docstring); None: no baseline."""
    if value is None or metric in HIGHER_SCORES:
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
    base = {}  # the baseline's summary: its val_loss, bleu, f1
    if exp.is_baseline:
        base_top1, baseline_status, base_dir, base = result["final_top1"], "self", str(exp.run_dir), result
    elif baseline is not None:
        base_top1, base_dir = baseline["final_top1"], baseline["run_dir"]
        bs = baseline.get("summary")
        base = json.loads(bs) if isinstance(bs, str) else (bs or {})
    else:
        base_top1 = base_dir = None
    metric = result.get("metric", "top1")
    base_val = base.get("val_loss")
    base_score = base.get(metric) if metric in HIGHER_SCORES else None
    if base_top1 is None:
        deg = None
    elif metric in HIGHER_SCORES:
        deg = None if base_score is None or result.get(metric) is None else base_score - result[metric]
    elif metric == "val_loss":
        deg = None if base_val is None or result.get("val_loss") is None \
            else result["val_loss"] - base_val
    else:
        deg = base_top1 - result["final_top1"]
    quality = baseline_quality(metric, base_val if metric == "val_loss" else base_top1,
                               result.get("num_classes") or 0) if base_top1 is not None else None
    own = result.get("val_loss") if metric == "val_loss" else result.get("final_top1")
    return {
        **{k: exp.names[k] for k in ("model", "data", "fwd", "grad")},
        "length": (f"{t.max_steps} steps" + (f" + {t.fnt_steps} FNT steps" if t.fnt_steps else "")
                   if t.max_steps else f"{t.epochs} epochs"
                   + (f" + {t.fnt_epochs} FNT epochs" if t.fnt_epochs else "")),
        "quality": baseline_quality(metric, own, result.get("num_classes") or 0)
        if result.get("num_classes") else None,
        "name": exp.name, "identity": exp.identity,
        "epochs": t.epochs, "fnt_epochs": t.fnt_epochs, "seed": t.seed,
        "batch_size": t.batch_size, "is_baseline": exp.is_baseline, "key": exp.key,
        **result,
        "baseline_top1": base_top1, "baseline_val_loss": base_val, "higher_is_better": metric != "val_loss",
        **({f"baseline_{metric}": base_score} if metric in HIGHER_SCORES else {}),
        "degradation": deg, "baseline_quality": quality,
        "baseline": baseline_status if base_top1 is not None else "no baseline",
        "baseline_run": base_dir,
        "grad_recipe": describe(exp.grad), "fwd_recipe": describe(exp.fwd),
        "convert": {k: describe(v) for k, v in exp.convert.items()},
        "run_dir": str(exp.run_dir),
    }


# summary.json opens with these (in this order); the rest follows sorted by key.
HEADLINE = ("status", "status_reason", "metric", "final_top1", "bleu", "f1", "exact_match", "val_loss",
            "bits_per_char", "higher_is_better", "baseline_bleu", "baseline_f1", "baseline_top1", "baseline_val_loss", "degradation", "quality", "baseline_quality",
            "best_top1", "best_val_loss", "model", "data", "fwd", "grad", "length", "seed",
            "steps", "skipped_steps", "wall_time", "run_dir")
# best vs final: reported when they differ by more than this (top-1 points; nats for a loss)
BEST_FINAL_NOISE = {"top1": 1.0, "val_loss": 0.02}


def ordered(s: dict[str, Any]) -> dict[str, Any]:
    """`s` with the headline numbers first (HEADLINE), then every other key sorted."""
    return {**{k: s[k] for k in HEADLINE if k in s}, **{k: s[k] for k in sorted(s) if k not in HEADLINE}}


def best_vs_final(s: dict[str, Any]) -> str | None:
    """One line when the best evaluation beat the final one by more than BEST_FINAL_NOISE."""
    if s.get("metric") == "val_loss":
        best, last = s.get("best_val_loss"), s.get("val_loss")
        if best is not None and last is not None and last - best > BEST_FINAL_NOISE["val_loss"]:
            return (f"best vs final  best val loss {best:.4f} nats, final {last:.4f} (+{last - best:.4f}): "
                    "it peaked earlier and then got worse")
        return None
    best, last = s.get("best_top1"), s.get("final_top1")
    if best is not None and last is not None and best - last > BEST_FINAL_NOISE["top1"]:
        return (f"best vs final  best top-1 {best:.2f}%, final {last:.2f}% (-{best - last:.2f} "
                "points): it peaked earlier and then got worse")
    return None


def final_line(s: dict[str, Any]) -> str:
    """The run's one closing line: status, the metric, the comparison, where it lies."""
    lm, score = s.get("metric") == "val_loss", s.get("metric") in HIGHER_SCORES
    val = s.get("val_loss") if lm else s.get(s["metric"]) if score else s.get("final_top1")
    what = ("n/a" if val is None else f"val loss {val:.4f}" if lm else
            f"{s['metric'].upper()} {val:.2f}" if score else f"top-1 {val:.2f}%")
    deg = s.get("degradation")
    cmp = ("fp32 baseline itself" if s.get("baseline") == "self" else "no baseline" if deg is None
           else f"{deg:+.4f} nats vs fp32" if lm else f"{deg:+.2f} points below fp32")
    flag = "; NEAR CHANCE" if s.get("quality") == "near chance" else ""
    return (f"result: {s.get('status', 'ok')}{flag}: {s['model']} {s.get('length', '')} "
            f"grad={s['grad']} fwd={s['fwd']}: {what} ({cmp}); {s['run_dir']}")


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
            if v is None:
                return "   n/a"
            return f"{v:.4f} nats" + ("" if s.get("task") == "mlm" else f" ({v / LN2:.3f} bits/char)")
        out += [f"val loss       {nats(s.get('val_loss'))}   (top-1 {pct(s['final_top1']).strip()})",
                f"fp32 baseline  {nats(s.get('baseline_val_loss'))}   ({base})",
                f"degradation    {'n/a' if shown is None else f'{shown:+.4f} nats'}   "
                f"{cmp or '(val loss - baseline)'}"]
    elif s.get("metric") in HIGHER_SCORES:
        k = s["metric"]
        em = f"   (EM {s['exact_match']:.2f})" if s.get("exact_match") is not None else ""
        def pts(v):
            return "   n/a" if v is None else f"{v:6.2f}"
        out += [f"{k.upper():15s}{pts(s.get(k))}{em}   (top-1 {pct(s['final_top1']).strip()})",
                f"fp32 baseline  {pts(s.get('baseline_' + k))}   ({base})",
                f"degradation    {'n/a' if shown is None else f'{shown:+.2f} points'}   "
                f"{cmp or f'(baseline - {k})'}"]
    else:
        best = "" if s.get("best_top1") is None else f"   (best {s['best_top1']:.2f}%)"
        out += [f"top-1          {pct(s['final_top1'])}{best}",
                f"fp32 baseline  {pct(s['baseline_top1'])}   ({base})",
                f"degradation    {'n/a' if shown is None else f'{shown:+.2f} points'}   "
                f"{cmp or '(baseline - top-1)'}"]
    if s.get("quality") == "near chance" and s["baseline"] != "self":
        out.append("caution        this run ended NEAR CHANCE: "
                   + ("perplexity above vocabulary/2" if lm else "top-1 below 2x chance"))
    bf = best_vs_final(s)
    return out + ([bf] if bf else []) + [f"run dir        {s['run_dir']}", final_line(s)]
