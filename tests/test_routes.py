"""δ routes (docs/routes.md#routes): which GEMM an N:M estimate of δ feeds, and along which axis.

update route (`<name>`): blocks along tokens, update GEMM only; backward route (`<name>_bwd`): blocks
along output channels, backward GEMM only; both (`<name>_both`): one draw along output channels for
both GEMMs. The layers draw from the global RNG, so re-seeding it and calling the recipe's estimator
on δ laid out as [C_out, tokens] reproduces the layer's draw.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lowprec as lp
from lowprec.chargpt import CharGPT
from lowprec.convert import convert
from lowprec.layers import QConv2d, QLinear
from lowprec.recipes import ROUTES, GradRecipe, grad_recipe

NM = ("mvue12", "mvue24", "mvue24_approx", "mse12", "mse24")
ROUTED = [(name + suffix, route) for name in NM
          for suffix, route in (("", "update"), ("_bwd", "backward"), ("_both", "both"))]
NEW = [name for name, route in ROUTED if route != "update"]
SEED = 123


def heavy(*shape, seed=0):
    """Log-normal magnitudes, random signs, no zeros: every block has more than N non-zeros."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp(1.5 * torch.randn(*shape, generator=g))
    return torch.where(torch.rand(*shape, generator=g) < 0.5, -mag, mag)


def run(layer, x, g):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    layer(x).backward(g)
    return x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad


def drawn(est, d2):
    """The layer's draw of `est` on δ as [C_out, tokens] (same global-RNG state as `run`)."""
    torch.manual_seed(SEED)
    return est(d2)


def blocks_ok(d2, n, m, dim):
    """Every block of m consecutive entries of the [C_out, tokens] matrix along `dim` has <= n non-zeros
    (a tail shorter than m is padded with zeros, as nm_prune does)."""
    t = d2.movedim(dim, -1)
    t = F.pad(t, (0, (-t.shape[-1]) % m))
    return bool(((t.reshape(*t.shape[:-1], -1, m) != 0).sum(-1) <= n).all())


# ----------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name,route", ROUTED)
def test_route_names_and_axes(name, route):
    r = grad_recipe(name)
    assert r.route == route and r.name == name and r.samples == 1
    est = r.update if route == "update" else r.backward
    assert isinstance(est, lp.NMPrune)
    base = grad_recipe(name.removesuffix("_bwd").removesuffix("_both")).update
    assert (est.n, est.m, est.method) == (base.n, base.m, base.method)
    assert est.dim == (-1 if route == "update" else 0)  # tokens vs output channels of [C_out, tokens]
    assert (r.backward is None) == (route == "update") and (r.update is None) == (route == "backward")
    assert r.shared == (route == "both")
    assert lp.estimator(name) == est


def test_route_of_the_other_recipes_and_validation():
    assert [grad_recipe(n).route for n in ("fp32", "luq4", "luq4_smp2", "mvue24_luq4")] == \
           ["dense", "both", "both", "split"]
    assert set(grad_recipe(n).route for n in lp.GRAD_NAMES) == set(ROUTES)
    est = lp.NMPrune(2, 4, dim=0)
    assert GradRecipe("x", backward=est, route="backward") == GradRecipe("x", backward=est)
    with pytest.raises(ValueError, match=r"route='both', but backward/update make it 'update'"):
        GradRecipe("x", update=est, route="both")
    with pytest.raises(ValueError, match="route='sideways'"):
        GradRecipe("x", route="sideways")


# ----------------------------------------------------------------------------- QLinear


