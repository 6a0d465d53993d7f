"""The one place that turns `parallel.engine` / `parallel.tensor_parallel` into an Engine, and a
checkpoint layout back into whole state dicts (for export).

Each branch builds its model its own way (DeepSpeed ZeRO-3 under `zero.Init`, tensor
parallelism with megatron linears in the `LinearSpec` slot) and returns an Engine; optional
packages are imported inside their branch, so a missing one only matters when it is chosen.
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from sfd_scale.config import SFDConfig, from_dict
from sfd_scale.models.fast_paths import apply_compile, apply_fp8, apply_fused_kernels, apply_residual_precision
from sfd_scale.models.fp8_delayed import without_fp8_state
from sfd_scale.models.layers import DENSE, LinearSpec
from sfd_scale.models.lightningdit import build_model
from sfd_scale.parallel.checkpointing import apply_activation_checkpointing
from sfd_scale.parallel.ddp import DDPEngine
from sfd_scale.parallel.dims import ParallelDims, check_bf16_weights, check_config_fits
from sfd_scale.parallel.distributed import init_process_group
from sfd_scale.parallel.engine import Engine, LocalEngine, PlainModel
from sfd_scale.train.checkpoint import (
    META_NAME,
    CheckpointNotFoundError,
    CheckpointStore,
    read_state,
    save_model_export,
)

log = logging.getLogger(__name__)


def build_training_model(cfg: SFDConfig, linears: LinearSpec = DENSE,
                         device: torch.device | None = None) -> nn.Module:
    """LightningDiT in train mode with the configured fast paths, activation checkpointing and
    compile applied, in that order (torchtitan's order: FP8 linears and kernels, then recompute,
    then compile)."""
    model = build_model(cfg.model, linears).train()
    apply_residual_precision(model, cfg.model.residual_precision)
    apply_fp8(model, cfg.model.fp8, device or torch.device("cpu"))
    if cfg.model.fused_kernels:
        apply_fused_kernels(model, device or torch.device("cpu"))
    apply_activation_checkpointing(model, cfg.parallel)
    apply_compile(model, cfg.model.compile, inductor_mode=cfg.model.compile_mode,
                  kernel_tuning=cfg.model.compile_tuning)
    return model


def build_engine(cfg: SFDConfig, dims: ParallelDims, device: torch.device,
                 build: Callable[[], nn.Module] | None = None, plain_model: PlainModel | None = None) -> Engine:
    """Check that the configuration fits `dims`, join the process group, and build the engine.

    The engine reads `cfg.parallel`, `cfg.optim` and `cfg.train`. By default it trains the
    configured LightningDiT; another module is trained by passing `build` (returns the module to
    train, fp32 on the CPU) and `plain_model` (its plain twin with the same state-dict keys, which
    sharded engines fill with gathered weights).
    Call with the same seed on every rank: replicated engines start from identical weights.
    """
    check_config_fits(cfg, dims)
    p, optim, decay = cfg.parallel, cfg.optim, cfg.train.ema_decay
    if (build is None) != (plain_model is None):
        raise ValueError("build_engine: pass both `build` and `plain_model`, or neither (the LightningDiT)")
    if build is not None and p.tensor_parallel > 1:
        raise ValueError(f"parallel.tensor_parallel={p.tensor_parallel}: tensor parallelism is built into "
                         "LightningDiT's linears only; train this model with tensor_parallel=1")
    if build is None:
        plain_model = cfg.model
        build = functools.partial(build_training_model, cfg, device=device)
    if p.engine != "local":
        init_process_group(dims, p.backend, device)
    if p.tensor_parallel > 1:  # megatron-core tensor parallelism, DDP over the data-parallel ranks
        from sfd_scale.parallel.tensor_parallel import TensorParallelEngine, validate_tensor_parallel

        validate_tensor_parallel(p, cfg.model, dims.world_size)  # before the model is built
        return TensorParallelEngine(build_model(cfg.model).train(), p, optim, decay, device)  # applies AC itself
    if optim.bf16_weights:
        check_bf16_weights(cfg, device.type)
    if p.engine == "local":
        return LocalEngine(build(), optim, decay, device)
    if p.engine == "ddp":
        return DDPEngine(build(), optim, decay, device)
    if p.engine == "fsdp2":
        from sfd_scale.parallel.fsdp import FSDP2Engine  # imports DCP, heavy: only when chosen

        return FSDP2Engine(build(), plain_model, optim, decay, cfg.train.precision, dims, device)
    if p.engine == "deepspeed":
        from sfd_scale.parallel.deepspeed_engine import DeepSpeedEngine  # imports deepspeed when built

        return DeepSpeedEngine(build, cfg, dims, device, plain_model=plain_model)
    raise ValueError(f"parallel.engine={p.engine!r} is not available in this build "
                     "(available: local, ddp, fsdp2, deepspeed)")


def read_consolidated(folder: Path, layout: str, plain_model: PlainModel
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Whole (model, EMA) state dicts with reference keys from a step folder of any engine,
    in this process alone (no process group). `plain_model`: a LightningDiT config, or a
    function building the plain module the run trained (see `PlainModel`)."""
    if layout == "replicated":
        return without_fp8_state(read_state(folder, "model")), without_fp8_state(read_state(folder, "ema"))
    if layout == "dcp":
        from sfd_scale.parallel.fsdp import read_consolidated as read_dcp

        return read_dcp(folder, plain_model)
    if layout == "deepspeed":
        from sfd_scale.parallel.deepspeed_engine import read_consolidated as read_zero

        return read_zero(folder, plain_model)
    if layout == "tensor_parallel":
        from sfd_scale.parallel.tensor_parallel import read_consolidated as read_tp

        return read_tp(folder)
    raise ValueError(f"{folder}: checkpoint layout {layout!r} cannot be consolidated "
                     "(known: replicated, dcp, deepspeed, tensor_parallel)")


def export_step(run_dir: Path, out: Path, step: int | None = None) -> tuple[Path, Path]:
    """Write the reference-layout export (`out` .pt with model/ema/config, and its .safetensors EMA
    twin) of step `step` (default: the highest complete step) of a run folder."""
    store = CheckpointStore(Path(run_dir) / "checkpoints")
    if step is None:
        step = store.latest_step()
        if step is None:
            raise CheckpointNotFoundError(f"no complete checkpoint under {store.root} to export")
    store.verify(step)
    folder = store.step_dir(step)
    meta = json.loads((folder / META_NAME).read_text())
    if "config" not in meta:
        raise ValueError(f"{folder / META_NAME} has no 'config'; it was not written by this trainer")
    cfg = from_dict(SFDConfig, meta["config"], str(folder / META_NAME))
    layout = meta.get("layout", LocalEngine.layout)
    log.info("exporting step %d (%s layout, engine %s) from %s", step, layout, meta.get("engine", "local"),
             folder)
    model, ema = read_consolidated(folder, layout, cfg.model)
    return save_model_export(Path(out), model, ema, meta["config"])
