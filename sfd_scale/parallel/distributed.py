"""Process groups and the few collectives the trainer and engines need.

Every helper here also works with no process group (a plain single-process run): reductions
return their input, broadcasts return the caller's value, barriers return at once. So library
code calls them unconditionally and stays free of `if distributed:` branches.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from sfd_scale.parallel.dims import ParallelDims

log = logging.getLogger(__name__)

T = TypeVar("T")
INIT_TIMEOUT = timedelta(minutes=30)
"""Long enough for rank 0 to verify a large checkpoint while the others wait in a collective."""


def resolve_backend(backend: str, device: torch.device) -> str:
    """auto: nccl for CUDA devices, gloo otherwise."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"parallel.backend=nccl needs a CUDA device, this run uses {device}")
    return backend


_JOINED = False
"""Whether this process has joined a process group (see `exit_after_distributed_run`)."""


def init_process_group(dims: ParallelDims, backend: str, device: torch.device,
                       timeout: timedelta = INIT_TIMEOUT) -> None:
    """Join the group described by `dims` (a no-op when one is already initialised).

    A single process gets a group of one on a free local port, so engines that need a group
    (ddp, fsdp2) also run without a launcher.
    """
    global _JOINED, _HOST_GROUP
    if dist.is_initialized():
        if dist.get_world_size() != dims.world_size or dist.get_rank() != dims.rank:
            raise RuntimeError(f"a process group already exists with rank {dist.get_rank()} of "
                               f"{dist.get_world_size()}, but this run expects {dims.describe()}")
        return
    port = dims.master_port if dims.master_port is not None else free_port()
    backend = resolve_backend(backend, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _JOINED = True
    dist.init_process_group(backend, init_method=f"tcp://{dims.master_addr}:{port}",
                            rank=dims.rank, world_size=dims.world_size, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    if backend == "nccl":  # made now, so a node gloo cannot reach (GLOO_SOCKET_IFNAME) fails at start
        _HOST_GROUP = dist.new_group(backend="gloo", timeout=timeout)
    log.info("process group: %s backend, %s", backend, dims.describe())


def destroy_process_group() -> None:
    """Leave the group after a last barrier, so no rank exits while others still communicate."""
    global _HOST_GROUP
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # every group, the host group included
        _HOST_GROUP = None


def exit_after_distributed_run() -> None:
    """End a launcher process that ran with peers at once, after flushing its logs.

    The interpreter's normal teardown can abort on c10d/gloo threads ("terminate called without
    an active exception", SIGABRT) after a run that succeeded, and launchers (torchrun, srun)
    then report the job as failed. Call after `destroy_process_group`, from `__main__` only.
    """
    if _JOINED:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _reduce_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_HOST_GROUP: dist.ProcessGroup | None = None
"""gloo group beside an NCCL default group, for values that live on the host (see `all_reduce`)."""


def _host_group() -> dist.ProcessGroup | None:
    """The group that reduces CPU tensors: the default group unless it is NCCL, else a gloo group
    over the same ranks, made by `init_process_group` (or, for a group someone else initialised,
    at the first host reduction, which every rank reaches at the same point)."""
    global _HOST_GROUP
    if dist.get_backend() != "nccl":
        return None
    if _HOST_GROUP is None:
        _HOST_GROUP = dist.new_group(backend="gloo")
    return _HOST_GROUP


def all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduced copy of a small float tensor over all ranks (op: sum, max).

    Host values (CPU tensors: stop flags, logged averages) are reduced on the host, by gloo, and
    device values on the device (NCCL on GPUs): an NCCL reduction of a host value would copy it
    through the GPU stream and make the host wait for every kernel queued before it.
    """
    if not dist.is_initialized():
        return values.clone()
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    if values.device.type == "cpu":
        out = values.detach().to(torch.float64, copy=True)
        dist.all_reduce(out, op=reduce_op, group=_host_group())
        return out.to(values.dtype)
    out = values.detach().to(_reduce_device(), torch.float64, copy=True)
    dist.all_reduce(out, op=reduce_op)
    return out.to(values.device, values.dtype)


def mean_over_ranks(metrics: Mapping[str, float]) -> dict[str, float]:
    """Average each scalar over all ranks in one host-side collective (every rank must pass the
    same keys)."""
    if not dist.is_initialized():
        return dict(metrics)
    keys = sorted(metrics)
    summed = all_reduce(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64))
    return {k: float(v) / world_size() for k, v in zip(keys, summed.tolist())}


def broadcast_object(obj: T, src: int = 0) -> T:
    """`obj` from rank `src` on every rank (picklable objects only)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_reduce_device())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 and hand its result, or the exception it raised, to every rank."""
    result: tuple[bool, Any] = (True, None)
    if rank() == 0:
        try:
            result = (True, fn())
        except Exception as err:  # every rank re-raises it below
            result = (False, err)
    ok, value = broadcast_object(result)
    if not ok:
        raise value  # on other ranks: rank 0's exception, unpickled
    return value


def raise_if_any_failed(error: BaseException | None, what: str) -> None:
    """Collective: if any rank passes an error, every rank raises, naming the failing ranks."""
    errors = all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
    failed = {r: e for r, e in enumerate(errors) if e is not None}
    if failed:
        detail = "; ".join(f"rank {r}: {e}" for r, e in failed.items())
        if error is not None:
            raise RuntimeError(f"{what} failed on {len(failed)} rank(s): {detail}") from error
        raise RuntimeError(f"{what} failed on {len(failed)} rank(s): {detail}")


def _fp32_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's 2-norm, accumulated in fp32, in the order given. One foreach call per dtype:
    CUDA's fused foreach norm takes lists of one dtype only (bf16 weight copies beside fp32 norm
    weights would otherwise fall back to a kernel per tensor)."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    norms: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
    for indices in by_dtype.values():
        for i, norm in zip(indices, torch._foreach_norm([tensors[i] for i in indices], 2, dtype=torch.float32)):
            norms[i] = norm
    return norms


def grad_norm_and_bad_loss(grads: list[torch.Tensor], loss: torch.Tensor, sharded: bool
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Global gradient norm over every rank and a 0/1 flag for a non-finite loss on any rank,
    both device scalars (no host synchronisation).

    `grads` are this rank's gradient tensors: whole and identical on every rank (`sharded`
    False: DDP, where only the loss check needs a collective) or disjoint shards (`sharded`
    True: FSDP, whose squared norms add up over ranks).
    """
    device = grads[0].device if grads else loss.device
    if grads:
        sq = torch.stack(_fp32_norms(grads)).pow(2).sum()
    else:
        sq = torch.zeros((), device=device)
    bad_loss = (~torch.isfinite(loss.detach().float())).float().to(device)
    if sharded:
        sq, bad = all_reduce(torch.stack([sq, bad_loss])).unbind(0)
    else:
        bad = all_reduce(bad_loss.reshape(1), op="max")[0]
    return sq.sqrt(), bad


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """torch's clipping factor min(1, max_norm / (norm + 1e-6)), on the device."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


def clip_grads_and_check(grads: list[torch.Tensor], max_norm: float, loss: torch.Tensor,
                         sharded: bool) -> tuple[float, bool]:
    """`grad_norm_and_bad_loss`, then clip in place unless the loss or the norm is not finite on
    some rank (then every rank skips the step together); (norm, finite)."""
    norm, bad = grad_norm_and_bad_loss(grads, loss, sharded)
    finite = bool(bad.item() == 0) and bool(torch.isfinite(norm).item())
    if finite and max_norm > 0 and grads:
        torch._foreach_mul_(grads, clip_coefficient(norm, max_norm).to(grads[0].dtype))
    return float(norm), finite
