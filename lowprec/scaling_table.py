"""The scaling grid's table and figures (issue 22): results/scaling_table.md, scaling_table.png,
scaling_table_eff.png, from the runs of conf/experiment/small/scaling/ (scripts/make_tables.py
scaling).

A row `<recipe>_c<width>_t<tpp>` is one grid point of one recipe. Per point the loss is the mean
final validation loss over its seeds (one seed, except at the noise point, where four measure
run-to-run noise); N = the model's non-embedding parameters (lowprec.scaling.chargpt_non_embedding
of the composed row's width and depth), D = steps × batch × context (tokens predicted). The fit
(lowprec.scaling.fit_all): the fp32 law, each recipe's eff_N and eff_D with bootstrap 95%
intervals, residuals, and the predicted loss gap at 1B parameters and 20 tokens per parameter.
"""

from __future__ import annotations

import re
from pathlib import Path

from . import scaling as S
from . import tables as T
from .provenance import launches
from .table_md import NOTES, note

ROW = re.compile(r"^(?P<recipe>.+)_c(?P<width>\d+)_t(?P<tpp>\d+)$")
# Quartet (arXiv 2505.14669) Table 3: 30M-parameter Llama on C4, its own (eff_N, eff_D).
QUARTET = {"LUQ, INT4 forward": (0.49, 0.15), "LUQ, FP4 forward": (0.01, 0.07),
           "Quartet (MXFP4)": (0.65, 0.95)}
# Our recipe closest to each of Quartet's rows (the same estimator and forward format).
QUARTET_MATCH = {"fwd4_luq4": "LUQ, INT4 forward"}
PREDICT = (1e9, 20.0)  # N, tokens per parameter
N_BOOT = 500


def point_of(t) -> tuple[str, float, float] | None:
    """(recipe, N, D) of a table row, None if the label is not a grid point."""
    m = ROW.match(t["spec"].label)
    if not m:
        return None
    ident = t["spec"].identity or {}
    kw = ((ident.get("model") or {}).get("kwargs") or {})
    tr = ident.get("trainer") or {}
    n = S.chargpt_non_embedding(int(kw.get("n_embd", m["width"])), int(kw.get("n_layer", 2)))
    d = int(tr.get("max_steps") or 0) * t["spec"].batch_size * int(kw.get("block_size", 64))
    return m["recipe"], float(n), float(d)


def grid_points(trs) -> tuple[dict, dict]:
    """({recipe: {(N, D): mean loss}}, {recipe: [(N, D, loss std over seeds, seeds)]} where a
    point has ≥ 2 seeds)."""
    pts: dict = {}
    noise: dict = {}
    for t in trs:
        p = point_of(t)
        m, sd = t["val"]
        if p is None or m is None:
            continue
        pts.setdefault(p[0], {})[(p[1], p[2])] = m
        if sd is not None:
            noise.setdefault(p[0], []).append((p[1], p[2], sd, len(t["seeds"])))
    return pts, noise


def fit(trs, n_boot: int = N_BOOT):
    pts, _ = grid_points(trs)
    if "fp32" not in pts or len(pts["fp32"]) < 6:
        return None
    return S.fit_all(pts, n_boot=n_boot)


def _iv(lo, hi, p=3):
    return f"[{lo:.{p}f}, {hi:.{p}f}]"


