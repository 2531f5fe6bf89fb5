"""The zoo-coverage exceptions of results/zoo_coverage.md, fixed (issue 19):

- a converted Linear's output can be written in place, as nn.Linear's can (F.linear on >2-d input
  returns a view of its folded result; a view made inside a custom autograd Function cannot be
  modified in place): wav2vec2's SpecAugment masking trains, values unchanged;
- subclasses of nn.Linear whose forward is known to equal nn.Linear's (timm.layers.Linear, the
  classifier of timm's mobilenetv3/ghostnet) are converted; an unknown subclass with its own
  forward stays skipped with the reason;
- torchvision's Swin attention (ShiftedWindowAttention, V2), which applies its qkv/proj weights with
  F.linear, runs those GEMMs through the converted layers (lowprec.layers_fn);
- parametrized Linear/Conv layers (weight norm: wav2vec2's positional conv) convert, the GEMMs
  on the computed weight, gradients flowing on to the original parameters.
Each: grad=fp32 equals the unconverted model bit for bit; luq4 changes the converted weight gradients.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from lowprec.convert import convert, converted_layers, layer_state, unconvert


def _step(model, x, seed=1):
    torch.manual_seed(seed)
    np.random.seed(seed)  # wav2vec2 draws its SpecAugment mask with numpy
    out = model(x)
    out = out[0] if isinstance(out, tuple) else getattr(out, "last_hidden_state", out)
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * r).sum().backward()
    return out


def _same(a, b):
    """Outputs and every parameter gradient equal bit for bit."""
    return all(torch.equal(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters()))


# ----------------------------------------------------------------------------- in-place writes


class _MaskWrite(nn.Module):
    """z = W x on [B, T, C] (4-d too), then an in-place masked write into z, as SpecAugment does."""

    def __init__(self, shape):
        super().__init__()
        self.shape = shape
        self.lin = nn.Linear(6, 5)
        self.fill = nn.Parameter(torch.randn(5))
        self.last = nn.Linear(5, 3)

    def forward(self, x):
        z = self.lin(x)
        mask = torch.zeros(z.shape[:-1], dtype=torch.bool)
        mask.view(-1)[::3] = True
        z[mask] = self.fill
        return self.last(z)


@pytest.mark.parametrize("shape", [(2, 4, 6), (2, 2, 3, 6)])
def test_converted_linear_output_can_be_written_in_place(shape):
    """Guards the wav2vec2 failure: 'Output 0 of QGemmFn is a view and is being modified inplace'
    (raised before the fix for contiguous 3-d and 4-d input); fp32 equals nn.Linear bit for bit."""
    torch.manual_seed(0)
    ref = _MaskWrite(shape)
    x = torch.randn(shape)
    for grad in ("fp32", "luq4"):
        m = copy.deepcopy(ref)
        convert(m, grad=grad, skip=None)
        out = _step(m, x)
        assert torch.isfinite(out).all() and all(torch.isfinite(p.grad).all() for p in m.parameters())
        if grad == "fp32":
            r = copy.deepcopy(ref)
            assert torch.equal(_step(r, x), out) and _same(r, m)


def test_wav2vec2_spec_augment_trains_converted():
    """The zoo's failing model, shrunk: a masked (SpecAugment) train-mode step with luq4."""
    tr = pytest.importorskip("transformers")
    cfg = tr.Wav2Vec2Config(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=8,
                            num_conv_pos_embedding_groups=2, mask_time_prob=0.5, mask_time_length=2)
    torch.manual_seed(0)
    ref = tr.Wav2Vec2Model(cfg).train()
    x = torch.randn(2, 400)
    for grad in ("fp32", "luq4"):
        m = copy.deepcopy(ref)
        convert(m, grad=grad)
        out = _step(m, x)
        assert torch.isfinite(out).all() and all(p.grad is None or torch.isfinite(p.grad).all()
                                                 for p in m.parameters())
        if grad == "fp32":
            r = copy.deepcopy(ref)
            assert torch.equal(_step(r, x), out) and _same(r, m)


# ----------------------------------------------------------------------------- subclasses


def test_timm_linear_converted_unknown_override_skipped():
    """timm.layers.Linear (forward = nn.Linear's outside TorchScript) converts and unconverts; a
    subclass of it without its own forward too; a subclass with a custom forward is skipped."""
    timm_layers = pytest.importorskip("timm.layers")

    class Sub(timm_layers.Linear):
        pass

    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 6), timm_layers.Linear(6, 6), Sub(6, 6), Custom(6, 6), nn.Linear(6, 2))
    x = torch.randn(3, 4)
    m = copy.deepcopy(ref)
    rep = convert(m, grad="fp32")
    assert rep.converted == ["1", "2"]
    assert "overrides forward" in rep.skipped["3"] and "EQUIVALENT_FORWARD" in rep.skipped["3"]
    r = copy.deepcopy(ref)
    assert torch.equal(_step(r, x), _step(m, x)) and _same(r, m)
    unconvert(m)
    assert type(m[1]) is timm_layers.Linear and type(m[2]) is Sub

    m = copy.deepcopy(ref)
    convert(m, grad="luq4")
    _step(m, x)
    r = copy.deepcopy(ref)
    _step(r, x)
    assert not torch.equal(m[1].weight.grad, r[1].weight.grad)


