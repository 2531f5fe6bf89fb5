"""scripts/bench_step.py --quick: every path (each grad recipe on both workloads, each estimator, our
implementations and the public algorithms' renditions) runs; nothing is asserted about times."""

import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from lowprec.recipes import GRAD_NAMES
from script_utils import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_runs_every_path(tmp_path):
    out = tmp_path / "bench.md"
    r = subprocess.run([sys.executable, "scripts/bench_step.py", "--quick", "--modes", "native,torch,reference",
                        "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = out.read_text()
    assert "error:" not in text and "bit-identical" in text
    assert "torch thread(s)" in text and "load average" in text and "busiest processes" in text
    for wl in ("resnet20 on digits", "chargpt"):
        section = text.split(wl, 1)[1].split("###", 1)[0]
        for recipe in GRAD_NAMES:
            if recipe != "fp32":
                assert f"| {recipe} | native |" in section, (wl, recipe)
                row = section.split(f"| {recipe} | native |", 1)[1].split("\n", 1)[0]
                assert "| 1.3x |" in row, (wl, recipe, row)  # every named recipe is held to 1.3x
                assert f"{recipe} " in section.split("Targets on the automatic CPU path", 1)[1]
        for recipe in ("luq4", "mvue12", "mvue24", "mvue24_approx", "mvue24_luq4"):
            for mode in ("torch", "reference"):
                assert f"| {recipe} | {mode} |" in section, (wl, recipe, mode)
        assert "Targets on the automatic CPU path (ratio, 95% CI, verdict): luq4 " in section
        assert "mvue24_luq4 " in section
        n = len(GRAD_NAMES) - 1
        assert f" of {n} recipes within 1.3x" in section.split("Verdict:", 1)[1].split("\n", 1)[0], (wl, n)
    for est in ("luq4", "mvue12", "mvue24", "mvue24_approx"):
        assert text.count(f"| {est} | [") == 2, est


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """No GPU in CI: the GPU check's three parts run on the CPU at toy sizes and the report is assembled."""
    out = tmp_path / "gpu.md"
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = out.read_text()
    for part in ("## GPU tests", "## Kernels vs copy bandwidth", "## Training step ratios"):
        assert part in text and "-> exit 0" in text.split(part, 1)[1].split("##", 1)[0], part
    for recipe in ("luq4", "mvue24", "mvue24_luq4", "fwd:int4"):
        assert f"| {recipe} | native |" in text
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--bogus"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error:")


def test_ratio_interval_is_the_order_statistics_of_the_pair_ratios():
    b = load_script("bench_step")
    tb = [1.0] * 20
    ratio, lo, hi = b.ratio_ci(tb, [1 + i / 100 for i in range(20)][::-1])  # pair order is irrelevant
    assert (ratio, lo, hi) == pytest.approx((1.095, 1.05, 1.14))  # r_(6), r_(15) of 20
    assert math.isnan(b.ratio_ci([1.0], [1.2])[1])  # one pair: no interval
    assert [b.verdict(lo, 1.2, hi, 1.3) for lo, hi in ((1.1, 1.29), (1.31, 1.5), (1.2, 1.4))] == \
        ["met", "MISSED", "undecided"]
    assert b.verdict(math.nan, 1.31, math.nan, 1.3) == "MISSED"


def test_ratio_interval_covers_the_true_median_at_its_level():
    """Pair ratios from a skewed distribution with a known median (log-normal around 1.25): over R
    benches of 20 pairs the interval holds 1.25 with the exact coverage of [r_(6), r_(15)],
    1 − 2·P(Binomial(20, 1/2) ≤ 5) = 95.9%, within 4 standard errors of a binomial proportion
    (r_(5)..r_(16) would cover 98.8%, r_(7)..r_(14) 88.5%: both far outside)."""
    from scipy.stats import binom

    b = load_script("bench_step")
    rng = random.Random(0)
    reps, hits = 2000, 0
    for _ in range(reps):
        tb = [rng.uniform(0.1, 0.2) for _ in range(20)]
        tr = [a * 1.25 * math.exp(rng.gauss(0, 0.1)) for a in tb]
        _, lo, hi = b.ratio_ci(tb, tr)
        hits += lo <= 1.25 <= hi
    cover = 1 - 2 * binom.cdf(5, 20, 0.5)
    assert abs(hits / reps - cover) < 4 * math.sqrt(cover * (1 - cover) / reps), (hits, cover)
