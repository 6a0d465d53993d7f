"""FSDP2 engine: parameters, gradients, optimizer state and EMA sharded over the data-parallel ranks.

`fully_shard` is applied to every repeated block (LightningDiT's `blocks`; the Semantic VAE's
encoder and decoder blocks), then to the root (embedders, final layer, REPA projector): a
block's parameters are all-gathered just before it runs and freed after, and its gradients are
reduce-scattered as soon as its backward is done. On CUDA the gathered
parameters are bf16 and gradients are reduced in fp32; on CPU everything stays fp32.

The EMA is kept sharded exactly like the parameters: one local tensor per parameter shard,
updated with a single foreach lerp on local shards (no communication); it is gathered only for
export and previews. Checkpoints are torch.distributed.checkpoint (DCP) folders, which reshard
on load, so a run resumes on any number of ranks.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from sfd_scale.config import OptimConfig, bf16_compute
from sfd_scale.parallel.checkpointing import clean_name
from sfd_scale.parallel.dims import ParallelDims
from sfd_scale.parallel.distributed import clip_grads_and_check
from sfd_scale.parallel.engine import Engine, PlainModel, StepStats, fused_step_on_device, plain_model_factory
from sfd_scale.train.optim import build_fused_ema_optimizer, build_optimizer, set_lr

log = logging.getLogger(__name__)

DCP_DIR = "dcp"
"""Sub-folder of a step folder holding the DCP shards and metadata."""


def mixed_precision(precision: str, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 weights for compute with fp32 gradient reduction on GPU (SPEC recipe); fp32 on CPU
    unless asked. Inputs are not cast: the trainer's autocast casts what the matmuls take, and the
    latents, times and residual stream stay fp32 as with the other engines."""
    if bf16_compute(precision, device.type):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)
    return MixedPrecisionPolicy()


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The sharding units below the root: the members of every nn.ModuleList named `blocks`
    (LightningDiT.blocks; encoder.blocks and decoder.blocks of the Semantic VAE), in forward
    order. A model without any is sharded as one unit, the root."""
    return [block for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] == "blocks" and isinstance(module, nn.ModuleList)
            for block in module]


def shard_model(model: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy) -> None:
    """fully_shard every repeated block, then the root for the remaining parameters."""
    for block in repeated_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp_policy)
    # The root's parameters (embedders, final layer, REPA projector) are needed at both ends of
    # the forward; resharding them after forward would gather them twice per step for little memory.
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)


class ShardedEMA:
    """EMA of sharded parameters, held as DTensors placed like the parameters."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"train.ema_decay must lie in [0, 1], got {decay}")
        self.decay = decay
        self.names = [name for name, _ in named_params]
        self.tensors: list[DTensor] = [p.detach().clone() for _, p in named_params]
        self._local = [t.to_local() for t in self.tensors]  # views: updates land in the DTensors

    @torch.no_grad()
    def update(self, params: list[nn.Parameter]) -> None:
        torch._foreach_lerp_(self._local, [p.to_local() for p in params], 1.0 - self.decay)

    def state_dict(self) -> dict[str, DTensor]:
        return dict(zip(self.names, self.tensors))


class FSDP2Engine(Engine):
    """fully_shard per block + root over the data-parallel mesh; sharded AdamW and EMA; DCP files."""

    layout = "dcp"  # type: ignore[assignment]

    def __init__(self, model: nn.Module, plain_model: PlainModel, optim_cfg: OptimConfig,
                 ema_decay: float, precision: str, dims: ParallelDims, device: torch.device) -> None:
        """`model` is the module to train (fp32); `plain_model` describes its plain twin (see
        `PlainModel`), which `ema_model` fills with the gathered EMA."""
        if dims.tp != 1:
            raise ValueError(f"the fsdp2 engine shards over data parallelism only; got {dims.describe()}")
        self._plain_model = plain_model_factory(plain_model)
        self.optim_cfg = optim_cfg
        self.device = device
        self.mesh = init_device_mesh(device.type, (dims.dp,), mesh_dim_names=("dp",))
        shard_model(model, self.mesh, mixed_precision(precision, device))
        self.model = model
        named = [(clean_name(n), p) for n, p in model.named_parameters()]
        self.params = [p for _, p in named]
        self.ema = ShardedEMA(named, ema_decay)
        if optim_cfg.fused_ema:  # the kernel updates the parameter, moment and EMA shards in place
            self.optimizer = build_fused_ema_optimizer(self.params, self.ema._local, ema_decay, optim_cfg, device)
        else:
            self.optimizer = build_optimizer(model, optim_cfg, device)

    def unwrap(self) -> nn.Module:
        return self.model

    def ema_model(self) -> nn.Module:
        _, ema = self.consolidated_state()
        module = self._plain_model().to(self.device).eval().requires_grad_(False)
        module.load_state_dict(ema, strict=True)
        return module

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        # Non-final micro-batches keep their (unsharded) gradients local: no reduce-scatter.
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float, loss: torch.Tensor) -> StepStats:
        if self.optim_cfg.fused_ema:
            norm, skipped = self.step_on_device(lr, loss)
            return StepStats(float(norm), bool(skipped))  # the step's one host synchronisation
        grads = [p.grad.to_local() for p in self.params if p.grad is not None]
        grad_norm, finite = clip_grads_and_check(grads, self.optim_cfg.max_grad_norm, loss, sharded=True)
        if not finite:
            return StepStats(grad_norm, skipped=True)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.ema.update(self.params)
        return StepStats(grad_norm, skipped=False)

    def step_on_device(self, lr: float | torch.Tensor, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused step (optim.fused_ema) on the local shards, with no host synchronisation."""
        if not self.optim_cfg.fused_ema:
            raise ValueError("a step without host synchronisation needs optim.fused_ema=true")
        grads = [p.grad.to_local() for p in self.params if p.grad is not None]
        return fused_step_on_device(self.optimizer, grads, loss, lr, self.optim_cfg.max_grad_norm, sharded=True)

    def _dcp_state(self) -> dict:
        return {"model": get_model_state_dict(self.model),
                "optimizer": get_optimizer_state_dict(self.model, self.optimizer),
                "ema": self.ema.state_dict()}

    def save(self, folder: Path) -> None:
        dcp.save(self._dcp_state(), checkpoint_id=str(folder / DCP_DIR))

    def load(self, folder: Path) -> None:
        state = self._dcp_state()
        dcp.load(state, checkpoint_id=str(folder / DCP_DIR))  # fills the EMA DTensors in place
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])

    def consolidated_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        # One tensor at a time, so gathering never holds more than one full parameter on the device.
        model = {k: _full(v) for k, v in self.model.state_dict().items()}
        ema = dict(model)  # buffers (RoPE tables) are constants shared by both
        ema.update({k: _full(v) for k, v in self.ema.state_dict().items()})
        return model, ema


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


def read_consolidated(folder: Path, plain_model: PlainModel) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Full (model, EMA) state dicts from a step folder written by FSDP2Engine, in this process
    alone (no process group: DCP reshards the saved shards into whole tensors)."""
    plain = plain_model_factory(plain_model)()
    model = {k: torch.empty_like(v) for k, v in plain.state_dict().items()}
    ema = {name: torch.empty_like(p) for name, p in plain.named_parameters()}
    with warnings.catch_warnings():  # DCP warns that it loads in one process, which is the point
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load({"model": model, "ema": ema}, checkpoint_id=str(folder / DCP_DIR), no_dist=True)
    return model, {**model, **ema}
