"""Where the time of a training step goes: the PyTorch profiler over a few steps, summed by kernel.

On a GPU every CUDA kernel's device time is summed per step, by kernel name and by category
(matmuls, attention, multi-tensor optimizer/EMA/clip kernels, Triton kernels from inductor or
`kernels/`, eager elementwise and reduction kernels, copies); `busy_s_per_step` next to
`wall_s_per_step` shows how long the GPU sat idle (launch- or sync-bound), and `idle` says where:
each gap between kernels, attributed to what the host thread that launches the kernels was doing
meanwhile (its innermost operator or annotated range) and to the kernel that ended the gap; each of
the top kernels names the host operators that launched it most often (`launched_by`: which eager
reduction, which backward node; kernels replayed from a CUDA graph name the graph's launch). On the
CPU the operators' own (self) CPU time is summed instead, which is what tests can check.
"""
from __future__ import annotations

import os
import re
import time
import traceback
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Callable

import numpy as np
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
                          top: int = 25, steps_per_call: int = 1) -> dict:
    """Run `step` under the profiler (after the caller's warm-up) until `steps` training steps ran,
    each call running `steps_per_call` of them (a training loop's own stretch of steps); per-step
    seconds by category and for the `top` most expensive kernels (or CPU operators)."""
    if steps < 1 or steps_per_call < 1 or steps % steps_per_call:
        raise ValueError(f"profile: steps must be a positive multiple of steps_per_call, got {steps}, {steps_per_call}")
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps // steps_per_call):
            step()
        if on_gpu:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    launchers = kernel_launchers(prof.events()) if on_gpu else {}
    kernels: list[Interval] = []
    host_ops: list[HostOp] = []
    for event in prof.events():
        if on_gpu and event.device_type == DeviceType.CPU:
            host_ops.append((event.time_range.start, event.time_range.end, event.name, event.thread))
        if on_gpu:
            # Kernels only: annotated ranges on the GPU track ('Optimizer.step#AdamW.step') span
            # kernels that are counted on their own.
            if event.device_type != DeviceType.CUDA or getattr(event, "is_user_annotation", False):
                continue
            seconds = event.device_time / 1e6
            kernels.append((event.time_range.start, event.time_range.end, event.name))
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
                 "calls_per_step": calls / steps,
                 **({"launched_by": launchers[name].most_common(1)[0][0]} if name in launchers else {})}
                for name, (seconds, calls) in ranked],
        **({"idle": idle_gaps(kernels, host_ops, steps)} if on_gpu else {}),
    }


def kernel_launchers(events: Sequence, depth: int = 4) -> dict[str, Counter]:
    """For each kernel name, how often each chain of host operators launched it: the operators
    around the runtime call that launched it, innermost first (`aten::sum < autograd::engine::
    evaluate_function: MulBackward0 < ...`, up to `depth`). The profiler files each kernel under
    the runtime call (`cudaLaunchKernel`, `cudaGraphLaunch`, ...) that launched it."""
    launchers: dict[str, Counter] = defaultdict(Counter)
    for event in events:
        if not getattr(event, "kernels", None):
            continue
        names, parent = [], event.cpu_parent
        while parent is not None and len(names) < depth:
            names.append(parent.name)
            parent = parent.cpu_parent
        path = " < ".join(names) or event.name
        for kernel in event.kernels:
            launchers[kernel.name][path] += 1
    return launchers


Interval = tuple[float, float, str]
"""(start us, end us, name) of one kernel on the profiler's clock."""
HostOp = tuple[float, float, str, int]
"""(start us, end us, name, thread) of one host-side operator, runtime call or annotated range."""


def idle_gaps(kernels: Sequence[Interval], host_ops: Sequence[HostOp], steps: int, min_gap_us: float = 10.0,
              top: int = 8) -> dict:
    """Where the GPU sat idle between its first and last kernel: gaps of at least `min_gap_us`,
    summed per step by the kernel that ended each gap and by what the host thread that launched
    it (the thread of the last CUDA runtime or driver call before it: the main thread, or
    autograd's device thread in a backward) was doing at the gap's midpoint (its innermost
    operator); the largest `top` of each."""
    busy_until, gaps = None, []
    for start, end, name in sorted(kernels):
        if busy_until is not None and start - busy_until >= min_gap_us:
            gaps.append((busy_until, start, name))
        busy_until = end if busy_until is None else max(busy_until, end)
    launches = sorted((start, thread) for start, _, name, thread in host_ops if name.startswith("cu"))
    launch_starts = np.array([start for start, _ in launches], dtype=np.float64)
    per_thread: dict[int, list[HostOp]] = defaultdict(list)
    for op in host_ops:
        per_thread[op[3]].append(op)
    spans = {thread: (np.array([op[0] for op in ops]), np.array([op[1] for op in ops]), [op[2] for op in ops])
             for thread, ops in per_thread.items()}
    by_host: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    by_next: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for start, end, next_kernel in gaps:
        host = "(no host op)"
        last_launch = int(np.searchsorted(launch_starts, end, side="right")) - 1
        if last_launch >= 0:
            starts, ends, names = spans[launches[last_launch][1]]
            mid = (start + end) / 2
            covering = np.flatnonzero((starts <= mid) & (ends >= mid))
            if covering.size:
                host = names[covering[np.argmin(ends[covering] - starts[covering])]]
        for table, key in ((by_host, host), (by_next, next_kernel)):
            table[key][0] += end - start
            table[key][1] += 1

    def ranked(table: dict[str, list[float]]) -> list[dict]:
        rows = sorted(table.items(), key=lambda item: -item[1][0])[:top]
        return [{"name": name, "s_per_step": us / 1e6 / steps, "gaps_per_step": n / steps} for name, (us, n) in rows]

    return {"s_per_step": sum(end - start for start, end, _ in gaps) / 1e6 / steps, "gaps_per_step": len(gaps) / steps,
            "min_gap_us": min_gap_us, "by_host_op": ranked(by_host), "before_kernel": ranked(by_next)}


