"""Evaluation of a model on a loader: top-1/top-5 and the mean cross-entropy (for a language model,
every position of every window is one prediction, and the loss in nats is the LM metric)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device, bf16: bool, limit: int) -> dict[str, float]:
    """{"top1", "top5" (%), "val_loss" (mean cross-entropy in nats per prediction)} on `loader`
    (top-k with k = min(5, classes); a language model's [B, V, T] logits count every position
    as one prediction); leaves `model` in train mode."""
    model.eval()
    n = c1 = c5 = 0
    loss_sum = 0.0
    for i, (x, y) in enumerate(loader):
        if limit and i >= limit:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum").item()
        top = out.float().topk(min(5, out.shape[1]), dim=1).indices
        hit = top == y[:, None]
        c1 += hit[:, 0].sum().item()
        c5 += hit.any(dim=1).sum().item()
        n += y.numel()
    model.train()
    return {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1),
            "val_loss": loss_sum / max(n, 1)}


def metric_text(m: dict) -> str:
    """An evaluation's numbers in one line of the training log."""
    if "bleu" in m:
        return f"val loss {m['val_loss']:.4f} BLEU {m['bleu']:.2f} top1 {m['top1']:6.2f}"
    if "f1" in m:
        return f"val loss {m['val_loss']:.4f} EM {m['exact_match']:.2f} F1 {m['f1']:.2f}"
    if "masked_tokens" in m:
        return f"val loss {m['val_loss']:.4f} (masked LM) top1 {m['top1']:6.2f}"
    if "bits_per_char" in m:
        return f"val loss {m['val_loss']:.4f} ({m['bits_per_char']:.3f} bpc) top1 {m['top1']:6.2f}"
    return f"top1 {m['top1']:6.2f} top5 {m['top5']:6.2f}"
