"""The scaling-law fitter (lowprec.scaling): exact recovery of a known law and known multipliers
from noise-free losses, recovery within the bootstrap 95% intervals from noisy ones, residuals at
the noise level, and the (0, 1] bound. Grids like the planned one (4 sizes × 4 budgets of 25-200
tokens per parameter); small bootstrap counts so the test stays fast."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lowprec import scaling as S
from script_utils import load_script

LAW = S.Law(A=40.0, alpha=0.45, B=60.0, beta=0.35, E=1.3)
SIZES = (14.5e3, 25.5e3, 56.6e3, 100e3)
GRID = [(n, n * t) for n in SIZES for t in (25, 50, 100, 200)]
TRUE = {"luq4": (0.5, 0.3), "mvue24": (0.9, 0.6)}


def test_noise_free_losses_recover_the_law_and_the_multipliers_exactly():
    """Guards the model form, the log-loss residual and the starts: with no noise the fit is the
    generating law (every loss reproduced to 1e-6 relative; the parameters to 1e-3)."""
    pts = {"fp32": S.simulate(LAW, GRID), **{r: S.simulate(LAW, GRID, e) for r, e in TRUE.items()}}
    fit = S.fit_all(pts, n_boot=0)
    for name in ("A", "alpha", "B", "beta", "E"):
        assert getattr(fit.law, name) == pytest.approx(getattr(LAW, name), rel=1e-3), name
    for r, (en, ed) in TRUE.items():
        assert fit.eff[r] == (pytest.approx(en, rel=1e-3), pytest.approx(ed, rel=1e-3))
        assert np.abs(fit.residuals[r]).max() < 1e-6
    assert fit.gap("luq4", 1e9, 2e10) == pytest.approx(
        float(LAW.loss(1e9, 2e10, *TRUE["luq4"]) - LAW.loss(1e9, 2e10)), rel=1e-2)


def test_noisy_losses_recover_the_parameters_within_their_bootstrap_intervals():
    """0.5% log-normal noise on every loss (about the run-to-run spread of the LM tables): every
    true eff_N, eff_D of two recipes and the true loss gap at 1B parameters and 20 tokens per
    parameter lie in the 95% bootstrap intervals, α, β, E in the 99% ones (the measured coverage
    of the nominal 95% intervals is 0.85-0.95: lowprec.scaling docstring); residuals are at the
    noise level (RMS between 0.3 and 2 times 0.005: the fit absorbs 5 of 16 degrees of freedom)."""
    pts = {"fp32": S.simulate(LAW, GRID, noise=0.005, seed=1),
           **{r: S.simulate(LAW, GRID, e, noise=0.005, seed=2 + i)
              for i, (r, e) in enumerate(TRUE.items())}}
    fit = S.fit_all(pts, n_boot=40, seed=0)
    assert len(fit.boot_law) == 40
    for name in ("alpha", "beta", "E"):  # 99%: the percentile bootstrap undercovers E, β a bit
        lo, hi = fit.law_interval(name, 0.99)
        assert lo <= getattr(LAW, name) <= hi, (name, lo, hi)
    for r, (en, ed) in TRUE.items():
        for which, true in ((0, en), (1, ed)):
            lo, hi = fit.eff_interval(r, which)
            assert lo <= true <= hi and 0 < lo and hi <= 1, (r, which, lo, hi)
        lo, hi = fit.gap_interval(r, 1e9, 2e10)
        assert lo <= float(LAW.loss(1e9, 2e10, *TRUE[r]) - LAW.loss(1e9, 2e10)) <= hi
    for res in fit.residuals.values():
        assert 0.0015 < math.sqrt(float(np.mean(res ** 2))) < 0.01


def test_a_recipe_no_worse_than_fp32_sits_at_the_bound_one():
    """eff ∈ (0, 1]: a recipe with the fp32 losses gets eff_N = eff_D = 1 (the bound), and one
    whose losses are lower than fp32's cannot get a multiplier above 1."""
    base = S.simulate(LAW, GRID)
    better = {k: v * 0.99 for k, v in base.items()}
    fit = S.fit_all({"fp32": base, "same": dict(base), "better": better}, n_boot=0)
    assert fit.eff["same"] == (pytest.approx(1.0), pytest.approx(1.0))
    assert fit.eff["better"][0] <= 1.0 and fit.eff["better"][1] <= 1.0


