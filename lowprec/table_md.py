"""Render one results table: results/<table>.md and its figure (for scripts/make_tables.py).

Everything numeric comes from `lowprec.tables` (the runs' summaries and metrics.jsonl). The prose
around it is written by people and read from a notes folder (default results/notes/):

    <scale>/_scale.md            how the scale differs from the papers' (under every table's title)
    <scale>/<table>.note.md      replaces _scale.md for one table whose setup differs
    <scale>/<table>.findings.md  "What it shows": a reading of particular runs (rewrite on rerun)

A leading `<!-- ... -->` comment in a note is not copied.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from . import tables as T
from .provenance import git_commit, launches

NOTES = T.REPO / "results" / "notes"
# Tables that also show the best end-of-epoch top-1 (the single-seed long-horizon table).
BEST_COLUMN = {"long_table"}


def fmt(m, s, p=2):  # "m ± s"
    if m is None:
        return "—"
    return f"{m:.{p}f}" + (f" ± {s:.{p}f}" if s is not None else "")


def note(notes: Path, *parts: str) -> str | None:
    p = Path(notes, *parts)
    if not p.exists():
        return None
    return re.sub(r"\A\s*<!--.*?-->\s*", "", p.read_text(), flags=re.S).strip()


def is_lm(table: str, trs) -> bool:
    """A language-model table: its runs report validation loss (or, with no runs yet, its name)."""
    return any(t["metric"] == "val_loss" for t in trs) or table.startswith("lm_")


def write_md(table, scale, specs, trs, idx, path: Path, overrides=(), notes: Path = NOTES):
    if is_lm(table, trs):
        return write_lm_md(table, scale, specs, trs, idx, path, overrides, notes)
    head = note(notes, scale, f"{table}.note.md") or note(notes, scale, "_scale.md") or ""
    L = [f"# {table} ({scale} scale)\n", head + "\n"]
    best_col = table in BEST_COLUMN
    paper = T.paper_numbers()
    L.append("| row | model / data | fwd | grad | FNT | seeds | top-1 % (mean ± std) | "
             "degradation vs fp32 (points) | " + ("best epoch top-1 % | best-epoch degradation | "
                                                  "final train loss | " if best_col else "")
             + "lowest epoch top-1 % | paper top-1 | paper degradation / claim |")
    L.append("|---" * (14 if best_col else 11) + "|")
    base_best = {t["spec"].label: t["best"][0] for t in trs}
    for t in trs:
        s = t["spec"]
        ptop, pdeg = T.paper_cell(table, scale, s.label, paper)
        wnm = f" + {s.weight_nm[0]}:{s.weight_nm[1]} weights" if s.weight_nm else ""
        deg = "0 (baseline)" if t["base"] == s.label else fmt(*t["deg"])
        best = ""
        if best_col:
            bb = base_best.get(t["base"])
            bdeg = ("0 (baseline)" if t["base"] == s.label else
                    f"{bb - t['best'][0]:.2f}" if bb is not None and t["best"][0] is not None else "—")
            best = f"{fmt(t['best'][0], None)} | {bdeg} | {fmt(t['loss'][0], None, 3)} | "
        L.append(f"| {s.label} | {s.model} / {s.data} | {s.fwd} | {s.grad}{wnm} | {s.fnt_epochs} | "
                 f"{','.join(map(str, t['seeds'])) or 'none'} | {fmt(*t['top1'])} | {deg} | {best}"
                 f"{fmt(t['low'][0], None)} | {ptop} | {pdeg} |")
    L.append("\nDegradation = fp32 top-1 − row top-1 for the same seed (> 0: worse), then mean ± std "
             "over seeds; std is the sample std (n−1), absent with one seed. Final-epoch top-1, "
             "not best. Lowest epoch top-1: the worst end-of-epoch test top-1 during training "
             "(mean over seeds): an unstable run shows there even when it recovers by the end."
             + (" Best epoch top-1: the highest end-of-epoch test top-1 (mean over seeds); "
                "best-epoch degradation = fp32's best − the row's best. Final train loss: the "
                "mean training loss of the last epoch (mean over seeds)." if best_col else ""))
    for t in [t for t in trs if t["spec"].fnt_epochs]:
        L.append(f"\n{t['spec'].label}: the FNT row trains {t['spec'].fnt_epochs} more epoch(s) than "
                 "the fp32 row; its degradation is against an fp32 run of the same total length "
                 "and schedule, same seed (the runner's trainer.baseline=auto match), not against "
                 "the shorter fp32 row (the paper's convention, which credits FNT with its extra "
                 "epochs).")
    _tail(L, table, scale, trs, idx, overrides, notes)
    path.write_text("\n".join(L) + "\n")


def _tail(L, table, scale, trs, idx, overrides, notes):
    """Findings, claim checks and provenance (commands, commit, wall time)."""
    findings = note(notes, scale, f"{table}.findings.md")
    if findings:
        L.append("\n## What it shows\n\n" + findings)
    L.append("\n## Checks of the papers' claims (computed from the table)\n")
    L.extend(T.checks(trs, f"{table}, {scale} scale") or ["(not enough rows finished)"])
    cmds = launches(Path(idx).parent, table, scale)
    done = {c["started"] for c in cmds if c.get("wall_s") is not None}
    cmds = [c for c in cmds if c.get("wall_s") is not None or c.get("started") not in done]
    L.append("\n## How this was made\n")
    for c in cmds:
        env = " ".join(f"{k}={v}" for k, v in c.get("env", {}).items())
        L.append(f"- `{env} {c['command']}`  \n  commit `{c['commit']}`, started {c['started']}")
    if not cmds:
        L.append(f"- `python scripts/reproduce.py {table} --scale {scale}` (no launch log found)")
    extra = "".join(f" --override {o}" for o in overrides)
    L.append(f"- then `python scripts/make_tables.py {table} --scale {scale}{extra}` "
             f"(commit `{git_commit()}`); index `{Path(idx).name}` under the run output root.")
    walls = [t["wall"][0] * len(t["seeds"]) for t in trs if t["wall"][0] is not None]
    if walls:
        L.append(f"- training wall time, all runs of this table: {sum(walls) / 60:.1f} min")
    for c in cmds:
        if c.get("wall_s") is not None:
            L.append(f"- measured wall time of `{c['command']}` (started {c['started']}): "
                     f"{c['wall_s'] / 60:.1f} min on this machine"
                     + (f", {c['jobs']} jobs in parallel" if c.get("jobs") else ""))


def write_lm_md(table, scale, specs, trs, idx, path: Path, overrides=(), notes: Path = NOTES):
    """A language-model table: validation loss, bits/char and paired Δ val loss vs fp32."""
    head = note(notes, scale, f"{table}.note.md") or note(notes, scale, "_scale.md") or ""
    L = [f"# {table} ({scale} scale)\n", head + "\n"]
    paper = T.paper_numbers()
    L.append("| row | δ route | fwd | grad | FNT steps | seeds | val loss, nats (mean ± std) | "
             "bits/char | Δ val loss vs fp32, nats (mean ± std) | 95% CI of Δ | char top-1 % | "
             "paper claim |")
    L.append("|---" * 12 + "|")
    for t in trs:
        s = t["spec"]
        method = s.label[len(T.fwd_prefix(s.label)):]
        for suf in ("_bwd", "_both"):
            method = method[: -len(suf)] if method.endswith(suf) else method
        method = method.split("_fnt")[0] + ("_fnt1" if "_fnt" in method else "")
        claim = paper["mvue_claim"].get(method) or paper["luq_claim"].get(method, "")
        base = t["base"] == s.label
        deg = "0 (baseline)" if base else fmt(*t["deg"], p=4)
        e = None if base else T.ci(t)
        fnt = T.fnt_of(s)
        L.append(f"| {s.label} | {T.route_of(s.label)} | {s.fwd} | {s.grad} | {fnt} | "
                 f"{','.join(map(str, t['seeds'])) or 'none'} | {fmt(*t['val'], p=4)} | "
                 f"{fmt(t['bpc'][0], None, 3)} | {deg} | {'—' if e is None else f'[{e[0]:+.4f}, {e[1]:+.4f}]'} | "
                 f"{fmt(*t['top1'])} | {claim} |")
    L.append("\nVal loss: mean cross-entropy (nats per character) of the final model on the fixed "
             "validation windows; bits/char = val loss / ln 2. Δ = val loss(row) − val loss(fp32) "
             "for the same seed (same init and data order; > 0: worse), then mean ± sample std "
             "(n−1) over seeds; 95% CI: Student's t with n − 1 df (not corrected for the "
             "number of rows; the verdicts below are). FNT rows: Δ against an fp32 run of the "
             "same total steps (below). Char top-1: next-character accuracy. Route: "
             "where the estimate of δ goes (README, methods table): update = update GEMM only, "
             "blocks along tokens; backward = backward GEMM only, blocks along output channels; "
             "both = one draw feeds both GEMMs; quantizer = one quantized δ feeds both GEMMs."
             + (" Diverged runs (val loss ≥ ln V): "
                + ", ".join(f"{t['spec'].label} ({t['diverged']})" for t in trs if t["diverged"])
                if any(t["diverged"] for t in trs) else ""))
    for t in trs:
        fnt = T.fnt_of(t["spec"])
        if fnt:
            L.append(f"\n{t['spec'].label}: the FNT row trains {fnt} steps more than the fp32 row; "
                     "its Δ is against an fp32 run of the same total steps and schedule, same seed "
                     "(the runner's trainer.baseline=auto match), never against the shorter fp32 "
                     "row (the paper's convention, which credits FNT with its extra steps).")
    _tail(L, table, scale, trs, idx, overrides, notes)
    L.append(f"- figures: `{path.stem}.png` (validation-loss curves, one panel per route) and "
             f"`{path.stem}_delta.png` (Δ val loss per row, error bars the 95% CI)")
    path.write_text("\n".join(L) + "\n")


def plot(table, scale, trs, path: Path):
    """Test top-1 and train loss per epoch, mean over seeds, one line per row (an LM table:
    plot_lm)."""
    if is_lm(table, trs):
        return plot_lm(table, scale, trs, path)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(13, 4.6))
    for i, t in enumerate(trs):
        curves = [T.epoch_records(r) for r in t["runs"]
                  if (Path(r["run_dir"]) / "metrics.jsonl").exists()]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        ep = [curves[0][j]["epoch"] for j in range(n)]
        top = [statistics.fmean(c[j]["top1"] for c in curves) for j in range(n)]
        loss = [statistics.fmean(c[j]["train_loss"] for c in curves) for j in range(n)]
        ls = "--" if t["spec"].fnt_epochs else "-"
        lab = f"{t['spec'].label} (n={len(curves)})"
        ax[0].plot(ep, top, ls, marker="o", color=f"C{i % 10}", label=lab)
        ax[1].plot(ep, loss, ls, marker="o", color=f"C{i % 10}", label=lab)
    ax[0].set_ylabel("test top-1 %")
    ax[1].set_ylabel("train loss")
    ax[1].set_yscale("log")
    for a in ax:
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"{table} ({scale}): mean over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


ROUTE_PANELS = ("quantizer", "update", "backward", "both")


def plot_lm(table, scale, trs, path: Path):
    """<path>: validation loss vs step (mean over seeds), one panel per δ route, fp32 in each;
    <stem>_delta.png: Δ val loss vs fp32 per row with 95%-CI error bars (paired t)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ROUTE_PANELS if any(T.route_of(t["spec"].label) == p for t in trs)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.6 * max(1, len(panels)), 4.4),
                             sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        shown = [t for t in trs if T.route_of(t["spec"].label) in (panel, "baseline")]
        for i, t in enumerate(shown):  # colours per panel: no two lines of a panel share one
            route = T.route_of(t["spec"].label)
            curves = [c for c in (T.val_curve(r) for r in t["runs"]) if c]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            steps = [curves[0][j][0] for j in range(n)]
            mean = [statistics.fmean(c[j][1] for c in curves) for j in range(n)]
            ax.plot(steps, mean, "--" if route == "baseline" else "-", color=f"C{i % 10}",
                    marker=".", label=f"{t['spec'].label} (n={len(curves)})")
        ax.set_title(f"route: {panel}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("validation loss (nats)")
    fig.suptitle(f"{table} ({scale}): validation loss, mean over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

    rows = [t for t in trs if t["deg"][0] is not None and t["base"] != t["spec"].label]
    fig, ax = plt.subplots(figsize=(max(6, 0.42 * len(rows) + 2), 4.4))
    colors = {p: f"C{i}" for i, p in enumerate(ROUTE_PANELS)}
    for i, t in enumerate(rows):
        e = T.ci(t)
        ax.bar(i, t["deg"][0], yerr=0 if e is None else (e[1] - e[0]) / 2, capsize=3,
               color=colors.get(T.route_of(t["spec"].label), "C7"))
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), [t["spec"].label for t in rows], rotation=70, fontsize=7,
                  ha="right")
    ax.set_ylabel("Δ val loss vs fp32 (nats), 95% CI")
    ax.legend(handles=[matplotlib.patches.Patch(color=c, label=p) for p, c in colors.items()
                       if any(T.route_of(t["spec"].label) == p for t in rows)], fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"{table} ({scale}): paired Δ val loss (same seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path.with_name(path.stem + "_delta.png"), dpi=100)
    plt.close(fig)
