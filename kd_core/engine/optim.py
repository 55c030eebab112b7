"""Optimizer and learning-rate schedule of one phase, from its :class:`~kd_core.config.TrainingConfig`."""

from __future__ import annotations

import torch
from torch import nn

from kd_core.config import TrainingConfig


def make_optimizer(params: list[nn.Parameter], cfg: TrainingConfig) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov and o.momentum > 0)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig) -> torch.optim.lr_scheduler.LRScheduler:
    s = cfg.scheduler
    if s.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    if s.name == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=s.milestones, gamma=s.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
