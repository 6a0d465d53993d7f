"""Who this process is in a multi-process run, read from the launcher's environment.

Three launchers are understood, checked in this order:
  * `torchrun` and the `deepspeed` launcher set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT (deepspeed also passes `--local_rank=N`, given here as `local_rank_arg`);
  * `srun` sets SLURM_PROCID, SLURM_LOCALID and SLURM_STEP_NUM_TASKS; the rendezvous host is the
    first node of the step's node list and the port is derived from the job id unless MASTER_ADDR /
    MASTER_PORT are set. A batch script run without srun sees the job's SLURM_NTASKS but no
    SLURM_STEP_NUM_TASKS: with more than one task that is an error (a forgotten srun);
  * nothing set: one process.

Ranks are laid out tensor-parallel innermost (megatron's order): rank = dp_rank * tp + tp_rank,
so one tensor-parallel group sits on consecutive ranks (one node) and shares a data slice.
"""
from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from sfd_scale.config import ParallelConfig, SFDConfig, bf16_compute

log = logging.getLogger(__name__)

TENSOR_PARALLEL_SIZES = (1, 2, 4, 8)
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 20000
"""MASTER_PORT under srun: SLURM_PORT_BASE + job id mod SLURM_PORT_SPAN (same on every task)."""


@dataclass(frozen=True)
class ParallelDims:
    """World, data-parallel and tensor-parallel sizes of this run, and this process's place in them."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    """Index of this process on its node: the GPU it drives."""
    tp: int = 1
    """Tensor-parallel degree; the data-parallel degree is world_size / tp."""
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    """Rendezvous port; None for a single process (a free port is picked if a group is needed)."""
    launcher: str = "single"
    """Where the numbers came from: torchrun, deepspeed, slurm or single (for logs)."""

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise ValueError(f"invalid process placement from {self.launcher}: rank {self.rank}, "
                             f"local rank {self.local_rank}, world size {self.world_size}")
        if self.tp not in TENSOR_PARALLEL_SIZES:
            raise ValueError(f"parallel.tensor_parallel={self.tp} must be one of {TENSOR_PARALLEL_SIZES}")
        if self.world_size % self.tp:
            raise ValueError(f"world size {self.world_size} is not divisible by parallel.tensor_parallel="
                             f"{self.tp}: need world = dp x tp with whole dp ({self.describe()})")

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        """Every degree, for logs and error messages."""
        dp = f"{self.world_size / self.tp:g}"
        return (f"world {self.world_size} = dp {dp} x tp {self.tp}; rank {self.rank}, "
                f"local rank {self.local_rank}, launcher {self.launcher}")

    @classmethod
    def from_env(cls, tp: int = 1, env: Mapping[str, str] | None = None,
                 local_rank_arg: int | None = None) -> ParallelDims:
        """Read the launcher's variables from `env` (default os.environ)."""
        env = os.environ if env is None else env
        if "RANK" in env or "WORLD_SIZE" in env:
            return _from_torch_env(env, tp, local_rank_arg)
        if "SLURM_STEP_NUM_TASKS" in env:  # set by srun for the tasks of a job step
            return _from_slurm_env(env, tp)
        if "SLURM_NTASKS" in env and _int(env, "SLURM_NTASKS", "SLURM") > 1:
            # The batch script itself (or salloc's shell) sees the job's task count but is one process.
            raise ValueError(f"this SLURM job has SLURM_NTASKS={env['SLURM_NTASKS']} but the process was not "
                             "started by srun (SLURM_STEP_NUM_TASKS is unset); launch it with `srun python "
                             "launchers/train.py ...` (or torchrun / deepspeed)")
        if local_rank_arg not in (None, 0):
            raise ValueError(f"--local_rank={local_rank_arg} was passed but RANK/WORLD_SIZE are not set; "
                             "start multi-process runs with torchrun, deepspeed or srun")
        return cls(tp=tp)


def _int(env: Mapping[str, str], key: str, launcher: str) -> int:
    if key not in env:
        raise ValueError(f"{launcher} environment lacks {key} (set: "
                         f"{', '.join(sorted(k for k in env if k in _KNOWN_KEYS)) or 'none of ours'})")
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None


