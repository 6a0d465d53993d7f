"""AdamW, gradient-clip scaling and the EMA update in one pass over each parameter.

Unfused, a step reads and writes each parameter's bytes in three places: the clip scale (read and
write the gradient), torch's fused AdamW (read p, g, m, v; write p, m, v) and the EMA lerp (read
ema and p; write ema): 48 bytes per fp32 parameter. Fused, one kernel reads p, g, m, v, ema and
writes p, m, v, ema: 36 bytes, and the clip coefficient and the skip flag stay on the device, so
the step needs no host synchronisation. Measured on an H100 (docs/benchmarks.md): 16.8 ms against
22.7 ms for the three passes; inside the XXL step the kernel runs 12.5 ms, at the card's copy rate.

The arithmetic is torch.optim.AdamW's (decoupled weight decay, bias corrections from the step
count, `exp_avg.lerp_(grad, 1 - beta1)`), followed by `ema.lerp_(param, 1 - decay)`. The step
counts live on the device as float32 tensors, as torch's fused and capturable AdamW keep them;
a skipped step (non-finite loss or gradient) changes nothing, not even the counts.

With compute copies (`optim.bf16_weights`), a parameter's fp32 master lives here and the module
computes with a bf16 copy: the kernel reads that copy's bf16 gradient and writes the copy back,
rounded from the new master, in the same pass (bf16 weights without a per-step cast in the forward
and fp32 weight gradients in the backward).

Plain-PyTorch twin: torch.optim.AdamW followed by torch._foreach_lerp_ (tests compare them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.distributed.tensor import DTensor

from sfd_scale.host_copy import to_device_async

_BLOCK = 1024
"""Elements per program."""


_FIELDS = 8
"""Columns of the per-tensor table: addresses of param, grad, exp_avg, exp_avg_sq, ema, step; numel;
address of the bf16 compute copy (0: none)."""


@triton.jit
def _bf16_bits(x):
    # The bits of x rounded to bfloat16, to nearest even, as torch casts (and autocast would cast the
    # master): written out because Triton's interpreter truncates a float32 -> bfloat16 conversion.
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
    return tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)


@triton.jit
def _adamw_ema_kernel(table_ptr, block_tensor_ptr, block_start_ptr, scale_ptr, skip_ptr,
                      lr_ptr, beta1, beta2, eps, weight_decay, ema_weight, log_beta1, log_beta2,
                      FIELDS: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, COPY: tl.constexpr,
                      GRAD_BF16: tl.constexpr):
    # One launch for many tensors: program i updates elements [start, start + BLOCK) of tensor
    # block_tensor[i], whose addresses and size are row block_tensor[i] of the table. With COPY,
    # every tensor of the launch has a bf16 compute copy, which gets the new value; GRAD_BF16: the
    # gradients are bf16 (a copy's own; fp32 where DDP reduced them in fp32).
    pid = tl.program_id(0)
    row = table_ptr + tl.load(block_tensor_ptr + pid).to(tl.int64) * FIELDS
    p_ptr = tl.load(row).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(tl.bfloat16 if GRAD_BF16 else tl.float32))
    copy_ptr = tl.load(row + 7).to(tl.pointer_type(tl.uint16))  # bf16 bits, see _bf16_bits
    m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    ema_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    step_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    n = tl.load(row + 6)
    start = tl.multiple_of(tl.load(block_start_ptr + pid), BLOCK)
    if ALIGNED:
        # Addresses read from a table carry no alignment, so Triton would move one float at a
        # time; these tensors are 16-byte aligned with sizes divisible by 4: 128-bit accesses.
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        ema_ptr = tl.multiple_of(ema_ptr, 16)
        n = tl.multiple_of(n, 4)
        if COPY:
            copy_ptr = tl.multiple_of(copy_ptr, 16)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    keep = tl.load(skip_ptr) == 0
    # At least 1: a step skipped before any update leaves the count at 0.
    step = tl.maximum(tl.load(step_ptr), 1.0)
    scale = tl.load(scale_ptr)
    lr = tl.load(lr_ptr)  # read on the device: a replayed CUDA graph takes each step's rate
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale
    p0 = tl.load(p_ptr + offs, mask=mask, other=0.0)
    m0 = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v0 = tl.load(v_ptr + offs, mask=mask, other=0.0)
    e0 = tl.load(ema_ptr + offs, mask=mask, other=0.0)
    m = m0 + (1.0 - beta1) * (g - m0)
    v = v0 * beta2 + (1.0 - beta2) * g * g
    bias1 = 1.0 - tl.exp(step * log_beta1)
    bias2_sqrt = tl.sqrt(1.0 - tl.exp(step * log_beta2))
    p = p0 * (1.0 - lr * weight_decay) - (lr / bias1) * (m / (tl.sqrt(v) / bias2_sqrt + eps))
    e = e0 + ema_weight * (p - e0)
    # A skipped step writes back what it read. Selecting rather than masking keeps the mask
    # uniform over each 4-float vector, which 128-bit accesses need.
    tl.store(p_ptr + offs, tl.where(keep, p, p0), mask=mask)
    tl.store(m_ptr + offs, tl.where(keep, m, m0), mask=mask)
    tl.store(v_ptr + offs, tl.where(keep, v, v0), mask=mask)
    tl.store(ema_ptr + offs, tl.where(keep, e, e0), mask=mask)
    if COPY:
        tl.store(copy_ptr + offs, _bf16_bits(tl.where(keep, p, p0)), mask=mask)


def block_table(numels: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor index, first element) of every BLOCK-sized piece of tensors of these sizes."""
    blocks = torch.tensor([-(-n // _BLOCK) for n in numels], dtype=torch.int64)
    tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), blocks)
    first = torch.cat([torch.arange(int(b), dtype=torch.int64) * _BLOCK for b in blocks]) if numels else blocks
    return tensor.to(device), first.to(device)


def _aligned(row: list[int]) -> bool:
    """A table row whose tensors start on 16 bytes and hold a multiple of 4 elements."""
    return all(address % 16 == 0 for address in (*row[:5], row[7])) and row[6] % 4 == 0


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _log(beta: float) -> float:
    """log(beta) for beta ** step computed as exp(step * log(beta)); beta 0 gives 0 ** step = 0."""
    return math.log(beta) if beta > 0 else -math.inf


class AdamWEMA(torch.optim.AdamW):
    """torch.optim.AdamW whose `step` also clips (by a device scale) and updates the EMA, in one
    Triton kernel launch for all parameters of a group (a table of their addresses, rebuilt every
    step because gradients are new tensors, unless frozen for a captured step: `freeze_tables`;
    XXL has 358 parameter tensors, so one launch instead of 358 saves the host several
    milliseconds a step), two when some tensors are not 16-byte aligned (shards, bucket views),
    which then get the kernel without 128-bit accesses. Its state dict is AdamW's, so checkpoints
    move between the two.

    `ema_params[i]` is the EMA tensor of the i-th parameter (same shape, fp32, same device).
    `compute_copies[i]`, when given and not None, is the bf16 tensor the module computes with in
    place of the i-th parameter (its fp32 master): its gradient is the one used, and the step
    writes it back as the rounded new master.
    Parameters may be sharded DTensors (FSDP2): the kernel then updates each rank's local shards,
    `ema_params` are the EMA's local shards, and the moments are DTensors placed like the
    parameters, so distributed checkpoints reshard them as they do torch's AdamW state.
    """

    def __init__(self, params, ema_params: list[torch.Tensor], ema_decay: float, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 compute_copies: list[torch.Tensor | None] | None = None) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
        flat = [_local(p) for group in self.param_groups for p in group["params"]]
        if len(ema_params) != len(flat) or any(e.shape != p.shape for e, p in zip(ema_params, flat)):
            raise ValueError(f"AdamWEMA: {len(ema_params)} EMA tensors for {len(flat)} parameters, or shapes differ")
        if any(p.dtype != torch.float32 or e.dtype != torch.float32 or not p.is_contiguous()
               or not e.is_contiguous() for p, e in zip(flat, ema_params)):
            raise ValueError("AdamWEMA: parameters and EMA tensors must be contiguous float32")
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"AdamWEMA: ema_decay must lie in [0, 1], got {ema_decay}")
        copies = [None] * len(flat) if compute_copies is None else compute_copies
        if len(copies) != len(flat) or any(
                c is not None and (isinstance(p, DTensor) or c.shape != p.shape or c.dtype != torch.bfloat16
                                   or not c.is_contiguous()) for c, p in zip(copies, flat)):
            raise ValueError("AdamWEMA: compute copies must be contiguous bfloat16 tensors shaped like their "
                             "(unsharded) parameters, one entry per parameter")
        self.ema_params = ema_params
        self._copy_of = {id(p): c for p, c in zip(flat, copies) if c is not None}
        self.ema_decay = ema_decay
        self._block_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._frozen_tables: dict[tuple, torch.Tensor] = {}
        self.state_version = 0
        """Counts `load_state_dict` calls: each gives the moments and counts new tensors, which a
        captured step (train/step_graph.py) no longer reads."""

    def grad_of(self, param: torch.Tensor) -> torch.Tensor | None:
        """The gradient the step uses for `param`: its compute copy's when it has one, and there the
        fp32 `main_grad` when data parallelism reduced the bf16 gradient in fp32 beside it."""
        copy = self._copy_of.get(id(param))
        if copy is None:
            return param.grad
        return None if copy.grad is None else getattr(copy, "main_grad", copy.grad)

    def gradients(self) -> list[torch.Tensor]:
        """The gradients the next step uses (`grad_of`), in parameter order: what clipping's norm reads."""
        return [g for group in self.param_groups for p in group["params"] if (g := self.grad_of(p)) is not None]

    def _copy_address(self, param: torch.Tensor) -> int:
        copy = self._copy_of.get(id(param))
        return 0 if copy is None else copy.data_ptr()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._frozen_tables.clear()  # their addresses are the replaced tensors'
        self.state_version += 1

    def freeze_tables(self) -> None:
        """Copy the address tables of the current parameters, gradients and state to the device
        once; every later step whose tensors sit at the same addresses uses them. A CUDA graph
        capture needs this: a table copied from host memory inside a capture would be read again
        from that (meanwhile reused) host buffer at every replay. Call it once the gradients of
        the step to capture exist."""
        self._prepare_state()
        self._frozen_tables = {launch.key(): to_device_async(torch.tensor(launch.rows, dtype=torch.int64),
                                                             launch.device)
                               for launch in self._launches()}

    def _prepare_state(self) -> list[torch.Tensor]:
        """Moments and counts for every parameter with a gradient, counts on its device; the counts."""
        steps = []
        for group in self.param_groups:
            for p in group["params"]:
                if self.grad_of(p) is None:
                    continue
                state = self.state[p]
                device = _local(p).device
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if state["step"].device != device:  # AdamW's load_state_dict leaves counts on the CPU
                    state["step"] = state["step"].to(device)
                steps.append(state["step"])
        return steps

    def _launches(self) -> list[_Launch]:
        """The kernel launches of a step: per group, one per kind of tensor present (alignment,
        compute copy, gradient dtype). Fresh allocations are aligned, views (shards, buckets) may
        not be; tensors with a compute copy write it, and read bf16 gradients unless reduced in fp32."""
        launches = []
        ema_of = {id(p): e for p, e in zip((p for g in self.param_groups for p in g["params"]), self.ema_params)}
        for group in self.param_groups:
            with_grads = [(p, _local(g).contiguous()) for p in group["params"] if (g := self.grad_of(p)) is not None]
            if not with_grads:
                continue
            rows = [[_local(p).data_ptr(), g.data_ptr(), _local(self.state[p]["exp_avg"]).data_ptr(),
                     _local(self.state[p]["exp_avg_sq"]).data_ptr(), ema_of[id(p)].data_ptr(),
                     self.state[p]["step"].data_ptr(), g.numel(), self._copy_address(p)] for p, g in with_grads]
            kinds = [(_aligned(r), r[7] != 0, g.dtype == torch.bfloat16) for r, (_, g) in zip(rows, with_grads)]
            for kind in sorted(set(kinds), reverse=True):
                chosen = [i for i, k in enumerate(kinds) if k == kind]
                launches.append(_Launch(group, kind, [rows[i] for i in chosen], [with_grads[i][1] for i in chosen],
                                        _local(with_grads[0][0]).device))
        return launches

    def _blocks(self, numels: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's block table for a group's tensor sizes, built once (it depends on nothing else)."""
        key = (numels, device)
        if key not in self._block_tables:
            self._block_tables[key] = block_table(numels, device)
        return self._block_tables[key]

    @torch.no_grad()
    def step(self, closure=None, grad_scale: torch.Tensor | None = None, skip: torch.Tensor | None = None,
             lr: torch.Tensor | None = None):
        """One update of every parameter with a gradient: grads times `grad_scale` (a device
        scalar: the clip coefficient, default 1), nothing at all where `skip` (a device scalar,
        nonzero = skip) is set, at learning rate `lr` (a device scalar; default each group's
        'lr'). None of them is read on the host."""
        if closure is not None:
            raise ValueError("AdamWEMA.step takes no closure")
        steps = self._prepare_state()
        launches = self._launches()
        if not launches:
            return None
        device = launches[0].device
        scale = torch.ones((), device=device) if grad_scale is None else grad_scale.to(device, torch.float32)
        skipped = torch.zeros((), device=device) if skip is None else skip.to(device, torch.float32)
        # Counts advance unless skipped, on the device. `alpha` selects the tensor overload: without
        # it the 0-d increment is taken as a Python scalar (.item(), a host sync every step).
        torch._foreach_add_(steps, 1.0 - skipped, alpha=1)
        rates = {}
        for launch in launches:
            group = launch.group
            if id(group) not in rates:
                rates[id(group)] = (torch.full((), group["lr"], device=device) if lr is None
                                    else lr.to(device, torch.float32))
            table = self._frozen_tables.get(launch.key()) if self._frozen_tables else None
            if table is None:
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise RuntimeError("AdamWEMA.step is being captured in a CUDA graph with tensors at new "
                                       "addresses: call freeze_tables() before the capture")
                table = to_device_async(torch.tensor(launch.rows, dtype=torch.int64), device)
            beta1, beta2 = group["betas"]
            block_tensor, block_start = self._blocks(tuple(r[6] for r in launch.rows), device)
            if block_tensor.numel():  # none when every tensor is elsewhere or an empty shard
                aligned, copy, grad_bf16 = launch.kind
                _adamw_ema_kernel[(block_tensor.numel(),)](
                    table, block_tensor, block_start, scale, skipped, rates[id(group)], beta1, beta2, group["eps"],
                    group["weight_decay"], 1.0 - self.ema_decay, _log(beta1), _log(beta2),
                    FIELDS=_FIELDS, BLOCK=_BLOCK, ALIGNED=aligned, COPY=copy, GRAD_BF16=grad_bf16)
        return None


@dataclass
class _Launch:
    """One kernel launch of a step: tensors of one group and kind, and their table rows."""

    group: dict
    kind: tuple[bool, bool, bool]
    """(16-byte aligned, has a bf16 compute copy, bf16 gradients)."""
    rows: list[list[int]]
    grads: list[torch.Tensor]
    """Alive until the kernel is queued (contiguous copies of strided gradients)."""
    device: torch.device

    def key(self) -> tuple:
        return self.kind, tuple(map(tuple, self.rows))
