"""Host-to-device copies that never make the host wait for the GPU.

A copy from ordinary (pageable) host memory to a CUDA device is synchronous: PyTorch waits for
the whole stream to drain first, so a few bytes of noise drawn on the CPU at the start of a step
stall the host until the previous step's optimizer has finished, and the GPU then idles while
the host prepares the next kernels. Staging through pinned memory makes the copy asynchronous;
PyTorch's pinned-memory cache keeps each staging block alive until its copy has run.
"""
from __future__ import annotations

import torch


def to_device_async(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`t` (a CPU tensor) on `device` as `dtype`, without a host synchronisation on CUDA."""
    if device.type != "cuda":
        return t.to(device, dtype)
    return t.pin_memory().to(device, dtype, non_blocking=True)


def to_host_async(t: torch.Tensor) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
    """Start copying `t` to the host; returns (host tensor, event to wait on before reading it).

    On CUDA the copy lands in pinned memory behind the work already queued, and the host goes
    on; a CPU tensor is returned as it is, with no event.
    """
    if t.device.type != "cuda":
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready
