"""model=chargpt: shapes, causality, parameter count, what convert() converts, the trainer's
loss/top-k code on its [B, V, T] logits."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowprec.chargpt import CharGPT
from lowprec.convert import convert
from lowprec.models import ModelSpec, build_model

BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _model(vocab=65, **kw):
    torch.manual_seed(0)
    return CharGPT(vocab, **kw)


def test_forward_shapes_and_shorter_contexts():
    m = _model(vocab=30, block_size=16)
    idx = torch.randint(0, 30, (3, 16))
    assert m(idx).shape == (3, 30, 16)
    assert m(idx[:, :5]).shape == (3, 30, 5)
    with pytest.raises(ValueError, match="exceeds model.kwargs.block_size=16"):
        m(torch.randint(0, 30, (1, 17)))


def test_causal_a_future_token_does_not_change_earlier_logits():
    m = _model(vocab=20, block_size=12).eval()
    idx = torch.randint(0, 20, (2, 12))
    t = 7
    changed = idx.clone()
    changed[:, t] = (idx[:, t] + 1) % 20
    a, b = m(idx), m(changed)
    assert torch.equal(a[:, :, :t], b[:, :, :t])
    assert not torch.allclose(a[:, :, t:], b[:, :, t:])  # and it does change its own and later ones


def test_token_embedding_equals_an_embedding_lookup():
    m = _model(vocab=10, block_size=4)
    idx = torch.tensor([[3, 0, 9, 3]])
    onehot = m.wte(F.one_hot(idx, 10).float())
    assert torch.allclose(onehot, m.wte.weight.t()[idx])


def test_parameter_count_default_config():
    m = build_model(ModelSpec(name="chargpt", source="lm"), num_classes=65, in_channels=1, image_size=64)
    C, V, L, T = 64, 65, 2, 64
    expected = V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C + C * V
    assert expected == 112_512
    assert sum(p.numel() for p in m.parameters()) == expected
    assert sum(p.numel() for p in _model(vocab=84).parameters()) == 114_944  # the Shakespeare vocabulary


def test_first_last_skip_converts_exactly_the_block_linears():
    m = _model(n_layer=2)
    report = convert(m, fwd="fp32", grad="luq4", skip="first_last")
    expected = {f"blocks.{i}.{n}" for i in range(2) for n in BLOCK_LINEARS}
    assert len(expected) == 8
    assert set(report.converted) == expected
    assert set(report.skipped) == {"wte", "lm_head"}
    idx = torch.randint(0, 65, (2, 64))
    F.cross_entropy(m(idx), torch.randint(0, 65, (2, 64))).backward()  # converted layers take [B, T, C]
    assert all(p.grad is not None for p in m.parameters())

    m = _model(n_layer=3)
    assert len(convert(m, grad="luq4", skip=None).converted) == 3 * 4 + 2  # skip=null: also wte and head


def test_trainer_loss_and_topk_code_work_on_lm_logits():
    """train.py's loss (F.cross_entropy(model(x), y)) and evaluate()'s top-k on dim 1 against
    y[:, None] count every position as one prediction, unchanged."""
    m = _model(vocab=12, block_size=8)
    x, y = torch.randint(0, 12, (4, 8)), torch.randint(0, 12, (4, 8))
    out = m(x)
    per_pos = F.cross_entropy(out.transpose(1, 2).reshape(-1, 12), y.reshape(-1))
    assert torch.allclose(F.cross_entropy(out, y), per_pos)
    top = out.topk(5, dim=1).indices
    hit = top == y[:, None]
    assert hit[:, 0].sum().item() == (out.argmax(1) == y).sum().item()
    assert hit.shape == (4, 5, 8)


def test_model_spec_validation():
    with pytest.raises(ValueError, match="is not an lm model"):
        ModelSpec(name="gpt9", source="lm")
    with pytest.raises(ValueError, match="key 'width' is not accepted"):
        ModelSpec(name="chargpt", source="lm", kwargs={"width": 2})
    with pytest.raises(ValueError, match="not divisible by n_head=3"):
        ModelSpec(name="chargpt", source="lm", kwargs={"n_head": 3})
    with pytest.raises(ValueError, match="dropout"):
        ModelSpec(name="chargpt", source="lm", kwargs={"dropout": 1.0})
    spec = ModelSpec(name="chargpt", source="lm", kwargs={"block_size": 32})
    with pytest.raises(ValueError, match=r"block_size=32 is shorter than the data's windows \(data.block_size=64\)"):
        build_model(spec, num_classes=10, in_channels=1, image_size=64)
    assert isinstance(build_model(spec, num_classes=10, in_channels=1, image_size=16), nn.Module)


def test_yaml_builds_forward_backward():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / "chargpt.yaml")
    node.pop("defaults")  # Hydra's defaults list (data/optim overrides), not a ModelSpec field
    spec = instantiate(node)
    assert spec.source == "lm" and spec.kwargs == {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64,
                                                   "dropout": 0.0}
    m = build_model(spec, num_classes=84, in_channels=1, image_size=64)
    x, y = torch.randint(0, 84, (2, 64)), torch.randint(0, 84, (2, 64))
    loss = F.cross_entropy(m(x), y)
    assert abs(loss.item() - math.log(84)) < 0.1  # small init: near-uniform predictions
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
