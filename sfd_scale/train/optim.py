"""Optimizer and learning-rate schedule from the config (one place chooses the AdamW kernel)."""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from sfd_scale.config import OptimConfig
from sfd_scale.models.fast_paths import fused_kernels_unavailable

log = logging.getLogger(__name__)


def _apex_fused_adam() -> type | None:
    """NVIDIA apex's FusedAdam when apex (built with its CUDA extensions) is importable."""
    try:
        from apex.optimizers import FusedAdam
    except (ImportError, OSError):  # PyPI's unrelated `apex`, or an apex built without CUDA
        return None
    return FusedAdam


@functools.cache
def with_adamw_interface(fused_adam: type) -> type:
    """apex's FusedAdam behind `torch.optim.AdamW`'s interface, so engines and checkpoints need
    not know which kernel ran: `zero_grad(set_to_none=...)` (apex's takes no argument) and state
    dicts in AdamW's layout, with a per-parameter 'step' (apex keeps one per group). A run saved
    with apex resumes exactly without it, and the other way round."""

    class ApexAdamW(fused_adam):
        def zero_grad(self, set_to_none: bool = True) -> None:
            for group in self.param_groups:
                for p in group["params"]:
                    if set_to_none:
                        p.grad = None
                    elif p.grad is not None:
                        p.grad.detach_().zero_()

        def state_dict(self) -> dict:
            state = super().state_dict()
            for group in state["param_groups"]:
                step = group.pop("step", None)
                group.pop("bias_correction", None)
                for index in group["params"]:
                    if step is not None and index in state["state"]:
                        state["state"][index]["step"] = torch.tensor(float(step))
            return state

        def load_state_dict(self, state_dict: dict) -> None:
            state = {i: dict(v) for i, v in state_dict["state"].items()}
            groups = [dict(g) for g in state_dict["param_groups"]]
            for group, current in zip(groups, self.param_groups):
                steps = {float(state[i].pop("step")) for i in group["params"] if "step" in state.get(i, {})}
                if len(steps) > 1:
                    raise ValueError(f"optimizer state has parameters at different steps {sorted(steps)}; "
                                     "apex FusedAdam keeps one step per parameter group")
                if steps:
                    group["step"] = int(steps.pop())
                group.setdefault("bias_correction", current["bias_correction"])
            super().load_state_dict({"state": state, "param_groups": groups})

    return ApexAdamW


def adamw_kernel(params: list[torch.Tensor], device: torch.device) -> str:
    """The AdamW implementation for `params` on `device`: 'apex' (apex FusedAdam) when importable
    on CUDA, else 'fused' (torch's single-kernel AdamW) on CUDA, 'foreach' elsewhere. Sharded
    (DTensor) parameters never go to apex, which only knows plain tensors."""
    if device.type != "cuda":
        return "foreach"
    if _apex_fused_adam() is not None and not any(isinstance(p, DTensor) for p in params):
        return "apex"
    return "fused"


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, with the kernel `adamw_kernel` picks (logged)."""
    params = [p for p in model.parameters() if p.requires_grad]
    kernel = adamw_kernel(params, device)
    log.info("optimizer: AdamW (%s), lr %g, betas (%g, %g), weight decay %g",
             kernel, cfg.lr, cfg.beta1, cfg.beta2, cfg.weight_decay)
    hyper = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if kernel == "apex":
        return with_adamw_interface(_apex_fused_adam())(params, adam_w_mode=True, **hyper)
    return torch.optim.AdamW(params, **hyper, **{kernel: True})


def build_fused_ema_optimizer(params: list[torch.Tensor], ema_tensors: list[torch.Tensor], ema_decay: float,
                              cfg: OptimConfig, device: torch.device,
                              compute_copies: list[torch.Tensor | None] | None = None) -> torch.optim.Optimizer:
    """`kernels/adamw_ema.AdamWEMA` over the trainable `params`, updating their EMA copies
    `ema_tensors` (local shards for sharded parameters) in the same kernel; then no separate EMA
    update may run. `compute_copies[i]`, when not None, is the bf16 tensor the module computes with
    in place of `params[i]` (optim.bf16_weights). CUDA, or the CPU under Triton's interpreter."""
    reason = fused_kernels_unavailable(device)
    if reason is not None:
        raise ValueError(f"optim.fused_ema cannot run: {reason}")
    from sfd_scale.kernels.adamw_ema import AdamWEMA

    copies = [None] * len(params) if compute_copies is None else compute_copies
    kept = [(p, e, c) for p, e, c in zip(params, ema_tensors, copies) if p.requires_grad]
    log.info("optimizer: AdamW + clip + EMA fused (Triton), lr %g, betas (%g, %g), weight decay %g%s",
             cfg.lr, cfg.beta1, cfg.beta2, cfg.weight_decay,
             f"; {sum(c is not None for _, _, c in kept)} tensors computed with bf16 copies of fp32 masters"
             if compute_copies is not None else "")
    return AdamWEMA([p for p, _, _ in kept], [e for _, e, _ in kept], ema_decay, lr=cfg.lr,
                    betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
                    compute_copies=[c for _, _, c in kept])


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant (the SFD
    recipe has no decay). A pure function of the step, so resume needs no scheduler state."""
    if cfg.warmup_steps <= 0:
        return cfg.lr
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
