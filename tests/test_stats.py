import math

import pytest
import torch

import lowprec as lp
from stat_utils import heavy_tailed


def test_compare_values():
    d = torch.tensor([3.0, 4.0, 0.0])
    h = torch.tensor([3.0, 0.0, 0.0])
    s = lp.compare(d, h)
    assert s["rel_error"] == pytest.approx(16 / 25)
    assert s["cosine"] == pytest.approx(3 / 5)
    assert s["zero_frac"] == pytest.approx(2 / 3) and s["nnz_in"] == pytest.approx(2 / 3)


def test_bias_falls_for_unbiased_and_stays_for_mse():
    x = heavy_tailed((32, 64), sigma=1.0, seed=0)
    g = torch.Generator().manual_seed(0)
    mv = lp.estimator_stats(x, lp.NMPrune(2, 4), ks=(1, 16, 256), generator=g)
    assert mv["bias@256"] < mv["bias@16"] < mv["bias@1"]
    assert mv["bias@256"] < 2 * mv["bias_floor@256"]
    assert mv["rel_var"] == pytest.approx(mv["rel_var_theory"], rel=0.15)
    mse = lp.estimator_stats(x, lp.NMPrune(2, 4, "mse"), ks=(1, 16, 256), generator=g)
    assert mse["bias@1"] == mse["bias@256"] > 0 and mse["rel_var"] == 0
    luq = lp.estimator_stats(x, lp.LUQ(4), ks=(1, 64), generator=g)
    assert 0 < luq["underflow_frac"] < 1 and luq["alpha"] == pytest.approx(luq["max_abs"] / 64)
    assert luq["rel_var"] == pytest.approx(luq["rel_var_theory"], rel=0.2)
    assert math.isnan(lp.compare(torch.zeros(3), torch.zeros(3))["rel_error"])
    with pytest.raises(ValueError, match="all zeros"):
        lp.estimator_stats(torch.zeros(4), lp.LUQ(4))
