"""Tests of lowprec.layers: per-GEMM routing, SMP, forward quantization, convert(), N:M weights, stats.

Inputs are tiny (the CI machine has two shared cores).
"""

import copy
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lowprec.stats
from lowprec.convert import (ConvertReport, collect_stats, convert, converted_layers, layer_state, load_layer_state,
                             set_recipes, unconvert)
from lowprec.estimators import LUQ
from lowprec.layers import QConv2d, QLinear
from lowprec.recipes import GradRecipe, fwd_recipe, grad_recipe
from lowprec.weight_nm import nm_weight_mask

FP32 = GradRecipe("fp32")


# ----------------------------------------------------------------------------- stub estimators


@dataclass(frozen=True)
class Scale:
    """Deterministic elementwise stand-in: δ -> k·δ."""

    k: float
    unbiased = False
    elementwise = True

    @property
    def name(self):
        return f"x{self.k}"

    def __call__(self, x, *, generator=None, state=None):
        return x * self.k

    def expected_variance(self, x):
        return None


class EvenTokens:
    """Non-elementwise stand-in: must get [C_out, tokens]; zeros every odd token (column)."""

    unbiased = False
    elementwise = False
    name = "even_tokens"

    def __init__(self, c_out):
        self.c_out = c_out
        self.shapes = []

    def __call__(self, x, *, generator=None, state=None):
        assert x.dim() == 2 and x.shape[0] == self.c_out, x.shape
        self.shapes.append(tuple(x.shape))
        keep = (torch.arange(x.shape[1]) % 2 == 0).to(x.dtype)
        return x * keep

    def expected_variance(self, x):
        return None


class Counting:
    """Draw i (1-based, counted over the object's life) returns (i+1)·δ; records the state dicts."""

    unbiased = False
    elementwise = True
    name = "counting"

    def __init__(self):
        self.calls = 0
        self.states = []
        self.seen = []  # state["n"] as each draw found it

    def __call__(self, x, *, generator=None, state=None):
        self.calls += 1
        self.states.append(state)
        if state is not None:
            self.seen.append(state.get("n", 0))
            state["n"] = state.get("n", 0) + 1
        return x * (self.calls + 1)

    def expected_variance(self, x):
        return None


def q_linear(ref, grad=FP32, fwd="fp32", **kw):
    return QLinear.from_linear(copy.deepcopy(ref), grad=grad, fwd=fwd, **kw)


def q_conv(ref, grad=FP32, fwd="fp32", **kw):
    return QConv2d.from_conv(copy.deepcopy(ref), grad=grad, fwd=fwd, **kw)


def run(layer, x, g):
    """Forward + backward with a fixed δ = g; returns (z, grad_x, grad_w, grad_b)."""
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    z = layer(x)
    z.backward(g)
    return z.detach(), x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad


# ----------------------------------------------------------------------------- identity == nn exactly

LINEAR_CASES = [((5, 7), 9, True), ((2, 3, 7), 9, True), ((2, 3, 4, 7), 5, False), ((7,), 3, True),
                ((64, 33), 17, False)]
CONV_CASES = [  # cin, cout, k, kwargs, hw
    (3, 4, 3, dict(), (7, 6)),
    (3, 4, 3, dict(stride=2, padding=1), (9, 8)),
    (4, 6, 3, dict(padding=2, dilation=2), (8, 8)),
    (4, 6, 3, dict(groups=2, padding=1, bias=False), (6, 7)),
    (6, 6, 3, dict(groups=6, padding=1), (6, 6)),  # depthwise
    (4, 8, 1, dict(stride=2, bias=False), (7, 7)),
    (3, 4, 2, dict(padding="same"), (5, 6)),  # asymmetric 'same'
    (3, 4, 3, dict(padding=1, padding_mode="reflect"), (5, 5)),
]


