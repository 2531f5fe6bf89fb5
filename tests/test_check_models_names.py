"""scripts/check_models.py sorts conf/model/*.yaml into image and language models: a language model
(`source: lm`, or a Hugging Face `arch` other than image-classification, as conf/model/hf.yaml's
causal-lm) is listed as not run, never trained on the default digits against the image bar."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("check_models", ROOT / "scripts" / "check_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hf_causal_lm_is_a_language_model():
    cm = _script()
    image, lm = cm.model_names()
    assert "hf" in lm and "chargpt" in lm  # hf.yaml: arch causal-lm (was listed as an image model)
    assert "hf" not in image and "resnet20" in image and "timm" in image


def test_is_language_model_by_source_and_arch():
    cm = _script()
    assert cm.is_language_model({"source": "lm"})
    assert cm.is_language_model({"arch": "causal-lm"})
    assert cm.is_language_model({"arch": "seq2seq"})
    assert not cm.is_language_model({"arch": "image-classification"})
    assert not cm.is_language_model({"source": "torchvision"})
    assert not cm.is_language_model({})
