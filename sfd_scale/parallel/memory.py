"""Per-rank bytes of parameters, gradients, optimizer state and EMA, measured on the real sharding.

The model is built on the meta device (no memory), wrapped exactly as the engine wraps it
(`fully_shard` per block + root for fsdp2, over a fake process group of the wanted world size
whose rank we choose), and every number is read off the resulting tensors: the local shards of
the parameters, a gradient per trainable shard, and the state AdamW actually creates in one
step on those meta tensors. Nothing is allocated and no other process is needed.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from sfd_scale.config import ModelConfig
from sfd_scale.models.lightningdit import build_model

ENGINES = ("ddp", "fsdp2")


@dataclass(frozen=True)
class RankBytes:
    """Steady-state bytes held by one rank between steps (fp32 master weights)."""

    engine: str
    world_size: int
    rank: int
    params: int
    grads: int
    optimizer: int
    ema: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.ema


def rank_bytes(model_cfg: ModelConfig, engine: str, world_size: int, rank: int = 0) -> RankBytes:
    """Bytes on `rank` of a `world_size` run of `engine` (ddp: replicated; fsdp2: sharded)."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: memory is measured for {', '.join(ENGINES)}")
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world size {world_size}")
    with torch.device("meta"):
        model = build_model(model_cfg)
    if engine == "ddp":  # every rank holds the whole model, gradients, optimizer and EMA
        return _measure(model, engine, world_size, rank)
    with _fake_process_group(world_size, rank):
        from torch.distributed.device_mesh import init_device_mesh

        from torch.distributed.fsdp import MixedPrecisionPolicy

        from sfd_scale.parallel.fsdp import shard_model

        shard_model(model, init_device_mesh("cpu", (world_size,)), MixedPrecisionPolicy())
        return _measure(model, engine, world_size, rank)


def _measure(model: nn.Module, engine: str, world_size: int, rank: int) -> RankBytes:
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(trainable, foreach=True)
    optimizer.step()  # creates exp_avg, exp_avg_sq and step exactly as training does
    opt_bytes = sum(_local_bytes(v) for state in optimizer.state.values() for v in state.values()
                    if isinstance(v, torch.Tensor))
    param_bytes = sum(_local_bytes(p) for p in params)
    return RankBytes(engine=engine, world_size=world_size, rank=rank, params=param_bytes,
                     grads=sum(_local_bytes(p.grad) for p in trainable), optimizer=opt_bytes,
                     ema=param_bytes)  # the EMA mirrors every parameter, sharded alike


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


@contextlib.contextmanager
def _fake_process_group(world_size: int, rank: int) -> Iterator[None]:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("memory measurement needs its own fake process group; run it outside training")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def format_table(rows: list[RankBytes]) -> str:
    """Markdown table in GiB."""
    gib = 1024 ** 3
    lines = ["| engine | world | rank | params GiB | grads GiB | optimizer GiB | EMA GiB | total GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.engine} | {r.world_size} | {r.rank} | {r.params / gib:.3f} | {r.grads / gib:.3f} | "
                     f"{r.optimizer / gib:.3f} | {r.ema / gib:.3f} | {r.total / gib:.3f} |")
    return "\n".join(lines)
