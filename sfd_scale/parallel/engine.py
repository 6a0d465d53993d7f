"""The one interface the trainer loop talks to, whatever runs underneath (single process, DDP,
FSDP2, DeepSpeed, tensor parallel). The loop never asks which engine it has.

In a multi-process run every rank calls every method in the same order; methods that gather
or write shards (`step`, `save`, `load`, `consolidated_state`, `ema_model`) are collective.
"""
from __future__ import annotations

import abc
import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import torch
import torch.nn as nn

from sfd_scale.config import ModelConfig, OptimConfig
from sfd_scale.models.fp8_delayed import fp8_state_for, without_fp8_state
from sfd_scale.models.lightningdit import build_model
from sfd_scale.parallel.checkpointing import clean_name
from sfd_scale.parallel.distributed import clip_coefficient, clip_grads_and_check, grad_norm_and_bad_loss
from sfd_scale.train.checkpoint import read_state, write_state
from sfd_scale.train.ema import EMA
from sfd_scale.train.optim import build_fused_ema_optimizer, build_optimizer, set_lr


PlainModel = Union[ModelConfig, Callable[[], nn.Module]]
"""What sharded engines fill with gathered weights (`ema_model`, offline consolidation): a
LightningDiT config, or a function building any plain module with the training module's
state-dict keys (e.g. the Semantic VAE)."""


def plain_model_factory(plain: PlainModel) -> Callable[[], nn.Module]:
    """A function that builds the plain (unwrapped, unsharded) model described by `plain`."""
    if isinstance(plain, ModelConfig):
        return functools.partial(build_model, plain)
    if callable(plain):
        return plain
    raise TypeError(f"expected a ModelConfig or a function returning an nn.Module, got {type(plain).__name__}")


@dataclass
class StepStats:
    grad_norm: float
    """Global gradient norm before clipping (over every shard and rank)."""
    skipped: bool
    """True when the loss or the gradient norm was not finite on any rank: no optimizer or EMA
    update anywhere."""


