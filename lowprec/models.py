"""Models: CIFAR ResNets (written here), torchvision and timm networks, behind one validated spec.

    spec = ModelSpec(name="resnet20", source="cifar", kwargs={"width": 1})   # conf/model/<name>.yaml
    model = build_model(spec, num_classes=10, in_channels=1, image_size=32)

Sources and their kwargs:

- ``cifar``: ResNets of He et al. 2016 (sec. 4.2) for 32x32 inputs: 3x3 stride-1 stem with 16
  channels, no max-pool, three stages of n basic blocks with 16/32/64 channels (strides 1/2/2),
  global average pool, linear head; depth 6n+2 (``CIFAR_RESNETS``). kwargs: ``width`` (channel
  multiplier, default 1), ``shortcut`` ("A": parameter-free zero-padded identity, the paper's CIFAR
  choice, 0.27M parameters for resnet20; "B": 1x1 conv + BN projection where the shape changes),
  ``zero_init_residual`` (default false; see below).
- ``torchvision``: ``TORCHVISION_MODELS``, built with ``weights=None`` (never downloads), with
  ``num_classes`` set and the first conv replaced when ``in_channels != 3``. kwargs: ``small_stem``
  (default: ``image_size <= 64``): a CIFAR stem, i.e. the first conv becomes 3x3 stride 1 and the
  ResNet max-pool is dropped (MobileNetV2: its stride-2 stem conv becomes stride 1); resnets also
  take ``zero_init_residual``, mobilenet_v2 takes ``zero_init_residual``, ``width_mult`` and
  ``dropout``.
- ``timm``: ``timm.create_model(name, pretrained=False, num_classes=, in_chans=, img_size=, **kwargs)``
  (``img_size`` only for models that take it, e.g. ViTs); e.g. kwargs ``patch_size: 4`` for 32x32
  inputs. Never touches the network. ``input_size`` (lowprec's kwarg): inputs are resized to it
  first; null picks the data's size, or the smallest larger multiple of the network's stride it
  runs on (``model=timm model.name=convnext_atto`` on 16-px digits: 32 px; see ``_timm``).
- ``hf``: ``transformers`` architectures from a config (``lowprec.hf_models.HFModelSpec``,
  ``conf/model/hf.yaml``), built by ``lowprec.hf_models.build_hf``.
- ``lm``: ``chargpt``, the character-level decoder of ``lowprec.chargpt`` (for a data task "lm":
  ``num_classes`` = vocabulary size, ``image_size`` = window length); kwargs ``CHARGPT_DEFAULTS``.

``zero_init_residual``: the scale γ of the last BatchNorm of every residual branch starts at 0,
so each block x + γ·f(x) starts as the identity and the network as a shallow one (Goyal et al.
2017; torchvision's flag; for MobileNetV2 the BN after the linear 1x1 projection of each block with
a skip connection). Without it a deep ResNet's output variance grows with depth at init, and on a
short schedule (digits: 60 SGD steps at lr 0.1) resnet50 did not get past ~14% top-1.

``train_defaults``: training settings that suit this model, read by conf/optim and conf/sched
through interpolation (``optim.lr: ${oc.select:model.train_defaults.sgd_lr,0.1}``), so they show in
the resolved config and in the experiment key, and ``optim.lr=...`` on the command line still wins.
Keys: ``TRAIN_DEFAULT_KEYS``. build_model ignores them.

Wrong names, sources or kwargs raise ValueError naming the value and the allowed set.
torchvision and timm are imported only when such a model is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .chargpt import build_lm, check_lm_kwargs
from .hf_models import HFModelSpec, build_hf
from .model_defaults import TRAIN_DEFAULT_KEYS, check_train_defaults

__all__ = ["MODEL_SOURCES", "CIFAR_RESNETS", "TORCHVISION_MODELS", "TRAIN_DEFAULT_KEYS", "ModelSpec",
           "build_model", "CifarResNet"]

MODEL_SOURCES = ("cifar", "torchvision", "timm", "lm")  # lm: lowprec.chargpt (data task "lm")
CIFAR_RESNETS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}  # blocks/stage
TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2")
_CIFAR_KWARGS = ("width", "shortcut", "zero_init_residual")
_TV_KWARGS = {"resnet18": ("small_stem", "zero_init_residual"), "resnet34": ("small_stem", "zero_init_residual"),
              "resnet50": ("small_stem", "zero_init_residual"),
              "mobilenet_v2": ("small_stem", "zero_init_residual", "width_mult", "dropout")}


def _plain(x: Any) -> Any:
    """DictConfig/ListConfig (Hydra without _convert_) -> plain containers."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(x):
            return OmegaConf.to_container(x, resolve=True)
    except ImportError:  # pragma: no cover - hydra is a dependency, but models must not need it
        pass
    return x


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str = "cifar"
    kwargs: dict = field(default_factory=dict)
    train_defaults: dict = field(default_factory=dict)  # read by conf/optim, conf/sched; not by build_model

    def __post_init__(self) -> None:
        object.__setattr__(self, "train_defaults", check_train_defaults(self.train_defaults))
        if self.source not in MODEL_SOURCES:
            raise ValueError(f"ModelSpec.source={self.source!r} is not a model source; allowed: {MODEL_SOURCES}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ModelSpec.name={self.name!r} must be a non-empty string")
        kwargs = _plain(self.kwargs)
        kwargs = {} if kwargs is None else kwargs
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
            raise ValueError(f"ModelSpec.kwargs={self.kwargs!r} must be a mapping of str to values")
        kwargs = dict(kwargs)
        object.__setattr__(self, "kwargs", kwargs)
        if self.source == "lm":
            return check_lm_kwargs(self.name, kwargs)

        if self.source == "cifar":
            if self.name not in CIFAR_RESNETS:
                raise ValueError(f"ModelSpec.name={self.name!r} is not a cifar model; allowed: {tuple(CIFAR_RESNETS)}")
            allowed = _CIFAR_KWARGS
        elif self.source == "torchvision":
            if self.name not in TORCHVISION_MODELS:
                raise ValueError(f"ModelSpec.name={self.name!r} is not a torchvision model here; "
                                 f"allowed: {TORCHVISION_MODELS}")
            allowed = _TV_KWARGS[self.name]
        else:
            # timm names are checked in build_model (needs `import timm`, ~1 s); kwargs pass through.
            ins = kwargs.get("input_size")
            if ins is not None and (isinstance(ins, bool) or not isinstance(ins, int) or ins < 1):
                raise ValueError(f"ModelSpec.kwargs.input_size={ins!r} must be a positive int or null")
            for k in ("pretrained", "num_classes", "in_chans"):
                if k in kwargs:
                    raise ValueError(f"ModelSpec.kwargs has {k!r}={kwargs[k]!r}: set by build_model, not kwargs")
            return
        bad = sorted(set(kwargs) - set(allowed))
        if bad:
            raise ValueError(f"ModelSpec.kwargs key {bad[0]!r} is not accepted by {self.source} {self.name}; "
                             f"allowed: {allowed}")
        if self.source == "cifar":
            w = kwargs.get("width", 1)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 or round(16 * w) < 1:
                raise ValueError(f"ModelSpec.kwargs.width={w!r} must be a positive number (channel multiplier)")
            sc = kwargs.get("shortcut", "A")
            if sc not in ("A", "B"):
                raise ValueError(f"ModelSpec.kwargs.shortcut={sc!r}; allowed: ('A', 'B')")
        zi = kwargs.get("zero_init_residual", False)
        if not isinstance(zi, bool):
            raise ValueError(f"ModelSpec.kwargs.zero_init_residual={zi!r}; allowed: true, false")
        ss = kwargs.get("small_stem")
        if ss is not None and not isinstance(ss, bool):
            raise ValueError(f"ModelSpec.kwargs.small_stem={ss!r}; allowed: true, false, null (= image_size <= 64)")