def format_profile(report: dict, width: int = 90) -> str:
    """The category table and the top kernels as plain text."""
    busy = report["busy_s_per_step"] or float("nan")
    lines = [f"profile over {report['steps']} step(s), {report['clock']}: wall {report['wall_s_per_step'] * 1e3:.2f} ms"
             f"/step, busy {report['busy_s_per_step'] * 1e3:.2f} ms/step",
             "| category | ms/step | share |", "|---|---|---|"]
    lines += [f"| {name} | {seconds * 1e3:.2f} | {seconds / busy:.1%} |" for name, seconds in report["categories"].items()]
    lines += ["| kernel | category | ms/step | calls/step |", "|---|---|---|---|"]
    for row in report["top"]:
        lines.append(f"| {_short(row['name'], width)} | {row['category']} | {row['s_per_step'] * 1e3:.3f} | "
                     f"{row['calls_per_step']:.1f} |")
    launched = [row for row in report["top"] if "launched_by" in row]
    if launched:
        lines += ["| kernel | launched by (most calls) |", "|---|---|"]
        lines += [f"| {_short(row['name'], width)} | {_short(row['launched_by'], width)} |" for row in launched]
    idle = report.get("idle")
    if idle is not None:
        lines.append(f"GPU idle between kernels: {idle['s_per_step'] * 1e3:.2f} ms/step in {idle['gaps_per_step']:.0f} "
                     f"gaps of >= {idle['min_gap_us']:g} us")
        for title, key in (("host thread doing", "by_host_op"), ("gap ended by kernel", "before_kernel")):
            lines += [f"| {title} | idle ms/step | gaps/step |", "|---|---|---|"]
            lines += [f"| {_short(row['name'], width)} | {row['s_per_step'] * 1e3:.3f} | {row['gaps_per_step']:.1f} |"
                      for row in idle[key]]
    return "\n".join(lines)


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else name[:width - 3] + "..."


def count_host_syncs(step: Callable[[], object], device: torch.device, sites: int = 10) -> dict | None:
    """Run `step` once with CUDA's sync debug mode on: how many calls made the host wait for the
    GPU (stream syncs behind pageable copies, .item(), ...) and the Python lines that made them,
    most frequent first; None off CUDA, where nothing is asynchronous."""
    if device.type != "cuda":
        return None
    torch.cuda.set_sync_debug_mode("warn")
    try:
        stacks = sync_warning_stacks(step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    where = Counter(sync_site(stack) for stack in stacks)
    return {"count": len(stacks), "sites": [f"{site} (x{n})" for site, n in where.most_common(sites)]}


def sync_warning_stacks(step: Callable[[], object]) -> list[traceback.StackSummary]:
    """Run `step`; the Python stack at each warning about a synchronising CUDA call it raised.
    Warnings come from C++ on the calling thread, so the stack at `showwarning` is the caller's."""
    stacks: list[traceback.StackSummary] = []

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" in str(message):
            stack = traceback.extract_stack()[:-1]
            while stack and stack[-1].filename == warnings.__file__:  # the warnings module's own frames
                stack.pop()
            stacks.append(stack)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        step()
    return stacks


def sync_site(stack: traceback.StackSummary, library: str = f"site-packages{os.sep}torch{os.sep}") -> str:
    """Where a synchronising call came from: the innermost frame, and when that is inside torch
    (torch.cuda.synchronize called by CUDA-graph bookkeeping, say) also the torch frame that
    called it and the nearest frame outside torch, innermost first."""
    frames = [f"{frame.filename}:{frame.lineno}" for frame in stack]
    if library not in stack[-1].filename:
        return frames[-1]
    outside = next((i for i in range(len(stack) - 1, -1, -1) if library not in stack[i].filename), None)
    chain = [frames[-1]] + ([frames[-2]] if len(stack) > 1 and library in stack[-2].filename else [])
    if outside is not None:
        chain.append(frames[outside])
    return " < ".join(chain)
