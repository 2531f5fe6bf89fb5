"""Results tables: which experiment files make a table, which finished runs fill each row, and
the numbers each row shows (scripts/reproduce.py and scripts/make_tables.py are CLIs over this).

A table is a folder conf/experiment/<scale>/<table>/ with one YAML per row (`# @package _global_`);
files starting with `_` are shared bases, not rows. A row is composed with Hydra (`compose_row`),
and a finished run in the index belongs to it when the run is the same experiment:

- summaries that carry `identity` (lowprec.config.Experiment.identity): the same fwd and grad
  choices and the same identity apart from the seed (the row's identity comes from the same
  `lowprec.config.experiment_identity` the runner used; it is not rebuilt here);
- older summaries: the same model, data, fwd, grad, epochs, FNT epochs, batch size and weight N:M.

So two tables that share a row (the fp32 baseline) share its runs.

Per row, over its seeds s (the newest run per seed):
  top-1      = mean ± sample std (n−1) of the final-epoch test top-1;
  degradation(s) = top1_fp32(s) − top1_row(s) against the table's fp32 row of the same model,
               data and weight N:M with no FNT (`base_label`), same seed; then mean ± std.
               A row with FNT (fine-tuning after the low-precision phase) trains longer than that
               row, so its degradation(s) is instead the one the runner measured against an fp32
               run of the same total steps and schedule, same seed (its summary's `degradation`,
               trainer.baseline=auto); it is never compared with the shorter fp32 row;
  diverged   = runs whose final top-1 ≤ chance + 1 point, chance = 100 / num_classes % (the
               run's `num_classes` from its summary; older summaries: the dataset's class count);
  verdict of "A worse than B": a paired t-test on degradation_A(s) − degradation_B(s) over the
               seeds both rows have, Holm–Bonferroni over all the claims of the table
               (lowprec.verdicts: the statistics, the words and the detectable effect).

Language-model tables (runs whose summary has metric "val_loss", conf/experiment/small/lm_*):
the row value is the final validation loss L (nats), degradation(s) = L_row(s) − L_fp32(s)
(paired: same seed = same init and data order; > 0: worse), the same mean ± std and paired
verdicts; diverged = L not finite or ≥ ln V (no better than uniform guessing over the V
characters). Rows are grouped by δ route (`route_of`).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import runs, verdicts
from .adapt import signature
from .config import experiment_identity, register_resolvers

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
PAPER_NUMBERS = CONF / "paper_numbers.yaml"
SCALES = ("small", "full")
# Rows listed first in tables and sweeps (the baseline first, then the paper's order).
NM_METHODS = ("mse12", "mse24", "mvue12", "mvue24", "mvue24_approx")
# δ routes of the N:M recipes (lowprec.recipes): the name's suffix; no suffix = the update route.
ROUTE_SUFFIXES = {"": "update", "_bwd": "backward", "_both": "both"}
ORDER = ("fp32", "w24_fp32", "radix4", "fp4_rdn", "int4_sr", "luq4", "luq4_smp2", "luq3",
         "luq4_b16", "luq4_b32", "nvfp4_rtn", "nvfp4_sr", "mxfp4_rtn", "mxfp4_sr", "nvfp4_sr_rht",
         "luq4_fnt1", "luq4_fnt2", "luq4_fnt3", "mse12", "mse24", "mvue12", "mvue24",
         "mvue24_approx", "mvue24_luq4", "w24_mvue12", "w24_mvue24",
         *(m + suf for suf in ("_bwd", "_both") for m in NM_METHODS))
# Class counts of the datasets whose summaries predate the `num_classes` field.
LEGACY_NUM_CLASSES = {"digits": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100,
                      "imagenet": 1000}


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
        raise ValueError(f"no table {table!r} at scale {scale!r}; have {tables(scale)}")
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
    identity: dict | None = None  # lowprec.config.experiment_identity of the composed row
    adapt: dict | None = None     # lowprec.adapt.signature: a fixed and an adaptive row differ here only

    @property
    def label(self) -> str:
        return self.experiment.rsplit("/", 1)[-1]


def compose_row(experiment: str, overrides: list[str] = ()) -> RowSpec:
    """Compose conf/config.yaml with experiment=<experiment> (no Hydra app is started)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={experiment}", *overrides],
                      return_hydra_config=True)
    ch = cfg.hydra.runtime.choices
    nm = cfg.convert.get("weight_nm")
    c = OmegaConf.to_container(cfg, resolve=False)
    c.pop("hydra", None)
    c = OmegaConf.to_container(OmegaConf.create(c), resolve=True)
    return RowSpec(experiment=experiment, model=ch["model"], data=ch["data"], fwd=ch["fwd"],
                   grad=ch["grad"], epochs=int(cfg.trainer.epochs),
                   fnt_epochs=int(cfg.trainer.fnt_epochs), batch_size=int(cfg.trainer.batch_size),
                   weight_nm=None if nm is None else tuple(nm), out_root=str(cfg.out_root),
                   index=str(cfg.index), identity=experiment_identity(c), adapt=signature(c["trainer"]))


