"""The one interface the trainer loop talks to, whatever runs underneath (single process, DDP,
FSDP2, DeepSpeed, tensor parallel). The loop never asks which engine it has.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from sfd_scale.config import OptimConfig
from sfd_scale.train.checkpoint import read_state, write_state
from sfd_scale.train.ema import EMA
from sfd_scale.train.optim import build_optimizer, set_lr


@dataclass
class StepStats:
    grad_norm: float
    """Global gradient norm before clipping (over every shard and rank)."""
    skipped: bool
    """True when the loss or the gradient norm was not finite: no optimizer or EMA update."""


class Engine(abc.ABC):
    """Owns the model, its optimizer and its EMA, and how they are stored."""

    model: nn.Module
    """Call this for the training forward (it may be a wrapper)."""

    @abc.abstractmethod
    def unwrap(self) -> nn.Module:
        """The plain LightningDiT (reference parameter names) behind any wrapper."""

    @abc.abstractmethod
    def ema_model(self) -> nn.Module:
        """A module holding the EMA weights, usable for sampling previews."""

    @abc.abstractmethod
    def zero_grad(self) -> None: ...

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def step(self, lr: float, loss: torch.Tensor) -> StepStats:
        """Clip by global norm, skip on non-finite loss/grad norm, else optimizer step + EMA."""

    @abc.abstractmethod
    def save(self, folder: Path) -> None:
        """Write model, EMA and optimizer state into a checkpoint folder being assembled."""

    @abc.abstractmethod
    def load(self, folder: Path) -> None:
        """Restore what `save` wrote (exactly)."""

    @abc.abstractmethod
    def consolidated_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Full (model, EMA) state dicts with reference keys, for export."""


class LocalEngine(Engine):
    """One process, one device: plain module, AdamW, foreach EMA."""

    def __init__(self, model: nn.Module, optim_cfg: OptimConfig, ema_decay: float,
                 device: torch.device) -> None:
        self.model = model.to(device)
        self.optim_cfg = optim_cfg
        self.ema = EMA(self.model, ema_decay)
        self.optimizer = build_optimizer(self.model, optim_cfg, device)

    def unwrap(self) -> nn.Module:
        return self.model

    def ema_model(self) -> nn.Module:
        return self.ema.model

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float, loss: torch.Tensor) -> StepStats:
        max_norm = self.optim_cfg.max_grad_norm if self.optim_cfg.max_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        # A non-finite loss or gradient would poison the weights and the EMA: skip the update.
        if not (math.isfinite(float(loss)) and math.isfinite(grad_norm)):
            return StepStats(grad_norm, skipped=True)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.ema.update(self.model)
        return StepStats(grad_norm, skipped=False)

    def save(self, folder: Path) -> None:
        write_state(folder, "model", self.model.state_dict())
        write_state(folder, "ema", self.ema.state_dict())
        write_state(folder, "optimizer", self.optimizer.state_dict())

    def load(self, folder: Path) -> None:
        self.model.load_state_dict(read_state(folder, "model"), strict=True)
        self.ema.load_state_dict(read_state(folder, "ema"))
        self.optimizer.load_state_dict(read_state(folder, "optimizer"))

    def consolidated_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return self.model.state_dict(), self.ema.state_dict()
