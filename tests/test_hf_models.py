"""model=hf (lowprec.hf_models) and model=timm: builders from configs without the network, the
trainer's contracts (LM: idx [B, T] -> logits [B, V, T]; images: [N, classes]), the one-line input
errors, a local config/checkpoint directory, and a 2-step run of each through run.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lowprec.chargpt import CharGPT
from lowprec.convert import convert
from lowprec.hf_models import HFModelSpec, build_hf
from lowprec.models import ModelSpec, Resized, build_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "sample.txt"
TINY_LLAMA = dict(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, hidden_size=32,
                  intermediate_size=64)
TINY_BERT = dict(num_hidden_layers=1, num_attention_heads=2, hidden_size=32, intermediate_size=64)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (transformers/timm must not download)."""
    def refuse(*a, **k):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _yaml_spec(**over):
    """conf/model/hf.yaml as run.py instantiates it (its presets), with `over` on top."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.load(ROOT / "conf" / "model" / "hf.yaml")
    node.pop("defaults")
    for k, v in over.items():
        node[k] = v
    return instantiate(node)


def test_gpt2_preset_is_chargpt_sized_with_the_lm_contract():
    """The yaml's gpt2 is chargpt's architecture (same parameter count), returns [B, V, T], and its
    one-hot input embedding and LM head are the first and last layers convert's first_last keeps."""
    spec = _yaml_spec()
    assert isinstance(spec, HFModelSpec) and spec.source == "lm" and spec.train_defaults["max_steps"] == 2000
    torch.manual_seed(0)
    m = build_model(spec, num_classes=84, in_channels=1, image_size=64)
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in CharGPT(84).parameters()) == 114_944
    idx = torch.randint(0, 84, (2, 64))
    out = m(idx)
    assert out.shape == (2, 84, 64) and torch.isfinite(out).all()
    # the one-hot Linear is the embedding: a row lookup of its weight's columns
    wte = m.hf.get_input_embeddings()
    assert isinstance(wte, nn.Linear) and wte.weight.shape == (64, 84)
    assert m.no_weight_decay() == {"hf.transformer.wte.weight"}
    assert m.hf.lm_head.weight is not wte.weight  # untied
    rep = convert(m, grad="fp32")
    assert rep.skipped["hf.transformer.wte"].startswith("first") and rep.skipped["hf.lm_head"].startswith("last")
    with pytest.raises(ValueError, match="shorter than the data's windows"):
        build_model(spec, num_classes=84, in_channels=1, image_size=65)


def test_causal_lm_converts_and_steps():
    """A llama (nn.Linear projections) converts every block GEMM; a luq4 step gives finite
    gradients that differ from the fp32 step's in the converted layers."""
    spec = HFModelSpec(name="llama", config=TINY_LLAMA)
    torch.manual_seed(0)
    ref = build_hf(spec, num_classes=30, in_channels=1, image_size=16)
    m = build_hf(spec, num_classes=30, in_channels=1, image_size=16)
    m.load_state_dict(ref.state_dict())
    rep = convert(m, grad="luq4")
    assert rep.num_converted == 7 and set(rep.skipped) == {"hf.model.embed_tokens", "hf.lm_head"}
    idx, y = torch.randint(0, 30, (4, 16)), torch.randint(0, 30, (4, 16))
    for model in (ref, m):
        nn.functional.cross_entropy(model(idx), y).backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), m.named_parameters()):
        assert torch.isfinite(q.grad).all(), n
    q_proj = "hf.model.layers.0.self_attn.q_proj.weight"
    g = dict(m.named_parameters())[q_proj].grad
    assert not torch.equal(g, dict(ref.named_parameters())[q_proj].grad)


