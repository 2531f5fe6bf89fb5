"""Verdicts on the papers' claims from paired differences per seed (pure statistics; scipy).

A claim "A is worse than B" is tested on the seeds that both rows have (same seed = same
initialisation and data order, so the two runs of a seed are a pair). With the n paired
differences dₛ = deg_A(s) − deg_B(s) (degradations against fp32, > 0 worse; a claim against fp32
itself uses dₛ = deg_A(s)), mean d̄ and sample standard deviation s (n − 1):

    t = d̄ / (s/√n),   two-sided p = 2·P(T_{n−1} > |t|)           (Student's t, n − 1 df),
    95% interval  d̄ ± t_{0.975, n−1}·s/√n.

This is `scipy.stats.ttest_rel` on the pairs. n < 2: no test. s = 0: p = 0 when d̄ ≠ 0, else 1.

Multiple comparisons: the claims of one table are one family, m tests. Holm–Bonferroni: sort the
raw p ascending, p₍₁₎ ≤ … ≤ p₍ₘ₎; the adjusted p₍ᵢ₎ = max_{j ≤ i} min(1, (m − j + 1)·p₍ⱼ₎). It
controls the family-wise error rate at α whatever the dependence between the tests.

Words, at α = 0.05 on the Holm-adjusted p (the claimed direction is d > 0):
    shown        adjusted p < α and d̄ > 0;
    contradicted adjusted p < α and d̄ < 0 (the interval at the Holm level excludes the claimed
                 direction: every d ≥ 0; the 95% interval then excludes it too);
    not shown    otherwise (including n < 2).

Power: the smallest true mean difference δ the test would find with probability 0.8, from the
measured spread s and the pairs n, at the Bonferroni level α/m (the strictest step of Holm, the
one the smallest p must pass): the δ solving
    P(|T'| > t_{1 − α/(2m), n−1}) = 0.8,   T' noncentral t with n − 1 df and noncentrality δ√n/s.
It is a property of the design (n, s, m), not of the observed d̄; s is itself an estimate, so with
few pairs this number is rough.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALPHA = 0.05
POWER = 0.8


@dataclass(frozen=True)
class Paired:
    """A paired t-test of "worse − better > 0" over the common seeds."""

    n: int                  # pairs (seeds present in both rows)
    mean: float | None      # d̄
    sd: float | None        # sample std of dₛ (n − 1); None with n < 2
    lo: float | None        # 95% interval
    hi: float | None
    p: float | None         # two-sided p-value; None with n < 2
    seeds: tuple = ()


def paired(worse: dict, better: dict | None = None, level: float = 0.95) -> Paired:
    """Paired t-test of {seed: value} rows (better None: a one-sample test of worse against 0);
    a seed pairs when both rows have a finite value for it."""
    from scipy import stats

    def ok(x):
        return x is not None and math.isfinite(x)

    seeds = sorted(s for s in worse if ok(worse[s]) and (better is None or ok(better.get(s))))
    d = [worse[s] - (0.0 if better is None else better[s]) for s in seeds]
    n = len(d)
    if n == 0:
        return Paired(0, None, None, None, None, None, tuple(seeds))
    m = math.fsum(d) / n
    if n < 2:
        return Paired(1, m, None, None, None, None, tuple(seeds))
    sd = math.sqrt(math.fsum((x - m) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    q = float(stats.t.ppf(0.5 + level / 2, n - 1))
    if se == 0:
        p = 0.0 if m != 0 else 1.0
    else:
        p = float(2 * stats.t.sf(abs(m / se), n - 1))
    return Paired(n, m, sd, m - q * se, m + q * se, p, tuple(seeds))


def holm(ps: list[float | None]) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values, in the input order (None: not a test, not counted)."""
    idx = sorted((i for i, p in enumerate(ps) if p is not None), key=lambda i: ps[i])
    m = len(idx)
    out: list[float | None] = [None] * len(ps)
    run = 0.0
    for j, i in enumerate(idx):
        run = max(run, min(1.0, (m - j) * ps[i]))
        out[i] = run
    return out


def word(t: Paired, p_adj: float | None, alpha: float = ALPHA) -> str:
    """"shown" / "contradicted" / "not shown" (module docstring)."""
    if p_adj is None or t.mean is None or p_adj >= alpha:
        return "not shown"
    return "shown" if t.mean > 0 else "contradicted" if t.mean < 0 else "not shown"


def detectable(n: int, sd: float | None, m: int = 1, alpha: float = ALPHA,
               power: float = POWER) -> float | None:
    """The smallest mean difference found with probability `power` by the two-sided paired
    t-test at level alpha/m with n pairs of spread sd (module docstring); None with n < 2."""
    from scipy import optimize, stats

    if n < 2 or sd is None:
        return None
    if sd == 0:
        return 0.0
    df, a = n - 1, alpha / max(m, 1)
    tc = float(stats.t.ppf(1 - a / 2, df))

    def pw(delta):
        nc = delta * math.sqrt(n) / sd
        lower = float(stats.nct.cdf(-tc, df, nc))  # far tail: scipy can return nan for ~0
        return float(stats.nct.sf(tc, df, nc)) + (0.0 if math.isnan(lower) else lower) - power

    hi = sd
    while pw(hi) < 0:
        hi *= 2
    return float(optimize.brentq(pw, 0.0, hi, xtol=1e-12 * sd))


def line(t: Paired, p_adj: float | None, m: int, claim: str, decimals: int = 2,
         unit: str = "", alpha: float = ALPHA) -> str:
    """One verdict line: '<claim>: <word> (paired over n seeds: difference, 95% CI, p, Holm p,
    detectable effect)'."""
    f = f"{{:+.{decimals}f}}"
    if t.n < 2:
        diff = "" if t.mean is None else f", difference {f.format(t.mean)}{unit}"
        return (f"{claim}: not shown ({t.n} common seed{'s' if t.n != 1 else ''}: no paired test"
                f"{diff})")
    if t.sd == 0 and t.mean == 0:  # e.g. a policy that never changed an update: no spread to test
        return (f"{claim}: not shown (paired over {t.n} seeds: every difference exactly 0, the two "
                f"rows made the same updates; p = 1, counted in the {m} tests)")
    mde = detectable(t.n, t.sd, m, alpha)
    return (f"{claim}: {word(t, p_adj, alpha)} (paired over {t.n} seeds: difference "
            f"{f.format(t.mean)}{unit}, 95% CI [{f.format(t.lo)}, {f.format(t.hi)}], "
            f"p = {t.p:.3g}, Holm-adjusted p = {p_adj:.3g} over {m} tests; "
            f"detectable at 80% power: {mde:.{decimals}f}{unit} at α/{m})")


def family(tests: list[tuple[Paired, str]], decimals: int = 2, unit: str = "",
           alpha: float = ALPHA) -> list[str]:
    """Verdict lines of one family of (test, claim) pairs, Holm over those with n ≥ 2."""
    adj = holm([t.p for t, _ in tests])
    m = sum(1 for t, _ in tests if t.p is not None)
    return [line(t, a, m, c, decimals, unit, alpha) for (t, c), a in zip(tests, adj)]