_KNOWN_KEYS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
               "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_JOB_ID",
               "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_STEP_NODELIST"}


def _from_torch_env(env: Mapping[str, str], tp: int, local_rank_arg: int | None) -> ParallelDims:
    launcher = "deepspeed" if local_rank_arg is not None else "torchrun"
    rank, world = _int(env, "RANK", launcher), _int(env, "WORLD_SIZE", launcher)
    if "LOCAL_RANK" in env:
        local_rank = _int(env, "LOCAL_RANK", launcher)
        if local_rank_arg is not None and local_rank_arg != local_rank:
            raise ValueError(f"--local_rank={local_rank_arg} disagrees with LOCAL_RANK={local_rank}")
    elif local_rank_arg is not None:
        local_rank = local_rank_arg
    else:
        local_rank = _int(env, "LOCAL_RANK", launcher)
    if world > 1:
        addr, port = env.get("MASTER_ADDR"), _int(env, "MASTER_PORT", launcher)
        if not addr:
            raise ValueError(f"{launcher} environment lacks MASTER_ADDR (world size {world})")
    else:
        addr, port = env.get("MASTER_ADDR") or "127.0.0.1", None
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT", launcher)
    return ParallelDims(world, rank, local_rank, tp, addr, port, launcher)


def _from_slurm_env(env: Mapping[str, str], tp: int) -> ParallelDims:
    # SLURM_STEP_NUM_TASKS is the size of this srun step (SLURM_NTASKS is the job's).
    world_key = "SLURM_STEP_NUM_TASKS"
    rank, world = _int(env, "SLURM_PROCID", "srun"), _int(env, world_key, "srun")
    local_rank = _int(env, "SLURM_LOCALID", "srun")
    addr = env.get("MASTER_ADDR")
    if not addr:
        nodelist = next((env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                         if env.get(k)), None)
        if nodelist is None:
            raise ValueError("srun environment has no SLURM_STEP_NODELIST / SLURM_JOB_NODELIST / "
                             "SLURM_NODELIST to find the rendezvous host; set MASTER_ADDR")
        addr = expand_hostlist(nodelist)[0]
    if "MASTER_PORT" in env:
        port = _int(env, "MASTER_PORT", "srun")
    else:
        port = SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID", "srun") % SLURM_PORT_SPAN
    return ParallelDims(world, rank, local_rank, tp, addr, port, "slurm")


# ----------------------------------------------------------------------------------------------
# SLURM host lists: "n[1-3,5],gpu-a[01-02]-ib" -> n1 n2 n3 n5 gpu-a01-ib gpu-a02-ib
# ----------------------------------------------------------------------------------------------
_BRACKET = re.compile(r"\[([^\[\]]*)\]")


def expand_hostlist(text: str) -> list[str]:
    """Expand a SLURM compressed host list (ranges keep zero padding; several bracket groups in
    one name expand as a product), in order."""
    hosts: list[str] = []
    for item in _split_top_level(text.strip()):
        parts = _BRACKET.split(item)  # literal, ranges, literal, ranges, ..., literal
        if any(c in p for p in parts[0::2] for c in "[]"):
            raise ValueError(f"host list {text!r}: unbalanced brackets in {item!r}")
        choices = [[p] if i % 2 == 0 else _expand_ranges(p, text) for i, p in enumerate(parts)]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    if not hosts:
        raise ValueError(f"host list {text!r} names no host")
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0:
            raise ValueError(f"host list {text!r}: unbalanced brackets")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"host list {text!r}: unbalanced brackets")
    items.append(text[start:])
    return [item for item in items if item]


def _expand_ranges(spec: str, text: str) -> list[str]:
    out = []
    for part in spec.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"host list {text!r}: bad range {part!r}")
        width = len(lo)
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"host list {text!r}: range {part!r} runs backwards")
        out.extend(str(n).zfill(width) for n in range(first, last + 1))
    return out


