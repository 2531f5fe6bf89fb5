"""Hugging Face ``transformers`` architectures from a config, never from the network (``model=hf``).

    spec = HFModelSpec(name="gpt2", arch="causal-lm", config={"n_layer": 2, "n_embd": 64})
    model = build_hf(spec, num_classes=84, in_channels=1, image_size=64)   # as models.build_model

``name`` is a ``model_type`` of ``transformers.CONFIG_MAPPING`` (gpt2, llama, bert, t5, vit, marian,
...); ``config`` overrides fields of that type's default config, on top of ``presets[name]`` (small
sizes conf/model/hf.yaml keeps per model_type so that ``model.name=llama`` alone trains on a CPU;
``model.presets={}`` gives the library's full-size default); ``path`` (instead) is a local
directory holding a ``config.json`` (a saved config or checkpoint; its weights are loaded only with
``weights: true``). Nothing is downloaded: configs come from the installed library or the local
directory (``local_files_only``), and ``HF_HUB_OFFLINE=1`` is set before transformers is imported.

``arch`` picks the head (the Auto class): ``causal-lm``, ``masked-lm``, ``seq2seq``,
``image-classification``, ``question-answering``. Every wrapper returns plain tensors with the class
dimension second, the layout ``F.cross_entropy(out, target)`` takes:

- ``causal-lm`` (the trainer's language-model contract, as ``lowprec.chargpt``): ``model(idx)``,
  idx int64 [B, T] -> logits [B, V, T]; V = the data's vocabulary (``num_classes``), the context
  = ``kwargs.block_size`` (data.block_size follows it), ``max_position_embeddings`` = that context
  unless ``config`` sets it. The input embedding is an ``nn.Linear(V, C, bias=False)`` applied to
  one-hot inputs (onehot(i)·Wᵀ = W[:, i]: the same function and gradient as nn.Embedding) put in
  the model's own embedding slot, and the inputs reach the model as ``inputs_embeds``: the
  embedding is then the model's first Linear and the LM head its last, so ``convert``'s
  ``skip="first_last"`` keeps exactly those two in high precision, as for chargpt. Word embeddings
  are therefore untied (``tie_word_embeddings: false``, chargpt's choice too). ``model.source`` is
  "lm", so the trainer pairs it with text data.
- ``image-classification``: ``model(x)``, x [N, C, H, W] -> logits [N, classes]; ``num_labels``,
  ``num_channels`` and ``image_size`` come from the data (when the config has those fields).
- ``masked-lm``: ``model(input_ids, attention_mask=None)`` -> logits [B, V, T]
  (``F.cross_entropy(logits, labels)`` with labels -100 where not masked, lowprec.mlm).
- ``seq2seq``: ``model(input_ids, decoder_input_ids, attention_mask=None)`` -> logits [B, V, T_dec].
- ``question-answering``: ``model(input_ids, attention_mask=None, token_type_ids=None)`` ->
  (start_logits, end_logits), each [B, T] (lowprec.squad).

The last three are for the task modules (lowprec.mlm, lowprec.translation, lowprec.squad); the
trainer runs ``causal-lm`` and ``image-classification`` today (``source`` "hf" pairs with image data).

Input errors are one-line ValueErrors naming the key and value (an unknown model_type, an arch the
model_type has no head for, a config field the model_type does not have), raised when the spec is
built, as ModelSpec's are; a missing or unreadable ``path`` when the model is built (run.py builds
it once before training, so it is still an input error before anything runs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .model_defaults import check_train_defaults

__all__ = ["HF_ARCHS", "HF_KWARGS", "HFModelSpec", "build_hf", "hf_config", "HFCausalLM", "HFImageClassifier",
           "HFMaskedLM", "HFSeq2Seq", "HFQuestionAnswering"]

# arch -> (Auto class, the auto-mapping of model_type -> class name, in transformers.models.auto.modeling_auto)
HF_ARCHS = {
    "causal-lm": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    "masked-lm": ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    "seq2seq": ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    "image-classification": ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    "question-answering": ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
}
HF_KWARGS = ("block_size",)  # lowprec's own options (not the HF config's)


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, whatever is asked
    try:
        import transformers
    except ImportError:  # pragma: no cover - the `hf` extra
        raise ValueError("model=hf needs transformers: pip install -e '.[hf]'") from None
    return transformers


def _plain(x: Any) -> Any:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(x):
            return OmegaConf.to_container(x, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return x


@dataclass(frozen=True)
class HFModelSpec:
    """conf/model/hf.yaml. ``source`` is derived: "lm" for causal-lm (text data), else "hf"."""
    name: str = "gpt2"                 # model_type (ignored when path is set: config.json names it)
    arch: str = "causal-lm"
    config: dict = field(default_factory=dict)  # config fields over the model_type's defaults
    presets: dict = field(default_factory=dict)  # {model_type: config fields} applied before config
    path: str | None = None            # local dir with config.json (and weights, for weights: true)
    weights: bool = False              # load the weights found under path
    kwargs: dict = field(default_factory=dict)  # HF_KWARGS: block_size (causal-lm context)
    train_defaults: dict = field(default_factory=dict)  # read by conf/optim, conf/sched, conf/trainer

    @property
    def source(self) -> str:
        return "lm" if self.arch == "causal-lm" else "hf"

    def __post_init__(self) -> None:
        object.__setattr__(self, "train_defaults", check_train_defaults(self.train_defaults))
        if self.arch not in HF_ARCHS:
            raise ValueError(f"model.arch={self.arch!r} is not a Hugging Face head here; allowed: {tuple(HF_ARCHS)}")
        for key in ("config", "kwargs", "presets"):
            v = _plain(getattr(self, key))
            v = {} if v is None else v
            if not isinstance(v, Mapping) or not all(isinstance(k, str) for k in v):
                raise ValueError(f"model.{key}={getattr(self, key)!r} must be a mapping of str to values")
            object.__setattr__(self, key, dict(v))
        bad = sorted(set(self.kwargs) - set(HF_KWARGS))
        if bad:
            raise ValueError(f"model.kwargs key {bad[0]!r} is not known for model=hf; allowed: {HF_KWARGS}")
        bs = self.kwargs.get("block_size")
        if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 1):
            raise ValueError(f"model.kwargs.block_size={bs!r} must be a positive int")
        if not isinstance(self.weights, bool):
            raise ValueError(f"model.weights={self.weights!r}; allowed: true, false")
        if self.weights and self.path is None:
            raise ValueError("model.weights=true needs model.path=<a local checkpoint directory>")
        if self.path is None:  # names and config keys, checked now (one line each); a path when built
            hf_config(self)    # (an experiment may name a checkpoint that only the cluster has)


def _known_fields(cfg) -> set[str]:
    # num_labels is a property of every config (id2label is what to_dict shows)
    return set(cfg.to_dict()) | set(getattr(cfg, "attribute_map", {}) or {}) | {"num_labels"}


def hf_config(spec: HFModelSpec):
    """The transformers config of ``spec`` (validated; the data-dependent fields are set by build_hf)."""
    tf = _transformers()
    if spec.path is not None:
        p = Path(str(spec.path)).expanduser()
        if not (p / "config.json").is_file():
            raise ValueError(f"model.path={spec.path}: no config.json there (a local directory saved by "
                             "save_pretrained, or holding a config.json)")
        try:
            base = tf.AutoConfig.from_pretrained(str(p), local_files_only=True)
        except Exception as e:  # malformed json, unknown model_type, ...
            raise ValueError(f"model.path={spec.path}: cannot read its config.json "
                             f"({type(e).__name__}: {str(e).strip().splitlines()[0][:160]})") from None
        model_type = base.model_type
    else:
        model_type = spec.name
        if not isinstance(model_type, str) or model_type not in tf.CONFIG_MAPPING:
            import difflib

            close = difflib.get_close_matches(str(model_type), list(tf.CONFIG_MAPPING.keys()), n=3)
            raise ValueError(f"model.name={model_type!r} is not a transformers model_type"
                             + (f" (did you mean {', '.join(close)}?)" if close else "")
                             + "; see transformers.CONFIG_MAPPING")
        base = tf.AutoConfig.for_model(model_type)
    from transformers.models.auto import modeling_auto

    auto, mapping = HF_ARCHS[spec.arch]
    names = getattr(modeling_auto, mapping)
    if model_type not in names:
        have = [a for a, (_, m) in HF_ARCHS.items() if model_type in getattr(modeling_auto, m)]
        raise ValueError(f"model.arch={spec.arch!r} has no {model_type} model; {model_type} has: "
                         f"{', '.join(have) or 'none of ' + str(tuple(HF_ARCHS))}")
    known = _known_fields(base)
    preset = {} if spec.path is not None else spec.presets.get(model_type) or {}
    if not isinstance(preset, Mapping):
        raise ValueError(f"model.presets.{model_type}={preset!r} must be a mapping of config fields")
    for k, v in {**preset, **spec.config}.items():
        if k not in known:
            import difflib

            close = difflib.get_close_matches(k, sorted(known), n=1)
            where = "config" if k in spec.config else f"presets.{model_type}"
            raise ValueError(f"model.{where}.{k}={v!r}: {model_type}'s config has no field {k!r}"
                             + (f" (did you mean {close[0]!r}?)" if close else ""))
        setattr(base, k, v)
    return base


def _set(cfg, key: str, value, spec: HFModelSpec) -> None:
    """Set a data-dependent field unless the user's config chose it (then it must agree)."""
    if key not in _known_fields(cfg):
        return
    if key in spec.config and spec.config[key] != value:
        raise ValueError(f"model.config.{key}={spec.config[key]!r} does not fit the data ({key} = {value})")
    setattr(cfg, key, value)