@pytest.mark.parametrize("shape,out,bias", LINEAR_CASES)
def test_linear_identity_equals_nn_exactly(shape, out, bias):
    torch.manual_seed(0)
    ref = nn.Linear(shape[-1], out, bias=bias)
    q = q_linear(ref)
    x = torch.randn(shape)
    g = torch.randn(*shape[:-1], out)
    for a, b in zip(run(ref, x, g), run(q, x, g)):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("cin,cout,k,kw,hw", CONV_CASES)
def test_conv_identity_equals_nn_exactly(cin, cout, k, kw, hw):
    torch.manual_seed(0)
    ref = nn.Conv2d(cin, cout, k, **kw)
    q = q_conv(ref)
    x = torch.randn(2, cin, *hw)
    g = torch.randn_like(ref(x))
    for a, b in zip(run(ref, x, g), run(q, x, g)):
        assert (a is None and b is None) or torch.equal(a, b)


def test_first_layer_input_without_grad():
    ref = nn.Conv2d(3, 4, 3)
    q = q_conv(ref, grad=GradRecipe("s", backward=Scale(3.0), update=Scale(2.0)))
    x = torch.randn(1, 3, 5, 5)  # no requires_grad: backward estimator/GEMM are skipped
    q(x).sum().backward()
    assert q.weight.grad is not None and q.bias.grad is not None


def test_create_graph_backward_refuses_double_backward():
    # QGemmFn.backward applies once_differentiable only when grad mode is on (create_graph): the
    # first gradients are the plain backward's, a second backward through them raises
    torch.manual_seed(0)
    q = q_linear(nn.Linear(8, 6))
    x = torch.randn(4, 8, requires_grad=True)
    gw_plain = torch.autograd.grad(q(x).square().sum(), q.weight)[0]
    gw = torch.autograd.grad(q(x).square().sum(), q.weight, create_graph=True)[0]
    assert torch.equal(gw, gw_plain) and gw.requires_grad
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gw.sum().backward()


# ----------------------------------------------------------------------------- routing vs hand-written backward


