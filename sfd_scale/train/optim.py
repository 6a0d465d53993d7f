"""Optimizer and learning-rate schedule from the config (one place chooses the AdamW kernel)."""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from sfd_scale.config import OptimConfig

log = logging.getLogger(__name__)


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: fused kernel on CUDA, foreach elsewhere."""
    params = [p for p in model.parameters() if p.requires_grad]
    kernel = {"fused": True} if device.type == "cuda" else {"foreach": True}
    log.info("optimizer: AdamW (%s), lr %g, betas (%g, %g), weight decay %g",
             next(iter(kernel)), cfg.lr, cfg.beta1, cfg.beta2, cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, **kernel)


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant (the SFD
    recipe has no decay). A pure function of the step, so resume needs no scheduler state."""
    if cfg.warmup_steps <= 0:
        return cfg.lr
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
