"""conf/paper_numbers.yaml as lowprec.tables reads it: every full luq_table row whose model the LUQ
paper's Table 2 reports (all of them but the FNT-only and radix4-only rows) shows the paper's number
and its degradation, including the ResNeXt-50, ViT-B and Transformer-base WMT En-De rows."""

from pathlib import Path

import pytest

from lowprec import tables as T

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("label,number,deg", [
    ("resnext50_imagenet_fp32", "77.60 (resnext50)", "baseline"),
    ("resnext50_imagenet_luq4", "76.02 (resnext50)", "+1.58"),
    ("resnext50_imagenet_luq4_smp2", "76.12 (resnext50)", "+1.48"),
    ("vit_b_imagenet_fp32", "76.20 (vit_b)", "baseline"),
    ("vit_b_imagenet_luq4", "73.70 (vit_b)", "+2.50"),
    ("vit_b_imagenet_luq4_smp2", "74.10 (vit_b)", "+2.10"),
    ("transformer_wmt_en_de_fp32", "27.50 (transformer_wmt_en_de)", "baseline"),
    ("transformer_wmt_en_de_luq4", "27.17 (transformer_wmt_en_de)", "+0.33"),
    ("transformer_wmt_en_de_luq4_smp2", "27.25 (transformer_wmt_en_de)", "+0.25"),
])
def test_new_full_rows_show_the_papers_numbers(label, number, deg):
    assert T.paper_cell("luq_table", "full", label) == (number, deg)


def test_every_full_luq_row_has_a_paper_number():
    """No row of the full luq_table shows '—' except LUQ+FNT (the paper has no such number)."""
    labels = [p.stem for p in sorted((ROOT / "conf" / "experiment" / "full" / "luq_table").glob("*.yaml"))]
    assert labels
    missing = [lab for lab in labels if T.paper_cell("luq_table", "full", lab)[0] == "—"]
    assert all("_fnt" in lab or lab.startswith("mobilenet_v2_imagenet_radix4") for lab in missing), missing