@pytest.mark.parametrize("arch, name, config, check", [
    ("image-classification", "vit", dict(TINY_BERT, patch_size=4), "image"),
    ("masked-lm", "bert", TINY_BERT, "mlm"),
    ("question-answering", "bert", TINY_BERT, "qa"),
    ("seq2seq", "t5", dict(num_layers=1, num_decoder_layers=1, num_heads=2, d_model=32, d_kv=16, d_ff=64), "s2s"),
])
def test_other_heads_shapes(arch, name, config, check):
    spec = HFModelSpec(name=name, arch=arch, config=config)
    assert spec.source == "hf"
    m = build_hf(spec, num_classes=10 if check == "image" else 50, in_channels=1, image_size=16)
    ids = torch.randint(0, 50, (2, 12))
    if check == "image":
        assert m(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    elif check == "mlm":
        assert m(ids, torch.ones_like(ids)).shape == (2, 50, 12)
    elif check == "qa":
        s, e = m(ids, torch.ones_like(ids))
        assert s.shape == e.shape == (2, 12)
    else:
        assert m(ids, torch.randint(0, 50, (2, 5))).shape == (2, 50, 5)


def test_missing_path_is_one_line_when_built():
    spec = HFModelSpec(path="/nonexistent/dir")  # an experiment may name a cluster-only checkpoint
    with pytest.raises(ValueError) as e:
        build_hf(spec, num_classes=30, in_channels=1, image_size=16)
    assert "model.path=/nonexistent/dir: no config.json there" in str(e.value) and "\n" not in str(e.value)


def test_local_config_and_checkpoint_directory(tmp_path):
    """model.path: the config from a saved directory (the name is then its model_type);
    weights=true loads the saved weights (a block's weights equal bit for bit)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    saved = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=30, **TINY_LLAMA))
    saved.save_pretrained(tmp_path)
    m = build_hf(HFModelSpec(name="ignored", path=str(tmp_path)), num_classes=30, in_channels=1, image_size=16)
    assert m.hf.config.hidden_size == 32
    w = build_hf(HFModelSpec(path=str(tmp_path), weights=True), num_classes=30, in_channels=1, image_size=16)
    k = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(w.hf.state_dict()[k], saved.state_dict()[k])
    assert not torch.equal(m.hf.state_dict()[k], saved.state_dict()[k])  # fresh init without weights


@pytest.mark.parametrize("kw, msg", [
    (dict(name="gpt3"), "model.name='gpt3' is not a transformers model_type (did you mean"),
    (dict(name="bert", arch="seq2seq"), "model.arch='seq2seq' has no bert model; bert has: causal-lm, masked-lm"),
    (dict(name="gpt2", config={"n_layers": 2}), "model.config.n_layers=2: gpt2's config has no field 'n_layers' "
                                                "(did you mean 'n_layer'?)"),
    (dict(arch="lm"), "model.arch='lm' is not a Hugging Face head here"),
    (dict(kwargs={"block": 3}), "model.kwargs key 'block' is not known"),
    (dict(weights=True), "model.weights=true needs model.path"),
    (dict(train_defaults={"lr": 1}), "train_defaults key 'lr' is not known"),
])
def test_input_errors_are_one_line(kw, msg):
    with pytest.raises(ValueError) as e:
        HFModelSpec(**kw)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_timm_input_resized_to_its_stride():
    """convnext_atto (total stride 32) cannot run on 16-px digits: inputs are resized to 32 px;
    resnet18 runs at 16 px unwrapped; input_size pins the size."""
    m = build_model(ModelSpec("convnext_atto", "timm", {}), num_classes=10, in_channels=1, image_size=16)
    assert isinstance(m, Resized) and m.size == 32
    assert m(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    r = build_model(ModelSpec("resnet18", "timm", {}), num_classes=10, in_channels=1, image_size=16)
    assert not isinstance(r, Resized)
    p = build_model(ModelSpec("resnet18", "timm", {"input_size": 24}), num_classes=10, in_channels=1, image_size=16)
    assert isinstance(p, Resized) and p.size == 24
    with pytest.raises(ValueError, match="input_size=0"):
        ModelSpec("resnet18", "timm", {"input_size": 0})


def _run(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HYDRA_FULL_ERROR="0")
    env.pop("LOWPREC_DEBUG", None)
    return subprocess.run([sys.executable, str(ROOT / "run.py"), f"out_root={tmp}", "logger=none",
                           "trainer.threads=1", *args], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["model=hf", "model.name=llama", "model.kwargs.block_size=16", "data=text", f"data.path={SAMPLE}",
     "data.val_windows=8", "trainer.max_steps=2", "trainer.eval_every=0", "sched.warmup_steps=1"],
    ["model=timm", "model.name=convnext_atto", "grad=mvue24", "trainer.epochs=1", "trainer.limit_batches=1",
     "trainer.batch_size=16"],
], ids=["hf-llama", "timm-convnext_atto"])
def test_two_step_runs_print_a_degradation(tmp_path, args):
    p = _run(tmp_path, *args)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "converted" in p.stdout and any(l.startswith("degradation") for l in p.stdout.splitlines())


def test_run_py_bad_name_is_one_error_line(tmp_path):
    p = _run(tmp_path, "model=hf", "model.name=gpt3", "data=text", f"data.path={SAMPLE}")
    assert p.returncode == 2
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and "model.name='gpt3'" in errors[0], p.stderr
    assert p.stderr.strip().splitlines()[-1] == errors[0]
