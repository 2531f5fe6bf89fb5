"""The per-operand slots of issue 11 inside the layers (hand-computed gradients of one layer), the
block random Hadamard transform on the update GEMM, and every block-format name on a model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lowprec as lp
from lowprec import dispatch
from lowprec import qgemm as lpl  # the one call site of random_signs
from lowprec.convert import converted_layers
from lowprec.fp4 import mxfp4, nvfp4
from lowprec.hadamard import block_rht, random_signs

NEW_GRAD = ["nvfp4_rtn", "nvfp4_sr", "mxfp4_rtn", "mxfp4_sr", "nvfp4_sr_rht", "luq4_b16", "luq4_b32"]
NEW_FWD = ["nvfp4", "mxfp4"]
W_BWD = lp.NVFP4("rtn", dim=0)  # deterministic: the expected gradients are exact
A_UPD = lp.MXFP4("rtn", dim=0)


def linear_case(grad, fwd="fp32", seed=0, tokens=37):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(40, 24)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 40, generator=g))
    layer = lp.QLinear.from_linear(lin, fwd=fwd, grad=grad)
    x = torch.randn(tokens, 40, generator=g).requires_grad_()
    delta = torch.randn(tokens, 24, generator=g)
    return layer, x, delta


def run(layer, x, delta):
    layer.zero_grad()
    x.grad = None
    layer(x).backward(delta)
    return x.grad, layer.weight.grad, layer.bias.grad


def test_weight_bwd_slot_reaches_only_the_backward_gemm_from_the_high_precision_weight():
    layer, x, delta = linear_case(lp.GradRecipe("t", weight_bwd=W_BWD), fwd="int4")
    gx, gw, gb = run(layer, x, delta)
    w = layer.weight.detach()
    assert torch.equal(gx, delta @ nvfp4(w, dim=0))
    assert not torch.allclose(gx, delta @ lp.IntQuant(4, signed=True)(w))  # not the forward-quantized copy
    a_q = lp.IntQuant(4)(x.detach())
    assert torch.allclose(gw, delta.t() @ a_q, rtol=1e-5, atol=1e-5) and torch.allclose(gb, delta.sum(0), atol=1e-5)


def test_act_upd_slot_reaches_only_the_update_gemm_from_the_high_precision_activation():
    layer, x, delta = linear_case(lp.GradRecipe("t", act_upd=A_UPD), fwd="int4")
    gx, gw, gb = run(layer, x, delta)
    w_q = lp.IntQuant(4, signed=True)(layer.weight.detach())
    assert torch.allclose(gx, delta @ w_q, rtol=1e-5, atol=1e-5)
    want = delta.t() @ mxfp4(x.detach(), dim=0)  # a as [tokens, C_in], blocks along tokens
    assert torch.allclose(gw, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(gw, delta.t() @ lp.IntQuant(4)(x.detach()), rtol=1e-3)
    assert torch.allclose(gb, delta.sum(0), atol=1e-5)


def test_conv_slots_hand_computed():
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    layer = lp.QConv2d.from_conv(conv, grad=lp.GradRecipe("t", weight_bwd=W_BWD, act_upd=A_UPD))
    x = torch.randn(2, 3, 9, 9, generator=g).requires_grad_()
    z = layer(x)
    delta = torch.randn(z.shape, generator=g)
    z.backward(delta)
    w = layer.weight.detach()
    w_b = nvfp4(w.reshape(8, -1), dim=0).reshape(w.shape)
    assert torch.allclose(x.grad, torch.nn.grad.conv2d_input(x.shape, w_b, delta, stride=2, padding=1), atol=1e-5)
    cols = F.unfold(x.detach(), 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27)  # [tokens, C_in·kh·kw]
    d2 = delta.permute(1, 0, 2, 3).reshape(8, -1)
    assert torch.allclose(layer.weight.grad, (d2 @ mxfp4(cols, dim=0)).reshape(w.shape), atol=1e-5)
    assert torch.allclose(layer.bias.grad, d2.sum(1), atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_rht_alone_leaves_the_weight_gradient_unchanged(kind):
    """Same signs on both operands: (δR)(Rᵀa) = δa up to fp32 rounding (different signs would not)."""
    g = torch.Generator().manual_seed(2)
    if kind == "linear":
        mod, x = nn.Linear(20, 6), torch.randn(45, 20, generator=g)
    else:
        mod, x = nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 5, 7, generator=g)
    ref = type(mod)(*((20, 6) if kind == "linear" else (3, 4, 3)), **({} if kind == "linear" else {"padding": 1}))
    ref.load_state_dict(mod.state_dict())
    layer = (lp.QLinear.from_linear(mod, grad=lp.GradRecipe("t", update_rht=16)) if kind == "linear"
             else lp.QConv2d.from_conv(mod, grad=lp.GradRecipe("t", update_rht=16)))
    delta = torch.randn(ref(x).shape, generator=g)
    ref(x).backward(delta)
    layer(x).backward(delta)
    assert torch.allclose(layer.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(layer.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)


def test_rht_draws_fresh_signs_each_step(monkeypatch):
    drawn = []

    def spy(n, **kw):
        s = random_signs(n, **kw)
        drawn.append(s)
        return s

    monkeypatch.setattr(lpl, "random_signs", spy)
    layer, x, delta = linear_case("nvfp4_sr_rht")
    torch.manual_seed(0)
    run(layer, x, delta)
    run(layer, x, delta)
    assert len(drawn) == 2 and not torch.equal(drawn[0], drawn[1])


def test_nvfp4_sr_rht_linear_hand_computed():
    layer, x, delta = linear_case("nvfp4_sr_rht", tokens=45)
    torch.manual_seed(3)
    gx, gw, gb = run(layer, x, delta)
    torch.manual_seed(3)  # the same draws in the layer's order (δ_b, signs, δ_u), on the layer's path
    d2 = delta.t()
    d_b = dispatch.nvfp4(d2, dim=0, rounding="sr").t()
    s = random_signs(16)
    d_u = dispatch.nvfp4(block_rht(d2, s, -1), dim=-1, rounding="sr")
    a_u = nvfp4(block_rht(x.detach(), s, 0), dim=0)
    assert torch.allclose(gx, d_b @ layer.weight.detach(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(gw, d_u @ a_u, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gb, (d_u @ block_rht(torch.ones(45, 1), s, 0)).squeeze(1), rtol=1e-5, atol=1e-4)


def test_rht_with_a_shared_draw_is_refused():
    with pytest.raises(ValueError, match="update_rht"):
        lp.GradRecipe("x", backward=lp.LUQ(4), update=lp.LUQ(4), update_rht=16)
    with pytest.raises(ValueError, match="rht size"):
        lp.GradRecipe("x", update_rht=8)


def test_grouped_conv_with_act_upd_is_a_value_error():
    layer = lp.QConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), grad=lp.GradRecipe("t", act_upd=A_UPD))
    with pytest.raises(ValueError, match="grouped"):
        layer(torch.randn(1, 4, 5, 5)).sum().backward()


def small_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 3 * 3, 20), nn.ReLU(), nn.Linear(20, 5))


@pytest.mark.parametrize("fwd,grad", [("fp32", g) for g in NEW_GRAD] + [(f, "fp32") for f in NEW_FWD]
                         + [("nvfp4", "nvfp4_sr_rht"), ("mxfp4", "luq4_b32")])
def test_every_new_name_converts_a_model_and_takes_a_step(fwd, grad):
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    base = small_model()
    model = small_model()
    model.load_state_dict(base.state_dict())
    rep = lp.convert(model, fwd=fwd, grad=grad, skip=None)
    assert len(list(converted_layers(model))) == 4, rep
    F.cross_entropy(base(x), y).backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    for (n, p), q in zip(model.named_parameters(), base.parameters()):
        assert torch.isfinite(p.grad).all(), n
    # the recipe acts: the middle conv's weight gradient differs from the fp32 model's
    assert not torch.allclose(model[2].weight.grad, base[2].weight.grad)
    opt.step()
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