def summary_of(r: dict) -> dict:
    """The summary dict of an index row (stored as JSON in its `summary` column)."""
    s = r.get("summary")
    return json.loads(s) if isinstance(s, str) else (s or {})


def _without_seed(identity: dict) -> dict:
    return {**identity, "trainer": {k: v for k, v in identity.get("trainer", {}).items()
                                    if k != "seed"}}


def is_run_of(spec: RowSpec, r: dict) -> bool:
    """Is index row `r` a run of table row `spec`? (module docstring)"""
    s = summary_of(r)
    if (s.get("adapt") or {"policy": "none"}) != (spec.adapt or {"policy": "none"}):
        return False
    if s.get("identity") is not None and spec.identity is not None:
        return ((r["fwd"], r["grad"]) == (spec.fwd, spec.grad)
                and _without_seed(s["identity"]) == _without_seed(spec.identity))
    if (r["model"], r["data"], r["fwd"], r["grad"], r["epochs"], r["fnt_epochs"],
            r["batch_size"]) != (spec.model, spec.data, spec.fwd, spec.grad, spec.epochs,
                                 spec.fnt_epochs, spec.batch_size):
        return False
    nm = (s.get("convert") or {}).get("weight_nm")
    return (None if nm is None else tuple(nm)) == spec.weight_nm


def matching_runs(spec: RowSpec, index_rows: list[dict]) -> list[dict]:
    """Index rows (dicts from lowprec.runs.rows) that are runs of this table row, oldest first."""
    return [r for r in index_rows if is_run_of(spec, r)]


def index_rows(index: str | Path) -> list[dict]:
    return runs.rows(index)


def num_classes(r: dict) -> int:
    """The class count of a run's dataset: its summary's, else the dataset's (older summaries)."""
    n = summary_of(r).get("num_classes")
    return int(n) if n is not None else LEGACY_NUM_CLASSES[r["data"]]


def metric_of(r: dict) -> str:
    """"val_loss" for a language-model run, "top1" otherwise (older summaries: top1)."""
    return summary_of(r).get("metric") or "top1"


def value(r: dict) -> float | None:
    """A run's final metric: validation loss (nats) for an LM run, else top-1 (%)."""
    return summary_of(r).get("val_loss") if metric_of(r) == "val_loss" else r["final_top1"]


def diverged(r: dict) -> bool:
    """Final top-1 within 1 point of chance (100 / num_classes %); for an LM run, validation
    loss not finite or ≥ ln V (no better than uniform guessing)."""
    if metric_of(r) == "val_loss":
        v = value(r)
        return v is None or not math.isfinite(v) or v >= math.log(num_classes(r))
    return r["final_top1"] is not None and r["final_top1"] <= 100 / num_classes(r) + 1


def route_of(label: str) -> str:
    """The δ route a row's method uses: "update" / "backward" / "both" for the N:M recipes
    (and "update" for mvue24_luq4's N:M part), "quantizer" for a quantizer feeding both GEMMs,
    "baseline" for fp32 (an FWD_PREFIXES prefix and an ADAPT_SUFFIXES suffix are ignored)."""
    m = label[len(fwd_prefix(label)):]
    m = next((m[: -len(s)] for s in ADAPT_SUFFIXES if m.endswith(s)), m)
    if m.endswith("fp32"):
        return "baseline"
    for suf in ("_bwd", "_both"):
        if m.endswith(suf) and m[: -len(suf)] in NM_METHODS:
            return ROUTE_SUFFIXES[suf]
    return "update" if m in NM_METHODS or m == "mvue24_luq4" else "quantizer"