class Engine(abc.ABC):
    """Owns the model, its optimizer and its EMA, and how they are stored."""

    model: nn.Module
    """Call this for the training forward (it may be a wrapper)."""

    @property
    def layout(self) -> str:
        """Name of the checkpoint layout `save` writes; `load` accepts only the same layout.

        Engines whose files are interchangeable share a name (local and ddp: 'replicated').
        """
        return type(self).__name__

    @abc.abstractmethod
    def unwrap(self) -> nn.Module:
        """The plain module (reference parameter names) behind any wrapper."""

    @abc.abstractmethod
    def ema_model(self) -> nn.Module:
        """A module holding the EMA weights, usable for sampling previews."""

    @abc.abstractmethod
    def zero_grad(self) -> None: ...

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        """Wraps the forward and backward of one micro-batch; gradients are synchronised across
        ranks only when `last` (the final micro-batch of an optimizer step)."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of `loss` (already divided by the number of micro-batches)."""

    @abc.abstractmethod
    def step(self, lr: float, loss: torch.Tensor) -> StepStats:
        """Clip by global norm, skip on non-finite loss/grad norm, else optimizer step + EMA."""

    def step_on_device(self, lr: float | torch.Tensor, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`step` with no host synchronisation: (grad norm, skipped) as device scalars. Only the
        engines running the fused AdamW + EMA kernel (optim.fused_ema) can skip on the device.
        `lr` may be a device scalar, which the kernel reads when it runs (a replayed CUDA graph)."""
        raise NotImplementedError(f"{type(self).__name__} cannot step without a host synchronisation; "
                                  "train.async_metrics needs parallel.engine local, ddp or fsdp2 with "
                                  "optim.fused_ema=true")

    @abc.abstractmethod
    def save(self, folder: Path) -> None:
        """Write model, EMA and optimizer state into a checkpoint folder being assembled
        (every rank writes its part into the same folder)."""

    @abc.abstractmethod
    def load(self, folder: Path) -> None:
        """Restore what `save` wrote (exactly), possibly by a run with another world size."""

    @abc.abstractmethod
    def consolidated_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Full (model, EMA) state dicts with reference keys, on the CPU, for export."""


def attach_bf16_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Make the weights and biases of `module`'s linear layers bf16 in place (what autocast would
    cast them to every step) and return their fp32 masters, keyed like `module.state_dict()`
    (without activation-checkpointing wrappers' infix), for the optimizer and checkpoints."""
    linear = {id(p) for layer in module.modules() if isinstance(layer, nn.Linear)
              for p in layer.parameters(recurse=False)}
    masters = {}
    for name, param in module.named_parameters():
        if id(param) in linear:
            masters[clean_name(name)] = param.detach().clone().requires_grad_(param.requires_grad)
            param.data = param.data.to(torch.bfloat16)
    return masters


class LocalEngine(Engine):
    """One process, one device: plain module, AdamW, foreach EMA; with optim.bf16_weights the
    module computes with bf16 linear weights and the fused optimizer keeps their fp32 masters,
    which are what checkpoints and exports hold."""

    layout = "replicated"  # type: ignore[assignment]

    def __init__(self, model: nn.Module, optim_cfg: OptimConfig, ema_decay: float,
                 device: torch.device) -> None:
        self.module = model.to(device)
        self.model = self.module
        self.optim_cfg = optim_cfg
        if optim_cfg.bf16_weights and not optim_cfg.fused_ema:
            raise ValueError("optim.bf16_weights needs optim.fused_ema=true: the fused kernel writes the bf16 copies")
        self.ema = EMA(self.module, ema_decay)  # from the fp32 weights, before any bf16 copy
        self.masters = attach_bf16_weights(self.module) if optim_cfg.bf16_weights else {}
        if optim_cfg.fused_ema:
            named = [(clean_name(n), p) for n, p in self.module.named_parameters()]
            self.optimizer = build_fused_ema_optimizer([self.masters.get(n, p) for n, p in named],
                                                       [e.data for e in self.ema.model.parameters()],
                                                       ema_decay, optim_cfg, device,
                                                       compute_copies=[p if n in self.masters else None
                                                                       for n, p in named] if self.masters else None)
        else:
            self.optimizer = build_optimizer(self.module, optim_cfg, device)

    def unwrap(self) -> nn.Module:
        return self.module

    def ema_model(self) -> nn.Module:
        return self.ema.model

    def zero_grad(self) -> None:
        self.module.zero_grad(set_to_none=True)  # the module's: bf16 copies hold their masters' gradients

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float, loss: torch.Tensor) -> StepStats:
        if self.optim_cfg.fused_ema:
            norm, skipped = self.step_on_device(lr, loss)
            return StepStats(float(norm), bool(skipped))  # the step's one host synchronisation
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        grad_norm, finite = clip_grads_and_check(grads, self.optim_cfg.max_grad_norm, loss, sharded=False)
        # A non-finite loss or gradient would poison the weights and the EMA: skip the update.
        if not finite:
            return StepStats(grad_norm, skipped=True)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.ema.update(self.module)
        return StepStats(grad_norm, skipped=False)

    def step_on_device(self, lr: float | torch.Tensor, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused step with no host synchronisation at all: (grad norm, skipped) come back as
        device scalars and the skip happens inside the kernel. Needs optim.fused_ema; what the
        trainer runs with train.async_metrics (launchers/bench.py --sync-free times it)."""
        if not self.optim_cfg.fused_ema:
            raise ValueError("a step without host synchronisation needs optim.fused_ema=true")
        return fused_step_on_device(self.optimizer, self.optimizer.gradients(), loss, lr, self.optim_cfg.max_grad_norm,
                                    sharded=False)

    def model_state(self) -> dict[str, torch.Tensor]:
        """The module's state dict with the fp32 masters in place of bf16 compute copies."""
        return {k: self.masters.get(k, v) for k, v in self.module.state_dict().items()}

    def save(self, folder: Path) -> None:
        write_state(folder, "model", self.model_state())
        write_state(folder, "ema", self.ema.state_dict())
        write_state(folder, "optimizer", self.optimizer.state_dict())

    def load(self, folder: Path) -> None:
        state = fp8_state_for(self.module, read_state(folder, "model"))
        self.module.load_state_dict(state, strict=True)  # bf16 copies: rounded to nearest, as autocast casts
        with torch.no_grad():
            for name, master in self.masters.items():
                master.copy_(state[name])
        self.ema.load_state_dict(fp8_state_for(self.ema.model, read_state(folder, "ema")))
        self.optimizer.load_state_dict(read_state(folder, "optimizer"))

    def consolidated_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return _to_cpu(without_fp8_state(self.model_state())), _to_cpu(without_fp8_state(self.ema.state_dict()))


def fused_step_on_device(optimizer: torch.optim.Optimizer, grads: list[torch.Tensor], loss: torch.Tensor,
                         lr: float | torch.Tensor, max_norm: float, sharded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip scale, AdamW and EMA in the fused kernel (`AdamWEMA`), skipping on the device when the
    loss or the global gradient norm is not finite on any rank; (grad norm, skipped) stay device
    scalars. `grads` are this rank's gradients (local shards when `sharded`); `lr` a number or a
    device scalar."""
    norm, bad_loss = grad_norm_and_bad_loss(grads, loss, sharded=sharded)
    skipped = torch.maximum(bad_loss, (~torch.isfinite(norm)).float())
    on_device = isinstance(lr, torch.Tensor)
    if not on_device:
        set_lr(optimizer, lr)
    optimizer.step(grad_scale=clip_coefficient(norm, max_norm) if max_norm > 0 else None, skip=skipped,
                   lr=lr if on_device else None)
    return norm, skipped > 0


def _to_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}
