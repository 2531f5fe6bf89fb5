"""Verdicts on the papers' claims (lowprec.verdicts, lowprec.tables claims): the paired t-test
against scipy's, Holm–Bonferroni against a hand-worked example, the thresholds, rows with unequal
seed counts, the detectable effect's defining property, and FNT compared only with an fp32 run
of the same total steps. Fast: no training, no Hydra except where a row spec is composed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from lowprec import tables as X
from lowprec import verdicts as V
from script_utils import load_script


def test_paired_matches_scipy_ttest_rel():
    """Guards the statistic, the df (n − 1) and the interval: p and the 95% CI equal
    scipy.stats.ttest_rel's on the same pairs."""
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 11):
        a, b = rng.normal(0.3, 1, n), rng.normal(0, 1, n)
        t = V.paired(dict(enumerate(a)), dict(enumerate(b)))
        ref = stats.ttest_rel(a, b)
        ci = ref.confidence_interval(0.95)
        assert t.n == n and t.p == pytest.approx(ref.pvalue, rel=1e-9)
        assert (t.lo, t.hi) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))
        assert t.mean == pytest.approx(float(np.mean(a - b)))
    one = V.paired({0: 1.0, 1: 2.0, 2: 4.0})  # one-sample (a claim against fp32 itself)
    assert one.p == pytest.approx(stats.ttest_1samp([1.0, 2.0, 4.0], 0).pvalue)


def test_holm_hand_worked_example():
    """Holm on p = (0.01, 0.04, 0.03, 0.005), m = 4, worked by hand: sorted 0.005·4 = 0.02,
    0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → max(0.06, 0.04) = 0.06 (monotone). So at 0.05
    only the first and the last are significant; Bonferroni-free testing would call all four.
    A None (no test) is not counted in m."""
    assert V.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert V.holm([0.01, None, 0.04, 0.03, 0.005])[1] is None
    assert V.holm([0.01, None, 0.04, 0.03, 0.005])[2] == pytest.approx(0.06)
    assert V.holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1


def _pairs(t_stat, n, sd=0.01):
    """Differences with exactly the given t statistic: mean t·sd/√n, sample std sd."""
    z = np.arange(n) - (n - 1) / 2
    z = z / z.std(ddof=1)
    return dict(enumerate(t_stat * sd / math.sqrt(n) + sd * z))


def test_verdict_thresholds_are_students_t_with_n_minus_1_df():
    """Guards the 2-s.e. rule and a z (normal) quantile: with 3 pairs the two-sided 5% critical
    value is t = 4.303 (2 df); t = 4.4 is shown, t = 4.2 and t = 2.5 are not (both would pass a
    2-s.e. or 1.96 rule); t = −4.4 contradicts the claim."""
    for t_stat, w in ((4.4, "shown"), (4.2, "not shown"), (2.5, "not shown"),
                      (-4.4, "contradicted"), (-4.2, "not shown")):
        r = V.paired(_pairs(t_stat, 3))
        assert r.mean / (r.sd / math.sqrt(3)) == pytest.approx(t_stat)
        assert V.word(r, V.holm([r.p])[0]) == w, t_stat
    # Holm moves the threshold: the same t = 4.4 with a second test of p = 0.5 in the family
    r = V.paired(_pairs(4.4, 3))
    assert V.word(r, V.holm([r.p, 0.5])[0]) == "not shown"  # 2·p ≈ 0.097


def test_unequal_seed_counts_pair_only_common_seeds():
    """Guards the wrong row's seed count and unpaired seeds: `worse` has seeds 0-4, `better`
    0-2 and 9. Only seeds 0-2 pair; with them t = 4.2 (not shown at 2 df). Using n = 5 (the
    worse row's count) for the df or the standard error would give t = 4.2·√(5/3) = 5.4 against
    2.78: shown; letting seeds 3, 4 in (their large values) would also flip it."""
    d = _pairs(4.2, 3)
    better = {0: 1.0, 1: 1.0, 2: 1.0, 9: 0.0}
    worse = {s: better[s] + d[s] for s in range(3)} | {3: 5.0, 4: 5.0}
    r = V.paired(worse, better)
    assert r.n == 3 and r.seeds == (0, 1, 2)
    ref = stats.ttest_rel([worse[s] for s in range(3)], [better[s] for s in range(3)])
    assert r.p == pytest.approx(ref.pvalue)
    assert V.word(r, V.holm([r.p])[0]) == "not shown"
    wrong = stats.t.sf(r.mean / (r.sd / math.sqrt(5)), 4) * 2  # the planted bug's p
    assert wrong < 0.05
    line = V.family([(r, "A worse than B")], 4, " nats")[0]
    assert "paired over 3 seeds" in line and "A worse than B: not shown" in line
    assert f"p = {r.p:.3g}" in line and "Holm-adjusted p" in line and "95% CI [" in line
    assert V.paired({0: 1.0, 1: None, 2: 2.0, 3: 3.0}, {0: 0.0, 1: 0.0, 2: float("nan"),
                                                         3: 1.0}).seeds == (0, 3)
    one = V.family([(V.paired({0: 1.0, 1: 2.0}, {1: 0.0, 5: 0.0}), "C")])[0]
    assert one.startswith("C: not shown (1 common seed: no paired test")