# ----------------------------------------------------------------------------- paper numbers


def paper_numbers(path: str | Path = PAPER_NUMBERS) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def method_of(label: str) -> tuple[str, str | None]:
    """(method, model or None) from a row label: 'luq4' or 'resnet50_imagenet_luq4'."""
    for m in sorted(ORDER, key=len, reverse=True):
        if label == m:
            return m, None
        if label.endswith("_" + m):
            return m, label[: -len(m) - 1].split("_imagenet")[0].split("_cifar10")[0]
    return label, None


def paper_cell(table: str, scale: str, label: str, paper: dict | None = None) -> tuple[str, str]:
    """(paper top-1, paper claim/degradation) for a row."""
    p = paper_numbers() if paper is None else paper
    luq_claim, mvue_claim = p["luq_claim"], p["mvue_claim"]
    method, model = method_of(label)
    model = model or p["paper_model"].get(scale)
    luq_style = table.startswith("luq") or (not table.startswith("mvue") and (
        method in luq_claim and method not in mvue_claim))  # mixed tables: by method
    if luq_style:
        v = p["luq_top1"].get(model, {}).get(method)
        base = p["luq_top1"].get(model, {}).get("fp32")
        if method == "fp32":
            deg = "baseline"
        else:
            deg = f"{base - v:+.2f}" if v is not None and base is not None else luq_claim.get(method, "")
        return ("—" if v is None else f"{v:.2f} ({model})"), deg
    return "—", mvue_claim.get(method, "")


# ----------------------------------------------------------------------------- row statistics


