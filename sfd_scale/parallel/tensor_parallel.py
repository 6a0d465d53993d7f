"""Megatron-core tensor parallelism for LightningDiT, with data parallelism over the other ranks.

What is split (megatron style, swapped in through the model's `LinearSpec` slot):
  * `attn.qkv` and `mlp.w12` are `ColumnParallelLinear` (output features split, no gather);
  * `attn.proj` and `mlp.w3` are `RowParallelLinear` (input features split, output all-reduced);
  * everything else is replicated on every tensor-parallel rank and computed redundantly.

Reference checkpoints stack fused projections as qkv = [q(all heads); k; v] and w12 = [gate(H);
value(H)] along the output dimension. Tensor-parallel rank r holds [q_r; k_r; v_r] and
[gate_r; value_r] (its own heads and hidden slice of each sub-matrix), which is what the model's
forward expects for every tp size. `shard_state_dict` / `gather_state_dict` convert between the
two layouts; they work on any name -> tensor dict (weights, EMA, Adam moments).

Ranks are placed the megatron way (tensor-parallel innermost): rank = dp_rank * tp + tp_rank, so
the ranks of one tensor-parallel group must receive the same batch and the same random draws.
Gradients are averaged over the data-parallel ranks by DDP on megatron's data-parallel group.

Checkpoints (layout "tensor_parallel"): data-parallel replica 0 writes one folder per
tensor-parallel rank, `tensor_parallel/tp-RR-of-NN/{model,ema,optimizer}`, with the optimizer
state keyed by parameter name; a run with another tp size re-splits them on load.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from sfd_scale.config import ModelConfig, OptimConfig, ParallelConfig
from sfd_scale.models.layers import LinearSpec
from sfd_scale.models.lightningdit import LightningDiT, build_model, resolve_size
from sfd_scale.models.weights import load_strict
from sfd_scale.parallel.checkpointing import apply_activation_checkpointing, clean_name
from sfd_scale.parallel.dims import TENSOR_PARALLEL_SIZES
from sfd_scale.parallel.engine import Engine, StepStats
from sfd_scale.train.checkpoint import read_state, write_state
from sfd_scale.train.ema import EMA
from sfd_scale.train.optim import build_optimizer, set_lr

log = logging.getLogger(__name__)

SHARD_DIR = "tensor_parallel"
_SHARD_NAME = re.compile(r"^tp-(\d+)-of-(\d+)$")
MEGATRON_HINT = "pip install megatron-core==0.16.1"


# ----------------------------------------------------------------------------------------------
# Layout: reference (full) state dicts <-> per-rank shards
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    """How one parameter is divided over tensor-parallel ranks."""

    dim: int
    """0: output features (column-parallel), 1: input features (row-parallel)."""
    parts: int
    """Fused sub-matrices stacked along `dim` (q, k, v: 3; gate, value: 2); each is split on its own."""


_SPLITS: tuple[tuple[re.Pattern[str], Split], ...] = (
    (re.compile(r"^blocks\.\d+\.attn\.qkv\.(weight|bias)$"), Split(dim=0, parts=3)),
    (re.compile(r"^blocks\.\d+\.mlp\.w12\.(weight|bias)$"), Split(dim=0, parts=2)),
    # Row-parallel biases are added after the all-reduce, so they stay whole (replicated).
    (re.compile(r"^blocks\.\d+\.(attn\.proj|mlp\.w3)\.weight$"), Split(dim=1, parts=1)),
)
# Replicated weights applied inside the tensor-parallel region (the per-head qk-norm sees only
# this rank's heads): their gradients are partial sums that must be added over the group.
_PARTIAL_GRAD = re.compile(r"^blocks\.\d+\.attn\.(q_norm|k_norm)\.weight$")


def split_of(key: str) -> Split | None:
    """The split of reference key `key`, or None when the tensor is replicated."""
    for pattern, split in _SPLITS:
        if pattern.match(key):
            return split
    return None


def _shard_tensor(full: torch.Tensor, split: Split, tp_rank: int, tp_size: int, key: str) -> torch.Tensor:
    if full.dim() <= split.dim or full.shape[split.dim] % (split.parts * tp_size):
        raise ValueError(f"{key}: shape {tuple(full.shape)} cannot be split into {split.parts} part(s) "
                         f"x {tp_size} tensor-parallel ranks along dim {split.dim}")
    pieces = full.chunk(split.parts, dim=split.dim)                  # q, k, v (or gate, value)
    return torch.cat([piece.chunk(tp_size, dim=split.dim)[tp_rank] for piece in pieces], dim=split.dim)


def _gather_tensor(parts: Sequence[torch.Tensor], split: Split, key: str) -> torch.Tensor:
    shapes = {tuple(p.shape) for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"{key}: tensor-parallel shards have different shapes {sorted(shapes)}")
    per_rank = [p.chunk(split.parts, dim=split.dim) for p in parts]
    # Full layout: every rank's slice of sub-matrix 0, then of sub-matrix 1, ...
    return torch.cat([per_rank[r][i] for i in range(split.parts) for r in range(len(parts))],
                     dim=split.dim)


def shard_state_dict(full: Mapping[str, torch.Tensor], tp_rank: int, tp_size: int
                     ) -> dict[str, torch.Tensor]:
    """Rank `tp_rank`'s part of a reference-layout state dict (replicated tensors are shared, not copied)."""
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"tensor-parallel rank {tp_rank} is not in [0, {tp_size})")
    out = {}
    for key, tensor in full.items():
        split = split_of(key)
        out[key] = tensor if split is None or tp_size == 1 else _shard_tensor(tensor, split, tp_rank,
                                                                                tp_size, key)
    return out


