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


def build_lr_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `optim.warmup_steps`, then constant (the SFD recipe has no decay)."""
    warmup = cfg.warmup_steps

    def factor(step: int) -> float:
        return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
