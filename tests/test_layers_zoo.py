"""Tests of the layer kinds beyond Linear/Conv2d: nn.MultiheadAttention (QMultiheadAttention),
transformers' Conv1D (QConv1D) and nn.Conv1d (QConv1d), all through lowprec.qgemm's one skeleton.

- grad=fp32 is the unconverted module bit for bit (outputs, attention weights, every gradient),
  for every attention flavour, nn.TransformerEncoderLayer, a torchvision ViT, a transformers GPT-2
  and a grouped Conv1d stack;
- per-GEMM routing against hand-written backward passes: with δ estimators that scale by powers of
  two (exact in fp32) the input gradient is the backward estimator's factor times the exact one and
  the weight/bias gradients the update estimator's; a block estimator sees δ as [C_out, tokens];
- statistics, the noise monitor, weight N:M and exact resume (lp_state) on the new layers.
Dimensions are tiny (the CI machine has two shared cores).
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lowprec.estimators import LUQ
from lowprec.convert import collect_stats, convert, converted_layers, layer_state, load_layer_state, unconvert
from lowprec.layers import QConv1d
from lowprec.layers_mha import QMultiheadAttention
from lowprec.recipes import GRAD_NAMES, GradRecipe, grad_recipe
from test_layers import Scale  # the deterministic elementwise stand-in the layer tests use


SPLIT = GradRecipe("split", backward=Scale(4.0), update=Scale(0.5))
LUQH = GradRecipe("luq_h", backward=LUQ(4, hindsight=0.5), update=LUQ(4, hindsight=0.5))  # has update state


def grads_of(model, inputs, loss_fn, seed=0, model_of=None):
    """(outputs, {name: grad}) of one forward/backward; inputs get grads too ("input<i>").
    `model` may be a callable wrapping the module `model_of`."""
    mod = model if model_of is None else model_of
    inputs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    mod.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(*inputs)
    loss_fn(out).backward()
    g = {n: p.grad for n, p in mod.named_parameters() if p.grad is not None}
    g.update({f"input{i}": x.grad for i, x in enumerate(inputs) if x.grad is not None})
    return out, g


def assert_same(a, b):
    if hasattr(a, "logits"):  # a transformers output (its cache is not compared)
        a, b = a.logits, b.logits
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_same(u, v)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    elif a is None:
        assert b is None
    else:
        assert torch.equal(a, b)


def wsum(out):
    """A loss with a distinct weight per output element (so δ is not uniform)."""
    out = out[0] if isinstance(out, (tuple, list)) else out
    out = getattr(out, "logits", out)
    w = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    return (out * w).sum() + (out ** 2).sum() * 0.1


# ----------------------------------------------------------------------------- MultiheadAttention

E, H, L, S, N = 8, 2, 3, 4, 2

MHA_CASES = {  # name: (module kwargs, call kind, forward kwargs)
    "self": (dict(), "self", dict()),
    "self_batch_first_no_weights": (dict(batch_first=True), "self", dict(need_weights=False)),
    "cross_kv": (dict(), "kv", dict(average_attn_weights=False)),
    "cross_qkv_bias_kv_zero_attn": (dict(add_bias_kv=True, add_zero_attn=True), "qkv", dict()),
    "kdim_vdim": (dict(kdim=5, vdim=6, batch_first=True), "qkv", dict()),
    "no_bias_dropout": (dict(bias=False, dropout=0.5), "self", dict()),
    "key_padding_bool": (dict(batch_first=True), "self", dict(key_padding_mask=True)),
    "attn_mask_float_no_weights": (dict(), "self", dict(attn_mask="float", need_weights=False)),
    "attn_mask_3d_bool": (dict(), "kv", dict(attn_mask="bool3")),
    "causal": (dict(batch_first=True), "self", dict(attn_mask="causal", is_causal=True, need_weights=False)),
    "unbatched": (dict(), "unbatched", dict()),
}


def mha_inputs(mha, kind):
    g = torch.Generator().manual_seed(1)
    bf = mha.batch_first

    def t(seq, dim):
        return torch.randn(*((N, seq) if bf else (seq, N)), dim, generator=g)

    if kind == "self":
        return [t(L, E)]
    if kind == "unbatched":
        return [torch.randn(L, E, generator=g)]
    if kind == "kv":
        return [t(L, E), t(S, E)]
    return [t(L, E), t(S, mha.kdim), t(S, mha.vdim)]


def mha_call(mha, kind, fkw):
    fkw = dict(fkw)
    src = L if kind in ("self", "unbatched") else S
    if fkw.get("key_padding_mask") is True:
        fkw["key_padding_mask"] = torch.tensor([[False] * (src - 1) + [True], [False] * src])
    m = fkw.get("attn_mask")
    if m == "float":
        fkw["attn_mask"] = torch.randn(L, src, generator=torch.Generator().manual_seed(2))
    elif m == "bool3":
        fkw["attn_mask"] = torch.rand(N * H, L, src, generator=torch.Generator().manual_seed(3)) > 0.7
    elif m == "causal":
        fkw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L)

    def call(*xs):
        if kind in ("self", "unbatched"):
            return mha(xs[0], xs[0], xs[0], **fkw)
        if kind == "kv":
            return mha(xs[0], xs[1], xs[1], **fkw)
        return mha(*xs, **fkw)
    return call


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_mha_fp32_equals_unconverted_exactly(case):
    kw, kind, fkw = MHA_CASES[case]
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, **kw)
    q = copy.deepcopy(ref)
    rep = convert(nn.ModuleDict(dict(m=q)), grad="fp32", skip=None)
    assert rep.converted == ["m", "m.out_proj"] and isinstance(q, QMultiheadAttention)
    xs = mha_inputs(ref, kind)
    out_r, g_r = _run_mha(ref, kind, fkw, xs)
    out_q, g_q = _run_mha(q, kind, fkw, xs)
    assert_same(out_r, out_q)
    assert_same(g_r, g_q)


def _run_mha(mha, kind, fkw, xs):
    xs = [x.clone().requires_grad_(True) for x in xs]
    mha.train()
    mha.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # dropout draws
    out = mha_call(mha, kind, fkw)(*xs)
    wsum(out).backward()
    g = {n: p.grad for n, p in mha.named_parameters() if p.grad is not None}
    g.update({f"x{i}": x.grad for i, x in enumerate(xs) if x.grad is not None})
    return out, g


@pytest.mark.parametrize("case", ["self", "cross_qkv_bias_kv_zero_attn", "kdim_vdim"])
def test_mha_in_projection_routes_delta_per_gemm(case):
    """Hand-written backward: the in-projection's input gradients are 4x the exact ones (backward
    GEMM δ ×4), its weight and bias gradients 0.5x (update GEMM δ ×0.5); out_proj (not converted
    here) and bias_k/bias_v are untouched."""
    kw, kind, fkw = MHA_CASES[case]
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, **kw)
    q = QMultiheadAttention.from_mha(copy.deepcopy(ref), grad=SPLIT)
    xs = mha_inputs(ref, kind)
    out_r, g_r = _run_mha(ref, kind, fkw, xs)
    out_q, g_q = _run_mha(q, kind, fkw, xs)
    assert_same(out_r, out_q)
    for n, g in g_r.items():
        k = 4.0 if n.startswith("x") else 0.5 if n.endswith("proj_weight") or n == "in_proj_bias" else 1.0
        assert torch.equal(g_q[n], k * g), n


def test_transformer_encoder_layer_and_vit_fp32_exact_and_luq4_acts():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=True, norm_first=True)
    vit = torchvision.models.VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8,
                                               mlp_dim=16, num_classes=3)
    nn.init.normal_(vit.heads.head.weight)  # torchvision zero-initialises the head: δ would be 0
    x_enc = [torch.randn(N, L, E)]
    x_vit = [torch.randn(2, 3, 8, 8)]
    for model, xs in ((enc, x_enc), (vit, x_vit)):
        q = copy.deepcopy(model)
        rep = convert(q, grad="fp32", skip=None)
        mha = [n for n, m in q.named_modules() if isinstance(m, QMultiheadAttention)]
        assert mha and all(n in rep.converted and n + ".out_proj" in rep.converted for n in mha)
        assert not rep.skipped
        assert_same(grads_of(model, xs, wsum), grads_of(q, xs, wsum))
        q.eval()  # inference runs the converted forward too (no fused fast path)
        with torch.no_grad():
            assert torch.isfinite(q(*xs)).all()
        l4 = copy.deepcopy(model)
        convert(l4, grad="luq4", skip=None)
        g_ref, g_l4 = grads_of(model, xs, wsum)[1], grads_of(l4, xs, wsum)[1]
        w = next(k for k in g_ref if k.endswith("in_proj_weight"))
        assert not torch.equal(g_ref[w], g_l4[w]) and torch.isfinite(g_l4[w]).all()


def test_nn_transformer_encoder_decoder_fp32_exact():
    """nn.Transformer: self-attention in both stacks and the decoder's encoder-decoder attention
    (key is value: the q rows and the kv rows of the packed weight), with causal and padding masks."""
    torch.manual_seed(0)
    ref = nn.Transformer(d_model=E, nhead=H, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16,
                         dropout=0.0, batch_first=True)
    q = copy.deepcopy(ref)
    rep = convert(q, grad="fp32", skip=None)
    assert sum(t == "MultiheadAttention" for n, t in rep.types.items() if n in rep.converted) == 3
    src, tgt = torch.randn(N, S, E), torch.randn(N, L, E)
    pad = torch.tensor([[False] * (S - 1) + [True], [False] * S])

    def fwd(m):
        return lambda s, t: m(s, t, tgt_mask=nn.Transformer.generate_square_subsequent_mask(L),
                              src_key_padding_mask=pad, memory_key_padding_mask=pad, tgt_is_causal=True)
    assert_same(grads_of(fwd(ref), [src, tgt], wsum, model_of=ref), grads_of(fwd(q), [src, tgt], wsum, model_of=q))


def test_mha_state_stats_noise_nm_and_exact_resume():
    """The input projection is a GemmSlot with the layers' per-GEMM state: statistics, the noise
    monitor, weight N:M (packed weight masked as one [3E, E] matrix) and lp_state resume."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(E, E), nn.TransformerEncoderLayer(E, H, 16, dropout=0.0), nn.Linear(E, 3))
    convert(model, grad=LUQH, weight_nm=(2, 4), weight_nm_every=2, stats_every=1)
    names = [n for n, _ in converted_layers(model)]
    assert "1.self_attn.in_proj" in names and "1.self_attn.out_proj" in names
    slot = dict(converted_layers(model))["1.self_attn.in_proj"]
    x = torch.randn(L, N, E)
    slot.arm_noise(torch.Generator().manual_seed(1))
    model(x).sum().backward()
    assert slot.pop_noise() is not None and slot.pop_update_macs() == 3 * E * E * L * N
    stats = collect_stats(model)
    assert stats["1.self_attn.in_proj"]["records"] == 1 and 0 < stats["1.self_attn.in_proj"]["cosine"] <= 1
    mask = slot.weight_mask
    assert mask.shape == (3 * E, E) and int(mask.reshape(3 * E, -1, 4).sum(-1).max()) == 2
    model(x).sum().backward()
    states = layer_state(model)
    assert states["1.self_attn.in_proj"]["lp_state"]["update"]
    twin = copy.deepcopy(model)
    unconvert(twin)
    assert type(twin[1].self_attn) is nn.MultiheadAttention and twin[1].self_attn._qkv_same_embed_dim
    convert(twin, grad=LUQH, weight_nm=(2, 4), weight_nm_every=2, stats_every=1)
    twin.load_state_dict(model.state_dict())
    load_layer_state(twin, copy.deepcopy(states))
    grads = []
    for m in (model, twin):
        m.zero_grad()
        torch.manual_seed(18)
        m(x).sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert list(model.state_dict()) == list(twin.state_dict())


