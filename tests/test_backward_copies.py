"""backward.route makes the [C_out, tokens] copy of δ at most once per backward and shares it between
the backward and update estimates (and SMP draws), and on the CPU a Linear's block estimates make none
(they read the transposed view, lowprec.backward._reads_view): guards the char GPT's block-FP4 step
time (each copy of a Linear δ is a transposing one) without changing a number."""

import pytest
import torch

import lowprec.backward as backward
from lowprec.backward import route
from lowprec.kernels import cpu as cpu_twins
from lowprec.recipes import grad_recipe


def _counting(delta, monkeypatch):
    """A Linear's to2d/from2d, and the list of the copies of δ made: to2d(t) and the C transposition
    (kernels.cpu.contiguous) by which route copies the transposed view."""
    copies = []

    def to2d(t, view=False):
        if not view:
            copies.append("to2d")
        v = t.reshape(-1, t.shape[-1]).t()
        return v if view else v.contiguous()

    real = cpu_twins.contiguous

    def contiguous(x):
        copies.append("contiguous")
        return real(x)

    monkeypatch.setattr(cpu_twins, "contiguous", contiguous)
    return to2d, (lambda t: t.t().reshape(delta.shape)), copies


@pytest.mark.parametrize("view", [True, False], ids=["view read", "copy path"])
def test_one_copy_for_both_estimates_and_same_numbers(view, monkeypatch):
    delta = torch.randn(4, 32, 16)
    to2d, from2d, copies = _counting(delta, monkeypatch)
    if not view:  # the copy path (off the CPU, or a layout the view rule leaves alone)
        monkeypatch.setattr(backward, "_reads_view", lambda *a: False)
    g = grad_recipe("nvfp4_sr")  # block estimators on both GEMMs, separate draws
    torch.manual_seed(0)
    d_b, d_u = route(g, {"backward": {}, "update": {}}, delta, True, True, to2d, from2d)
    copies_made = len(copies)
    # the same draws as with a fresh copy per estimate
    torch.manual_seed(0)
    ref_b = from2d(g.backward(to2d(delta), state={}))
    ref_u = from2d(g.update(to2d(delta), state={}))
    assert torch.equal(d_b, ref_b) and torch.equal(d_u, ref_u)
    if view:
        assert copies_made == 0 and d_b.is_contiguous() and d_u.is_contiguous()  # δ's own order
    else:
        assert copies_made == 1 and d_b.stride() == ref_b.stride() and d_u.stride() == ref_u.stride()


@pytest.mark.parametrize("view", [True, False], ids=["view read", "copy path"])
def test_smp_draws_share_the_copy(view, monkeypatch):
    """Two SMP draws of a block estimator: one copy (each draw used to make its own), none on the view."""
    from lowprec.estimators import NVFP4
    from lowprec.recipes import GradRecipe
    delta = torch.randn(2, 16, 8)
    to2d, from2d, copies = _counting(delta, monkeypatch)
    if not view:
        monkeypatch.setattr(backward, "_reads_view", lambda *a: False)
    g = GradRecipe("nvfp4_smp2", update=NVFP4("sr", dim=-1), samples=2)
    route(g, {"backward": {}, "update": {}}, delta, True, True, to2d, from2d)
    assert len(copies) == (0 if view else 1)