@pytest.mark.parametrize("name,route", ROUTED)
def test_linear_gemms_get_the_routed_delta(name, route):
    """out_features = 10 is not a multiple of M = 4: the channel tail is padded like a token tail."""
    r = grad_recipe(name)
    est = r.update if route == "update" else r.backward
    torch.manual_seed(0)
    ref = nn.Linear(7, 10)
    q = QLinear.from_linear(copy.deepcopy(ref), grad=name)
    x, g = torch.randn(2, 6, 7), heavy(2, 6, 10)
    gx, gw, gb = run(q, x, g)
    d = g.reshape(-1, 10)  # [tokens, C_out]
    hat = drawn(est, d.t().contiguous()).t()  # the layer's one draw, back as [tokens, C_out]
    assert not torch.equal(hat, d)
    d_b = d if route == "update" else hat
    d_u = d if route == "backward" else hat
    a2, w = x.reshape(-1, 7), ref.weight.detach()
    torch.testing.assert_close(gx, (d_b @ w).reshape(x.shape), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw, d_u.t() @ a2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gb, d_u.sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,route", ROUTED)
def test_linear_nm_pattern_lies_along_the_route_axis(name, route):
    """x = I (tokens = in_features) makes grad-weight = δ_uᵀ as [C_out, tokens]; W = [I | 0] makes
    grad-input = δ_b: both δs read back from the layer itself."""
    r = grad_recipe(name)
    est = r.update if route == "update" else r.backward
    n, m, tokens, out = est.n, est.m, 12, 10
    q = QLinear.from_linear(nn.Linear(tokens, out, bias=False), grad=name)
    with torch.no_grad():
        q.weight.copy_(torch.eye(out, tokens))
    g = heavy(tokens, out, seed=1)
    gx, gw, _ = run(q, torch.eye(tokens), g)
    d_u, d_b = gw, gx[:, :out].t()  # both [C_out, tokens]
    delta = g.t()
    assert not blocks_ok(delta, n, m, 0) and not blocks_ok(delta, n, m, -1)  # the checks can fail
    if route == "update":
        assert torch.equal(d_b, delta) and blocks_ok(d_u, n, m, -1) and not blocks_ok(d_u, n, m, 0)
    elif route == "backward":
        assert torch.equal(d_u, delta) and blocks_ok(d_b, n, m, 0) and not blocks_ok(d_b, n, m, -1)
    else:
        assert torch.equal(d_b, d_u) and blocks_ok(d_b, n, m, 0) and not blocks_ok(d_b, n, m, -1)


# ----------------------------------------------------------------------------- QConv2d


@pytest.mark.parametrize("name", ["mvue24", "mvue24_bwd", "mvue24_both", "mse12_bwd", "mvue12_both"])
def test_conv_gemms_get_the_routed_delta(name):
    """C_out = 6 (not a multiple of 4); tokens = (n, h, w) row-major."""
    r = grad_recipe(name)
    est = r.update if r.route == "update" else r.backward
    torch.manual_seed(0)
    kw = dict(stride=1, padding=1)
    ref = nn.Conv2d(3, 6, 3, **kw)
    q = QConv2d.from_conv(copy.deepcopy(ref), grad=name)
    x = torch.randn(2, 3, 4, 5)
    g = heavy(2, 6, 4, 5, seed=2)
    gx, gw, gb = run(q, x, g)
    hat = drawn(est, g.permute(1, 0, 2, 3).reshape(6, -1)).reshape(6, 2, 4, 5).permute(1, 0, 2, 3)
    assert not torch.equal(hat, g)
    if r.route != "update":  # blocks of M along channels at every (n, h, w)
        assert blocks_ok(hat.permute(1, 0, 2, 3).reshape(6, -1), est.n, est.m, 0)
    d_b = g if r.route == "update" else hat
    d_u = g if r.route == "backward" else hat
    w = ref.weight.detach()
    torch.testing.assert_close(gx, torch.nn.grad.conv2d_input(x.shape, w, d_b, **kw), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, torch.nn.grad.conv2d_weight(x, w.shape, d_u, **kw), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, d_u.sum((0, 2, 3)), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- a model step


@pytest.mark.parametrize("name", NEW)
def test_every_new_route_trains_chargpt_one_step(name):
    torch.manual_seed(0)
    ref = CharGPT(12, n_layer=1, n_head=2, n_embd=16, block_size=8)
    model = copy.deepcopy(ref)
    report = convert(model, grad=name)
    assert report.num_converted == 4
    idx = torch.randint(0, 12, (3, 9))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = {}
    for m in (ref, model):
        torch.manual_seed(SEED)
        F.cross_entropy(m(idx[:, :-1]), idx[:, 1:]).backward()
        grads[m] = {k: p.grad.clone() for k, p in m.named_parameters()}
    assert all(torch.isfinite(v).all() for v in grads[model].values())
    # the estimate acts: some weight gradient differs from fp32's
    assert any(not torch.equal(grads[model][k], grads[ref][k]) for k in grads[ref])
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(before[k], p) for k, p in model.named_parameters())


@pytest.mark.parametrize("name", ["mvue24", "mvue12", "mvue24_approx", "mse24", "mvue24_both", "mvue24_luq4"])
@pytest.mark.parametrize("layer_kind", ["linear", "conv 8x8", "conv 7x7"])
def test_token_views_change_nothing(name, layer_kind, monkeypatch):
    """N:M estimators take δ as a token view (conv [C_out, N, H·W], linear [C_out, T] transposed)
    instead of a [C_out, tokens] copy: the same δ̂, also where H·W is not a multiple of M (7x7: the
    estimator reshapes, blocks still run along all tokens). Conv gradients are bit-identical; a linear
    layer's δ̂ now comes back contiguous, and the BLAS GEMM on the other layout may round its sums
    differently (a wrong draw would be an O(1) difference, far outside the tolerance)."""
    if layer_kind == "linear":
        x, layer = heavy(6, 8, 24, seed=1), nn.Linear(24, 16)
    else:
        hw = 8 if layer_kind == "conv 8x8" else 7
        x, layer = heavy(4, 6, hw, hw, seed=1), nn.Conv2d(6, 8, 3, padding=1)
    grads = []
    for views in (True, False):
        monkeypatch.setattr(lp.NMPrune, "token_views", views)
        q = copy.deepcopy(layer)
        q = QLinear.from_linear(q, grad=name) if layer_kind == "linear" else QConv2d.from_conv(q, grad=name)
        torch.manual_seed(SEED)
        xx = x.detach().clone().requires_grad_(True)
        y = q(xx)
        y.backward(heavy(*y.shape, seed=2))
        grads.append((xx.grad, q.weight.grad, q.bias.grad))
    for a, b in zip(*grads):
        if layer_kind == "linear":
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
        else:
            assert torch.equal(a, b)