def build_hf(spec: HFModelSpec, *, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A freshly initialized (or, with weights: true, loaded from path) model wrapped for lowprec.
    causal-lm: num_classes = vocabulary size, image_size = window length (as models.build_model)."""
    tf = _transformers()
    cfg = hf_config(spec)
    if spec.arch in ("causal-lm", "masked-lm", "seq2seq", "question-answering"):
        if spec.arch != "question-answering":
            _set(cfg, "vocab_size", num_classes, spec)
        for tok in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            v = getattr(cfg, tok, None)  # a char vocabulary is smaller than the config's token ids
            if isinstance(v, int) and v >= cfg.vocab_size and tok not in spec.config:
                setattr(cfg, tok, 0 if tok in ("pad_token_id", "decoder_start_token_id") else None)
    if spec.arch == "causal-lm":
        ctx = spec.kwargs.get("block_size", image_size)
        if image_size > ctx:
            raise ValueError(f"model.kwargs.block_size={ctx} is shorter than the data's windows "
                             f"(data.block_size={image_size})")
        if "max_position_embeddings" in _known_fields(cfg):
            mp = spec.config.get("max_position_embeddings", spec.config.get("n_positions", ctx))
            if mp < image_size:
                raise ValueError(f"model.config max_position_embeddings={mp} is shorter than the data's "
                                 f"windows (data.block_size={image_size})")
            cfg.max_position_embeddings = mp
        cfg.tie_word_embeddings = False  # the one-hot input embedding is a Linear [C, V] (docstring)
    if spec.arch == "image-classification":
        _set(cfg, "num_labels", num_classes, spec)
        _set(cfg, "num_channels", in_channels, spec)
        _set(cfg, "image_size", image_size, spec)
    auto = getattr(tf, HF_ARCHS[spec.arch][0])
    if spec.weights:
        try:
            hf = auto.from_pretrained(str(spec.path), config=cfg, local_files_only=True)
        except Exception as e:
            raise ValueError(f"model.path={spec.path} model.weights=true: cannot load its weights "
                             f"({type(e).__name__}: {str(e).strip().splitlines()[0][:160]})") from None
    else:
        hf = auto.from_config(cfg)
    return _WRAPPERS[spec.arch](hf)


class _HF(nn.Module):
    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def no_weight_decay(self) -> set[str]:
        return set()


class HFCausalLM(_HF):
    """idx [B, T] -> logits [B, V, T]; the input embedding is a one-hot Linear (module docstring)."""

    def __init__(self, hf: nn.Module):
        super().__init__(hf)
        old = hf.get_input_embeddings()
        V, C = old.weight.shape
        wte = nn.Linear(V, C, bias=False)
        with torch.no_grad():
            wte.weight.copy_(old.weight.t())  # the model's own init (e.g. N(0, initializer_range))
        hf.set_input_embeddings(wte)  # in the embedding's slot: first in module order
        self.vocab_size = V

    def no_weight_decay(self) -> set[str]:
        # the token embedding: a Linear only in form (minGPT's rule, as chargpt)
        return {n for n, p in self.named_parameters() if p is self.hf.get_input_embeddings().weight}

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"HFCausalLM expects int64 token ids [B, T], got {idx.dtype} {tuple(idx.shape)}")
        wte = self.hf.get_input_embeddings()
        emb = wte(F.one_hot(idx, self.vocab_size).to(wte.weight.dtype))
        return self.hf(inputs_embeds=emb, use_cache=False).logits.transpose(1, 2)


class HFImageClassifier(_HF):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=x).logits


class HFMaskedLM(_HF):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits.transpose(1, 2)


class HFSeq2Seq(_HF):
    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                       use_cache=False).logits.transpose(1, 2)


class HFQuestionAnswering(_HF):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, **kw)
        return out.start_logits, out.end_logits


_WRAPPERS = {"causal-lm": HFCausalLM, "masked-lm": HFMaskedLM, "seq2seq": HFSeq2Seq,
             "image-classification": HFImageClassifier, "question-answering": HFQuestionAnswering}
