"""AdamW and the OneCycle schedule (stepped once per optimiser step)."""

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