# ----------------------------------------------------------------------------------------------
# CIFAR ResNet (He et al. 2016, sec. 4.2)

class _ShortcutA(nn.Module):
    """Option A: identity with stride-s subsampling and zero channels appended (no parameters)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride, self.pad = stride, planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _ShortcutA(in_planes, planes, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, *, num_classes: int = 10, in_channels: int = 3, width: float = 1,
                 shortcut: str = "A", zero_init_residual: bool = False):
        super().__init__()
        assert (depth - 2) % 6 == 0, f"depth={depth} is not 6n+2"
        n = (depth - 2) // 6
        c1, c2, c3 = (max(1, round(c * width)) for c in (16, 32, 64))
        self.conv1 = nn.Conv2d(in_channels, c1, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        layers, in_planes = [], c1
        for planes, stride in ((c1, 1), (c2, 2), (c3, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1, shortcut))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(c3, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in",
                                        nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, _BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ----------------------------------------------------------------------------------------------

def _new_conv(old: nn.Conv2d, in_channels: int, kernel: int, stride: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, old.out_channels, kernel, stride, kernel // 2, bias=old.bias is not None)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # as torchvision inits convs
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _torchvision(spec: ModelSpec, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    import torchvision

    kw = dict(spec.kwargs)
    small = kw.pop("small_stem", None)
    small = image_size <= 64 if small is None else small
    zero_mb = spec.name == "mobilenet_v2" and kw.pop("zero_init_residual", False)
    model = getattr(torchvision.models, spec.name)(weights=None, num_classes=num_classes, **kw)
    if spec.name.startswith("resnet"):
        if small:
            model.conv1 = _new_conv(model.conv1, in_channels, 3, 1)
            model.maxpool = nn.Identity()
        elif in_channels != 3:
            model.conv1 = _new_conv(model.conv1, in_channels, 7, 2)
    else:  # mobilenet_v2: features[0] = Conv2dNormActivation(3, 32*width, 3, stride 2)
        stem = model.features[0][0]
        if small or in_channels != 3:
            model.features[0][0] = _new_conv(stem, in_channels, 3, 1 if small else 2)
        if zero_mb:  # the BN after the linear projection, in blocks that add their input back
            for block in model.features:
                if getattr(block, "use_res_connect", False):
                    nn.init.zeros_(block.conv[-1].weight)
    return model


class Resized(nn.Module):
    """``model`` on inputs resized (bilinear) to ``size`` x ``size``: a timm network whose strides
    need more pixels than the data has (e.g. ConvNeXt's 32x reduction on 16-px digits)."""

    def __init__(self, model: nn.Module, size: int):
        super().__init__()
        self.model, self.size = model, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.model(x)


def _timm_create(spec: ModelSpec, kw: dict, num_classes: int, in_channels: int, size: int) -> nn.Module:
    import timm

    kw = dict(kw)
    has_img_size = "img_size" in kw
    try:
        # ViT-style models take img_size; CNNs don't (they are size-agnostic). Try, then fall back.
        if not has_img_size:
            kw["img_size"] = size
        return timm.create_model(spec.name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kw)
    except TypeError as e:
        if "img_size" in str(e) and not has_img_size:
            kw.pop("img_size")
            try:
                return timm.create_model(spec.name, pretrained=False, num_classes=num_classes,
                                         in_chans=in_channels, **kw)
            except TypeError as e2:
                e = e2
        raise ValueError(f"ModelSpec.kwargs={spec.kwargs!r} not accepted by timm {spec.name} "
                         f"({type(e).__name__}: {e})") from None


def _timm(spec: ModelSpec, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """timm.create_model at the data's size; ``kwargs.input_size`` (lowprec's, not timm's): the size
    the inputs are resized to first. null (default): the data's size if the network runs on it,
    else the smallest multiple of its total stride (timm's feature_info reduction) that it runs on,
    doubling up to 224 (its default input), tried once each with one image at build time."""
    import timm

    if not timm.is_model(spec.name):
        raise ValueError(f"ModelSpec.name={spec.name!r} is not a timm model (see timm.list_models())")
    kw = dict(spec.kwargs)
    size = kw.pop("input_size", None)
    if size is not None:
        model = _timm_create(spec, kw, num_classes, in_channels, size)
        return model if size == image_size else Resized(model, size)
    model = _timm_create(spec, kw, num_classes, in_channels, image_size)
    info = getattr(model, "feature_info", None)
    red = int(info[-1]["reduction"]) if info else 32
    sizes = [image_size]
    s = -(-image_size // red) * red
    while s <= 224:
        if s > image_size:
            sizes.append(s)
        s *= 2
    for i, size in enumerate(sizes):
        if i:
            model = _timm_create(spec, kw, num_classes, in_channels, size)
        was = model.training
        try:
            with torch.no_grad():
                model.eval()(torch.zeros(1, in_channels, size, size))
        except Exception:  # too small for its strides, windows or fixed input size: try a larger one
            continue
        finally:
            model.train(was)
        return model if size == image_size else Resized(model, size)
    raise ValueError(f"model.name={spec.name}: timm {spec.name} runs on none of {sizes} px inputs; set "
                     "model.kwargs.input_size (and img_size where it takes one)")


def build_model(spec: ModelSpec, *, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A freshly initialized model (never pretrained) for [N, in_channels, image_size, image_size] inputs."""
    if not isinstance(spec, (ModelSpec, HFModelSpec)):
        raise ValueError(f"build_model expects a ModelSpec or HFModelSpec, got {type(spec).__name__}")
    for k, v in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"build_model: {k}={v!r} must be a positive int")
    if isinstance(spec, HFModelSpec):  # lowprec.hf_models (causal-lm: as lm below)
        return build_hf(spec, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    if spec.source == "lm":  # num_classes = vocabulary size, image_size = window length
        return build_lm(spec.name, spec.kwargs, vocab_size=num_classes, seq_len=image_size)
    if spec.source == "cifar":
        kw = spec.kwargs
        return CifarResNet(6 * CIFAR_RESNETS[spec.name] + 2, num_classes=num_classes, in_channels=in_channels,
                           width=kw.get("width", 1), shortcut=kw.get("shortcut", "A"),
                           zero_init_residual=kw.get("zero_init_residual", False))
    if spec.source == "torchvision":
        return _torchvision(spec, num_classes, in_channels, image_size)
    return _timm(spec, num_classes, in_channels, image_size)