def test_timm_mobilenetv3_classifier_converted():
    """The zoo's mobilenetv3 (its classifier a timm Linear): every Linear/Conv2d eligible."""
    timm = pytest.importorskip("timm")
    m = timm.create_model("mobilenetv3_small_050", num_classes=10)
    rep = convert(m, grad="luq4", skip=None)
    assert not rep.skipped and "classifier" in rep.converted


# ----------------------------------------------------------------------------- torchvision Swin


def _swin(v2: bool):
    tv = pytest.importorskip("torchvision.models.swin_transformer")
    kw = dict(block=tv.SwinTransformerBlockV2, downsample_layer=tv.PatchMergingV2) if v2 else {}
    torch.manual_seed(0)
    return tv.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 1], num_heads=[2, 2], window_size=[4, 4],
                              num_classes=5, **kw)


@pytest.mark.parametrize("v2", [False, True])
def test_torchvision_swin_attention_runs_converted_qkv_and_proj(v2):
    """Guards swin_t's 32.7%: the qkv/proj Linears convert() reports as converted must run their
    converted forward (each called once per block), fp32 bit-identical, luq4 changes their
    weight gradients, their state is in layer_state; unconvert restores the attention's class."""
    ref = _swin(v2)
    x = torch.randn(2, 3, 16, 16)
    m = copy.deepcopy(ref)
    rep = convert(m, grad="fp32")
    r = copy.deepcopy(ref)
    assert torch.equal(_step(r, x), _step(m, x)) and _same(r, m)

    m = copy.deepcopy(ref)
    rep = convert(m, grad="luq4")
    qkv = [n for n in rep.converted if n.endswith(("attn.qkv", "attn.proj"))]
    assert len(qkv) == 6  # 3 blocks
    called = []
    mods = dict(m.named_modules())
    for n in qkv:
        mods[n].register_forward_hook(lambda *a, n=n: called.append(n))
    _step(m, x)
    r = copy.deepcopy(ref)
    _step(r, x)
    assert sorted(called) == sorted(qkv)
    rmods = dict(r.named_modules())
    for n in qkv:
        assert not torch.equal(mods[n].weight.grad, rmods[n].weight.grad), n
    assert set(qkv) <= set(layer_state(m))  # their run-time state is checkpointed under their names
    attn = mods[qkv[0].rsplit(".", 1)[0]]
    assert type(attn).__name__.startswith("QShiftedWindowAttention")
    names = unconvert(m)
    assert type(attn) is type(rmods[qkv[0].rsplit(".", 1)[0]]) and not list(converted_layers(m))
    assert set(qkv) <= set(names)
    convert(m, grad="luq4")  # convertible again


# ----------------------------------------------------------------------------- parametrized layers


def test_weight_normed_layers_convert_and_restore():
    """Guards wav2vec2's 'parametrized module' skip: weight-normed Conv1d (grouped) and Linear convert
    (the class keeps parametrize's computed weight), fp32 bit-identical outputs and gradients of the
    original parameters, luq4 changes them, state_dict keys unchanged, deepcopy works, unconvert
    gives back the parametrized classes."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), weight_norm(nn.Conv1d(4, 4, 5, padding=2, groups=2)),
                        nn.Flatten(), weight_norm(nn.Linear(24, 8)), nn.Linear(8, 3))
    x = torch.randn(2, 2, 6)
    kinds = (type(ref[1]), type(ref[3]))
    for grad in ("fp32", "luq4"):
        m = copy.deepcopy(ref)
        rep = convert(m, grad=grad)
        assert rep.converted == ["1", "3"] and [n for n, _ in converted_layers(m)] == ["1", "3"]
        assert list(m.state_dict()) == list(ref.state_dict())
        r = copy.deepcopy(ref)
        assert torch.equal(_step(r, x), _step(m, x))
        originals = [n for n, _ in m.named_parameters() if "original" in n]
        assert len(originals) == 4
        g = dict(m.named_parameters())
        gr = dict(r.named_parameters())
        same = [torch.equal(g[n].grad, gr[n].grad) for n in originals]
        assert all(same) if grad == "fp32" else not any(same)
        _step(copy.deepcopy(m), x)
        unconvert(m)
        assert (type(m[1]), type(m[3])) == kinds and parametrize.is_parametrized(m[1])