# ----------------------------------------------------------------------------- transformers Conv1D


def test_gpt2_conv1d_fp32_exact_routes_and_report():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    from lowprec.layers_hf import QConv1D

    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=11, n_positions=8, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(cfg)
    ids = [torch.randint(0, 11, (2, 5))]
    q = copy.deepcopy(ref)
    rep = convert(q, grad="fp32", skip=None)
    conv1d = [n for n, m in ref.named_modules() if isinstance(m, Conv1D)]
    assert len(conv1d) == 4 and all(n in rep.converted and rep.types[n] == "Conv1D" for n in conv1d)
    assert all(isinstance(m, QConv1D) for n, m in q.named_modules() if n in conv1d)
    assert_same(grads_of(ref, ids, wsum), grads_of(q, ids, wsum))
    # hand-written backward of one Conv1D: x.grad 4x, weight/bias grads 0.5x
    lin = Conv1D(6, 5)
    ql = QConv1D.from_hf(copy.deepcopy(lin), grad=SPLIT)
    x = [torch.randn(2, 3, 5)]
    (o_r, g_r), (o_q, g_q) = grads_of(lin, x, wsum), grads_of(ql, x, wsum)
    assert torch.equal(o_r, o_q)
    assert torch.equal(g_q["input0"], 4 * g_r["input0"]) and torch.equal(g_q["weight"], 0.5 * g_r["weight"])
    assert torch.equal(g_q["bias"], 0.5 * g_r["bias"])
    assert ql.effective_weight().shape == (6, 5)  # the GEMM layout [C_out, K]
    unconvert(nn.ModuleDict(dict(c=ql)))
    assert type(ql) is Conv1D