def write_md(trs, f, idx, path: Path, scale: str = "small") -> None:
    pts, noise = grid_points(trs)
    L = ["# scaling_table (small scale)\n",
         "Precision scaling laws on the character LM (issue 22): chargpt on Shakespeare, widths × "
         "budgets per recipe (conf/experiment/small/scaling/, scripts/make_scaling_grid.py; the "
         "design and its cost: results/notes/scaling_plan.md). N = non-embedding parameters, "
         "D = tokens predicted, loss = final validation loss (nats/char).\n"]
    L.append("## Grid: final validation loss (mean over seeds)\n")
    Ds = sorted({round(d / n) for p in pts.values() for n, d in p})
    L.append("| recipe | N | " + " | ".join(f"D/N = {x}" for x in Ds) + " |")
    L.append("|---|---:|" + "---:|" * len(Ds))
    for rc in sorted(pts, key=lambda r: (r != "fp32", r)):
        for n in sorted({k[0] for k in pts[rc]}):
            cells = {round(d / n): v for (nn, d), v in pts[rc].items() if nn == n}
            L.append(f"| {rc} | {n / 1e3:.1f}k | "
                     + " | ".join(f"{cells[x]:.4f}" if x in cells else "—" for x in Ds) + " |")
    if noise:
        L.append("\nRun-to-run noise (points with several seeds): "
                 + "; ".join(f"{rc} at N {n / 1e3:.1f}k, D/N {d / n:.0f}: std {sd:.4f} nats over "
                             f"{k} seeds" for rc, v in sorted(noise.items()) for n, d, sd, k in v))
    if f is None:
        L.append("\n(not enough fp32 grid points finished to fit the law: need ≥ 6)")
        path.write_text("\n".join(L) + "\n")
        return
    law = f.law
    L.append("\n## The fp32 law\n")
    L.append(f"L(N, D) = A·N^−α + B·D^−β + E, nonlinear least squares on log-loss over "
             f"{len(pts['fp32'])} fp32 points; 95% intervals from {len(f.boot_law)} bootstrap "
             "replicates over grid points (lowprec.scaling; its measured coverage on synthetic "
             "grids is 0.85-0.95 for the law's parameters, E lowest).\n")
    L.append("| parameter | fit | 95% interval |\n|---|---:|---|")
    for name in ("A", "alpha", "B", "beta", "E"):
        L.append(f"| {name} | {getattr(law, name):.4g} | "
                 f"{_iv(*f.law_interval(name), 4) if f.boot_law else '—'} |")
    rms = {rc: float((r ** 2).mean()) ** 0.5 for rc, r in f.residuals.items()}
    L.append("\n## Effective parameters and data per recipe\n")
    L.append("L_r(N, D) = A·(N·eff_N)^−α + B·(D·eff_D)^−β + E with the fp32 law's parameters; "
             "eff ∈ (0, 1] (1: no worse than fp32 in that direction). Quartet's values (Table 3) "
             "are for a 30M-parameter Llama on C4 with 10⁸-10⁹ tokens, 250-2000× our largest "
             "model: the scale difference alone can move them, so compare the ordering, not the "
             f"numbers. Predicted gap: L_r − L_fp32 at N = {PREDICT[0]:.0e}, D = {PREDICT[1]:.0f}·N.\n")
    L.append("| recipe | eff_N | 95% interval | eff_D | 95% interval | residual RMS (log) | "
             "predicted gap at 1B, 20 tok/param (nats) | 95% interval | Quartet (eff_N, eff_D) |")
    L.append("|---|---:|---|---:|---|---:|---:|---|---|")
    L.append(f"| fp32 | 1 | — | 1 | — | {rms['fp32']:.4f} | 0 | — | — |")
    N1, D1 = PREDICT[0], PREDICT[0] * PREDICT[1]
    for rc, (en, ed) in sorted(f.eff.items()):
        q = QUARTET_MATCH.get(rc)
        boot = bool(f.boot_eff.get(rc))
        L.append(f"| {rc} | {en:.3f} | {_iv(*f.eff_interval(rc, 0)) if boot else '—'} | "
                 f"{ed:.3f} | {_iv(*f.eff_interval(rc, 1)) if boot else '—'} | {rms[rc]:.4f} | "
                 f"{f.gap(rc, N1, D1):+.4f} | "
                 f"{_iv(*f.gap_interval(rc, N1, D1), 4) if boot else '—'} | "
                 + (f"{q}: {QUARTET[q][0]}, {QUARTET[q][1]}" if q else "—") + " |")
    L.append("\nQuartet's other published rows: "
             + "; ".join(f"{k}: eff_N {v[0]}, eff_D {v[1]}" for k, v in QUARTET.items()
                         if k not in QUARTET_MATCH.values()) + ".")
    ns = sorted({n for p in pts.values() for n, _ in p})
    dmax = max(d for p in pts.values() for _, d in p)
    L.append(f"\n**Extrapolation.** The gap at 1B parameters is the fitted law evaluated "
             f"{N1 / ns[-1]:.1e}× beyond the largest model and {D1 / dmax:.1e}× beyond the largest "
             "D of the grid. It assumes the law's form, its exponents and each recipe's "
             "multipliers stay the same over that range; none of that is tested by a grid of "
             f"{ns[0] / 1e3:.1f}k-{ns[-1] / 1e3:.1f}k parameters, so read it as what these fits "
             "imply, with the bootstrap interval as a lower bound on the uncertainty (it carries "
             "the fit's noise, not the model's error).")
    findings = note(NOTES, scale, "scaling_table.findings.md")
    if findings is not None:
        L.append("\n## Findings\n")
        L.append(findings)
    L.append("\n![validation loss vs tokens, fitted curves](scaling_table.png)\n"
             "![eff_N and eff_D per recipe](scaling_table_eff.png)")
    L.append("\n## How this was made\n")
    cmds = launches(Path(idx).parent, "scaling", scale)
    sweep = [c for c in cmds if "optim.lr=" in c["command"]]
    if sweep:  # their runs are at other LRs, or were run again by the grid's own launch
        L.append(f"- the fp32 LR sweep's {len(sweep)} launch records are not listed: none of its runs "
                 "is a number here (results/notes/scaling_plan.md has the sweep and its commits)")
    for c in (c for c in cmds if c not in sweep):
        L.append(f"- `{c['command']}`  \n  commit `{c['commit']}`, started {c['started']}"
                 + (f", wall time {c['wall_s'] / 60:.1f} min" if c.get("wall_s") is not None else ""))
    walls = [t["wall"][0] * len(t["seeds"]) for t in trs if t["wall"][0] is not None]
    if walls:
        L.append(f"- training wall time, all runs of the grid: {sum(walls) / 3600:.2f} h")
    L.append("- then `python scripts/make_tables.py scaling` (the fit, this file and the figures)")
    path.write_text("\n".join(L) + "\n")


