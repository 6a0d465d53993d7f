"""Where the time of a training step goes: the PyTorch profiler over a few steps, summed by kernel.

On a GPU every CUDA kernel's device time is summed per step, by kernel name and by category
(matmuls, attention, multi-tensor optimizer/EMA/clip kernels, Triton kernels from inductor or
`kernels/`, eager elementwise and reduction kernels, copies); `busy_s_per_step` next to
`wall_s_per_step` shows how long the GPU sat idle (launch- or sync-bound). On the CPU the
operators' own (self) CPU time is summed instead, which is what tests can check.
"""
from __future__ import annotations

import re
import time
import warnings
from collections import Counter, defaultdict
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("attention", re.compile(r"flash|fmha|attention|attn|scaled_dot_product", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|sm90_|aten::(mm|addmm|bmm|linear|matmul)\b|convolution",
                          re.I)),
    ("optimizer/EMA/clip", re.compile(r"adam|multi_tensor|foreach|lerp", re.I)),
    ("triton", re.compile(r"^triton_|_kernel_(fwd|bwd)|rmsnorm_modulate|swiglu|rope", re.I)),
    ("copy/memset", re.compile(r"memcpy|memset|aten::copy_|aten::fill_|aten::zero_", re.I)),
    ("elementwise/reduction", re.compile(r"elementwise|reduce|vectorized|unrolled|aten::", re.I)),
)
"""First match wins: attention before matmul because cuDNN's attention kernels contain 'gemm'."""


def category(name: str) -> str:
    return next((label for label, pattern in CATEGORIES if pattern.search(name)), "other")


def profile_training_step(step: Callable[[], object], device: torch.device, steps: int,
                          top: int = 25) -> dict:
    """Run `step` `steps` times under the profiler (after the caller's warm-up); per-step seconds
    by category and for the `top` most expensive kernels (or CPU operators)."""
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if on_gpu:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if on_gpu:
            # Kernels only: annotated ranges on the GPU track ('Optimizer.step#AdamW.step') span
            # kernels that are counted on their own.
            if event.device_type != DeviceType.CUDA or getattr(event, "is_user_annotation", False):
                continue
            seconds = event.device_time / 1e6
        else:
            seconds = event.self_cpu_time_total / 1e6
            if seconds <= 0:
                continue
        per_name[event.name][0] += seconds
        per_name[event.name][1] += 1
    by_category: dict[str, float] = defaultdict(float)
    for name, (seconds, _) in per_name.items():
        by_category[category(name)] += seconds / steps
    busy = sum(by_category.values())
    ranked = sorted(per_name.items(), key=lambda item: -item[1][0])[:top]
    return {
        "steps": steps,
        "clock": "device" if on_gpu else "cpu (self time of operators)",
        "wall_s_per_step": wall / steps,
        "busy_s_per_step": busy,
        "categories": dict(sorted(by_category.items(), key=lambda item: -item[1])),
        "top": [{"name": name, "category": category(name), "s_per_step": seconds / steps,
                 "calls_per_step": calls / steps} for name, (seconds, calls) in ranked],
    }


def format_profile(report: dict, width: int = 90) -> str:
    """The category table and the top kernels as plain text."""
    busy = report["busy_s_per_step"] or float("nan")
    lines = [f"profile over {report['steps']} step(s), {report['clock']}: wall {report['wall_s_per_step'] * 1e3:.2f} ms"
             f"/step, busy {report['busy_s_per_step'] * 1e3:.2f} ms/step",
             "| category | ms/step | share |", "|---|---|---|"]
    lines += [f"| {name} | {seconds * 1e3:.2f} | {seconds / busy:.1%} |" for name, seconds in report["categories"].items()]
    lines += ["| kernel | category | ms/step | calls/step |", "|---|---|---|---|"]
    for row in report["top"]:
        name = row["name"] if len(row["name"]) <= width else row["name"][:width - 3] + "..."
        lines.append(f"| {name} | {row['category']} | {row['s_per_step'] * 1e3:.3f} | {row['calls_per_step']:.1f} |")
    return "\n".join(lines)


def count_host_syncs(step: Callable[[], object], device: torch.device, sites: int = 10) -> dict | None:
    """Run `step` once with CUDA's sync debug mode on: how many calls made the host wait for the
    GPU (stream syncs behind pageable copies, .item(), ...) and the Python lines that made them,
    most frequent first; None off CUDA, where nothing is asynchronous."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where = Counter(f"{w.filename}:{w.lineno}" for w in syncs)
    return {"count": len(syncs), "sites": [f"{site} (x{n})" for site, n in where.most_common(sites)]}
