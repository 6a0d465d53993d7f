"""DistributedDataParallel engine: every rank holds the whole model, optimizer and EMA.

Gradients are averaged by DDP's bucketed all-reduce; the EMA is updated identically on every
rank (replicated, no communication). Checkpoints have the single-process layout, written by
rank 0 alone, so a DDP run resumes on any number of ranks, a single process included.

With optim.bf16_weights the buckets hold bf16 gradients; a communication hook averages them in
fp32 (as DDP averages fp32 gradients) into buffers the fused optimizer reads (`main_grad`).
"""
from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from sfd_scale.config import OptimConfig
from sfd_scale.models.fp8_delayed import amax_histories, share_newest_amaxes
from sfd_scale.parallel.distributed import rank
from sfd_scale.parallel.engine import LocalEngine


# Buffers (RoPE tables) are constants, so there is nothing to broadcast before each forward.
# torch 2.13 renamed the switch (`broadcast_buffers` is deprecated there); the GPU machines still
# run torch 2.11, which knows only the old name.
_NO_BUFFER_SYNC_PER_FORWARD = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False})


class DDPEngine(LocalEngine):
    """LocalEngine's optimizer, EMA and files, with DDP's gradient averaging."""

    def __init__(self, model: nn.Module, optim_cfg: OptimConfig, ema_decay: float,
                 device: torch.device) -> None:
        super().__init__(model, optim_cfg, ema_decay, device)
        # Gradients live in the all-reduce buckets, saving one model-sized copy.
        self.model = DistributedDataParallel(
            self.module, device_ids=[device] if device.type == "cuda" else None,
            gradient_as_bucket_view=True, **_NO_BUFFER_SYNC_PER_FORWARD)
        if self.masters:
            self.model.register_comm_hook(FP32Average(), fp32_average_hook)
        self.amax_histories = amax_histories(self.module)  # model.fp8=delayed; the module is on its device

    def backward(self, loss: torch.Tensor) -> None:
        super().backward(loss)
        share_newest_amaxes(self.amax_histories)  # model.fp8=delayed: every rank scales alike

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.model.no_sync()

    def save(self, folder: Path) -> None:
        if rank() == 0:  # replicated state: one copy is the whole checkpoint
            super().save(folder)


class FP32Average:
    """State of `fp32_average_hook`: one fp32 buffer per DDP bucket, kept between steps."""

    def __init__(self) -> None:
        self.buffers: dict[int, torch.Tensor] = {}


def fp32_average_hook(state: FP32Average, bucket):  # no annotations: DDP checks them as objects, these would be strings
    """Average a bucket (dist.GradBucket) of bf16 gradients over the ranks in fp32, as DDP averages
    fp32 gradients (divide, then sum), leave each parameter's fp32 average in `param.main_grad` for
    the fused optimizer, and hand DDP the bf16 rounding of it for `param.grad` (a future)."""
    grads = bucket.buffer()
    world = dist.get_world_size()
    if grads.dtype == torch.float32:  # parameters without a bf16 copy: averaged in place, as DDP does
        return dist.all_reduce(grads.div_(world), async_op=True).get_future().then(lambda done: done.value()[0])
    full = state.buffers.get(bucket.index())
    if full is None or full.shape != grads.shape:  # DDP rebuilds its buckets after the first step
        full = state.buffers[bucket.index()] = torch.empty(grads.shape, dtype=torch.float32, device=grads.device)
    full.copy_(grads).div_(world)
    reduced = dist.all_reduce(full, async_op=True).get_future()

    def publish(_: torch.futures.Future) -> torch.Tensor:
        for param, grad in zip(bucket.parameters(), bucket.gradients()):
            start = (grad.data_ptr() - grads.data_ptr()) // grads.element_size()
            param.main_grad = full[start:start + grad.numel()].view_as(param)
        return grads.copy_(full)

    return reduced.then(publish)
