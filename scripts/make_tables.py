#!/usr/bin/env python
"""Write results/<table>.md and results/<table>.png from the run index.

    python scripts/make_tables.py                      # every small-scale table
    python scripts/make_tables.py luq_table --scale full --index /ckpt/outputs/full/runs.sqlite

For each row of conf/experiment/<scale>/<table>/ the finished runs in the index are found and the
table gets: final top-1 mean ± std over seeds, the seeds, the degradation vs the table's fp32 row
(per seed, same seed, then mean ± std), the papers' numbers beside them (conf/paper_numbers.yaml),
the command(s) and git commit from <out_root>/commands.jsonl, and the people-written notes from
results/notes/<scale>/ (how the scale differs from the paper's; findings). The figure has test
top-1 and train loss per epoch, mean over seeds, one line per row. The computation is
lowprec.tables; the rendering lowprec.table_md. The scaling grid (table `scaling`) is a fit,
not a row per experiment: results/scaling_table.md and its figures (lowprec.scaling_table).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lowprec import adapt_table, scaling_table, table_md, tables


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("tables", nargs="*", help="default: every table of the scale")
    p.add_argument("--scale", choices=tables.SCALES, default="small")
    p.add_argument("--index", default=None, help="run index (default: <out_root>/runs.sqlite)")
    p.add_argument("--out", default=str(tables.REPO / "results"))
    p.add_argument("--notes", default=str(table_md.NOTES),
                   help="folder of the people-written notes (<scale>/_scale.md, <table>.note.md, "
                        "<table>.findings.md)")
    p.add_argument("--override", action="append", default=[],
                   help="Hydra override used when composing rows (e.g. out_root=...)")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for table in a.tables or tables.tables(a.scale):
        try:
            specs, found, idx = tables.collect(table, a.scale, a.index, a.override)
        except ValueError as e:  # an unknown table
            print(f"error: {e}", file=sys.stderr)
            return 2
        trs = tables.table_rows(specs, found)
        if table == "scaling":  # the grid's own table: the fit, not a row per experiment
            md = scaling_table.write(trs, idx, out, plot_figs=not a.no_plot)
            print(f"wrote {md} ({sum(len(t['seeds']) for t in trs)} runs)")
            continue
        name = table if a.scale == "small" else f"{table}_{a.scale}"
        table_md.write_md(table, a.scale, specs, trs, idx, out / f"{name}.md", a.override,
                          notes=Path(a.notes))
        if not a.no_plot:
            table_md.plot(table, a.scale, trs, out / f"{name}.png")
        if table.startswith("adapt"):  # adapt(2000)_table: lowp_fraction, decisions, r-vs-gap figure
            adapt_table.write(trs, out / f"{name}.md", None if a.no_plot else out / f"{name}_r_gap.png")
        print(f"wrote {out / name}.md ({sum(len(t['seeds']) for t in trs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
