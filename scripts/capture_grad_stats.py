#!/usr/bin/env python
"""Bias and variance of every δ estimator on neural gradients captured from a real fp32 run.

    OMP_NUM_THREADS=1 python scripts/capture_grad_stats.py            # small-scale setup
    python scripts/capture_grad_stats.py --experiment small/mvue_table/fp32 --steps 64 --draws 64

1. Composes the experiment (default: the small-scale fp32 row; `--override key=value` adds Hydra
   overrides, e.g. `--override data=digits`), converts it to the package's objects once
   (`lowprec.config.experiment_from_cfg`, as run.py does), trains it with exact gradients for
   --steps SGD steps (same data, model, optimizer and LR schedule, `lowprec.budget.Budget`, as
   the table runs), and at the
   last step records δ = ∂C/∂z (grad_output) of a few layers with backward hooks.
2. For every estimator (the recipe's δ estimator, `lowprec.estimator(name)`; SMP recipes as
   `lowprec.SMP`), `lowprec.estimator_stats(δ, est, ks=...)` on δ laid out [C_out, tokens]
   (the layout the layers give N:M estimators; blocks along tokens): relative bias after K draws,
   the 1/√K floor an unbiased estimator with the measured variance would show, measured relative
   variance and its closed form.
3. Writes results/estimators.json, results/estimators.md and results/estimators.png
   (bias vs K: MSE vs MVUE masks; LUQ vs biased FP4 vs radix-4 vs INT4-SR; per-layer variance of
   luq4 vs luq4 + SMP-2, measured and closed form).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

from lowprec import SMP, estimator
from lowprec.config import experiment_from_cfg, register_resolvers
from lowprec.provenance import git_commit
from lowprec.tables import CONF, REPO

ESTIMATORS = ("mse12", "mse24", "mvue12", "mvue24", "mvue24_approx", "luq4", "luq4_smp2",
              "fp4_rdn", "radix4", "int4_sr", "mvue24_luq4")
AUTO_LAYERS = 4  # --layers auto: how many converted layers, spread over depth


def spread(names: list[str], k: int = AUTO_LAYERS) -> list[str]:
    """k of `names` (in forward order) spread over depth: the first, the last, and k−2 more
    counting back from the last in steps of ⌊(n−1)/(k−1)⌋ (all of them when n <= k).
    ResNet-20's 18 converted convs give layer1.0.conv1, layer2.0.conv2, layer3.0.conv1,
    layer3.2.conv2."""
    n = len(names)
    if n <= k:
        return list(names)
    step = (n - 1) // (k - 1)
    picked = {0} | {n - 1 - j * step for j in range(k - 1)}
    return [names[i] for i in sorted(picked)]


def estimator_for(name: str):
    """The δ estimator of grad recipe `name` (its update estimator, the backward one for a
    backward-route recipe); a recipe with SMP samples > 1 as `lowprec.SMP` of it."""
    from lowprec import grad_recipe

    est, samples = estimator(name), grad_recipe(name).samples  # ValueError for an unknown name
    if est is None:
        raise ValueError(f"{name!r} estimates nothing (exact δ)")
    return SMP(est, samples) if samples > 1 else est


def capture(experiment: str, steps: int, layers: tuple[str, ...], overrides=()) -> dict:
    """Train `experiment` with exact δ for `steps` steps; return {layer: δ as [C, tokens]}."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    import torch.nn.functional as F

    from lowprec import convert
    from lowprec.budget import Budget
    from lowprec.checkpoint import seed_everything
    from lowprec.data import build_datasets
    from lowprec.models import build_model
    from lowprec.optim import make_optimizer

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={experiment}", *overrides])
    # the one conversion to plain objects (validated); nothing is written to run_dir
    exp = experiment_from_cfg(cfg, names={}, run_dir=REPO / "outputs" / "capture_grad_stats", name=experiment)
    t = exp.trainer
    ds = build_datasets(exp.data)
    seed_everything(t.seed)
    model = build_model(exp.model, num_classes=ds.num_classes, in_channels=ds.in_channels,
                        image_size=ds.image_size)
    if layers == ("auto",):  # the layers the experiment converts (skip=...), spread over depth
        layers = tuple(spread(convert(copy.deepcopy(model), skip=exp.convert.get("skip")).converted))
    opt = make_optimizer(model, t.optim)
    mods = dict(model.named_modules())
    missing = [l for l in layers if l not in mods]
    if missing:
        raise SystemExit(f"no layers {missing}; have {[n for n, m in mods.items() if hasattr(m, 'weight')]}")
    got: dict[str, torch.Tensor] = {}
    arm = {"on": False}

    def hook(name):
        def f(mod, gin, gout):
            if arm["on"]:
                d = gout[0].detach().clone()
                got[name] = (d.permute(1, 0, 2, 3).reshape(d.shape[1], -1) if d.ndim == 4
                             else d.reshape(-1, d.shape[-1]).t()).contiguous()
        return f

    hs = [mods[l].register_full_backward_hook(hook(l)) for l in layers]
    loader = torch.utils.data.DataLoader(ds.train, batch_size=t.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(t.seed))
    budget = Budget.from_trainer(t, len(loader))  # the trainer's clock: the same LR schedule
    step, it = 0, iter(loader)
    model.train()
    while step < steps:
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        lr = t.optim.lr * budget.lr_factor(t.sched, step)
        for g in opt.param_groups:
            g["lr"] = lr
        arm["on"] = step == steps - 1
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    for h in hs:
        h.remove()
    return {"deltas": got, "layers": layers, "step": step, "loss": loss.item(),
            "of_total_steps": budget.total_steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--experiment", default="small/mvue_table/fp32")
    p.add_argument("--steps", type=int, default=64, help="fp32 training steps before the capture")
    p.add_argument("--layers", default="auto",
                   help="comma list of module names; auto: 4 converted layers spread over depth")
    p.add_argument("--draws", type=int, default=64, help="largest K (draws per estimator)")
    p.add_argument("--estimators", default=",".join(ESTIMATORS))
    p.add_argument("--out", default=str(REPO / "results"), help="folder for estimators.{json,md,png}")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override for the experiment (repeatable), e.g. data=digits")
    a = p.parse_args(argv)
    try:  # an unknown name is an input error: one line, exit 2, before any training
        ests = {en: estimator_for(en) for en in a.estimators.split(",")}
    except ValueError as e:
        print(f"error: --estimators={a.estimators}: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    cap = capture(a.experiment, a.steps, tuple(a.layers.split(",")), a.override)
    print(f"captured δ of {len(cap['deltas'])} layers at step {cap['step']} "
          f"(loss {cap['loss']:.3f}) in {time.time() - t0:.1f}s", flush=True)
    from lowprec import estimator_stats
    ks = sorted({k for k in (1, 4, 16, 64, 256) if k <= a.draws} | {a.draws})
    res = {"experiment": a.experiment, "step": cap["step"], "of_total_steps": cap["of_total_steps"],
           "ks": ks, "layers": {}}
    for lname in [l for l in cap["layers"] if l in cap["deltas"]]:  # forward order
        d = cap["deltas"][lname]
        res["layers"][lname] = {"shape": list(d.shape), "stats": {}}
        for en, est in ests.items():
            g = torch.Generator().manual_seed(1234)
            st = estimator_stats(d, est, ks=ks, generator=g)
            res["layers"][lname]["stats"][en] = st
            print(f"{lname:16s} {en:14s} bias@1 {st['bias@1']:.3f} bias@{ks[-1]} {st[f'bias@{ks[-1]}']:.4f}"
                  f" (floor {st[f'bias_floor@{ks[-1]}']:.4f}) rel_var {st['rel_var']:.4g}"
                  f" theory {st['rel_var_theory']}", flush=True)
    res["wall_s"] = time.time() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "estimators.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    cmd = "OMP_NUM_THREADS=1 python scripts/capture_grad_stats.py " + " ".join(
        map(_portable, sys.argv[1:] if argv is None else argv))
    write_md(res, out / "estimators.md", cmd.strip())
    plot(res, out / "estimators.png")
    print(f"wrote {out}/estimators.{{json,md,png}} in {time.time() - t0:.0f}s")
    return 0


def _portable(arg: str) -> str:
    """A path argument inside the repository as a relative path (the record names no machine)."""
    p = Path(arg)
    if p.is_absolute() and p.resolve().is_relative_to(REPO):
        return str(p.resolve().relative_to(REPO)) or "."
    return arg


def _fmt(v, p=4):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{p}g}"


