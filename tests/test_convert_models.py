"""Every listed model converts and trains a step under every estimator, on both backends."""

import glob
import os

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import lowprec as lp
from lowprec.chargpt import LM_MODELS
from lowprec.models import build_model

CONF = os.path.join(os.path.dirname(__file__), "..", "conf")
# image models only: LMs take token ids (tests/test_chargpt.py); model=hf builds any transformers
# architecture (lowprec.hf_models and its tests)
MODEL_YAMLS = sorted(p for p in glob.glob(os.path.join(CONF, "model", "*.yaml"))
                     if os.path.basename(p)[:-5] not in LM_MODELS
                     and OmegaConf.load(p).get("_target_") == "lowprec.models.ModelSpec")


def tiny(name, **kw):
    cfg = OmegaConf.load(os.path.join(CONF, "model", f"{name}.yaml"))
    cfg.pop("defaults", None)  # a model file's defaults list (vit_tiny: optim=adamw) is Hydra's, not the spec's
    if "zero_init_residual" in cfg.get("kwargs", {}):
        # zero-initialised residual branches give every converted block layer δ = 0 at step 0, so
        # no recipe could change a weight gradient; the step below must exercise the estimators
        cfg.kwargs.zero_init_residual = False
    spec = instantiate(cfg)
    torch.manual_seed(0)
    return build_model(spec, num_classes=5, in_channels=1, image_size=16, **kw)


def step_grads(model, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(4, 1, 16, 16)
    y = torch.arange(4) % 5
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=[os.path.basename(p)[:-5] for p in MODEL_YAMLS])
@pytest.mark.parametrize("fwd,grad", [("int4", "luq4"), ("fp32", "mvue24_luq4")])
def test_every_model_converts_and_steps(path, fwd, grad):
    name = os.path.basename(path)[:-5]
    ref = step_grads(tiny(name))
    model = tiny(name)
    report = lp.convert(model, fwd=fwd, grad=grad)
    assert report.num_converted > 0 and len(report.skipped) >= 2
    got = step_grads(model)
    assert got.keys() == ref.keys()
    assert all(torch.isfinite(g).all() for g in got.values())
    # The recipe really acts: some converted layer's weight gradient differs from the fp32 one.
    conv = [n + ".weight" for n in report.converted]
    assert any(not torch.equal(got[k], ref[k]) for k in conv if k in got)


@pytest.mark.parametrize("grad", lp.GRAD_NAMES)
def test_every_estimator_in_a_model(grad):
    ref = step_grads(tiny("resnet20"))
    model = tiny("resnet20")
    report = lp.convert(model, grad=grad)
    g = step_grads(model)
    assert all(torch.isfinite(v).all() for v in g.values())
    # fp32 reproduces nn exactly; every other recipe changes some converted layer's weight gradient.
    changed = [k for k in (n + ".weight" for n in report.converted) if not torch.equal(g[k], ref[k])]
    assert (changed == []) == (grad == "fp32"), changed


@pytest.mark.parametrize("fwd,grad", [("fp32", "luq4"), ("fp32", "mvue24"), ("fp32", "mvue24_approx"),
                                      ("fp32", "mse24"), ("int4", "mvue24_luq4")])
def test_kernel_path_in_a_model(monkeypatch, fwd, grad):
    """LOWPREC_BACKEND=triton sends every estimator call through the Triton kernels (interpreter)."""
    import lowprec.kernels.intq as kintq
    import lowprec.kernels.luq as kluq
    import lowprec.kernels.nm as knm

    calls = []
    for mod, fn in ((kluq, "luq"), (knm, "nm_prune"), (kintq, "int_quant")):
        orig = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, _o=orig, _n=fn, **k: (calls.append(_n), _o(*a, **k))[1])
    monkeypatch.setenv("LOWPREC_BACKEND", "triton")
    model = tiny("resnet20")
    lp.convert(model, fwd=fwd, grad=grad)
    g = step_grads(model)
    assert all(torch.isfinite(v).all() for v in g.values())
    assert ("luq" in calls) == ("luq" in grad) and ("nm_prune" in calls) == ("mvue" in grad or "mse" in grad)
    assert ("int_quant" in calls) == (fwd == "int4")
