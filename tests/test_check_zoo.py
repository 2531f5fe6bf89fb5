"""lowprec.zoo (weight-GEMM FLOPs, coverage, the one-step check) and scripts/check_zoo.py --quick."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from lowprec.zoo import check_model, weight_gemm_flops
from script_utils import load_script



class Net(nn.Module):
    """conv (3->8, 3x3, groups 1) -> MHA over the 16 positions -> linear 8->5, for hand counts."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.dw(self.conv(x)).flatten(2).transpose(1, 2)  # [N, 16, 8]
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.mid(h).mean(1))


def test_flops_by_hand():
    """Each unit's count equals 2·(weights per output)·outputs: conv 2·27·(8·16) per image, the
    depthwise conv 2·9·(8·16), MHA's packed in-projection 2·8·(3·8)·16 and out_proj 2·8·8·16,
    linears 2·in·out per token (mid on 16 tokens, head on 1)."""
    m = Net()
    flops, remove = weight_gemm_flops(m)
    m(torch.randn(2, 3, 4, 4))
    remove()
    n = 2
    assert flops == {"conv": n * 2 * 27 * 8 * 16, "dw": n * 2 * 9 * 8 * 16, "attn": n * 2 * 8 * 24 * 16,
                     "attn.out_proj": n * 2 * 8 * 8 * 16, "mid": n * 2 * 8 * 8 * 16, "head": n * 2 * 8 * 5}
    m(torch.randn(2, 3, 4, 4))  # hooks removed: nothing added
    assert flops["head"] == n * 2 * 8 * 5


def test_parametrized_layer_flops_counted():
    """A weight-normed (parametrized) conv, as wav2vec2's positional conv, computes its weight in its
    forward: its FLOPs count for it (they were missed: no parameter operand, so the coverage could
    not see it skipped), and, converted, as converted."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Conv1d(4, 4, 3, padding=1),
                      torch.nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 4, 5, padding=2)),
                      nn.Conv1d(4, 3, 1))
    flops, remove = weight_gemm_flops(m)
    m(torch.randn(2, 2, 6))
    remove()
    assert flops["2"] == 2 * 2 * (4 * 5) * (4 * 6)
    cov = check_model(m, lambda: (torch.randn(2, 2, 6),), grad="luq4")
    assert sorted(cov.converted) == ["1", "2"] and cov.frac_rule == 1.0
    assert cov.grads_compared == 2 and cov.grads_differ == 2


def test_coverage_and_step():
    """luq4: first (conv) and last (head) kept; the rule's fraction counts what convert converted;
    converted weight gradients differ from fp32's. grad=fp32: identical gradients."""
    torch.manual_seed(0)
    m = Net()
    cov = check_model(m, lambda: (torch.randn(4, 3, 4, 4),), grad="luq4")
    assert cov.finite and set(cov.skipped) >= {"conv", "head"}
    f = cov.flops
    done = sum(f[n] for n in cov.converted)
    assert cov.frac_rule == pytest.approx(done / (sum(f.values()) - f["conv"] - f["head"]))
    assert cov.frac_all == pytest.approx(done / sum(f.values()))
    assert "dw" in cov.converted and "mid" in cov.converted
    assert cov.grads_compared >= 2 and cov.grads_differ == cov.grads_compared
    # an exact recipe: every converted layer's gradient equal to the unconverted model's
    torch.manual_seed(0)
    ref = check_model(Net(), lambda: (torch.randn(4, 3, 4, 4),), grad="fp32")
    assert ref.grads_compared >= 2 and ref.grads_differ == 0


def test_nothing_convertible_is_a_zero_row():
    """A model whose every layer is first or last converts nothing: 0%, no exception."""
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    cov = check_model(m, lambda: (torch.randn(2, 4),), grad="luq4")
    assert cov.converted == [] and cov.frac_all == 0 and cov.note


@pytest.mark.slow
def test_quick_cli(tmp_path):
    mod = load_script("check_zoo")
    out = tmp_path / "z.md"
    assert mod.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert "python scripts/check_zoo.py --quick" in text and "commit" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| tv:") or ln.startswith("| timm:")
            or ln.startswith("| hf:")]
    assert [r.split(" | ")[0][2:] for r in rows] == list(mod.QUICK)
    resnet = rows[0].split(" | ")
    assert resnet[6] == "100.00" and resnet[8].startswith("ok (19/19")  # every conv but the stem, fc
    assert "## Not covered\n\nEvery listed model is at ≥ 99%" in text  # said, not left out
    assert mod.main(["--models", "tv:nope", "--out", str(out)]) == 2