# ----------------------------------------------------------------------------------------------
# Does the configuration fit these dims?
# ----------------------------------------------------------------------------------------------
def check_global_batch(key: str, batch: int, grad_accum_steps: int, dims: ParallelDims) -> None:
    """Raise ValueError (naming `key` and the degrees) unless the global batch `batch` splits into
    dp ranks x `grad_accum_steps` micro-batches."""
    if grad_accum_steps < 1:
        raise ValueError(f"parallel.grad_accum_steps must be at least 1, got {grad_accum_steps}")
    per_step = dims.dp * grad_accum_steps
    if batch % per_step:
        raise ValueError(f"{key}={batch} is not divisible by dp {dims.dp} x parallel.grad_accum_steps "
                         f"{grad_accum_steps} = {per_step} ({dims.describe()})")


def check_bf16_weights(cfg: SFDConfig, device_type: str | None = None) -> None:
    """optim.bf16_weights runs on the local engine with the fused optimizer, bf16 compute (on
    `device_type` when known) and one micro-batch per step; raises ValueError naming what does not fit."""
    p = cfg.parallel
    if not cfg.optim.fused_ema:
        raise ValueError("optim.bf16_weights needs optim.fused_ema=true: the fused kernel writes the bf16 copies")
    if p.engine not in ("local", "ddp") or p.tensor_parallel > 1:
        raise ValueError(f"optim.bf16_weights runs with parallel.engine local or ddp and no tensor parallelism (got "
                         f"engine {p.engine}, tensor_parallel {p.tensor_parallel}); FSDP2 and DeepSpeed compute with "
                         "bf16 weights already")
    if p.grad_accum_steps > 1:
        raise ValueError(f"optim.bf16_weights needs parallel.grad_accum_steps=1 (got {p.grad_accum_steps}): the bf16 "
                         "gradients of several micro-batches would add up in bf16")
    if cfg.train.precision == "fp32" or (device_type is not None and not bf16_compute(cfg.train.precision, device_type)):
        raise ValueError(f"optim.bf16_weights needs bf16 compute (train.precision bf16, or auto on a GPU); got "
                         f"train.precision={cfg.train.precision}" + (f" on {device_type}" if device_type else ""))


def check_cuda_graph(cfg: SFDConfig) -> None:
    """train.cuda_graph captures a step that never waits for the host, of one micro-batch, on one
    device or under DDP (whose all-reduces NCCL lets a graph hold), with no CUDA graphs of its own
    inside."""
    needs = []
    if not cfg.train.async_metrics:
        needs.append("train.async_metrics=true (with optim.fused_ema=true): a captured step cannot wait for the host")
    if cfg.parallel.engine not in ("local", "ddp") or cfg.parallel.tensor_parallel != 1:
        needs.append(f"parallel.engine local or ddp without tensor parallelism (got {cfg.parallel.engine}, "
                     f"tensor_parallel {cfg.parallel.tensor_parallel})")
    if cfg.parallel.grad_accum_steps != 1:
        needs.append(f"parallel.grad_accum_steps=1 (got {cfg.parallel.grad_accum_steps})")
    if cfg.model.compile != "none" and cfg.model.compile_mode == "reduce-overhead":
        needs.append("model.compile_mode other than reduce-overhead, whose own CUDA graphs cannot be captured")
    if needs:
        raise ValueError("train.cuda_graph needs " + "; ".join(needs))


def check_delayed_fp8(fp8: str, parallel: ParallelConfig) -> None:
    """model.fp8=delayed needs whole weights (sharded ones are DTensors, or empty outside hooks) and
    one forward per step (a recomputed forward would record its amaxes twice)."""
    if fp8 == "delayed" and (parallel.engine not in ("local", "ddp") or parallel.activation_checkpointing != "none"):
        raise ValueError(f"model.fp8=delayed runs with parallel.engine local or ddp and no activation "
                         f"checkpointing (got engine {parallel.engine}, activation_checkpointing "
                         f"{parallel.activation_checkpointing})")


def has_fused_optimizer(parallel: ParallelConfig) -> bool:
    """Whether the engine these settings pick can run the fused AdamW + EMA kernel (optim.fused_ema)."""
    return parallel.engine in ("local", "ddp", "fsdp2") and parallel.tensor_parallel == 1