def test_identical_rows_say_so_instead_of_a_zero_detectable_effect():
    """Two rows that made the same updates in every seed (an adaptive policy that never acted)
    have no spread: the line says so (no '0.0000 detectable'), p = 1 counts in the family and
    leaves the other claims' Holm adjustment as with any p = 1; a non-zero constant difference
    is still a test (p = 0)."""
    same = V.paired({0: 2.0, 1: 2.5, 2: 2.4}, {0: 2.0, 1: 2.5, 2: 2.4})
    other = V.paired(_pairs(9.0, 3))
    lines = V.family([(same, "A"), (other, "B")], 4, " nats")
    assert lines[0] == ("A: not shown (paired over 3 seeds: every difference exactly 0, the two rows "
                        "made the same updates; p = 1, counted in the 2 tests)")
    assert "over 2 tests" in lines[1] and "detectable at 80% power" in lines[1]
    shift = V.paired({0: 1.5, 1: 2.5}, {0: 1.0, 1: 2.0})
    assert shift.p == 0.0 and "every difference exactly 0" not in V.family([(shift, "C")])[0]


def test_detectable_effect_has_80_percent_power():
    """The defining property: at the returned δ the two-sided paired t-test at α/m rejects in
    80% of simulated experiments (n pairs, normal differences of sd s). And the large-n limit
    (z_{1−α/2} + z_{0.8})·s/√n."""
    n, sd, m = 5, 0.02, 3
    delta = V.detectable(n, sd, m)
    rng = np.random.default_rng(1)
    d = rng.normal(delta, sd, size=(40000, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    rate = float((np.abs(t) > stats.t.ppf(1 - 0.05 / m / 2, n - 1)).mean())
    assert abs(rate - 0.8) < 4 * math.sqrt(0.8 * 0.2 / 40000)
    big = V.detectable(400, 1.0, 1)
    assert big == pytest.approx((stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) / 20, rel=5e-3)
    assert V.detectable(1, None) is None and V.detectable(4, 1.0, 10) > V.detectable(4, 1.0, 1)


def _lm_run(spec, seed, val, degradation=None):
    ident = json.loads(json.dumps(spec.identity))
    ident["trainer"]["seed"] = seed
    s = {"metric": "val_loss", "val_loss": val, "identity": ident, "num_classes": 84}
    return {"seed": seed, "final_top1": 30.0, "summary": json.dumps(s), "run_dir": "/nonexistent",
            "degradation": degradation, "wall_time": 1.0, "fwd": spec.fwd, "grad": spec.grad,
            "model": spec.model, "data": spec.data}


@pytest.fixture(scope="module")
def fwd4():
    return {n: X.compose_row(f"small/lm_fwd4_table/{n}")
            for n in ("fp32", "fwd4_luq4", "fwd4_luq4_fnt100")}


def test_fnt_is_only_compared_with_an_fp32_run_of_the_same_total_steps(fwd4):
    """Guards the lm_fwd4 bug (FNT's 500 steps against fp32's 400): the FNT row's Δ per seed is
    its runner-matched degradation (vs fp32 of 400 + 100 steps), never L_fnt − L_fp32(400 steps);
    with no matched degradation it has no Δ at all, and the claim is not tested."""
    specs = list(fwd4.values())
    fp32, luq, fnt = specs
    found = {"fp32": [_lm_run(fp32, s, 2.44) for s in range(3)],
             "fwd4_luq4": [_lm_run(luq, s, 2.48 + 0.001 * s) for s in range(3)],
             "fwd4_luq4_fnt100": [_lm_run(fnt, s, 2.42, 0.036 + 0.001 * s) for s in range(3)]}
    trs = {t["spec"].label: t for t in X.table_rows(specs, found)}
    assert trs["fwd4_luq4_fnt100"]["deg_by_seed"] == pytest.approx({0: 0.036, 1: 0.037, 2: 0.038})
    assert trs["fwd4_luq4"]["deg_by_seed"] == pytest.approx({0: 0.04, 1: 0.041, 2: 0.042})
    out = "\n".join(X.checks(list(trs.values()), "lm_fwd4_table"))
    # against the 400-step fp32 row FNT would look 0.06 better (shown); matched it is 0.004
    assert "FNT recovers accuracy" in out and "difference +0.0040" in out
    found["fwd4_luq4_fnt100"] = [_lm_run(fnt, s, 2.42, None) for s in range(3)]
    trs = {t["spec"].label: t for t in X.table_rows(specs, found)}
    assert trs["fwd4_luq4_fnt100"]["deg"] == (None, None)
    assert "FNT recovers" not in "\n".join(X.checks(list(trs.values())))


def test_lm_checks_are_one_holm_family(fwd4):
    """Every verdict line carries its p, interval and the correction; the family size m is the
    number of tested claims (pair claims + 'worse than fp32' claims)."""
    specs = list(fwd4.values())
    found = {"fp32": [_lm_run(specs[0], s, 2.44 + 0.01 * s) for s in range(4)],
             "fwd4_luq4": [_lm_run(specs[1], s, 2.50 + 0.012 * s) for s in range(4)],
             "fwd4_luq4_fnt100": [_lm_run(specs[2], s, 2.4, 0.06 - 0.003 * s) for s in range(4)]}
    out = X.checks(X.table_rows(specs, found), "lm_fwd4_table")
    assert out[0].startswith("Family: the 2 claims below (the claims of lm_fwd4_table)")
    body = [l for l in out[1:] if l.startswith("- ")]
    assert len(body) == 2 and all("over 2 tests" in l and "95% CI" in l and "p = " in l
                                  for l in body)
    assert any("fwd4_luq4 worse than fp32: shown (paired over 4 seeds" in l for l in body)


def test_make_tables_renders_an_lm_table_with_paired_verdicts(tmp_path):
    """make_tables on a synthetic LM index (lm_fwd4_table, 5 seeds, one row with 3): the Δ column
    has a 95% CI, the FNT row is measured against its matched-length fp32 run, and every claim
    line carries the pairs, p, the Holm-adjusted p and the family size."""
    from lowprec import runs

    mt = load_script("make_tables")
    idx = tmp_path / "runs.sqlite"
    vals = {"fp32": 2.44, "fwd4_fp32": 2.46, "fwd4_luq4": 2.48, "fwd4_luq4_smp2": 2.475,
            "fwd4_fp4_rdn": 2.52, "fwd4_luq4_fnt100": 2.42}
    for label, v in vals.items():
        sp = X.compose_row(f"small/lm_fwd4_table/{label}")
        for seed in range(3 if label == "fwd4_fp4_rdn" else 5):
            d = tmp_path / f"{label}_{seed}"
            d.mkdir()
            ident = json.loads(json.dumps(sp.identity))
            ident["trainer"]["seed"] = seed
            val = v + 0.01 * seed + 0.002 * ((seed * 7 + len(label)) % 3)
            (d / "metrics.jsonl").write_text(json.dumps({"step": 400, "val_loss": val}) + "\n")
            runs.insert(idx, {
                "run_dir": str(d), "model": sp.model, "data": sp.data, "fwd": sp.fwd,
                "grad": sp.grad, "epochs": sp.epochs, "fnt_epochs": sp.fnt_epochs, "seed": seed,
                "batch_size": sp.batch_size, "is_baseline": label == "fp32", "key": "k",
                "final_top1": 30.0, "best_top1": 30.0, "baseline_top1": 30.0,
                "degradation": 0.03 + 0.001 * seed if "fnt" in label else None,
                "wall_time": 60.0, "metric": "val_loss", "val_loss": val, "identity": ident,
                "num_classes": 84, "bits_per_char": val / math.log(2)})
    out = tmp_path / "out"
    assert mt.main(["lm_fwd4_table", "--index", str(idx), "--out", str(out), "--no-plot"]) == 0
    md = (out / "lm_fwd4_table.md").read_text()
    lines = {l.split("|")[1].strip(): l for l in md.splitlines() if l.startswith("| ")}
    assert "95% CI of Δ" in lines["row"] and "[+" in lines["fwd4_luq4"]
    assert "0.0320 ± 0.0016" in lines["fwd4_luq4_fnt100"]  # the matched-length Δ, not −0.02
    claims = [l for l in md.splitlines() if l.startswith("- ") and "nats →" in l]
    assert len(claims) == 6 and all("Holm-adjusted p" in l and "over 6 tests" in l
                                    and "95% CI [" in l for l in claims)
    assert any("paired over 3 seeds" in l for l in claims)  # fp4_rdn has 3 of the 5 seeds
