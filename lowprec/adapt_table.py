"""The adapt table's extra section and figure (issue 12; scripts/make_tables.py adapt_table).

Section: per row its controller policy, the 4-bit (low-precision) fraction of update-GEMM MACs
(`lowp_fraction`, SMP draws counted: 2.0 = SMP-2 everywhere; lowprec.adapt), the number of
controller events, the late_hp step, and the first measured step at which each whole-model ratio
fell below √3: lowprec's r (`noise/global/r`) and, where the runs log it, the paper's r_full
(`noise/global/r_full`, lowprec.noise.full_ratio); means over seeds, "never" when no seed crossed.
Figure (<stem>_r_gap.png): left, r = ‖g‖/‖ĝ − g‖ per converted layer over training for the fixed
(policy none) rows, mean over seeds, log scale, with the √3 line, and r_full dashed where logged;
right, the validation-loss gap to the fp32 row over training (same seed paired, then the mean),
one line per row.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from . import tables as T
from .noise import TAU


def _policy(t) -> str:
    ss = [T.summary_of(r).get("adapt") or {"policy": "none"} for r in t["runs"]]
    return ss[0]["policy"] if ss else "?"


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def section_md(trs) -> str:
    """Markdown: row, policy, seeds, lowp_fraction, events per run, late_hp step (means)."""
    lines = ["## Adaptive precision: cost and decisions", "",
             "| row | policy | seeds | low-precision update MACs (lowp_fraction) | events / run | "
             "late_hp step | first step r < √3 | first step r_full < √3 |",
             "|---|---|---|---|---|---|---|---|"]
    for t in trs:
        ss = [T.summary_of(r) for r in t["runs"]]
        lf = _mean([s.get("lowp_fraction") for s in ss])
        ev = _mean([len(s.get("adapt_events") or []) for s in ss]) if ss else None
        lh = [s.get("late_hp_step") for s in ss if s.get("late_hp_step") is not None]
        lines.append(f"| {t['spec'].label} | {_policy(t)} | {len(ss)} | "
                     f"{'—' if lf is None else f'{lf:.3f}'} | {'—' if ev is None else f'{ev:.1f}'} | "
                     f"{', '.join(map(str, lh)) or '—'} | {_crossing(t, 'global')} | "
                     f"{_crossing(t, 'global_full')} |")
    return "\n".join(lines) + "\n"


def _crossing(t, curve: str) -> str:
    """Mean over seeds of the first step where the curve is below √3 ("never (n)" if no seed
    crossed, "—" if no seed logged it); "k of n seeds" when only some crossed."""
    firsts, logged = [], 0
    for r in t["runs"]:
        pts = noise_curves(r).get(curve)
        if not pts:
            continue
        logged += 1
        below = [st for st, v in pts if v < TAU]
        if below:
            firsts.append(min(below))
    if not logged:
        return "—"
    if not firsts:
        return f"never ({logged} seeds)"
    m = _mean(firsts)
    return f"{m:.0f}" + (f" ({len(firsts)} of {logged} seeds)" if len(firsts) < logged else "")


def noise_curves(r: dict) -> dict[str, list[tuple[int, float]]]:
    """{layer: [(step, exact r), ...]} from a run's metrics.jsonl noise records, plus
    "global_full" for the paper's whole-model ratio (noise/global/r_full) where logged."""
    out: dict[str, list[tuple[int, float]]] = {}
    for x in _records(r):
        for k, v in x.items():
            if v is None or not k.startswith("noise/"):
                continue
            if k.endswith("/r"):
                out.setdefault(k[len("noise/"):-len("/r")], []).append((x["step"], v))
            elif k == "noise/global/r_full":
                out.setdefault("global_full", []).append((x["step"], v))
    return out


def _records(r: dict) -> list[dict]:
    import json

    p = Path(r["run_dir"]) / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def plot_r_gap(trs, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(13, 4.6))
    base = next((t for t in trs if (t["spec"].grad, t["spec"].fwd) == ("fp32", "fp32")), None)
    base_curves = {r["seed"]: dict(T.val_curve(r)) for r in (base["runs"] if base else [])}
    for i, t in enumerate(trs):
        if t is base:
            continue
        if _policy(t) == "none":
            per_layer: dict[str, dict[int, list[float]]] = {}
            for r in t["runs"]:
                for layer, pts in noise_curves(r).items():
                    for st, v in pts:
                        per_layer.setdefault(layer, {}).setdefault(st, []).append(v)
            for j, (layer, by_step) in enumerate(sorted(per_layer.items())):
                xs = sorted(by_step)
                whole = layer in ("global", "global_full")
                ax[0].plot(xs, [statistics.fmean(by_step[s]) for s in xs], color=f"C{i % 10}",
                           lw=2.2 if whole else 0.8, alpha=1 if whole else 0.5,
                           ls="--" if layer == "global_full" else "-",
                           label=(f"{t['spec'].label} global" if layer == "global" else
                                  f"{t['spec'].label} r_full (paper's)" if whole else None))
        gaps: dict[int, list[float]] = {}
        for r in t["runs"]:
            b = base_curves.get(r["seed"], {})
            for st, v in T.val_curve(r):
                if st in b:
                    gaps.setdefault(st, []).append(v - b[st])
        if gaps:
            xs = sorted(gaps)
            ax[1].plot(xs, [statistics.fmean(gaps[s]) for s in xs], marker="o", ms=3, color=f"C{i % 10}",
                       label=f"{t['spec'].label} ({_policy(t)})")
    ax[0].axhline(TAU, color="k", ls="--", lw=1, label="√3")
    ax[0].set_yscale("log")
    ax[0].set_ylabel("r = ‖g‖ / ‖ĝ − g‖ (fixed rows; thin: layers, thick: whole model)")
    ax[1].axhline(0, color="k", lw=0.8)
    ax[1].set_ylabel("val loss − fp32 val loss (nats, same seed)")
    for a in ax:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(trs, md_path: Path, png_path: Path | None) -> None:
    """Append the section to the table's markdown; write the figure (png_path None: no plot)."""
    with open(md_path, "a") as f:
        f.write("\n" + section_md(trs))
        if png_path is not None:
            f.write(f"\n![r per layer and loss gap to fp32]({png_path.name})\n")
    if png_path is not None:
        plot_r_gap(trs, png_path)