def test_linear_routing_hand_written():
    torch.manual_seed(1)
    ref = nn.Linear(6, 5)
    q = q_linear(ref, grad=GradRecipe("r", backward=Scale(3.0), update=Scale(2.0)))
    x, g = torch.randn(2, 4, 6), torch.randn(2, 4, 5)
    _, gx, gw, gb = run(q, x, g)
    a2, d2 = x.reshape(-1, 6), g.reshape(-1, 5)
    torch.testing.assert_close(gw, (2 * d2).t() @ a2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gb, (2 * d2).sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, ((3 * d2) @ ref.weight).reshape(x.shape), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(gx, ((2 * d2) @ ref.weight).reshape(x.shape))  # δ_b is not δ_u


def test_conv_routing_hand_written():
    torch.manual_seed(2)
    kw = dict(stride=2, padding=1, dilation=1, groups=2)
    ref = nn.Conv2d(4, 6, 3, **kw)
    q = q_conv(ref, grad=GradRecipe("r", backward=Scale(3.0), update=Scale(2.0)))
    x = torch.randn(2, 4, 7, 7)
    g = torch.randn_like(ref(x))
    _, gx, gw, gb = run(q, x, g)
    ww = torch.nn.grad.conv2d_weight(x, ref.weight.shape, 2 * g, **kw)
    wi = torch.nn.grad.conv2d_input(x.shape, ref.weight.detach(), 3 * g, **kw)
    torch.testing.assert_close(gw, ww, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, (2 * g).sum((0, 2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, wi, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(gx, torch.nn.grad.conv2d_input(x.shape, ref.weight.detach(), 2 * g, **kw))


def test_linear_non_elementwise_layout():
    torch.manual_seed(3)
    ref = nn.Linear(6, 5)
    est = EvenTokens(5)
    q = q_linear(ref, grad=GradRecipe("even", update=est))
    x, g = torch.randn(2, 3, 6), torch.randn(2, 3, 5)
    _, gx, gw, gb = run(q, x, g)
    assert est.shapes == [(5, 6)]
    d2 = g.reshape(-1, 5) * (torch.arange(6) % 2 == 0).float()[:, None]  # tokens = flattened leading dims
    torch.testing.assert_close(gw, d2.t() @ x.reshape(-1, 6), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gb, d2.sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, g @ ref.weight, rtol=1e-6, atol=1e-6)  # backward GEMM: exact δ


def test_conv_non_elementwise_layout():
    torch.manual_seed(4)
    ref = nn.Conv2d(3, 4, 3, padding=1)
    est = EvenTokens(4)
    q = q_conv(ref, grad=GradRecipe("even", update=est))
    x = torch.randn(2, 3, 3, 5)
    g = torch.randn(2, 4, 3, 5)
    _, gx, gw, gb = run(q, x, g)
    assert est.shapes == [(4, 2 * 3 * 5)]
    token = torch.arange(2 * 3 * 5).reshape(2, 1, 3, 5)  # token index = (n, h, w) row-major
    du = g * (token % 2 == 0)
    torch.testing.assert_close(gw, torch.nn.grad.conv2d_weight(x, ref.weight.shape, du, padding=1),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, du.sum((0, 2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, torch.nn.grad.conv2d_input(x.shape, ref.weight.detach(), g, padding=1),
                               rtol=1e-5, atol=1e-5)


def test_state_slots_are_per_layer_and_persistent():
    b, u = Counting(), Counting()
    q = q_linear(nn.Linear(3, 2), grad=GradRecipe("c", backward=b, update=u))
    q2 = q_linear(nn.Linear(3, 2), grad=GradRecipe("c", backward=b, update=u))
    for _ in range(2):
        run(q, torch.randn(4, 3), torch.randn(4, 2))
        run(q2, torch.randn(4, 3), torch.randn(4, 2))
    assert [id(s) for s in b.states] == [id(q.lp_state["backward"]), id(q2.lp_state["backward"])] * 2
    assert [id(s) for s in u.states] == [id(q.lp_state["update"]), id(q2.lp_state["update"])] * 2
    assert q.lp_state["backward"] is not q.lp_state["update"]


# ----------------------------------------------------------------------------- SMP


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("shared", [False, True])
def test_smp_mean_of_draws(kind, shared):
    torch.manual_seed(5)
    c = Counting()
    recipe = GradRecipe("smp", backward=c if shared else None, update=c, samples=3)
    if kind == "linear":
        ref = nn.Linear(4, 3)
        q = q_linear(ref, grad=recipe)
        x, g = torch.randn(5, 4), torch.randint(-3, 4, (5, 3)).float()
        exact = run(ref, x, g)
    else:
        ref = nn.Conv2d(2, 3, 3, padding=1)
        q = q_conv(ref, grad=recipe)
        x = torch.randn(2, 2, 4, 4)
        g = torch.randint(-3, 4, (2, 3, 4, 4)).float()
        exact = run(ref, x, g)
    _, gx, gw, gb = run(q, x, g)
    assert c.calls == 3  # shared: the first update draw is δ_b, no extra draw
    # draws 2δ, 3δ, 4δ -> mean 3δ on the update GEMM
    torch.testing.assert_close(gw, 3 * exact[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, 3 * exact[3], rtol=1e-5, atol=1e-5)
    # shared: the backward GEMM gets the first update draw (2δ); else exact δ
    torch.testing.assert_close(gx, (2 if shared else 1) * exact[1], rtol=1e-5, atol=1e-5)
    # SMP draws 2..s see a copy of the state as it was before draw 1: the layer's own dict is
    # passed exactly once per step and advances once per step
    assert sum(s is q.lp_state["update"] for s in c.states) == 1
    run(q, x, g)
    assert c.seen == [0, 0, 0, 1, 1, 1] and q.lp_state["update"]["n"] == 2


# ----------------------------------------------------------------------------- unbiasedness of grad_weight


def _grad_weight_z(layer_fn, recipe, k, seed=0):
    """Max |z| over elements of mean_K(grad_W) vs exact, z from the measured per-element variance.
    Elements with zero measured variance must match exactly (else z = inf)."""
    torch.manual_seed(seed)
    ref, x, g = layer_fn()
    exact = run(ref, x, g)[2].double()
    q = QLinear.from_linear(ref, grad=recipe) if isinstance(ref, nn.Linear) else QConv2d.from_conv(ref, grad=recipe)
    draws = torch.stack([run(q, x, g)[2].double() for _ in range(k)])
    mean, var = draws.mean(0), draws.var(0)
    se = (var / k).sqrt()
    dev = (mean - exact).abs()
    tiny = 1e-9 * exact.abs().max()
    z = torch.where(se > 0, dev / se.clamp_min(1e-300), torch.where(dev <= tiny, 0.0, math.inf))
    return float(z.max()), exact.numel()


def _lin():
    ref = nn.Linear(6, 4)
    x = torch.randn(32, 6)
    # mildly heavy tailed, like neural gradients; heavier tails make the K-sample mean far from
    # normal at K = 300 and the z-bound would need a larger K
    g = torch.randn(32, 4) * torch.exp(0.5 * torch.randn(32, 4))
    return ref, x, g


def _conv():
    ref = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(2, 2, 4, 4)
    g = torch.randn(2, 3, 4, 4) * torch.exp(0.5 * torch.randn(2, 3, 4, 4))
    return ref, x, g


def _z_bound(p, family_alpha=1e-4):
    """Two-sided normal quantile for a Bonferroni family error `family_alpha` over p elements,
    plus a margin for the t-distribution of the studentised mean at K ≈ 300."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(1 - family_alpha / (2 * p)) + 0.5


@pytest.mark.parametrize("name,layer_fn", [("luq4", _lin), ("mvue24", _lin), ("luq4", _conv), ("mvue24", _conv)])
def test_grad_weight_unbiased(name, layer_fn):
    z, p = _grad_weight_z(layer_fn, grad_recipe(name), k=300)
    assert z < _z_bound(p), f"{name}: max|z| = {z:.2f} >= {_z_bound(p):.2f}"


@dataclass(frozen=True)
class InflatedLUQ:
    """Stochastic and 10% biased: LUQ(δ)·1.1 (the z-test must catch bias under non-zero variance)."""

    unbiased = False
    elementwise = True
    name = "luq4_x1.1"

    def __call__(self, x, *, generator=None, state=None):
        from lowprec.estimators import LUQ

        return LUQ(4)(x, generator=generator) * 1.1

    def expected_variance(self, x):
        return None


@pytest.mark.parametrize("layer_fn", [_lin, _conv])
@pytest.mark.parametrize("recipe", ["mse24", "inflated"])
def test_biased_recipe_detected(layer_fn, recipe):
    if recipe == "inflated":
        recipe = GradRecipe("inflated", backward=InflatedLUQ(), update=InflatedLUQ())
    else:
        recipe = grad_recipe(recipe)
    z, p = _grad_weight_z(layer_fn, recipe, k=300)
    assert z > _z_bound(p)


def test_mvue_backward_gemm_dense():
    torch.manual_seed(6)
    ref, x, g = _lin()
    exact = run(ref, x, g)
    q = q_linear(ref, grad=grad_recipe("mvue24"))
    _, gx, gw, _ = run(q, x, g)
    torch.testing.assert_close(gx, exact[1], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(gw, exact[2])


# ----------------------------------------------------------------------------- forward INT quantization


def test_fwd_int4_linear_quantized_forward_and_ste():
    torch.manual_seed(7)
    ref = nn.Linear(8, 5)
    fwd = fwd_recipe("int4")
    q = q_linear(ref, fwd=fwd)
    x = torch.relu(torch.randn(6, 8))
    g = torch.randn(6, 5)
    z, gx, gw, gb = run(q, x, g)
    wq, aq = fwd.weight(ref.weight.detach()), fwd.act(x)
    assert wq.unique().numel() <= 15 and aq.unique().numel() <= 16
    assert not torch.equal(wq, ref.weight.detach())
    assert torch.equal(z, F.linear(aq, wq, ref.bias.detach()))
    assert not torch.allclose(z, ref(x).detach())
    torch.testing.assert_close(gx, g @ wq, rtol=1e-6, atol=1e-6)  # STE, backward GEMM sees Q(W)
    torch.testing.assert_close(gw, g.t() @ aq, rtol=1e-6, atol=1e-6)  # update GEMM sees Q(a)
    torch.testing.assert_close(gb, g.sum(0))


def test_fwd_int4_conv_quantized_forward_and_ste():
    torch.manual_seed(8)
    ref = nn.Conv2d(3, 4, 3, padding=1)
    fwd = fwd_recipe("int4")
    q = q_conv(ref, fwd=fwd)
    x = torch.randn(2, 3, 5, 5)
    g = torch.randn(2, 4, 5, 5)
    z, gx, gw, _ = run(q, x, g)
    wq, aq = fwd.weight(ref.weight.detach()), fwd.act(x)
    assert torch.equal(z, F.conv2d(aq, wq, ref.bias.detach(), padding=1))
    torch.testing.assert_close(gx, torch.nn.grad.conv2d_input(x.shape, wq, g, padding=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, torch.nn.grad.conv2d_weight(aq, wq.shape, g, padding=1), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- autocast bf16


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_autocast_bf16(kind):
    torch.manual_seed(9)
    ref = nn.Linear(8, 6) if kind == "linear" else nn.Conv2d(3, 6, 3, padding=1)
    x = torch.randn(4, 8) if kind == "linear" else torch.randn(2, 3, 5, 5)

    def go(layer):
        xx = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = layer(xx)
        z.float().square().sum().backward()
        return z, xx.grad, layer.weight.grad, layer.bias.grad

    r = go(ref)
    for grad in (FP32, "luq4"):
        q = q_linear(ref, grad=grad) if kind == "linear" else q_conv(ref, grad=grad)
        out = go(q)
        assert out[0].dtype == r[0].dtype == torch.bfloat16
        for a, b in zip(r[1:], out[1:]):
            assert b.dtype == a.dtype == torch.float32 and torch.isfinite(b).all()
        if grad is FP32:
            for a, b in zip(r, out):
                torch.testing.assert_close(b, a, rtol=0, atol=0)


# ----------------------------------------------------------------------------- convert


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 3))


def test_convert_mlp_default_skips_first_last():
    torch.manual_seed(10)
    model = mlp()
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    report = convert(model, grad="luq4")
    assert isinstance(report, ConvertReport)
    assert report.converted == ["2", "4"]
    assert set(report.skipped) == {"0", "6"} and "first" in report.skipped["0"] and "last" in report.skipped["6"]
    assert type(model[0]) is nn.Linear and type(model[2]) is QLinear and type(model[6]) is nn.Linear
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == keys
    before = model[2].weight.detach().clone()
    model(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    assert not torch.equal(before, model[2].weight)  # the optimizer built before convert still updates it
    assert "converted" in str(report) and "2" in str(report)


def test_convert_skip_options_and_errors():
    m = mlp()
    r = convert(m, grad="luq4", skip=None)
    assert r.num_converted == 4 and not r.skipped
    with pytest.raises(ValueError, match="already"):
        convert(m, grad="luq4")
    m = mlp()
    r = convert(m, grad="luq4", skip=["2"])
    assert r.converted == ["0", "4", "6"] and r.skipped == {"2": "in skip list"}
    with pytest.raises(ValueError, match="not found"):
        convert(mlp(), grad="luq4", skip=["nope"])
    with pytest.raises(ValueError, match="converted no layer"):
        convert(mlp(), grad="luq4", module_filter_fn=lambda mod, fqn: False)
    with pytest.raises(ValueError, match="converted no layer"):
        convert(mlp(), fwd="int4", module_filter_fn=lambda mod, fqn: False)
    r = convert(mlp(), module_filter_fn=lambda mod, fqn: False)  # identity: nothing converted is fine
    assert r.num_converted == 0
    m = mlp()
    r = convert(m, grad=grad_recipe("mvue24"), module_filter_fn=lambda mod, fqn: fqn == "4")
    assert r.converted == ["4"] and m[4].grad_recipe.name == "mvue24"
    with pytest.raises(ValueError, match="unknown"):
        convert(mlp(), grad="luq5")


def test_convert_reports_attention_conv1d_and_skips_custom_forward():
    """Guards the report: attention (in-projection and out_proj), Conv1d are converted; a custom
    forward, the out_proj of an attention that cannot be converted, and Conv3d are skipped with
    the reason."""
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    class MyAttention(nn.MultiheadAttention):
        def forward(self, *a, **k):
            return super().forward(*a, **k)

    model = nn.ModuleDict(dict(a=nn.Linear(4, 4), att=nn.MultiheadAttention(4, 2), c=MyLinear(4, 4),
                               d=nn.Conv1d(2, 2, 1), my=MyAttention(4, 2), v=nn.Conv3d(1, 1, 1),
                               e=nn.Linear(4, 4)))
    r = convert(model, grad="luq4", skip=None)
    assert r.converted == ["a", "att", "att.out_proj", "d", "e"]
    assert "MultiheadAttention" in r.skipped["my.out_proj"] and "forward" in r.skipped["c"]
    assert "forward" in r.skipped["my"] and "unsupported" in r.skipped["v"]
    assert [n for n, _ in converted_layers(model)] == ["a", "att.in_proj", "att.out_proj", "d", "e"]


def test_convert_resnet18_and_checkpoint_roundtrip():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(11)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    r = convert(model, fwd="int4", grad="luq4")
    assert r.num_converted == 19 and set(r.skipped) == {"conv1", "fc"}
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == keys
    model(torch.randn(2, 3, 32, 32)).logsumexp(1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    other = torchvision.models.resnet18(weights=None, num_classes=10)
    convert(other, fwd="int4", grad="luq4")
    other.load_state_dict(model.state_dict())  # strict: same keys
    assert torch.equal(other.layer1[0].conv1.weight, model.layer1[0].conv1.weight)


def test_convert_timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(12)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10, depth=2)
    r = convert(model, grad="mvue24")
    assert r.num_converted >= 8
    model(torch.randn(2, 3, 32, 32)).sum().backward()


def test_set_recipes_and_unconvert():
    m = mlp()
    convert(m, grad="luq4")
    assert set_recipes(m, grad="fp32") == 2 and m[2].grad_recipe.identity
    names = unconvert(m)
    assert names == ["2", "4"] and type(m[2]) is nn.Linear and "weight_mask" not in m[2]._buffers
    convert(m, grad="luq4")  # convertible again


# ----------------------------------------------------------------------------- weight N:M


def _blocks_ok(w, n, m):
    w2 = w.reshape(w.shape[0], -1)
    pad = (-w2.shape[1]) % m
    w2 = F.pad(w2, (0, pad))
    return bool(((w2.reshape(w2.shape[0], -1, m) != 0).sum(-1) <= n).all())


def test_nm_weight_mask_blocks():
    torch.manual_seed(13)
    w = torch.randn(5, 3, 3, 3)  # 27 per row: a tail block of 3
    mask = nm_weight_mask(w, 2, 4)
    assert _blocks_ok(w * mask, 2, 4) and not _blocks_ok(w, 2, 4)
    rows = (w * mask).reshape(5, -1)
    assert int((rows != 0).sum()) == 5 * (6 * 2 + 2)  # 6 full blocks keep 2, tail of 3 keeps 2
    # the kept ones are the largest in each block
    blk = w.reshape(5, -1)[:, :4].abs()
    assert torch.equal(mask.reshape(5, -1)[:, :4], blk >= blk.topk(2, -1).values[:, 1:])


def test_transposable_weight_mask_is_nm_both_ways_and_optimal():
    import itertools

    torch.manual_seed(16)
    w = torch.randn(10, 3, 3, 3)  # [10, 27]: tails in both dimensions
    mask = nm_weight_mask(w, 2, 4, transposable=True)
    w2 = (w * mask).reshape(10, -1)
    assert _blocks_ok(w2, 2, 4) and _blocks_ok(w2.t(), 2, 4)
    assert not _blocks_ok(w.reshape(10, -1).t() * nm_weight_mask(w, 2, 4).reshape(10, -1).t(), 2, 4)
    # Full 4x4 tiles keep exactly 2 per row and column, and the most |w| of any such pattern.
    tile = w.reshape(10, -1)[:4, :4].abs()
    kept = mask.reshape(10, -1)[:4, :4]
    assert bool((kept.sum(0) == 2).all() and (kept.sum(1) == 2).all())
    best = max(sum(float(tile[i, j]) for i, r in enumerate(rows) for j in r)
               for rows in itertools.product(itertools.combinations(range(4), 2), repeat=4)
               if all(sum(j in r for r in rows) == 2 for j in range(4)))
    assert float((tile * kept).sum()) == pytest.approx(best)
    with pytest.raises(ValueError, match="M <= 4"):
        convert(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)), weight_nm=(4, 8))
    r = convert(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)), weight_nm=(4, 8),
                weight_nm_transposable=False)
    assert "4:8" in str(r) and "transposable" not in str(r)


@pytest.mark.parametrize("fwd", ["fp32", "int4"])
def test_weight_nm_used_in_forward_and_backward(fwd):
    torch.manual_seed(14)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 9, 12),
                          nn.Linear(12, 2))
    convert(model, fwd=fwd, weight_nm=(2, 4), weight_nm_every=2)
    x = torch.randn(2, 3, 5, 5)
    model(x).sum().backward()
    for layer in (model[1], model[3]):
        w_eff = layer.effective_weight()
        assert _blocks_ok(w_eff, 2, 4)
        assert int((w_eff != 0).sum()) <= w_eff.numel() // 2 + w_eff.shape[0]
    # the linear layer's forward and backward GEMMs use the masked weight
    lin = model[3]
    a = torch.randn(3, 72, requires_grad=True)
    z = lin(a)
    w_eff = lin.effective_weight()
    aq = a if lin.fwd_recipe.act is None else lin.fwd_recipe.act(a.detach())
    torch.testing.assert_close(z, F.linear(aq, w_eff, lin.bias), rtol=1e-6, atol=1e-6)
    z.sum().backward()
    torch.testing.assert_close(a.grad, torch.ones(3, 12) @ w_eff, rtol=1e-6, atol=1e-6)


def test_weight_nm_recompute_cadence():
    torch.manual_seed(15)
    lin = QLinear.from_linear(nn.Linear(8, 4), weight_nm=(1, 2), weight_nm_every=2)
    x = torch.randn(3, 8)
    lin(x)
    m1 = lin.weight_mask.clone()
    with torch.no_grad():
        lin.weight.mul_(torch.where(m1, 0.01, 100.0))  # flip which entry of each pair is larger
    lin(x)
    assert torch.equal(lin.weight_mask, m1)  # 2nd forward: kept
    lin(x)
    assert torch.equal(lin.weight_mask, ~m1)  # 3rd forward: recomputed
    lin.eval()
    lin(x)
    lin(x)
    assert torch.equal(lin.weight_mask, ~m1) and lin._lp_nm_calls == 3  # eval does not advance
    sd = {k: v.clone() for k, v in lin.state_dict().items()}
    assert set(sd) == {"weight", "bias"}  # the mask is not in the checkpoint
    sd["weight"] = torch.where(m1, 100.0, 0.01)
    lin.load_state_dict(sd)
    lin(x)
    assert torch.equal(lin.weight_mask, m1)  # recomputed from the loaded weights


def test_layer_state_round_trip_makes_the_next_step_identical():
    """layer_state/load_layer_state carry what state_dict does not (LUQ's in-hindsight max, the
    weight mask and its schedule): a copy loaded with both takes the same next step."""
    torch.manual_seed(17)
    model = mlp()
    convert(model, grad=GradRecipe("luq", backward=LUQ(4, hindsight=0.5), update=LUQ(4, hindsight=0.5)),
            weight_nm=(2, 4), weight_nm_every=3)
    x = torch.randn(5, 8)
    for _ in range(2):
        model(x).sum().backward()
    states = layer_state(model)
    assert list(states) == [n for n, _ in converted_layers(model)] == ["2", "4"]
    assert set(states["2"]) == {"lp_state", "_lp_nm_calls", "weight_mask", "_lp_bwd_calls"}
    assert states["2"]["_lp_nm_calls"] == 2
    assert states["2"]["lp_state"]["update"]  # LUQ kept its in-hindsight max
    twin = mlp()
    convert(twin, grad=model[2].grad_recipe, weight_nm=(2, 4), weight_nm_every=3)
    twin.load_state_dict(model.state_dict())
    load_layer_state(twin, copy.deepcopy(states))
    grads = []
    for m in (model, twin):
        m.zero_grad()
        torch.manual_seed(18)
        m(x).sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    with pytest.raises(ValueError, match="unknown key 'nm_calls'"):
        twin[2].load_lp_state_dict({"nm_calls": 1})


# ----------------------------------------------------------------------------- stats


def test_stats_every_one():
    torch.manual_seed(16)
    model = mlp()
    convert(model, grad="mvue24_luq4", stats_every=1)
    for _ in range(2):
        model(torch.randn(8, 8)).square().sum().backward()
    s = collect_stats(model)
    assert set(s) == {"2", "4"}
    for rec in s.values():
        assert rec["records"] == 2
        for k in ("rel_error", "cosine", "bwd_rel_error", "bwd_cosine", "gw_rel_error", "absmax", "zero_frac"):
            assert math.isfinite(rec[k]), (k, rec)
        assert 0 < rec["rel_error"] and rec["cosine"] < 1
        assert rec["bwd_zero_frac"] < rec["zero_frac"]  # δ_b dense LUQ, δ_u 2:4-pruned then LUQ
    assert collect_stats(model) == {}  # cleared


def test_stats_cadence_and_off(monkeypatch):
    model = mlp()
    convert(model, grad="luq4", stats_every=2)
    for _ in range(3):
        model(torch.randn(4, 8)).sum().backward()
    s = collect_stats(model)
    assert s["2"]["records"] == 1 and "bwd_rel_error" not in s["2"]  # shared δ: no separate δ_b
    model = mlp()
    convert(model, grad="luq4")

    def boom(*a, **k):
        raise AssertionError("compare called with stats_every=0")

    monkeypatch.setattr(lowprec.stats, "compare", boom)
    model(torch.randn(4, 8)).sum().backward()
    assert collect_stats(model) == {} and model[2]._lp_bwd_calls == 0


def test_layer_state_carries_the_stats_schedule():
    """The backward count that schedules statistics (stats_every) is part of layer_state, so a
    resumed run records statistics at the same steps; a state without it (older checkpoints)
    still loads and keeps the count."""
    torch.manual_seed(19)
    model = mlp()
    convert(model, grad=GradRecipe("luq", backward=LUQ(4), update=LUQ(4)), stats_every=3)
    x = torch.randn(5, 8)
    for _ in range(2):
        model(x).sum().backward()
    states = layer_state(model)
    assert states["2"]["_lp_bwd_calls"] == 2
    twin = mlp()
    convert(twin, grad=model[2].grad_recipe, stats_every=3)
    load_layer_state(twin, copy.deepcopy(states))
    for m in (model, twin):
        m[2].pop_stats()
        m(x).sum().backward()  # the third backward: due in both
        assert len(m[2].pop_stats()) == 1
    old = {k: v for k, v in states["2"].items() if k != "_lp_bwd_calls"}
    twin[2].load_lp_state_dict(old)
    assert twin[2].lp_state_dict()["_lp_bwd_calls"] == 3
