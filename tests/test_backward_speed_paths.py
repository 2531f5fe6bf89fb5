"""The backward's copy-saving layout path (lowprec.backward._reads_view): a convolution's δ̂_b with blocks
along C_out is estimated on δ's [C_out, N, H·W] token view and comes back in δ's NCHW order (so
convolution_backward does not copy it), and so is δ̂_u when its blocks along tokens tile each map (else
the copy's layout); the numbers, the generator's state, the weight and bias gradients are those of the
[C_out, tokens] copy. A Linear's block estimates read its transposed view in both slots: the same
numbers, δ̂ in δ's own [tokens, C_out] order. A channels-last map keeps the copy."""

import copy

import pytest
import torch
import torch.nn as nn

import lowprec.backward as backward
from lowprec.backward import route
from lowprec.convert import convert
from lowprec.qgemm import ConvOp, LinearOp
from lowprec.recipes import grad_recipe

BLOCK = ["nvfp4_rtn", "nvfp4_sr", "mxfp4_rtn", "mxfp4_sr", "luq4_b16", "luq4_b32"]


def _old_path(monkeypatch):
    monkeypatch.setattr(backward, "_reads_view", lambda *a: False)


def _conv_gemms(n=3, c=32, hw=(4, 8), channels_last=False):
    a = torch.randn(n, 8, *hw)
    w = torch.randn(c, 8, 3, 3)
    delta = torch.randn(n, c, *hw)
    if channels_last:
        delta = delta.contiguous(memory_format=torch.channels_last)
    return ConvOp((1, 1), (1, 1), (1, 1), 1).gemms(a, w, delta, True), delta


def _linear_gemms(tokens=(4, 16), c=32):
    delta = torch.randn(*tokens, c)
    return LinearOp().gemms(torch.randn(*tokens, 8), torch.randn(c, 8), delta, True), delta


def _route(name, G, delta, need_u=True, seed=0):
    torch.manual_seed(seed)
    d_b, d_u = route(grad_recipe(name), {"backward": {}, "update": {}}, delta, True, need_u, G.to2d, G.from2d)
    return d_b, d_u, torch.rand(4)  # the global generator's state after the draws


def _copy_path(name, G, delta):
    """(δ̂_b, δ̂_u) estimated on fresh [C_out, tokens] copies, seeded as `_route`."""
    torch.manual_seed(0)
    g = grad_recipe(name)
    return G.from2d(g.backward(G.to2d(delta), state={})), G.from2d(g.update(G.to2d(delta), state={}))


@pytest.mark.parametrize("name", BLOCK)
@pytest.mark.parametrize("hw", [(4, 8), (3, 6)])  # H·W = 32: blocks along tokens inside one map; 18: across maps
def test_conv_backward_estimate_reads_the_view(name, hw):
    G, delta = _conv_gemms(hw=hw)
    d_b, d_u, after = _route(name, G, delta)
    ref_b, ref_u = _copy_path(name, G, delta)
    assert torch.equal(d_b, ref_b) and torch.equal(d_u, ref_u) and torch.equal(after, torch.rand(4))
    assert d_b.is_contiguous()  # δ's NCHW order: convolution_backward takes it as it is
    if hw == (4, 8):  # blocks along tokens (16 or 32) tile each map: the update side reads the view too
        assert d_u.is_contiguous() and not ref_u.is_contiguous()
    else:  # a block would cross a map: the update side keeps the copy's layout
        assert d_u.stride() == ref_u.stride()


@pytest.mark.parametrize("name", BLOCK)
@pytest.mark.parametrize("tokens", [(4, 16), (3, 7)])  # 64 tokens; 21: partial blocks along tokens
def test_linear_reads_its_view_in_both_slots(name, tokens):
    G, delta = _linear_gemms(tokens)
    d_b, d_u, after = _route(name, G, delta)
    ref_b, ref_u = _copy_path(name, G, delta)
    assert torch.equal(d_b, ref_b) and torch.equal(d_u, ref_u) and torch.equal(after, torch.rand(4))
    assert d_b.is_contiguous() and d_u.is_contiguous()  # δ's [..., C_out] order, not the copy's transpose
    assert not ref_b.is_contiguous()


@pytest.mark.parametrize("name", BLOCK)
def test_channels_last_keeps_the_copy(name):
    G, delta = _conv_gemms(channels_last=True)
    d_b, d_u, _ = _route(name, G, delta)
    ref_b, ref_u = _copy_path(name, G, delta)
    assert torch.equal(d_b, ref_b) and d_b.stride() == ref_b.stride()
    assert torch.equal(d_u, ref_u) and d_u.stride() == ref_u.stride()


def test_conv_without_update_gemm_makes_no_copy():
    G, delta = _conv_gemms()
    views = []

    def to2d(t, view=False):
        views.append(view)
        return G.to2d(t, view=view)

    route(grad_recipe("nvfp4_sr"), {"backward": {}, "update": {}}, delta, True, False, to2d, G.from2d)
    assert views and all(views)


def _net(bias):
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=bias), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=bias), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1, bias=bias), nn.Flatten(), nn.Linear(32 * 16, 10))


def _train(model, x, steps=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(2)
    grads = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        model(x).logsumexp(1).sum().backward()
        grads += [p.grad.clone() for p in model.parameters()]
        opt.step()
    return grads + [p.detach().clone() for p in model.parameters()] + [torch.rand(4)]


@pytest.mark.parametrize("name", BLOCK + ["nvfp4_sr_rht", "mse24_bwd", "mvue12_luq4"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_trained_weights_equal_the_copy_path(name, channels_last, monkeypatch):
    """Gradients, weights and the generator's state after two SGD steps of a small converted CNN
    (biases, a strided conv, 8x8 and 4x4 maps) equal those of the copy path bit for bit."""
    x = torch.randn(4, 3, 8, 8)
    base = _net(bias=True)
    if channels_last:
        base, x = base.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    new, old = copy.deepcopy(base), copy.deepcopy(base)
    for m in (new, old):
        convert(m, grad=name, skip=None)
    got = _train(new, x)
    _old_path(monkeypatch)
    want = _train(old, x)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
