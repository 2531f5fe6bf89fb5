"""Precision scaling laws: the fp32 law L(N, D) and each recipe's effective parameter and data
multipliers (pure statistics; scipy).

The fp32 law (Hoffmann et al. 2022; the form Quartet, arXiv 2505.14669, fits per recipe):

    L(N, D) = A·N^−α + B·D^−β + E,

N the non-embedding parameters, D the training tokens, L the final validation loss (nats). A
low-precision recipe trains like an fp32 model with fewer parameters and fewer tokens:

    L_r(N, D) = A·(N·eff_N)^−α + B·(D·eff_D)^−β + E,    eff_N, eff_D ∈ (0, 1],

with (A, α, B, β, E) the fp32 law's, shared. So eff_N = 0.5 means the recipe's model at N
parameters is as good as an fp32 model at N/2 (given the same D), and the same for eff_D.

Fits (nonlinear least squares on log-loss, scipy.optimize.least_squares, trust-region
reflective with bounds), residuals rᵢ = ln L̂(Nᵢ, Dᵢ) − ln Lᵢ:
- fp32: θ = (ln A, α, ln B, β, ln E), bounds α, β ∈ [0.01, 2], ln A, ln B ∈ [−5, 30],
  E ∈ [10⁻³, min L); multi-start over α, β ∈ {0.2, 0.5, 0.9} and E ∈ {0.5, 0.9}·min L, with
  A, B started where each term is a third of the mean loss; the best cost wins (the law is not
  convex in θ and a single start can stop in a poor basin).
- a recipe: (ln eff_N, ln eff_D) ∈ [−20, 0]² with the fp32 law fixed; starts (0, 0), (−1, −1),
  (−3, 0), (0, −3). A bound at 0 means the data do not show the recipe worse than fp32 in that
  direction (an "effective" multiplier above 1 is not allowed by the model).
Intervals: bootstrap over grid points. Each replicate resamples the (N, D) points with
replacement (one resample, shared by fp32 and every recipe, since they are measured on the same
grid), refits the fp32 law and then every recipe with that replicate's law, so the law's own
uncertainty reaches eff_N and eff_D. 95% intervals are the 2.5 and 97.5 percentiles over
replicates (percentile bootstrap; with a grid of 16 points it is approximate, and replicates
that draw few distinct N or D are poorly identified, which widens the intervals honestly).
Measured coverage of the nominal 95% intervals over 20 synthetic 4 × 4 grids (25-200 tokens per
parameter, 14.5k-100k parameters, 0.5% log-normal noise, 40 replicates; tests/test_scaling.py's
law, eff = (0.5, 0.3)): α 0.95, β 0.90, E 0.85, eff_N 0.95, eff_D 0.95; so read the law's
intervals, E's most, as somewhat too narrow.
Predictions at a new (N, D) (e.g. 1B parameters, 20 tokens per parameter) carry the same
bootstrap interval; extrapolating a law fitted on 10⁴–10⁵ parameters by four orders of magnitude
is only as good as the assumption that the form and the multipliers stay the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

ALPHA_START = (0.2, 0.5, 0.9)
E_START = (0.5, 0.9)
EFF_STARTS = ((0.0, 0.0), (-1.0, -1.0), (-3.0, 0.0), (0.0, -3.0))


@dataclass(frozen=True)
class Law:
    A: float
    alpha: float
    B: float
    beta: float
    E: float

    def loss(self, N, D, eff_N=1.0, eff_D=1.0):
        N, D = np.asarray(N, float), np.asarray(D, float)
        return self.A * (N * eff_N) ** -self.alpha + self.B * (D * eff_D) ** -self.beta + self.E


def _law(theta) -> Law:
    a, al, b, be, e = theta
    return Law(math.exp(a), al, math.exp(b), be, math.exp(e))


def fit_law(N, D, L, start: Law | None = None) -> tuple[Law, np.ndarray]:
    """The fp32 law by nonlinear least squares on log-loss (module docstring); (law, residuals).
    `start`: one start there instead of the multi-start (the bootstrap starts from the full fit)."""
    from scipy.optimize import least_squares

    N, D, L = (np.asarray(x, float) for x in (N, D, L))
    lo_e, hi_e = math.log(1e-3), math.log(float(L.min())) - 1e-9
    lo, hi = [-5, .01, -5, .01, lo_e], [30, 2, 30, 2, hi_e]
    starts = []
    if start is not None:
        starts.append([math.log(start.A), start.alpha, math.log(start.B), start.beta,
                       math.log(start.E)])
    else:
        for al in ALPHA_START:
            for be in ALPHA_START:
                for ef in E_START:  # each power-law term starts at a third of the mean loss
                    a0 = math.log(float(L.mean()) / 3) + al * float(np.log(N).mean())
                    b0 = math.log(float(L.mean()) / 3) + be * float(np.log(D).mean())
                    starts.append([a0, al, b0, be, math.log(ef * float(L.min()))])
    best = None
    for x0 in starts:
        r = least_squares(lambda t: np.log(_law(t).loss(N, D)) - np.log(L),
                          np.clip(x0, lo, np.array(hi) - 1e-12), bounds=(lo, hi), method="trf",
                          x_scale="jac", max_nfev=2000)
        if best is None or r.cost < best.cost:
            best = r
    return _law(best.x), best.fun


def fit_eff(law: Law, N, D, L, start: tuple[float, float] | None = None
            ) -> tuple[float, float, np.ndarray]:
    """(eff_N, eff_D, residuals) of one recipe with the fp32 law fixed (module docstring);
    `start`: (eff_N, eff_D) to start from, plus (1, 1), instead of the four starts."""
    from scipy.optimize import least_squares

    N, D, L = (np.asarray(x, float) for x in (N, D, L))
    starts = EFF_STARTS if start is None else (
        (0.0, 0.0), tuple(min(math.log(max(x, 1e-8)), 0.0) for x in start))
    best = None
    for x0 in starts:
        r = least_squares(lambda u: np.log(law.loss(N, D, math.exp(u[0]), math.exp(u[1])))
                          - np.log(L), x0, bounds=([-20, -20], [0, 0]), method="trf")
        if best is None or r.cost < best.cost:
            best = r
    return math.exp(best.x[0]), math.exp(best.x[1]), best.fun


@dataclass
class Fit:
    """The fp32 law, each recipe's (eff_N, eff_D), residuals and bootstrap replicates."""

    law: Law
    eff: dict[str, tuple[float, float]]
    residuals: dict[str, np.ndarray]
    boot_law: list[Law] = field(default_factory=list)
    boot_eff: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def law_interval(self, name: str, level: float = 0.95) -> tuple[float, float]:
        v = [getattr(l, name) for l in self.boot_law]
        return _pct(v, level)

    def eff_interval(self, recipe: str, which: int, level: float = 0.95) -> tuple[float, float]:
        """The interval of eff_N (which = 0) or eff_D (which = 1)."""
        return _pct([e[which] for e in self.boot_eff[recipe]], level)

    def gap(self, recipe: str, N: float, D: float) -> float:
        """L_recipe(N, D) − L_fp32(N, D), nats."""
        en, ed = self.eff[recipe]
        return float(self.law.loss(N, D, en, ed) - self.law.loss(N, D))

    def gap_interval(self, recipe: str, N: float, D: float, level: float = 0.95):
        g = [float(l.loss(N, D, *e) - l.loss(N, D)) for l, e in zip(self.boot_law,
                                                                     self.boot_eff[recipe])]
        return _pct(g, level)