def mean_std(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def collect(table: str, scale: str, index: str | None, overrides=()):
    """(row specs, {label: matching index rows}, index path) of one table."""
    specs = [compose_row(r, list(overrides)) for r in rows(scale, table)]
    idx = index or str(REPO / specs[0].index)
    allrows = index_rows(idx)
    found = {s.label: matching_runs(s, allrows) for s in specs}
    return specs, found, idx


def base_label(specs, spec):
    """The fp32 row a row is compared with: same model/data (and weight N:M), fp32/fp32, no FNT."""
    for s in specs:
        if (s.grad, s.fwd, s.fnt_epochs) == ("fp32", "fp32", 0) and (s.model, s.data) == (
                spec.model, spec.data) and s.weight_nm == spec.weight_nm:
            return s.label
    for s in specs:  # a sparse-weight row with no sparse-weight fp32 row: the dense one
        if (s.grad, s.fwd, s.fnt_epochs, s.weight_nm) == ("fp32", "fp32", 0, None) and (
                s.model, s.data) == (spec.model, spec.data):
            return s.label
    return None


def fnt_of(spec) -> int:
    """A row's FNT length: epochs (classification) or steps (trainer.fnt_steps), 0 if none."""
    return spec.fnt_epochs or int(((spec.identity or {}).get("trainer") or {}).get("fnt_steps") or 0)


def epoch_values(r: dict, key: str) -> list[float]:
    """Per-epoch values of `key` from the end-of-epoch records of a run's metrics.jsonl."""
    return [x[key] for x in epoch_records(r) if key in x]


def _records(r: dict) -> list[dict]:
    p = Path(r["run_dir"]) / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def epoch_records(r: dict) -> list[dict]:
    """The end-of-epoch records (with `epoch` and `top1`; not the every-k-steps ones) of a run's
    metrics.jsonl."""
    return [x for x in _records(r) if "epoch" in x and "top1" in x and x.get("eval") != "step"]


def val_curve(r: dict) -> list[tuple[int, float]]:
    """(step, validation loss) of every evaluation of a run, one per step, in step order."""
    by_step = {x["step"]: x["val_loss"] for x in _records(r) if "val_loss" in x and "step" in x}
    return sorted(by_step.items())


def table_rows(specs, found) -> list[dict]:
    """One dict of statistics per row (module docstring), in the order of `specs`."""
    out = []
    for s in specs:
        by_seed = {r["seed"]: r for r in found[s.label]}  # newest per seed wins (oldest first)
        top1 = [r["final_top1"] for r in by_seed.values()]
        bl = base_label(specs, s)
        base = {r["seed"]: value(r) for r in found.get(bl, [])} if bl else {}
        lm = any(metric_of(r) == "val_loss" for r in [*by_seed.values(), *found.get(bl, [])])
        vals = {sd: value(r) for sd, r in by_seed.items()}
        if fnt_of(s):  # only against an fp32 run of the same total steps (module docstring)
            by_deg = {sd: r["degradation"] for sd, r in by_seed.items()
                      if r["degradation"] is not None}
        else:
            by_deg = {sd: (vals[sd] - base[sd]) if lm else (base[sd] - vals[sd]) for sd in vals
                      if sd in base and vals[sd] is not None and base[sd] is not None}
        deg = list(by_deg.values())
        own = [r["degradation"] for r in by_seed.values() if r["degradation"] is not None]
        wall = [r["wall_time"] for r in by_seed.values() if r["wall_time"] is not None]
        curves = [epoch_values(r, "top1") for r in by_seed.values()]
        losses = [c[-1] for c in (epoch_values(r, "train_loss") for r in by_seed.values()) if c]
        out.append(dict(spec=s, seeds=sorted(by_seed), top1=mean_std(top1), deg=mean_std(deg),
                        low=mean_std([min(c) for c in curves if c]),
                        best=mean_std([max(c) for c in curves if c]), loss=mean_std(losses),
                        own_deg=mean_std(own), wall=mean_std(wall), base=bl,
                        runs=[by_seed[k] for k in sorted(by_seed)],
                        diverged=sum(1 for r in by_seed.values() if diverged(r)),
                        metric="val_loss" if lm else "top1",
                        val=mean_std([v for v in vals.values()]) if lm else (None, None),
                        bpc=mean_std([summary_of(r).get("bits_per_char") for r in by_seed.values()]),
                        deg_seeds=deg, deg_by_seed=by_deg))
    return out


# ----------------------------------------------------------------------------- claim checks


def ci(t) -> tuple[float, float] | None:
    """The 95% interval (paired t, n − 1 df) of a row's mean degradation; None with < 2 seeds."""
    r = verdicts.paired(t.get("deg_by_seed") or {})
    return None if r.lo is None else (r.lo, r.hi)


def claim(worse, better, text: str) -> tuple:
    """A claim "worse's degradation is larger than better's" (better None: larger than 0, i.e.
    worse than the fp32 row), tested pairwise over the seeds both rows have."""
    return ("claim", verdicts.paired(worse["deg_by_seed"],
                                     None if better is None else better["deg_by_seed"]), text)


def render(items: list, family: str, decimals: int = 2, unit: str = "") -> list[str]:
    """Markdown bullets from strings and `claim`s ("<prefix> → " strings followed by a claim
    are joined to it): Holm–Bonferroni over the claims of this list, which is the family."""
    tests = [(x[1], x[2]) for x in items if isinstance(x, tuple)]
    lines = iter(verdicts.family(tests, decimals, unit))
    out, pre = [], ""
    for x in items:
        if isinstance(x, tuple):
            out.append(pre + next(lines))
            pre = ""
        elif x.endswith("→ "):
            pre = x
        else:
            out.append(x)
    m = sum(1 for t, _ in tests if t.p is not None)
    if tests:
        out.insert(0, f"Family: the {len(tests)} claims below ({family}); {m} with ≥ 2 common "
                      f"seeds are tested, paired by seed (Student's t, n − 1 df), Holm–Bonferroni "
                      f"over those {m} at α = {verdicts.ALPHA}. Detectable effect: the mean "
                      f"difference the test finds with 80% power at the measured paired spread, at "
                      f"the Bonferroni level α/{m} (Holm's strictest step).\n")
    return out


def checks(trs, table: str = "this table") -> list[str]:
    """One markdown bullet per paper claim the table's rows can test (one Holm family)."""
    by = {t["spec"].label: t for t in trs if t["top1"][0] is not None and t["deg"][0] is not None}
    if any(t.get("metric") == "val_loss" for t in by.values()):
        return lm_checks(by, table)
    out: list = []

    def d(lbl):
        return by[lbl]["deg"][0]

    for mse, mv in (("mse12", "mvue12"), ("mse24", "mvue24")):
        if mse in by and mv in by:
            out += [f"- {mse} degrades {d(mse):+.2f}, {mv} {d(mv):+.2f} → ",
                    claim(by[mse], by[mv], f"MSE mask worse than MVUE ({mse[-2]}:{mse[-1]})")]
    if "fp4_rdn" in by and "luq4" in by:
        out += [f"- fp4_rdn degrades {d('fp4_rdn'):+.2f} (final top-1 "
                f"{by['fp4_rdn']['top1'][0]:.2f}), luq4 {d('luq4'):+.2f} → ",
                claim(by["fp4_rdn"], by["luq4"], "biased FP4 worse than LUQ (final top-1)")]
        lo, ll = by["fp4_rdn"]["low"][0], by["luq4"]["low"][0]
        lf = by["fp32"]["low"][0] if "fp32" in by else None
        if lo is not None and ll is not None:
            out.append(f"- Stability: lowest end-of-epoch top-1 fp4_rdn {lo:.2f}, luq4 {ll:.2f}"
                       + (f", fp32 {lf:.2f}" if lf is not None else "") + " → "
                       + (("fp4_rdn is unstable during training ("
                           + ("it ends at chance: diverged)" if by["fp4_rdn"]["diverged"]
                              else "it does not diverge to chance here)"))
                          if lo < ll - 5 else "no instability of fp4_rdn visible"))
    for x, text in (("int4_sr", "INT4-SR worse than LUQ"), ("radix4", "Ultra-low worse than LUQ")):
        if x in by and "luq4" in by:
            out += [f"- {x} {d(x):+.2f} vs luq4 {d('luq4'):+.2f} → ", claim(by[x], by["luq4"], text)]
    if "luq4_smp2" in by and "luq4" in by:
        out += [f"- luq4 {d('luq4'):+.2f} vs luq4_smp2 {d('luq4_smp2'):+.2f} → ",
                claim(by["luq4"], by["luq4_smp2"], "SMP-2 improves on LUQ"),
                "- SMP's variance reduction itself is measured in results/estimators.md."]
    for f in ("luq4_fnt1", "luq4_fnt2", "luq4_fnt3"):
        if f in by and "luq4" in by:
            out += [f"- {f} {d(f):+.2f} (vs an fp32 run of its own total length) vs luq4 "
                    f"{d('luq4'):+.2f} (vs the fp32 row) → ",
                    claim(by["luq4"], by[f], "FNT recovers accuracy")]
    return render(out, f"the claims of {table}", 2, " points")


# ----------------------------------------------------------------------------- LM claims

ADAPT_RECIPES = ("luq4", "luq3", "nvfp4_sr", "mvue24")  # the adapt table's recipes
ADAPT_SUFFIXES = ("_late_hp", "_smp", "_switch")  # its policy rows: <recipe><suffix>
# (worse, better, claim) pairs: "A is worse (higher Δ val loss) than B", the papers' claims
# carried over to the LM workload; rows with a FWD_PREFIXES prefix get the same pairs within it.
LM_CLAIMS = (
    ("fp4_rdn", "luq4", "biased FP4 (round-to-nearest) worse than LUQ"),
    ("int4_sr", "luq4", "INT4-SR worse than LUQ"),
    ("radix4", "luq4", "Ultra-low (radix-4) worse than LUQ"),
    ("luq4", "luq4_smp2", "SMP-2 improves on LUQ"),
    ("luq3", "luq4", "3-bit LUQ worse than 4-bit"),
    *((f"mse{nm}{suf}", f"mvue{nm}{suf}", f"MSE mask worse than MVUE ({nm[0]}:{nm[1]}, "
       f"{ROUTE_SUFFIXES[suf]} route)") for suf in ROUTE_SUFFIXES for nm in ("12", "24")),
    *((f"mvue24_approx{suf}", f"mvue24{suf}", f"approximate 2:4 MVUE worse than exact "
       f"({ROUTE_SUFFIXES[suf]} route)") for suf in ROUTE_SUFFIXES),
    *((f"mvue12{suf}", f"mvue24{suf}", f"MVUE 1:2 worse than 2:4 ({ROUTE_SUFFIXES[suf]} route; "
       "the MVUE paper: 1:2 is usually enough)") for suf in ROUTE_SUFFIXES),
    *((f"mvue24{suf}", "mvue24", f"MVUE 2:4 on the {ROUTE_SUFFIXES[suf]} route worse than on "
       "the update route") for suf in ("_bwd", "_both")),
    ("mvue24_luq4", "mvue24", "MVUE 2:4 + LUQ-4 (backward) worse than MVUE 2:4 alone"),
    # FNT: each side against an fp32 run of its own total steps (the FNT row's Δ is the runner's
    # matched-length one, table_rows), never the FNT row against the shorter fp32 row
    ("luq4", "luq4_fnt", "FNT recovers accuracy (LUQ's Δ vs fp32 of its length larger than "
     "LUQ + FNT's Δ vs fp32 of the same total steps)"),
    # formats_table (issue 11): scaling granularity, rounding, block format, RHT, LUQ vs hardware
    ("luq4", "luq4_b16", "per-tensor scaling worse than per-block (LUQ-4 vs LUQ-4, 16-blocks)"),
    ("fp4_rdn", "nvfp4_rtn", "per-tensor scaling worse than per-block (FP4 round-to-nearest vs "
     "NVFP4-RTN)"),
    ("nvfp4_rtn", "nvfp4_sr", "RTN worse than SR (NVFP4)"),
    ("mxfp4_rtn", "mxfp4_sr", "RTN worse than SR (MXFP4)"),
    ("mxfp4_sr", "nvfp4_sr", "MXFP4 (E8M0 per 32) worse than NVFP4 (E4M3 per 16), both SR"),
    ("nvfp4_sr", "nvfp4_sr_rht", "RHT improves NVFP4-SR"),
    ("luq4", "nvfp4_sr", "per-tensor LUQ-4 worse than the hardware format NVFP4-SR"),
    # adapt_table (issue 21): the controller reading the paper's r_full, per recipe
    *((r, f"{r}_late_hp", f"late_hp at the r_full crossing improves on fixed {r}") for r in ADAPT_RECIPES),
    *((f"{r}_switch", f"{r}_late_hp", f"late_hp at the crossing better than a fixed switch at the "
       f"same step ({r})") for r in ADAPT_RECIPES),
    *((r, f"{r}_smp", f"SMP doubling on r_full improves on fixed {r}") for r in ADAPT_RECIPES),
)
# Row-name prefixes of rows with a low-precision forward (their claims are checked within the
# prefix): lm_fwd4_table's INT4 forward, formats_table's NVFP4 forward.
FWD_PREFIXES = {"fwd4_": " (fwd int4)", "fwdnv_": " (fwd nvfp4)"}


def fwd_prefix(label: str) -> str:
    """The FWD_PREFIXES entry a row label starts with ("" if none)."""
    return next((p for p in FWD_PREFIXES if label.startswith(p)), "")


# Rows whose own Δ against fp32 is a paper claim ("≈ baseline" or "small degradation").
LM_VS_BASELINE = ("luq4", "luq4_smp2", "mvue24", "mvue12", "mvue24_approx", "mvue24_luq4",
                  "luq4_b16", "nvfp4_rtn", "nvfp4_sr", "mxfp4_rtn", "mxfp4_sr", "nvfp4_sr_rht",
                  *(f"{r}_late_hp" for r in ADAPT_RECIPES))


def lm_checks(by: dict, table: str = "this table") -> list[str]:
    """The LM claims (LM_CLAIMS) that the rows present can test; then, per LM_VS_BASELINE row
    (and a low-precision-forward fp32 row), "worse than fp32" on its own paired Δ. One Holm
    family (`render`); nats."""
    out: list = []
    prefixes = sorted({fwd_prefix(lbl) for lbl in by})

    def fnt_label(prefix):
        return next((l for l in by if l.startswith(prefix + "luq4_fnt")), None)

    for pre in prefixes:
        for w, b, text in LM_CLAIMS:
            w, b = (fnt_label(pre) if x == "luq4_fnt" else pre + x for x in (w, b))
            if w in by and b in by:
                out += [f"- {w} Δ {by[w]['deg'][0]:+.4f}, {b} Δ {by[b]['deg'][0]:+.4f} nats → ",
                        claim(by[w], by[b], text + FWD_PREFIXES.get(pre, ""))]
    for lbl in [l for l in by if l[len(fwd_prefix(l)):] in LM_VS_BASELINE] + [
            l for l in by if fwd_prefix(l) and l.endswith("fp32")]:
        out += [f"- {lbl}: Δ {by[lbl]['deg'][0]:+.4f} nats → ",
                claim(by[lbl], None, f"{lbl} worse than fp32")]
    return render(out, f"the claims of {table}", 4, " nats")
