#!/usr/bin/env python
"""Write the scaling grid's experiment files, conf/experiment/small/scaling/<row>.yaml (issue 22).

    python scripts/make_scaling_grid.py               # (re)write every row from the rules below
    python scripts/make_scaling_grid.py --check       # exit 1 if a file differs from the rules
    python scripts/make_scaling_grid.py --lr-sweep outputs/small_scaling/runs.sqlite
                                                      # the fp32 LR sweep's losses per width, LR

One row per (recipe, width, budget): `<recipe>_c<width>_t<tokens per parameter>`. The rules,
fixed before any grid run (results/notes/scaling_plan.md says how they were chosen):

- shape: chargpt with 2 layers and 2 heads (its defaults), context 64; only the width C varies.
  Non-embedding parameters N = 2·(12C² + 13C) + 2C (the blocks and the final LayerNorm; not the
  token/position embeddings or the head), C ∈ WIDTHS: 6.6k, 14.5k, 28.7k, 56.6k (8.6×). The
  first plan had C = 68 (112.9k) in place of 16; measured on the quiet machine it alone would have
  cost two thirds of the grid (results/notes/scaling_plan.md), so the sizes were shrunk, not the
  budgets or seeds, before any grid run.
- budget: D = N · tokens-per-parameter, TPP ∈ (25, 50, 100, 200) (Quartet's range); tokens =
  characters predicted = steps × batch 16 × context 64, so steps = round(N·TPP / 1024).
- schedule over each run's own budget: linear warm-up over 10% of its steps (the LM tables'
  40 of 400), then cosine to 0 at its last step; validation loss once, at the end.
- learning rate: lr(C) = LR0 · (C / 64)^(−LR_EXP), AdamW (chargpt's other defaults). LR0 = 2e-2,
  LR_EXP = 0, fixed by the plan's fp32 sweep before any grid run (50 tokens per parameter,
  seed 0): the best of {1, 2, 3, 6} e-3 and 1, 2, 3 e-2 was 2e-2 at both end widths 16 and 48
  (results/notes/scaling_plan.md has the losses); never changed after a grid run.
- recipes (RECIPES): fp32; luq4; INT4 forward + luq4; NVFP4 forward + nvfp4_sr; MXFP4 forward +
  mxfp4_sr; mvue24; mvue24_luq4. Every row shares conf/experiment/small/scaling/_base.yaml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lowprec.scaling import chargpt_non_embedding

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "conf" / "experiment" / "small" / "scaling"
WIDTHS = (16, 24, 34, 48)
TPP = (25, 50, 100, 200)
TOKENS_PER_STEP = 16 * 64
LR0, LR_EXP = 2e-2, 0.0  # the LR rule, from the fp32 sweep (module docstring)
# row prefix -> (fwd, grad)
RECIPES = {"fp32": ("fp32", "fp32"), "luq4": ("fp32", "luq4"), "fwd4_luq4": ("int4", "luq4"),
           "fwdnv_nvfp4_sr": ("nvfp4", "nvfp4_sr"), "fwdmx_mxfp4_sr": ("mxfp4", "mxfp4_sr"),
           "mvue24": ("fp32", "mvue24"), "mvue24_luq4": ("fp32", "mvue24_luq4")}
# The grid point with 3 extra seeds per recipe (run-to-run noise): the middle of the grid.
NOISE_POINT = (34, 100)


def steps(width: int, tpp: int) -> int:
    return round(chargpt_non_embedding(width) * tpp / TOKENS_PER_STEP)


def lr(width: int, lr0: float, lr_exp: float) -> float:
    return float(f"{lr0 * (width / 64) ** -lr_exp:.4g}")


def row_name(recipe: str, width: int, tpp: int) -> str:
    return f"{recipe}_c{width}_t{tpp}"


def row_yaml(recipe: str, width: int, tpp: int, lr0: float, lr_exp: float) -> str:
    fwd, grad = RECIPES[recipe]
    n, s = chargpt_non_embedding(width), steps(width, tpp)
    return (f"# @package _global_\n"
            f"# Scaling grid row (written by scripts/make_scaling_grid.py; edit the script, not this):\n"
            f"# {recipe} at width {width} (N = {n} non-embedding parameters), {tpp} tokens per\n"
            f"# parameter (D = {s * TOKENS_PER_STEP} tokens = {s} steps x {TOKENS_PER_STEP}).\n"
            f"defaults:\n"
            f"  - /experiment/small/scaling/_base\n"
            f"  - override /fwd: {fwd}\n"
            f"  - override /grad: {grad}\n"
            f"model:\n  kwargs:\n    n_embd: {width}\n"
            f"optim:\n  lr: {lr(width, lr0, lr_exp)}\n"
            f"sched:\n  warmup_steps: {max(1, round(s / 10))}\n"
            f"trainer:\n  max_steps: {s}\n  eval_every: {s}\n")


def lr_sweep(index: str) -> int:
    """One line per fp32/fp32 chargpt run of the index: width, steps, lr, seed, val loss."""
    import json

    from lowprec import runs

    if not Path(index).exists():
        print(f"error: --lr-sweep {index}: no such run index", file=sys.stderr)
        return 2
    out = []
    for r in runs.rows(index):
        s = json.loads(r["summary"]) if isinstance(r.get("summary"), str) else (r.get("summary") or {})
        ident = s.get("identity") or {}
        if (r["fwd"], r["grad"], r["model"]) != ("fp32", "fp32", "chargpt"):
            continue
        kw, tr = (ident.get("model") or {}).get("kwargs") or {}, ident.get("trainer") or {}
        lr_ = (ident.get("optim") or {}).get("lr")
        out.append((kw.get("n_embd"), tr.get("max_steps"), lr_, r["seed"], s.get("val_loss")))
    for w, st, lr_, seed, v in sorted(out, key=lambda x: tuple(str(y) for y in x)):
        print(f"width {w}  steps {st}  lr {lr_}  seed {seed}  val loss {v}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--lr0", type=float, default=LR0)
    p.add_argument("--lr-exp", type=float, default=LR_EXP)
    p.add_argument("--check", action="store_true", help="compare, write nothing")
    p.add_argument("--lr-sweep", metavar="INDEX", help="print the fp32 runs' final val loss per "
                   "(width, steps, lr) from a run index, write nothing")
    a = p.parse_args(argv)
    if a.lr_sweep:
        return lr_sweep(a.lr_sweep)
    if not (0 < a.lr0 < 1):
        print(f"error: --lr0={a.lr0}: expected 0 < lr0 < 1", file=sys.stderr)
        return 2
    want = {row_name(r, w, t) + ".yaml": row_yaml(r, w, t, a.lr0, a.lr_exp)
            for r in RECIPES for w in WIDTHS for t in TPP}
    extra = [f.name for f in OUT.glob("*.yaml") if not f.name.startswith("_") and f.name not in want]
    if a.check:
        bad = [f for f, txt in want.items() if not (OUT / f).exists() or (OUT / f).read_text() != txt]
        for f in bad + extra:
            print(f"differs: {OUT / f}", file=sys.stderr)
        return 1 if bad or extra else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for f in extra:  # rows the rules no longer make
        (OUT / f).unlink()
    for f, txt in want.items():
        (OUT / f).write_text(txt)
    print(f"wrote {len(want)} rows to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