# ----------------------------------------------------------------------------- nn.Conv1d


def conv1d_stack():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 8, 3, groups=4, padding="same"),
                         nn.Conv1d(8, 8, 5, groups=8, padding=2, padding_mode="reflect", bias=False),
                         nn.Conv1d(8, 6, 2, stride=2, dilation=2, padding="valid"), nn.Conv1d(6, 4, 4, padding="same"))


@pytest.mark.parametrize("unbatched", [False, True])
def test_conv1d_stack_fp32_equals_unconverted_exactly(unbatched):
    ref = conv1d_stack()
    q = copy.deepcopy(ref)
    rep = convert(q, grad="fp32", skip=None)
    assert rep.num_converted == 5 and all(isinstance(q[i], QConv1d) for i in (0, 2, 3, 4, 5))
    x = [torch.randn(4, 11) if unbatched else torch.randn(2, 4, 11)]
    assert_same(grads_of(ref, x, wsum), grads_of(q, x, wsum))


def test_conv1d_routes_delta_per_gemm_and_token_view():
    """Hand-written backward of a grouped Conv1d: scaled δ per GEMM, and a block estimator on the
    update GEMM sees δ as [C_out, N·L] (tokens n-major) and its result feeds the weight gradient."""
    ref = nn.Conv1d(4, 6, 3, padding=1, groups=2)
    x = torch.randn(2, 4, 7)
    (o_r, g_r) = grads_of(ref, [x], wsum)
    o_q, g_q = grads_of(QConv1d.from_conv(copy.deepcopy(ref), grad=SPLIT), [x], wsum)
    assert torch.equal(o_r, o_q) and torch.equal(g_q["input0"], 4 * g_r["input0"])
    assert torch.equal(g_q["weight"], 0.5 * g_r["weight"]) and torch.equal(g_q["bias"], 0.5 * g_r["bias"])

    class EvenTokens:
        unbiased, elementwise, name = False, False, "even_tokens"

        def __call__(self, d, *, generator=None, state=None):
            assert d.shape == (6, 2 * 7), d.shape
            return d * (torch.arange(d.shape[1]) % 2 == 0).to(d.dtype)

        def expected_variance(self, d):
            return None

    q = QConv1d.from_conv(copy.deepcopy(ref), grad=GradRecipe("even", update=EvenTokens()))
    xq = x.clone().requires_grad_(True)
    z = q(xq)
    delta = torch.randn_like(z)
    z.backward(delta)
    keep = (torch.arange(2 * 7) % 2 == 0).to(delta.dtype).reshape(2, 1, 7)
    xr = x.clone().requires_grad_(True)
    zr = ref(xr)
    gw, gb = torch.autograd.grad(zr, (ref.weight, ref.bias), delta * keep)
    gx, = torch.autograd.grad(ref(xr), xr, delta)
    assert torch.allclose(q.weight.grad, gw, atol=1e-6) and torch.allclose(q.bias.grad, gb, atol=1e-6)
    assert torch.allclose(xq.grad, gx, atol=1e-6)


