"""scripts/check_models.py --quick: two small models, fp32 and luq4 each, a few batches; the
markdown table has one filled row per model (numbers, not times, are checked)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_models.py"

pytestmark = pytest.mark.slow


def _rows(md: str) -> dict[str, list[str]]:
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("model", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def test_quick_mode_writes_one_row_per_model(tmp_path):
    out = tmp_path / "models.md"
    p = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    md = out.read_text()
    assert "QUICK MODE" in md and "trainer.threads=1" in md and "trainer.limit_batches=2" in md
    rows = _rows(md)
    assert sorted(rows) == ["mobilenet_v2", "resnet20"]
    for model, (defaults, fp32, luq4, deg, t_fp32, t_luq4, ok) in rows.items():
        assert re.match(r"sgd lr [\d.]+, cosine warm-up [\d.]+", defaults), defaults
        assert "digits 16 px, 1 ep, batch 128" in defaults
        f, q = float(fp32), float(luq4)
        assert 0 <= f <= 100 and 0 <= q <= 100
        assert float(deg) == pytest.approx(f - q, abs=0.02)  # each rounded to 0.01
        assert ok in ("yes", "**no**") and (ok == "yes") == (f >= 85)
    assert "zero-init" in rows["mobilenet_v2"][0]


def test_unknown_model_is_one_error_line(tmp_path):
    p = subprocess.run([sys.executable, str(SCRIPT), "--models", "resnet21", "--out", str(tmp_path / "m.md")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("error: --models 'resnet21'")
    assert "resnet20" in p.stderr and not (tmp_path / "m.md").exists()
