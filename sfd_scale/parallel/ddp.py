"""DistributedDataParallel engine: every rank holds the whole model, optimizer and EMA.

Gradients are averaged by DDP's bucketed all-reduce; the EMA is updated identically on every
rank (replicated, no communication). Checkpoints have the single-process layout, written by
rank 0 alone, so a DDP run resumes on any number of ranks, a single process included.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from sfd_scale.config import OptimConfig
from sfd_scale.parallel.distributed import rank
from sfd_scale.parallel.engine import LocalEngine


class DDPEngine(LocalEngine):
    """LocalEngine's optimizer, EMA and files, with DDP's gradient averaging."""

    def __init__(self, model: nn.Module, optim_cfg: OptimConfig, ema_decay: float,
                 device: torch.device) -> None:
        super().__init__(model, optim_cfg, ema_decay, device)
        # Buffers (RoPE tables) are constants, so there is nothing to broadcast per forward;
        # gradients live in the all-reduce buckets, saving one model-sized copy.
        self.model = DistributedDataParallel(
            self.module, device_ids=[device] if device.type == "cuda" else None,
            forward_sync_buffers=False, gradient_as_bucket_view=True)

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.model.no_sync()

    def save(self, folder: Path) -> None:
        if rank() == 0:  # replicated state: one copy is the whole checkpoint
            super().save(folder)
