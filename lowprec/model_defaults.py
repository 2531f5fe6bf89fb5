"""A model's ``train_defaults``: training settings that suit it, read by conf/optim, conf/sched and
conf/trainer through interpolation (``optim.lr: ${oc.select:model.train_defaults.sgd_lr,0.1}``), so
they show in the resolved config and the experiment key, and the command line still wins. Shared by
every model spec (lowprec.models.ModelSpec, lowprec.hf_models.HFModelSpec); builders ignore them."""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["TRAIN_DEFAULT_KEYS", "check_train_defaults"]

TRAIN_DEFAULT_KEYS = ("sgd_lr", "adamw_lr", "warmup_epochs",
                      # read by conf/optim (clip_grad, adamw_weight_decay), conf/sched
                      # (warmup_steps) and conf/trainer (epochs, batch_size, max_steps, eval_every)
                      "warmup_steps", "adamw_weight_decay", "clip_grad", "epochs", "batch_size", "max_steps",
                      "eval_every")


def check_train_defaults(train_defaults: Any) -> dict:
    """A plain dict of known keys with numbers > 0 (warmup_epochs >= 0); ValueError naming the key."""
    td = train_defaults
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(td):
            td = OmegaConf.to_container(td, resolve=True)
    except ImportError:  # pragma: no cover - hydra is a dependency
        pass
    td = {} if td is None else td
    if not isinstance(td, Mapping):
        raise ValueError(f"ModelSpec.train_defaults={train_defaults!r} must be a mapping")
    for k, v in td.items():
        if k not in TRAIN_DEFAULT_KEYS:
            raise ValueError(f"ModelSpec.train_defaults key {k!r} is not known; allowed: {TRAIN_DEFAULT_KEYS}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (k != "warmup_epochs" and v == 0):
            raise ValueError(f"ModelSpec.train_defaults.{k}={v!r} must be a number > 0 (warmup_epochs: >= 0)")
    return dict(td)