def check_config_fits(cfg: SFDConfig, dims: ParallelDims) -> None:
    """Raise ValueError (naming every degree) when the engine, batch or accumulation do not fit."""
    p = cfg.parallel
    if p.tensor_parallel != dims.tp:
        raise ValueError(f"parallel.tensor_parallel={p.tensor_parallel} but the process layout was "
                         f"built with tp {dims.tp} ({dims.describe()})")
    if p.engine == "local" and dims.world_size > 1:
        raise ValueError(f"parallel.engine=local runs one process, but the launcher started "
                         f"{dims.world_size} ({dims.describe()}); choose parallel.engine=ddp, fsdp2 "
                         "or deepspeed")
    check_global_batch("train.global_batch_size", cfg.train.global_batch_size, p.grad_accum_steps, dims)
    if p.activation_checkpointing == "selective" and p.checkpoint_every < 1:
        raise ValueError(f"parallel.checkpoint_every must be at least 1, got {p.checkpoint_every}")
    if p.checkpoint_attention_only and p.activation_checkpointing != "selective":
        raise ValueError("parallel.checkpoint_attention_only needs parallel.activation_checkpointing="
                         f"selective (it is {p.activation_checkpointing!r})")
    if p.engine == "deepspeed" and p.zero_stage == 3 and cfg.model.compile != "none":
        # torch.compile traces ZeRO-3's partitioned (empty) parameters and fails at the first step.
        raise ValueError(f"model.compile={cfg.model.compile} does not work with DeepSpeed ZeRO-3 (its "
                         "partitioned parameters are empty outside its hooks); set model.compile=none, or use "
                         "parallel.zero_stage 1/2 or parallel.engine=fsdp2, which compile")
    if p.tensor_parallel > 1 and (cfg.model.compile != "none" or cfg.model.fused_kernels or cfg.model.fp8 != "none"):
        raise ValueError(f"parallel.tensor_parallel={p.tensor_parallel} runs megatron-core's linear layers "
                         f"eagerly; model.compile={cfg.model.compile}, model.fused_kernels={cfg.model.fused_kernels} "
                         f"and model.fp8={cfg.model.fp8} are not supported with it (set none / false / none)")
    check_delayed_fp8(cfg.model.fp8, p)
    if p.engine == "deepspeed" and p.zero_stage == 3 and cfg.model.fp8 != "none":
        raise ValueError(f"model.fp8={cfg.model.fp8} does not work with DeepSpeed ZeRO-3 (its partitioned "
                         "parameters are empty outside its hooks); use parallel.zero_stage 1/2 or fsdp2")
    if p.engine == "fsdp2" and cfg.model.compile != "none" and cfg.model.compile_mode == "reduce-overhead":
        # FSDP2 all-gathers each block's parameters in hooks around its forward and backward:
        # collectives that CUDA-graph replays of the compiled blocks cannot contain.
        raise ValueError("model.compile_mode=reduce-overhead (CUDA graphs) does not work with parallel.engine=fsdp2; "
                         "use compile_mode default there, or the local / ddp engine")
    if cfg.optim.fused_ema and not has_fused_optimizer(p):
        raise ValueError(f"optim.fused_ema runs with parallel.engine local, ddp or fsdp2 and no tensor "
                         f"parallelism (got engine {p.engine}, tensor_parallel {p.tensor_parallel}); "
                         "set optim.fused_ema=false")
    if cfg.optim.bf16_weights:
        check_bf16_weights(cfg)
    if cfg.train.async_metrics and not cfg.optim.fused_ema:
        raise ValueError("train.async_metrics needs optim.fused_ema=true (a non-finite step must be skipped on "
                         "the device, without asking the host); set both, with parallel.engine local, ddp or fsdp2")
    if cfg.train.cuda_graph:
        check_cuda_graph(cfg)
    if p.backend == "nccl" and cfg.train.device == "cpu":
        raise ValueError("parallel.backend=nccl needs GPUs, but train.device=cpu; use backend gloo or auto")
