import glob
import os

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import lowprec as lp

CONF = os.path.join(os.path.dirname(__file__), "..", "conf")


def yaml_names(group):
    return sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONF, group, "*.yaml")))


def test_every_registered_name_has_a_yaml_and_back():
    assert yaml_names("grad") == sorted(lp.GRAD_NAMES)
    assert yaml_names("fwd") == sorted(lp.FWD_NAMES)


@pytest.mark.parametrize("name", yaml_names("grad"))
def test_grad_yaml_instantiates_to_the_registered_recipe(name):
    obj = instantiate(OmegaConf.load(os.path.join(CONF, "grad", f"{name}.yaml")))
    assert obj == lp.grad_recipe(name)
    assert obj.name == name
    x = torch.randn(8, 16)
    for est in (obj.backward, obj.update):
        if est is not None:
            y = est(x, generator=torch.Generator().manual_seed(0))
            assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("name", yaml_names("fwd"))
def test_fwd_yaml_instantiates_to_the_registered_recipe(name):
    assert instantiate(OmegaConf.load(os.path.join(CONF, "fwd", f"{name}.yaml"))) == lp.fwd_recipe(name)


def test_recipe_semantics():
    luq = lp.grad_recipe("luq4")
    assert luq.shared and luq.samples == 1 and luq.unbiased
    smp = lp.grad_recipe("luq4_smp2")
    assert smp.shared and smp.samples == 2
    mv = lp.grad_recipe("mvue24")
    assert mv.backward is None and not mv.shared and mv.update.dim == -1 and not mv.update.elementwise
    assert not lp.grad_recipe("mse24").unbiased and not lp.grad_recipe("fp4_rdn").unbiased
    combo = lp.grad_recipe("mvue24_luq4")
    assert combo.backward == lp.LUQ(4) and combo.update.unbiased and not combo.update.elementwise
    assert lp.grad_recipe("fp32").identity and lp.fwd_recipe("fp32").identity


def test_unknown_names_and_impossible_options():
    with pytest.raises(ValueError, match=r"unknown gradient method 'luq5'.*did you mean 'luq4'.*valid: fp32, luq4"):
        lp.grad_recipe("luq5")
    with pytest.raises(ValueError, match="unknown forward method 'int2'"):
        lp.fwd_recipe("int2")
    cfg = OmegaConf.load(os.path.join(CONF, "grad", "mvue24.yaml"))
    cfg["update"].n = 5  # (item access: DictConfig.update is a method)
    with pytest.raises(Exception, match="N must not exceed M"):
        instantiate(cfg)
    cfg = OmegaConf.load(os.path.join(CONF, "grad", "luq4.yaml"))
    cfg.backward.bits = 1
    with pytest.raises(Exception, match="bits=1"):
        instantiate(cfg)
    with pytest.raises(ValueError, match="samples"):
        lp.GradRecipe("x", samples=2)
    with pytest.raises(ValueError, match="samples"):
        lp.GradRecipe("x", update=lp.LUQ(), samples=0)
    with pytest.raises(ValueError, match="not an estimator"):
        lp.GradRecipe("x", update="luq4")


def test_sample_mean_reduces_variance_by_the_sample_count():
    x = torch.randn(4000, generator=torch.Generator().manual_seed(0)) * 3
    g = torch.Generator().manual_seed(1)
    one = torch.stack([lp.sample_mean(lp.LUQ(4), x, 1, generator=g) for _ in range(200)]).double()
    two = torch.stack([lp.sample_mean(lp.LUQ(4), x, 2, generator=g) for _ in range(200)]).double()
    ratio = float(one.var(0).sum() / two.var(0).sum())
    assert 1.8 < ratio < 2.2, ratio
    assert torch.allclose(two.mean(0), x.double(), atol=6 * float(two.std(0).max()) / 200 ** 0.5)


def test_chain_prunes_then_quantizes():
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    y = lp.Chain((lp.NMPrune(2, 4), lp.LUQ(4)))(x, generator=torch.Generator().manual_seed(0))
    assert int((y.reshape(16, 16, 4) != 0).sum(-1).max()) <= 2
    nz = y.abs()[y != 0]
    k = torch.log2(nz / nz.max())
    assert torch.equal(k, torch.round(k))