def write_md(res: dict, path: Path, cmd: str) -> None:
    ks = res["ks"]
    kmax = ks[-1]
    L = [f"# Estimator bias and variance on captured neural gradients\n",
         f"δ = ∂C/∂z of {len(res['layers'])} layers, captured at step {res['step']} of an fp32 run of "
         f"`{res['experiment']}` ({res['of_total_steps']} steps in the full run), laid out "
         f"[C_out, tokens]; N:M blocks along tokens. {kmax} independent draws per estimator.\n",
         f"- bias@K = ‖mean of K draws − δ‖/‖δ‖; floor@K = √(measured Σvar / K)/‖δ‖ (what an unbiased "
         f"estimator with that variance shows). Unbiased: bias@K ≈ floor@K, falling like 1/√K. "
         f"Biased: bias@K stays above the floor.",
         f"- var = measured Σ Var(δ̂)/‖δ‖²; theory = closed form (— where there is none).\n",
         f"Command: `{cmd}`  ", f"Commit: `{git_commit()}`\n"]
    for lname, lay in res["layers"].items():
        L.append(f"\n## {lname} δ {lay['shape']}\n")
        L.append(f"| estimator | unbiased | bias@1 | bias@{kmax} | floor@{kmax} | var | theory | zeros |")
        L.append("|---|---|---|---|---|---|---|---|")
        for en, s in lay["stats"].items():
            L.append(f"| {en} | {'yes' if s['unbiased'] else 'no'} | {_fmt(s['bias@1'])} | "
                     f"{_fmt(s[f'bias@{kmax}'])} | {_fmt(s[f'bias_floor@{kmax}'])} | {_fmt(s['rel_var'])} | "
                     f"{_fmt(s['rel_var_theory'])} | {s['zero_frac']:.3f} |")
    ratio = [lay["stats"]["luq4"]["rel_var"] / lay["stats"]["luq4_smp2"]["rel_var"]
             for lay in res["layers"].values()
             if "luq4" in lay["stats"] and "luq4_smp2" in lay["stats"]]
    if ratio:
        L.append(f"\nSMP: measured var(luq4) / var(luq4_smp2) per layer = "
                 f"{', '.join(f'{r:.2f}' for r in ratio)} (expected 2).")
    path.write_text("\n".join(L) + "\n")


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = res["ks"]
    layers = list(res["layers"])
    lay0 = res["layers"][layers[len(layers) // 2]]["stats"]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.6))
    groups = [("N:M masks: MSE vs MVUE", ("mse12", "mse24", "mvue12", "mvue24", "mvue24_approx")),
              ("4-bit: LUQ vs FP4-RDN vs radix-4 vs INT4-SR", ("luq4", "luq4_smp2", "fp4_rdn",
                                                              "radix4", "int4_sr"))]
    for a, (title, names) in zip(ax[:2], groups):
        for i, n in enumerate(names):
            if n not in lay0:
                continue
            s = lay0[n]
            c = f"C{i}"
            a.loglog(ks, [s[f"bias@{k}"] for k in ks], "o-", color=c, label=f"{n} measured")
            a.loglog(ks, [s[f"bias_floor@{k}"] for k in ks], ":", color=c, alpha=0.7)
        a.set_xlabel("K (draws averaged)")
        a.set_ylabel("‖mean_K δ̂ − δ‖ / ‖δ‖")
        a.set_title(f"{title}\n{layers[len(layers) // 2]} (dotted: unbiased 1/√K floor)", fontsize=9)
        a.legend(fontsize=7)
        a.grid(True, which="both", alpha=0.3)
    a = ax[2]
    x = range(len(layers))
    w = 0.2
    for j, (n, key, hatch) in enumerate([("luq4", "rel_var", ""), ("luq4", "rel_var_theory", "//"),
                                         ("luq4_smp2", "rel_var", ""),
                                         ("luq4_smp2", "rel_var_theory", "//")]):
        if n not in lay0:  # that estimator was not asked for (--estimators)
            continue
        vals = [res["layers"][l]["stats"][n][key] or 0 for l in layers]
        a.bar([i + (j - 1.5) * w for i in x], vals, w, color="C0" if n == "luq4" else "C1",
              hatch=hatch, label=f"{n} {'measured' if key == 'rel_var' else 'closed form'}",
              edgecolor="k", linewidth=0.4)
    a.set_xticks(list(x), layers, rotation=20, fontsize=7)
    a.set_ylabel("Σ Var(δ̂) / ‖δ‖²")
    a.set_title("LUQ variance per layer: 1 sample vs SMP-2", fontsize=9)
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
