"""AdamW, the OneCycle schedule (stepped once per optimiser step) and the fp16 loss scaler."""

from __future__ import annotations

import torch
from torch import nn

from mirage.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over every trainable parameter (lr, weight decay from ``cfg``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """OneCycle to ``cfg.lr`` over ``total_steps`` steps, warming up for ``cfg.warmup_frac`` of them."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=max(total_steps, 1), pct_start=cfg.warmup_frac
    )


def build_grad_scaler(cfg: TrainConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """The dynamic loss scaler of ``train.precision == 'fp16'`` (None for any other precision).

    ``torch.amp.GradScaler`` on ``device``'s type, sharded or not: under FSDP2 (``fully_shard``)
    the gradients are DTensor shards, and DTensor reduces the scaler's inf/NaN flag over the
    mesh (max) when it unscales them, so every rank skips the same steps and the shards stay in
    step. torch's default scale schedule, as the reference's ``16-mixed`` uses.
    """
    if cfg.precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)
