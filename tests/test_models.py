"""lowprec.models: every conf/model/*.yaml builds, runs forward+backward; CIFAR ResNets match the paper."""

import os
import socket

import pytest
import torch
from torch import nn

from lowprec.chargpt import LM_MODELS
from lowprec.models import CIFAR_RESNETS, CifarResNet, ModelSpec, build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_YAMLS = sorted(os.path.join(ROOT, "conf", "model", f)
                     for f in os.listdir(os.path.join(ROOT, "conf", "model"))
                     # LMs: tests/test_chargpt.py; model=hf: tests/test_hf_models.py
                     if f.endswith(".yaml") and f[:-5] not in (*LM_MODELS, "hf"))


def _nparams(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (timm/torchvision must not download)."""
    def refuse(*a, **k):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=[os.path.basename(p)[:-5] for p in MODEL_YAMLS])
def test_yaml_builds_forward_backward(path, no_network):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.load(path)
    node.pop("defaults", None)  # a defaults list (e.g. vit_tiny's optimizer) is Hydra's, not the spec's
    spec = instantiate(node)
    assert isinstance(spec, ModelSpec) and type(spec.kwargs) is dict
    torch.manual_seed(0)
    model = build_model(spec, num_classes=10, in_channels=1, image_size=32)
    x = torch.randn(2, 1, 32, 32)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1


def test_resnet20_parameter_count():
    # He et al. 2016, Table 6: ResNet-20 has 0.27M parameters (option A shortcuts, 10 classes, RGB).
    m = build_model(ModelSpec("resnet20", "cifar"), num_classes=10, in_channels=3, image_size=32)
    assert _nparams(m) == 269_722
    m56 = build_model(ModelSpec("resnet56", "cifar"), num_classes=10, in_channels=3, image_size=32)
    assert _nparams(m56) == 853_018  # 0.85M in the paper
    mB = build_model(ModelSpec("resnet20", "cifar", {"shortcut": "B"}), num_classes=10, in_channels=3, image_size=32)
    # Option B adds two 1x1 projections + BN: 16*32 + 2*32 and 32*64 + 2*64.
    assert _nparams(mB) == 269_722 + 16 * 32 + 64 + 32 * 64 + 128


def test_cifar_resnet_structure():
    m = build_model(ModelSpec("resnet32", "cifar", {"width": 2}), num_classes=100, in_channels=3, image_size=32)
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert len(convs) + 1 == 32  # 6n+2 weighted layers: 31 convs + fc (option A has no shortcut convs)
    assert (convs[0].kernel_size, convs[0].stride, convs[0].out_channels) == ((3, 3), (1, 1), 32)
    assert not any(isinstance(c, nn.MaxPool2d) for c in m.modules())
    assert {c.out_channels for c in convs} == {32, 64, 128} and m.fc.out_features == 100
    feats = {}
    m.layer3.register_forward_hook(lambda mod, i, o: feats.update(l3=o.shape))
    m(torch.randn(1, 3, 32, 32))
    assert feats["l3"] == (1, 128, 8, 8)  # 32 -> 32 -> 16 -> 8
    assert set(CIFAR_RESNETS) >= {"resnet20", "resnet32", "resnet56"}


def test_option_a_shortcut_is_zero_padded_identity():
    m = CifarResNet(20, num_classes=10, in_channels=3)
    blk = m.layer2[0]
    x = torch.randn(2, 16, 8, 8)
    s = blk.shortcut(x)
    assert s.shape == (2, 32, 4, 4)
    torch.testing.assert_close(s[:, 8:24], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert s[:, :8].abs().sum() == 0 and s[:, 24:].abs().sum() == 0


def test_torchvision_stems():
    small = build_model(ModelSpec("resnet18", "torchvision"), num_classes=10, in_channels=3, image_size=32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and isinstance(small.maxpool, nn.Identity)
    big = build_model(ModelSpec("resnet18", "torchvision"), num_classes=7, in_channels=1, image_size=224)
    assert big.conv1.kernel_size == (7, 7) and big.conv1.stride == (2, 2) and big.conv1.in_channels == 1
    assert isinstance(big.maxpool, nn.MaxPool2d) and big.fc.out_features == 7
    off = build_model(ModelSpec("resnet18", "torchvision", {"small_stem": False}), num_classes=10, in_channels=3,
                      image_size=32)
    assert off.conv1.stride == (2, 2)
    mb = build_model(ModelSpec("mobilenet_v2", "torchvision"), num_classes=10, in_channels=1, image_size=32)
    assert mb.features[0][0].stride == (1, 1) and mb.features[0][0].in_channels == 1
    assert mb.classifier[-1].out_features == 10


def test_vit_patch_size_and_no_network(no_network):
    m = build_model(ModelSpec("vit_tiny_patch16_224", "timm", {"patch_size": 4}), num_classes=10, in_channels=1,
                    image_size=32)
    assert m.patch_embed.num_patches == 64 and m.head.out_features == 10
    assert m.patch_embed.proj.in_channels == 1


@pytest.mark.parametrize("kwargs, needle", [
    (dict(name="resnet20", source="keras"), "'keras'"),
    (dict(name="resnet21", source="cifar"), "'resnet21'"),
    (dict(name="vgg16", source="torchvision"), "'vgg16'"),
    (dict(name="resnet20", source="cifar", kwargs={"depth": 3}), "'depth'"),
    (dict(name="resnet20", source="cifar", kwargs={"width": 0}), "width=0"),
    (dict(name="resnet20", source="cifar", kwargs={"shortcut": "C"}), "'C'"),
    (dict(name="resnet18", source="torchvision", kwargs={"small_stem": "yes"}), "'yes'"),
    (dict(name="resnet18", source="torchvision", kwargs={"width_mult": 2}), "'width_mult'"),
    (dict(name="vit_tiny_patch16_224", source="timm", kwargs={"num_classes": 3}), "'num_classes'"),
    (dict(name="resnet20", source="cifar", kwargs=[1, 2]), "[1, 2]"),
])
def test_bad_spec_names_value(kwargs, needle):
    with pytest.raises(ValueError) as e:
        ModelSpec(**kwargs)
    assert needle in str(e.value)


def test_bad_build_args():
    with pytest.raises(ValueError, match="'vit_nope'"):
        build_model(ModelSpec("vit_nope", "timm"), num_classes=10, in_channels=3, image_size=32)
    with pytest.raises(ValueError, match="num_classes=0"):
        build_model(ModelSpec("resnet20"), num_classes=0, in_channels=3, image_size=32)
    with pytest.raises(ValueError, match="'bogus'"):
        build_model(ModelSpec("vit_tiny_patch16_224", "timm", {"bogus": 1}), num_classes=10, in_channels=3,
                    image_size=32)


@pytest.mark.parametrize("name, source", [("resnet20", "cifar"), ("resnet18", "torchvision"),
                                          ("resnet50", "torchvision"), ("mobilenet_v2", "torchvision")])
def test_zero_init_residual_makes_every_residual_block_the_identity(name, source):
    """zero_init_residual: the last BN of each residual branch has γ = 0, so at init every block
    with a skip connection passes its (post-ReLU, so non-negative) input through unchanged;
    without it the blocks do not."""
    def residual_blocks(m):
        from torchvision.models.mobilenetv2 import InvertedResidual
        from torchvision.models.resnet import BasicBlock, Bottleneck

        cifar_block = type(CifarResNet(20).layer1[0])
        return [b for b in m.modules() if isinstance(b, (cifar_block, BasicBlock, Bottleneck))
                or (isinstance(b, InvertedResidual) and b.use_res_connect)]

    for zero in (True, False):
        torch.manual_seed(0)
        m = build_model(ModelSpec(name, source, {"zero_init_residual": zero}), num_classes=10, in_channels=1,
                        image_size=16)
        feats = []
        for b in residual_blocks(m):
            b.register_forward_hook(lambda mod, i, o: feats.append((i[0], o)))
        assert residual_blocks(m), name
        m(torch.randn(4, 1, 16, 16))
        # Blocks whose shortcut changes the shape (stride / channels) are not identities either way.
        same = [(i, o) for i, o in feats if i.shape == o.shape]
        assert same
        assert all(torch.equal(i, o) for i, o in same) == zero, (name, zero)


def test_train_defaults_are_checked():
    ModelSpec("resnet20", train_defaults={"sgd_lr": 0.05, "warmup_epochs": 0})
    with pytest.raises(ValueError, match="'lr'"):
        ModelSpec("resnet20", train_defaults={"lr": 0.05})
    with pytest.raises(ValueError, match="sgd_lr=0"):
        ModelSpec("resnet20", train_defaults={"sgd_lr": 0})
    with pytest.raises(ValueError, match="zero_init_residual='yes'"):
        ModelSpec("resnet50", "torchvision", {"zero_init_residual": "yes"})


def test_model_train_defaults_reach_the_composed_config_and_the_command_line_wins():
    """conf/optim and conf/sched read the model's train_defaults; the resolved config (what runs
    store and what the baseline key hashes) holds the values; optim.lr=... still wins."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    want = OmegaConf.load(os.path.join(ROOT, "conf", "model", "resnet50.yaml")).train_defaults
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
            def resolved(*ov):
                return OmegaConf.to_container(compose("config", overrides=list(ov)), resolve=True)

            c = resolved("model=resnet50")
            assert c["optim"]["lr"] == want.sgd_lr and c["sched"]["warmup_epochs"] == want.warmup_epochs
            assert c["model"]["kwargs"]["zero_init_residual"] is True
            c = resolved("model=resnet50", "optim.lr=0.05", "sched.warmup_epochs=0")
            assert (c["optim"]["lr"], c["sched"]["warmup_epochs"]) == (0.05, 0)
            c = resolved("model=resnet50", "sched=step")  # every schedule takes the warm-up
            assert c["sched"]["warmup_epochs"] == want.warmup_epochs
            c = resolved("model=resnet50", "model.train_defaults.sgd_lr=0.02")
            assert c["optim"]["lr"] == 0.02
            c = resolved("model=resnet50", "optim=adamw")  # no adamw_lr in resnet50.yaml: AdamW's own
            assert c["optim"]["lr"] == 1e-3
            c = resolved()  # resnet20, the plain `python run.py`, keeps the groups' own values
            assert (c["optim"]["lr"], c["sched"]["warmup_epochs"], c["trainer"]["epochs"]) == (0.1, 0, 5)
            # vit_tiny picks its optimizer and budget (conf/model/vit_tiny.yaml); the command line wins
            vit = OmegaConf.load(os.path.join(ROOT, "conf", "model", "vit_tiny.yaml")).train_defaults
            c = resolved("model=vit_tiny")
            assert (c["optim"]["name"], c["optim"]["lr"], c["trainer"]["epochs"]) == ("adamw", vit.adamw_lr, vit.epochs)
            c = resolved("model=vit_tiny", "optim=sgd", "trainer.epochs=5")
            assert (c["optim"]["name"], c["optim"]["lr"], c["trainer"]["epochs"]) == ("sgd", 0.1, 5)
    finally:
        GlobalHydra.instance().clear()
