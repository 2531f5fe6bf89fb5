"""Statistical checks shared by the estimator tests.

Every stochastic estimator here has, element by element, a two-point distribution, so the
closed-form variance of each element is known. The tests draw K estimates and compare the squared
distance of their mean to the input, S = ‖mean_K - x‖², with its expectation under unbiasedness,
E[S] = Σ Var_i / K. A bias b adds ‖b‖² to S, which does not shrink with K: a biased estimator is
caught once ‖b‖² dominates Σ Var_i / K.
"""

import torch


def heavy_tailed(shape, *, sigma=2.0, seed=0, dtype=torch.float32):
    """Log-normal magnitudes with random signs: how neural gradients look."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp(sigma * torch.randn(shape, generator=g, dtype=torch.float64))
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).double()
    return (sign * mag).to(dtype)


def draws(est, x, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([est(x, generator=g).double() for _ in range(k)])


def squared_error_ratio(est, x, k, *, variance=None, seed=0):
    """(S, E[S], sd[S]) for K draws; variance: closed-form total variance (else measured)."""
    d = draws(est, x, k, seed)
    mean = d.mean(0)
    s = float((mean - x.double()).square().sum())
    per_elem = d.var(0, unbiased=True)
    total = float(variance) if variance is not None else float(per_elem.sum())
    e_s = total / k
    # sd of S from the per-element fourth moments (measured), elements treated as independent.
    c = d - d.mean(0)
    mu4 = c.pow(4).mean(0)
    var_s = ((3 * per_elem.square() * (k - 1) + mu4) / k**3 - (per_elem / k).square()).clamp_min(0).sum()
    return s, e_s, float(var_s.sqrt())


def assert_unbiased(est, x, k=400, *, variance=None, z=6.0, seed=0):
    """S must stay within z standard deviations of Σ Var/K (exactly 0 for a deterministic estimator)."""
    s, e_s, sd = squared_error_ratio(est, x, k, variance=variance, seed=seed)
    scale = float(x.double().square().sum())
    tol = 1e-12 * scale
    assert s <= e_s + z * sd + tol, (
        f"{getattr(est, 'name', est)}: ‖mean_K - x‖² = {s:.4g} exceeds E = {e_s:.4g} + {z}·sd ({sd:.4g}) "
        f"at K={k}: biased")


def grid_mean(fn, x, g=4096, n_uniform=1):
    """Exact-in-the-limit expectation: average fn over a midpoint grid of uniforms.

    For estimators driven by one uniform per element or block, the output is a step function of u
    with few jumps, so the grid average differs from E by at most jumps·range/G: a deterministic
    unbiasedness check that cannot flake. ``fn(xb, U)`` gets x stacked G (or G²) times along a new
    leading dim and the grid points U of shape [G, 1] (or [G², 2]), and returns the stacked outputs.
    """
    u = (torch.arange(g, dtype=torch.float32) + 0.5) / g
    U = u[:, None] if n_uniform == 1 else torch.cartesian_prod(u, u)
    xb = x.unsqueeze(0).expand(len(U), *x.shape).contiguous()
    return fn(xb, U).double().mean(0)


# ----------------------------------------------------------------------------- full-range inputs

import math  # noqa: E402

from hypothesis import strategies as st  # noqa: E402

RANGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
U_LAST = 1.0 - 2.0 ** -24  # the largest fp32 below 1


def _finite_in(dtype, v: float) -> bool:
    return math.isfinite(float(torch.tensor(v, dtype=torch.float64).to(dtype)))


def full_range_values(dtype, min_size=1, max_size=8):
    """Lists of finite values of ``dtype`` over its whole range, subnormals and zeros included, each
    list drawn around one random binade (so values are neither all huge nor all tiny) plus extremes."""
    fi = torch.finfo(dtype)
    emin = math.frexp(fi.smallest_normal * fi.eps)[1] - 1  # log2 of the smallest subnormal
    emax = math.frexp(fi.max)[1] - 1

    @st.composite
    def build(draw):
        center = draw(st.integers(emin, emax))
        spread = draw(st.sampled_from([0, 2, 8, 40]))
        n = draw(st.integers(min_size, max_size))
        vals = []
        for _ in range(n):
            kind = draw(st.sampled_from(["near", "near", "near", "zero", "max", "tiny", "sub"]))
            if kind == "zero":
                v = 0.0
            elif kind == "max":
                v = fi.max
            elif kind == "tiny":
                v = fi.smallest_normal
            elif kind == "sub":
                v = fi.smallest_normal * fi.eps * draw(st.integers(1, 7))
            else:
                e = min(max(center + draw(st.integers(-spread, spread)), emin), emax)
                v = math.ldexp(draw(st.floats(1.0, 2.0, exclude_max=True)), e)
            v = v if draw(st.booleans()) else -v
            if not _finite_in(dtype, v):
                v = math.copysign(fi.max, v)
            vals.append(v)
        return torch.tensor(vals, dtype=torch.float64).to(dtype)

    return build()


def boundary_uniforms(shape, seed=0):
    """Uniforms with the extreme values 0, 2^-24 and 1 - 2^-24 mixed into random ones."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g)
    flat = u.view(-1)
    flat[0::4] = 0.0
    flat[1::4] = U_LAST
    flat[2::8] = 2.0 ** -24
    return u