def _pct(v, level):
    q = (1 - level) / 2
    return float(np.quantile(v, q)), float(np.quantile(v, 1 - q))


def fit_all(points: dict[str, dict[tuple[float, float], float]], base: str = "fp32",
            n_boot: int = 200, seed: int = 0) -> Fit:
    """points: {recipe: {(N, D): loss}} (one loss per grid point, e.g. the mean over seeds);
    the fp32 law from `base`, then every other recipe's multipliers; n_boot bootstrap
    replicates over the grid points of `base` (module docstring)."""
    grid = sorted(points[base])

    def one(keys, start=None):
        N, D = np.array([k[0] for k in keys]), np.array([k[1] for k in keys])
        law, res = fit_law(N, D, [points[base][k] for k in keys], start and start[0])
        eff, resid = {}, {base: res}
        for rc, pts in points.items():
            if rc == base:
                continue
            ks = [k for k in keys if k in pts]
            if not ks:
                continue
            en, ed, rr = fit_eff(law, [k[0] for k in ks], [k[1] for k in ks], [pts[k] for k in ks],
                                 start and start[1][rc])
            eff[rc], resid[rc] = (en, ed), rr
        return law, eff, resid

    law, eff, resid = one(grid)
    fit = Fit(law, eff, resid, [], {rc: [] for rc in eff})
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        keys = [grid[i] for i in rng.integers(0, len(grid), len(grid))]
        bl, be, _ = one(keys, (law, eff))  # replicates start from the full fit
        if set(be) != set(eff):
            continue
        fit.boot_law.append(bl)
        for rc in eff:
            fit.boot_eff[rc].append(be[rc])
    return fit


def simulate(law: Law, grid, eff=(1.0, 1.0), noise: float = 0.0, seed: int = 0) -> dict:
    """{(N, D): loss} from the law at the grid points, times exp(noise·ε), ε standard normal
    (log-normal noise: the fits' own error model)."""
    rng = np.random.default_rng(seed)
    return {(float(n), float(d)): float(law.loss(n, d, *eff)) * math.exp(noise * rng.standard_normal())
            for n, d in grid}


def chargpt_non_embedding(width: int, n_layer: int = 2) -> int:
    """N of lowprec.chargpt.CharGPT: n_layer·(12C² + 13C) + 2C, every parameter but the token and
    position embeddings and the head (C = n_embd; the blocks' Linears, biases and LayerNorms and
    the final LayerNorm)."""
    return n_layer * (12 * width ** 2 + 13 * width) + 2 * width
