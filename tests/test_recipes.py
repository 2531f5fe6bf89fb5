"""Recipes: the registry (lowprec.recipes, the one owner of the names, stored in Hydra's ConfigStore
for grad=/fwd=), what the names mean, and estimator composition."""

import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

import lowprec as lp
from lowprec import recipes

CONF = os.path.join(os.path.dirname(__file__), "..", "conf")


@pytest.fixture(scope="module")
def hydra_conf():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.abspath(CONF), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def test_the_registry_is_the_only_source_of_recipe_names():
    """Guards the one owner: no YAML under conf/grad or conf/fwd (it would shadow or duplicate a
    registered name), and every name has its one-line description."""
    for group in ("grad", "fwd"):
        d = os.path.join(CONF, group)
        assert not os.path.isdir(d) or not [f for f in os.listdir(d) if f.endswith(".yaml")], group
    assert set(recipes.RECIPE_DOCS["grad"]) == set(lp.GRAD_NAMES)
    assert set(recipes.RECIPE_DOCS["fwd"]) == set(lp.FWD_NAMES)
    assert recipes.config_options("grad") == list(lp.GRAD_NAMES) and recipes.config_options("model") == []


@pytest.mark.parametrize("name", lp.GRAD_NAMES)
def test_grad_option_composes_to_the_registered_recipe(hydra_conf, name):
    """grad=<name> composes from the ConfigStore and instantiates to grad_recipe(name)."""
    cfg = compose("config", overrides=[f"grad={name}"])
    obj = instantiate(cfg.grad)
    assert obj == lp.grad_recipe(name) and obj.name == name
    assert instantiate(OmegaConf.create(recipes.grad_config(name))) == obj
    x = torch.randn(8, 16)
    for est in (obj.backward, obj.update):
        if est is not None:
            y = est(x, generator=torch.Generator().manual_seed(0))
            assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("name", lp.FWD_NAMES)
def test_fwd_option_composes_to_the_registered_recipe(hydra_conf, name):
    cfg = compose("config", overrides=[f"fwd={name}"])
    assert instantiate(cfg.fwd) == lp.fwd_recipe(name)


def test_field_overrides_of_a_registered_recipe(hydra_conf):
    """grad.<slot>.<field>=v overrides one field; a shared recipe stays shared (update is
    ${.backward}); impossible values fail at instantiation."""
    r = instantiate(compose("config", overrides=["grad=luq4", "grad.backward.bits=3"]).grad)
    assert r.backward == r.update == lp.LUQ(3) and r.shared and r.route == "both"
    r = instantiate(compose("config", overrides=["grad=nvfp4_sr_rht", "grad.update_rht=32"]).grad)
    assert r.update_rht == 32
    assert instantiate(compose("config", overrides=["fwd=int4", "fwd.weight.bits=8"]).fwd).weight.bits == 8
    cfg = compose("config", overrides=["grad=mvue24", "grad.update.n=5"])
    with pytest.raises(Exception, match="N must not exceed M"):
        instantiate(cfg.grad)
    cfg = compose("config", overrides=["grad=luq4", "grad.backward.bits=1"])
    with pytest.raises(Exception, match="bits=1"):
        instantiate(cfg.grad)


def test_cli_option_check_knows_the_registered_names():
    """The runner's one-line check of group=option (lowprec.prepare) sees the ConfigStore names."""
    from lowprec.prepare import check_group_options

    assert check_group_options([f"grad={','.join(lp.GRAD_NAMES)}", "fwd=int4"]) is None
    assert "did you mean 'luq4'" in check_group_options(["grad=luq5"])
    assert "unknown fwd option 'int5'" in check_group_options(["fwd=int5"])


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