def test_grid_files_follow_the_rules_and_compose_to_their_n_and_d():
    """The committed conf/experiment/small/scaling/ rows are what scripts/make_scaling_grid.py
    writes (no hand edits), and a composed row's identity gives back its N and D (the table reads
    N and D from the composed row, not from the name)."""
    from lowprec import scaling_table as ST
    from lowprec import tables as X

    grid = load_script("make_scaling_grid")
    assert grid.main(["--check"]) == 0
    assert len(X.rows("small", "scaling")) == len(grid.RECIPES) * len(grid.WIDTHS) * len(grid.TPP)
    for name, width, tpp in (("fwdnv_nvfp4_sr_c48_t200", 48, 200), ("fp32_c16_t25", 16, 25)):
        row = X.compose_row(f"small/scaling/{name}")
        rc, n, d = ST.point_of({"spec": row})
        assert (rc, n) == (name.split("_c")[0], S.chargpt_non_embedding(width))
        assert d == grid.steps(width, tpp) * 1024 and abs(d / n - tpp) < 0.05 * tpp
    ns = [S.chargpt_non_embedding(w) for w in grid.WIDTHS]
    assert 7 <= ns[-1] / ns[0] <= 9  # ~8x in N, as the plan says


def test_scaling_table_renders_from_synthetic_rows(tmp_path, monkeypatch):
    """results/scaling_table.md and both figures from rows whose losses follow a known law (the
    table's reading of labels, N, D, seeds and the fit, end to end; no index needed); the findings
    note without its leading comment; the grid's launch listed, the LR sweep's counted, not listed."""
    from types import SimpleNamespace

    from lowprec import scaling_table as ST

    notes = tmp_path / "notes"
    (notes / "small").mkdir(parents=True)
    (notes / "small" / "scaling_table.findings.md").write_text("<!-- people -->\n- the grid ran\n")
    monkeypatch.setattr(ST, "NOTES", notes)
    launch = {"table": "scaling", "scale": "small", "commit": "abc", "started": "t0", "wall_s": 60}
    (tmp_path / "commands.jsonl").write_text("".join(json.dumps({**launch, "command": c}) + "\n" for c in (
        "python run.py -m +experiment=small/scaling/fp32_c16_t25 optim.lr=1e-3,2e-2", "python run.py -m grid")))

    trs = []
    for rc, e in (("fp32", (1.0, 1.0)), ("luq4", (0.5, 0.3))):
        for w in (24, 34, 48, 68):
            n = S.chargpt_non_embedding(w)
            for tpp in (25, 50, 100, 200):
                st = round(n * tpp / 1024)
                spec = SimpleNamespace(label=f"{rc}_c{w}_t{tpp}", batch_size=16, identity={
                    "model": {"kwargs": {"n_embd": w, "n_layer": 2, "block_size": 64}},
                    "trainer": {"max_steps": st}})
                v = float(LAW.loss(n, st * 1024, *e))
                noisy = (w, tpp) == (48, 100)
                trs.append({"spec": spec, "val": (v, 0.004 if noisy else None),
                            "seeds": [0, 1, 2, 3] if noisy else [0], "wall": (10.0, None)})
    md = ST.write(trs, tmp_path / "runs.sqlite", tmp_path, n_boot=10)
    text = md.read_text()
    assert "| luq4 | 0.500 | [" in text and "| fp32 | 14.5k |" in text
    assert "std 0.0040 nats over 4 seeds" in text and "Quartet (MXFP4): eff_N 0.65" in text
    assert "## Findings\n\n- the grid ran\n" in text and "people" not in text
    assert "`python run.py -m grid`" in text and "optim.lr=1e-3" not in text
    assert "the fp32 LR sweep's 1 launch records are not listed" in text
    assert (tmp_path / "scaling_table.png").stat().st_size > 1000
    assert (tmp_path / "scaling_table_eff.png").stat().st_size > 1000


def test_reproduce_deals_rows_by_cost_and_keeps_round_robin_for_equal_rows():
    """--jobs: rows of unequal cost (the scaling grid) go longest first to the least-loaded
    process, so two processes end within one row's cost of each other; rows of equal cost are
    dealt round-robin in their order (the LM tables' launches unchanged)."""
    rp = load_script("reproduce")
    rows = [f"r{i}" for i in range(7)]
    assert rp.deal(rows, dict.fromkeys(rows, 1.0), 2) == [rows[0::2], rows[1::2]]
    w = {"a": 8.0, "b": 4.0, "c": 2.0, "d": 1.0, "e": 1.0}
    parts = rp.deal(list(w), w, 2)
    loads = [sum(w[r] for r in p) for p in parts]
    assert sorted(loads) == [8.0, 8.0] and parts[0] == ["a"]