def gather_state_dict(parts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Inverse of `shard_state_dict`: per-rank dicts, in tensor-parallel rank order -> reference layout."""
    if not parts:
        raise ValueError("gather_state_dict needs at least one shard")
    keys = list(parts[0])
    for rank, part in enumerate(parts[1:], start=1):
        if set(part) != set(keys):
            diff = sorted(set(part) ^ set(keys))
            raise ValueError(f"tensor-parallel shard {rank} has other keys than shard 0: {diff[:5]}")
    out = {}
    for key in keys:
        split = split_of(key)
        if split is None or len(parts) == 1:
            out[key] = parts[0][key]
        else:
            out[key] = _gather_tensor([part[key] for part in parts], split, key)
    return out


# ----------------------------------------------------------------------------------------------
# Megatron-core pieces
# ----------------------------------------------------------------------------------------------
def _megatron():
    """Import megatron-core lazily: it is an optional dependency of this one engine."""
    try:
        with warnings.catch_warnings():
            # It warns at import that Transformer Engine / apex are absent; we use neither.
            warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
            from megatron.core import parallel_state, tensor_parallel
            from megatron.core.model_parallel_config import ModelParallelConfig
    except ImportError as err:
        raise ImportError(f"parallel.tensor_parallel > 1 needs megatron-core ({MEGATRON_HINT}): "
                          f"{err}") from err
    return parallel_state, tensor_parallel, ModelParallelConfig


class _PlainOutput:
    """Mixin for megatron linears: return a tensor, keep reference state-dict keys, deep-copy cleanly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # Megatron's autograd functions replay autocast in backward on CUDA only, so a CPU
            # bf16 backward would mix dtypes: on the CPU these layers run in full precision.
            with torch.autocast("cpu", enabled=False):
                out, _ = super().forward(x.to(self.weight.dtype))
            return out
        out, _ = super().forward(x)          # megatron returns (output, bias); the bias is added
        return out

    # Megatron adds an always-None `_extra_state` key; reference checkpoints have none.
    get_extra_state = nn.Module.get_extra_state

    def __deepcopy__(self, memo):
        # EMA copies the model: copy the weights, share the process group and config handles
        # (a process group cannot be copied).
        memo[id(self.tp_group)] = self.tp_group
        memo[id(self.config)] = self.config
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for name, value in vars(self).items():
            clone.__dict__[name] = copy.deepcopy(value, memo)
        return clone


@functools.cache
def _linear_classes() -> tuple[type[nn.Module], type[nn.Module]]:
    _, tensor_parallel, _ = _megatron()

    class ColumnParallelLinear(_PlainOutput, tensor_parallel.ColumnParallelLinear):
        """Output features split over the tensor-parallel group; output stays split."""

    class RowParallelLinear(_PlainOutput, tensor_parallel.RowParallelLinear):
        """Input features split over the group; partial outputs all-reduced, then the bias added."""

    return ColumnParallelLinear, RowParallelLinear


def validate_tensor_parallel(parallel: ParallelConfig, model: ModelConfig, world_size: int) -> None:
    """Fail before any work when tensor parallelism does not fit the engine, the world or the model."""
    tp = parallel.tensor_parallel
    if tp not in TENSOR_PARALLEL_SIZES:
        raise ValueError(f"parallel.tensor_parallel={tp}: supported sizes are {TENSOR_PARALLEL_SIZES}")
    if parallel.engine != "ddp":
        raise ValueError(f"parallel.tensor_parallel={tp} runs with parallel.engine=ddp (DDP over the "
                         f"data-parallel ranks), not {parallel.engine!r}: tensor parallelism with "
                         "fsdp2 or deepspeed is not available")
    if world_size % tp:
        raise ValueError(f"parallel.tensor_parallel={tp} does not divide the world size {world_size}; "
                         "data parallelism runs over world_size / tensor_parallel ranks")
    size = resolve_size(model)
    if size.num_heads % tp:
        raise ValueError(f"model {model.size}: num_heads {size.num_heads} is not divisible by "
                         f"parallel.tensor_parallel={tp} (heads are divided across ranks)")
    hidden = int(2 / 3 * model.mlp_ratio * size.hidden_size)
    if hidden % tp:
        raise ValueError(f"model {model.size}: SwiGLU hidden size {hidden} is not divisible by "
                         f"parallel.tensor_parallel={tp}")
    _megatron()  # a missing package fails here too, not after the model is built


def init_tensor_parallel(tp_size: int) -> None:
    """Create megatron-core's tensor/data-parallel groups (once per process) over the default group."""
    parallel_state, _, _ = _megatron()
    if not dist.is_initialized():
        raise RuntimeError("tensor parallelism needs torch.distributed initialised first "
                           "(sfd_scale.parallel.distributed)")
    if parallel_state.model_parallel_is_initialized():
        have = parallel_state.get_tensor_model_parallel_world_size()
        if have != tp_size:
            raise RuntimeError(f"megatron-core is already initialised with tensor parallel size {have}, "
                               f"not {tp_size}")
        return
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size,
                                             create_gloo_process_groups=False)
    rank = dist.get_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank()
    # The data loader and the random draws are sliced by dp_rank = rank // tp: megatron must agree.
    if (tp_rank, dp_rank) != (rank % tp_size, rank // tp_size):
        raise RuntimeError(f"megatron-core placed rank {rank} at tp_rank {tp_rank}, dp_rank {dp_rank}; "
                           f"expected {rank % tp_size}, {rank // tp_size} (tensor parallel innermost)")
    log.info("megatron-core: tensor parallel %d x data parallel %d", tp_size,
             parallel_state.get_data_parallel_world_size())


def megatron_linear_spec(tp_size: int) -> LinearSpec:
    """The model's linear slot filled with megatron-core column/row-parallel layers.

    Needs `init_tensor_parallel(tp_size)` first (the layers take megatron's tensor-parallel
    group). Weights are initialised on the CPU (megatron's CUDA RNG tracker is CUDA-only) from
    torch's default generator, xavier-uniform on the full matrix like the dense model; biases zero.
    """
    parallel_state, _, ModelParallelConfig = _megatron()
    if not parallel_state.model_parallel_is_initialized() or \
            parallel_state.get_tensor_model_parallel_world_size() != tp_size:
        raise RuntimeError(f"call init_tensor_parallel({tp_size}) before building tensor-parallel layers")
    config = ModelParallelConfig(tensor_model_parallel_size=tp_size, use_cpu_initialization=True,
                                 gradient_accumulation_fusion=False, sequence_parallel=False)
    column_cls, row_cls = _linear_classes()

    def column(in_features: int, out_features: int) -> nn.Module:
        return column_cls(in_features, out_features, config=config, init_method=nn.init.xavier_uniform_,
                          bias=True, gather_output=False)

    def row(in_features: int, out_features: int) -> nn.Module:
        return row_cls(in_features, out_features, config=config, init_method=nn.init.xavier_uniform_,
                       bias=True, input_is_parallel=True, skip_bias_add=False)

    return LinearSpec(column=column, row=row, tp_size=tp_size)


# ----------------------------------------------------------------------------------------------
# Engine
# ----------------------------------------------------------------------------------------------
class TensorParallelEngine(Engine):
    """Megatron-core tensor parallelism inside each group of tp ranks, DDP across the groups.

    Takes the dense model the caller built under the run's seed and keeps this rank's shard of
    it, so a tensor-parallel run starts from exactly the weights of a single-process run. The
    optimizer and the EMA hold local shards only; nothing is gathered per step.
    """

    layout = "tensor_parallel"  # type: ignore[assignment]

    def __init__(self, model: LightningDiT, parallel: ParallelConfig, optim_cfg: OptimConfig,
                 ema_decay: float, device: torch.device) -> None:
        if not dist.is_initialized():
            raise RuntimeError("TensorParallelEngine needs torch.distributed initialised first "
                               "(sfd_scale.parallel.distributed)")
        tp_size = parallel.tensor_parallel
        validate_tensor_parallel(parallel, model.cfg, dist.get_world_size())
        init_tensor_parallel(tp_size)
        parallel_state, _, _ = _megatron()
        self.model_cfg = model.cfg
        self.tp_size = tp_size
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.optim_cfg = optim_cfg
        self.device = device

        # Building the twin draws megatron's initial weights; keep the global RNG where a
        # single-process run would have it, since those weights are overwritten right away.
        with torch.random.fork_rng(devices=[]):
            local = build_model(model.cfg, megatron_linear_spec(tp_size))
        load_strict(local, shard_state_dict(model.state_dict(), self.tp_rank, tp_size),
                    source=f"dense model sharded for tensor-parallel rank {self.tp_rank}")
        self.local = local.train(model.training).to(device)
        apply_activation_checkpointing(self.local, parallel)
        self.model = self.local
        if self.dp_size > 1:
            self.model = DistributedDataParallel(
                self.local, process_group=parallel_state.get_data_parallel_group(),
                device_ids=[device] if device.type == "cuda" else None,
                forward_sync_buffers=False,  # buffers are constant RoPE tables: no per-step broadcast
                gradient_as_bucket_view=True)
        self.ema = EMA(self.local, ema_decay)
        self.optimizer = build_optimizer(self.local, optim_cfg, device)
        self._trainable = [(clean_name(name), p) for name, p in self.local.named_parameters()
                           if p.requires_grad]
        self._partial = [p for name, p in self._trainable if _PARTIAL_GRAD.match(name)]
        # Counted once in the global norm: shards on every rank, replicated tensors on tp rank 0,
        # and only on data-parallel rank 0 (DDP leaves identical gradients on every replica).
        counted = [p for name, p in self._trainable if split_of(name) is not None or self.tp_rank == 0]
        self._norm_params = counted if self.dp_rank == 0 else []

    def unwrap(self) -> nn.Module:
        return self.local

    def ema_model(self) -> nn.Module:
        """A dense single-process LightningDiT holding the gathered EMA (collective)."""
        _, ema = self.consolidated_state()
        with torch.device("meta"):      # no init work: every tensor is loaded right after
            module = build_model(self.model_cfg)
        module.to_empty(device=self.device)
        load_strict(module, ema, source="gathered tensor-parallel EMA")
        return module.eval().requires_grad_(False)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        if self.dp_size > 1 and not last:
            return self.model.no_sync()       # all-reduce over data parallel ranks once per step
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float, loss: torch.Tensor) -> StepStats:
        partial = [p.grad for p in self._partial if p.grad is not None]
        if self.tp_size > 1 and partial:         # one all-reduce for all of them
            flat = torch.cat([g.reshape(-1) for g in partial])
            dist.all_reduce(flat, group=self.tp_group)
            torch._foreach_copy_(partial, [f.view_as(g) for f, g in
                                           zip(flat.split([g.numel() for g in partial]), partial)])
        grad_norm, loss_finite = self._global_grad_norm(loss)
        # Every rank sees the same norm and flag, so all skip or all step together.
        if not (loss_finite and math.isfinite(grad_norm)):
            return StepStats(grad_norm, skipped=True)
        max_norm = self.optim_cfg.max_grad_norm if self.optim_cfg.max_grad_norm > 0 else math.inf
        coef = max_norm / (grad_norm + 1e-6)            # same rule as torch's clip_grad_norm_
        if coef < 1.0:
            torch._foreach_mul_([p.grad for _, p in self._trainable if p.grad is not None], coef)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.ema.update(self.local)
        return StepStats(grad_norm, skipped=False)

    def _global_grad_norm(self, loss: torch.Tensor) -> tuple[float, bool]:
        """(L2 norm over every shard of every gradient, whether the loss is finite on all ranks)."""
        grads = [p.grad for p in self._norm_params if p.grad is not None]
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        if grads:
            totals[0] = torch.stack(torch._foreach_norm(grads)).double().pow(2).sum()
        totals[1] = (~torch.isfinite(loss.detach())).any().double()
        dist.all_reduce(totals)
        return float(totals[0].sqrt()), bool(totals[1] == 0)

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Each tensor-parallel rank of data-parallel replica 0 writes its shard folder."""
        if self.dp_rank != 0:
            return
        shard = Path(folder) / SHARD_DIR / f"tp-{self.tp_rank:02d}-of-{self.tp_size:02d}"
        shard.mkdir(parents=True, exist_ok=True)
        write_state(shard, "model", self.local.state_dict())
        write_state(shard, "ema", self.ema.state_dict())
        write_state(shard, "optimizer", self._named_optimizer_state())

    def load(self, folder: Path) -> None:
        """Restore a tensor-parallel checkpoint; one saved with another tp size is re-split."""
        shards = _shard_folders(Path(folder))
        saved_tp = len(shards)
        if saved_tp == self.tp_size:
            mine = shards[self.tp_rank]
            model, ema, optim = (read_state(mine, name) for name in ("model", "ema", "optimizer"))
        else:
            log.info("re-splitting a tensor-parallel checkpoint from tp %d to tp %d", saved_tp, self.tp_size)
            model, ema, optim = (_reshard([read_state(s, name) for s in shards], name, self.tp_rank,
                                          self.tp_size) for name in ("model", "ema", "optimizer"))
        load_strict(self.local, model, source=str(folder))
        load_strict(self.ema.model, ema, source=f"{folder} (EMA)")
        self._load_named_optimizer_state(optim, folder)

    def _named_optimizer_state(self) -> dict:
        """Optimizer state keyed by parameter name (not index), so it can be re-split by name."""
        names = [name for name, _ in self._trainable]
        state = self.optimizer.state_dict()
        return {"state": {names[i]: s for i, s in state["state"].items()},
                "param_groups": [dict(g, params=[names[i] for i in g["params"]])
                                 for g in state["param_groups"]]}

    def _load_named_optimizer_state(self, named: dict, folder: Path) -> None:
        index = {name: i for i, (name, _) in enumerate(self._trainable)}
        unknown = sorted(set(named["state"]) - set(index))
        if unknown:
            raise ValueError(f"{folder}: optimizer state for parameters this model lacks: {unknown[:5]}")
        self.optimizer.load_state_dict({
            "state": {index[name]: s for name, s in named["state"].items()},
            "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in named["param_groups"]],
        })

    def consolidated_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Reference-layout model and EMA on every rank (a collective over the tensor-parallel group)."""
        return self.gather(self.local.state_dict()), self.gather(self.ema.state_dict())

    def gather(self, local: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reference layout (on the CPU) of this rank's name -> tensor dict, e.g. its gradients.

        A collective: every rank of the tensor-parallel group must call it with the same keys.
        """
        full = {}
        for key, tensor in local.items():
            split = split_of(key)
            if split is None or self.tp_size == 1:
                full[key] = tensor.detach().to("cpu", copy=True)
                continue
            parts = [torch.empty_like(tensor) for _ in range(self.tp_size)]
            dist.all_gather(parts, tensor.detach().contiguous(), group=self.tp_group)
            full[key] = _gather_tensor([p.cpu() for p in parts], split, key)
        return full


def read_consolidated(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Reference-layout (model, EMA) of a tensor-parallel step folder, in one process (for export)."""
    shards = _shard_folders(Path(folder))
    return tuple(gather_state_dict([read_state(s, name) for s in shards]) for name in ("model", "ema"))


def _shard_folders(folder: Path) -> list[Path]:
    """The complete, ordered set of tensor-parallel shard folders of a step folder."""
    root = folder / SHARD_DIR
    if not root.is_dir():
        raise FileNotFoundError(f"{folder} has no {SHARD_DIR}/ shard folders: it was not written by the "
                                "tensor-parallel engine (set parallel.tensor_parallel as it was saved, or "
                                "resume with the engine that wrote it)")
    found = {}
    for path in root.iterdir():
        match = _SHARD_NAME.match(path.name)
        if match and path.is_dir():
            found[int(match.group(1))] = (int(match.group(2)), path)
    sizes = {size for size, _ in found.values()}
    if len(sizes) != 1 or set(found) != set(range(next(iter(sizes)))):
        names = sorted(path.name for _, path in found.values())
        raise ValueError(f"{root}: incomplete or mixed tensor-parallel shard folders {names}")
    return [found[r][1] for r in range(len(found))]


def _reshard(saved: list, name: str, tp_rank: int, tp_size: int):
    """Re-split one entry (model, ema or optimizer) saved by len(saved) ranks for `tp_rank` of `tp_size`."""
    if name != "optimizer":
        return shard_state_dict(gather_state_dict(saved), tp_rank, tp_size)
    state = {}
    for param, first in saved[0]["state"].items():
        state[param] = {}
        for key, value in first.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:     # Adam's step count
                state[param][key] = value
                continue
            full = gather_state_dict([{param: s["state"][param][key]} for s in saved])
            state[param][key] = shard_state_dict(full, tp_rank, tp_size)[param]
    return {"state": state, "param_groups": saved[0]["param_groups"]}
