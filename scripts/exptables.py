"""Shared by scripts/reproduce.py and scripts/make_tables.py: which experiment files make a table,
what each composes to, and how a finished run in the index is matched to a table row.

A table is a folder conf/experiment/<scale>/<table>/ with one YAML per row (`# @package _global_`);
files starting with `_` are shared bases, not rows. A row is identified in the run index by what its
config composes to (model, data, epochs, fnt_epochs, batch size, fwd, grad, convert.weight_nm), so
two tables that share a row (the fp32 baseline) share its runs.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SCALES = ("small", "full")
# Rows listed first in tables and sweeps (the baseline first, then the paper's order).
ORDER = ("fp32", "w24_fp32", "radix4", "fp4_rdn", "int4_sr", "luq4", "luq4_smp2", "luq4_fnt1",
         "luq4_fnt2", "luq4_fnt3", "mse12", "mse24", "mvue12", "mvue24", "mvue24_approx",
         "mvue24_luq4", "w24_mvue12", "w24_mvue24")


def tables(scale: str) -> list[str]:
    d = CONF / "experiment" / scale
    return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("_"))


def _rank(name: str) -> tuple:
    """Sort key: full-scale rows are <model>_<data>_<method>, so by model first, then method."""
    for m in sorted(ORDER, key=len, reverse=True):  # longest suffix wins (luq4_smp2 before luq4)
        if name == m or name.endswith("_" + m):
            return (name[: len(name) - len(m)], ORDER.index(m), name)
    return (name, len(ORDER), name)


def rows(scale: str, table: str) -> list[str]:
    """Experiment names (for `experiment=`) of a table's rows, baseline first."""
    d = CONF / "experiment" / scale / table
    if not d.is_dir():
        raise SystemExit(f"no table {table!r} at scale {scale!r}; have {tables(scale)}")
    names = [p.stem for p in d.glob("*.yaml") if not p.stem.startswith("_")]
    return [f"{scale}/{table}/{n}" for n in sorted(names, key=_rank)]


@dataclass(frozen=True)
class RowSpec:
    experiment: str      # e.g. small/luq_table/luq4_fnt1
    model: str
    data: str
    fwd: str
    grad: str
    epochs: int
    fnt_epochs: int
    batch_size: int
    weight_nm: tuple | None
    out_root: str
    index: str

    @property
    def label(self) -> str:
        return self.experiment.rsplit("/", 1)[-1]


def compose_row(experiment: str, overrides: list[str] = ()) -> RowSpec:
    """Compose conf/config.yaml with experiment=<experiment> (no Hydra app is started)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("lowprec_or", lambda *xs: next(
        (str(x) for x in xs if x not in (None, "")), ""), replace=True)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={experiment}", *overrides],
                      return_hydra_config=True)
    ch = cfg.hydra.runtime.choices
    nm = cfg.convert.get("weight_nm")
    return RowSpec(experiment=experiment, model=ch["model"], data=ch["data"], fwd=ch["fwd"],
                   grad=ch["grad"], epochs=int(cfg.trainer.epochs),
                   fnt_epochs=int(cfg.trainer.fnt_epochs), batch_size=int(cfg.trainer.batch_size),
                   weight_nm=None if nm is None else tuple(nm), out_root=str(cfg.out_root),
                   index=str(cfg.index))


def matching_runs(spec: RowSpec, index_rows: list[dict]) -> list[dict]:
    """Index rows (dicts from lowprec.runs.rows) that are runs of this table row."""
    out = []
    for r in index_rows:
        if (r["model"], r["data"], r["fwd"], r["grad"], r["epochs"], r["fnt_epochs"],
                r["batch_size"]) != (spec.model, spec.data, spec.fwd, spec.grad, spec.epochs,
                                     spec.fnt_epochs, spec.batch_size):
            continue
        s = json.loads(r["summary"]) if isinstance(r.get("summary"), str) else (r.get("summary") or {})
        nm = (s.get("convert") or {}).get("weight_nm")
        if (None if nm is None else tuple(nm)) != spec.weight_nm:
            continue
        out.append(r)
    return out


def index_rows(index: str | Path) -> list[dict]:
    sys.path.insert(0, str(ROOT))
    from lowprec import runs

    return runs.rows(index)
