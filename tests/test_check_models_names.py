"""scripts/check_models.py sorts conf/model/*.yaml into image and language models: a language model
(`source: lm`, or a Hugging Face `arch` other than image-classification, as conf/model/hf.yaml's
causal-lm) is listed as not run, never trained on the default digits against the image bar."""

from script_utils import load_script


def test_hf_causal_lm_is_a_language_model():
    cm = load_script("check_models")
    image, lm = cm.model_names()
    assert "hf" in lm and "chargpt" in lm  # hf.yaml: arch causal-lm (was listed as an image model)
    assert "hf" not in image and "resnet20" in image and "timm" in image


def test_is_language_model_by_source_and_arch():
    cm = load_script("check_models")
    assert cm.is_language_model({"source": "lm"})
    assert cm.is_language_model({"arch": "causal-lm"})
    assert cm.is_language_model({"arch": "seq2seq"})
    assert not cm.is_language_model({"arch": "image-classification"})
    assert not cm.is_language_model({"source": "torchvision"})
    assert not cm.is_language_model({})