def test_conv1d_custom_update_operands_use_the_1d_im2col():
    """update_rht rotates both update-GEMM operands (the 1-d im2col matrix and δ) along tokens: an
    orthogonal change, so without quantizers the weight gradient equals the exact one."""
    ref = nn.Conv1d(3, 4, 3, padding=1, stride=2)
    x = [torch.randn(3, 3, 12)]
    g_r = grads_of(ref, x, wsum)[1]
    q = QConv1d.from_conv(copy.deepcopy(ref), grad=GradRecipe("rht", update_rht=16))
    g_q = grads_of(q, x, wsum)[1]
    for k in g_r:
        assert torch.allclose(g_q[k], g_r[k], atol=1e-5), k
    assert not torch.equal(g_q["weight"], g_r["weight"])  # it did rotate


def test_convert_model_with_conv1d_and_mha_reports_and_luq4_steps():
    model = nn.Sequential(nn.Conv1d(2, 8, 3, padding=1), nn.Conv1d(8, 8, 3, padding=1, groups=8), nn.Linear(5, 5))
    rep = convert(model, grad="luq4")
    assert rep.converted == ["1"] and set(rep.skipped) == {"0", "2"}
    assert "Conv1d" in str(rep)


class _Mixed(nn.Module):
    """Every new layer kind once: Conv1d, self- and cross-attention (packed), transformers Conv1D."""

    def __init__(self, conv1d_cls):
        super().__init__()
        self.inp = nn.Linear(4, E)
        self.conv = nn.Conv1d(E, E, 3, padding=1)
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.cross = nn.MultiheadAttention(E, H, batch_first=True)
        self.mlp = conv1d_cls(E, E) if conv1d_cls is not None else nn.Linear(E, E)
        self.out = nn.Linear(E, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        mem = h.flip(1)
        h = h + self.cross(h, mem, mem)[0]
        return self.out(torch.tanh(self.mlp(h)))


@pytest.mark.parametrize("grad", GRAD_NAMES)
def test_every_recipe_on_the_new_layer_kinds(grad):
    """Every registered recipe (every route, block format, SMP, RHT) runs on each new layer kind:
    finite gradients, and a non-identity recipe changes every converted weight gradient."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        Conv1D = None
    torch.manual_seed(0)
    ref = _Mixed(Conv1D)
    model = copy.deepcopy(ref)
    rep = convert(model, grad=grad)
    assert rep.converted == ["conv", "attn", "attn.out_proj", "cross", "cross.out_proj", "mlp"]
    x = [torch.randn(2, 16, 4)]
    g_ref, g = grads_of(ref, x, wsum)[1], grads_of(model, x, wsum)[1]
    assert g.keys() == g_ref.keys() and all(torch.isfinite(v).all() for v in g.values())
    weights = ["conv.weight", "attn.in_proj_weight", "attn.out_proj.weight", "cross.in_proj_weight", "mlp.weight"]
    differs = [not torch.equal(g[k], g_ref[k]) for k in weights]
    route = grad_recipe(grad).route
    if route == "backward":  # exact δ in the update GEMMs: the last layer's (mlp) weight gradient is exact
        assert differs == [True] * 4 + [False]
    else:
        assert all(differs) if route != "dense" else not any(differs)