def plot(trs, f, path: Path) -> None:
    """<path>: loss vs D, one panel per recipe, one colour per N, with the fitted curves;
    <stem>_eff.png: eff_N and eff_D per recipe with 95% intervals, Quartet's beside."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pts, _ = grid_points(trs)
    rcs = sorted(pts, key=lambda r: (r != "fp32", r))
    if not rcs:
        return
    sizes = sorted({n for p in pts.values() for n, _ in p})
    fig, axes = plt.subplots(1, len(rcs), figsize=(3.4 * len(rcs), 3.6), sharey=True, squeeze=False)
    for ax, rc in zip(axes[0], rcs):
        for i, n in enumerate(sizes):
            xs = sorted(d for nn, d in pts[rc] if nn == n)
            ax.plot(xs, [pts[rc][(n, d)] for d in xs], "o", color=f"C{i}", label=f"N {n / 1e3:.0f}k")
            if f is not None and xs and (rc == "fp32" or rc in f.eff):
                e = (1.0, 1.0) if rc == "fp32" else f.eff[rc]
                grid = np.geomspace(min(xs) / 1.3, max(xs) * 1.3, 50)
                ax.plot(grid, f.law.loss(n, grid, *e), "-", color=f"C{i}", lw=1)
        ax.set_xscale("log")
        ax.set_title(rc, fontsize=9)
        ax.set_xlabel("tokens D")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final validation loss (nats)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    if f is None:
        return
    names = sorted(f.eff)
    fig, ax = plt.subplots(figsize=(1.1 * (len(names) + len(QUARTET)) + 2, 3.8))
    for k, (which, lab) in enumerate(((0, "eff_N"), (1, "eff_D"))):
        xs = np.arange(len(names)) + 0.38 * k
        ys = [f.eff[r][which] for r in names]
        err = [[y - f.eff_interval(r, which)[0] for r, y in zip(names, ys)],
               [f.eff_interval(r, which)[1] - y for r, y in zip(names, ys)]] \
            if all(f.boot_eff.get(r) for r in names) else None
        ax.bar(xs, ys, 0.36, yerr=err, capsize=3, color=f"C{k}", label=f"{lab} (ours, 95% CI)")
        qx = len(names) + 0.5 + np.arange(len(QUARTET)) + 0.38 * k
        ax.bar(qx, [v[which] for v in QUARTET.values()], 0.36, color=f"C{k}", alpha=0.4,
               hatch="//", label=f"{lab} (Quartet, 30M Llama)")
    ticks = list(np.arange(len(names)) + 0.19) + list(len(names) + 0.5 + np.arange(len(QUARTET)) + 0.19)
    ax.set_xticks(ticks, names + list(QUARTET), rotation=40, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("multiplier (1 = fp32)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path.with_name(path.stem + "_eff.png"), dpi=100)
    plt.close(fig)


def write(trs, idx, out: Path, plot_figs: bool = True, n_boot: int = N_BOOT) -> Path:
    """Fit, write <out>/scaling_table.md and (plot_figs) its figures; returns the md path."""
    f = fit(trs, n_boot)
    md = out / "scaling_table.md"
    write_md(trs, f, idx, md)
    if plot_figs:
        plot(trs, f, out / "scaling_table.png")
    return md
