"""Two questions the H100 left open on 2026-11-27, each answered by one probe on a GPU
(scripts/gpu_session.sh runs them as steps `fp8_probe` and `sums_probe`):

  python scripts/gpu_probes.py fp8     # where our FP8 cast kernels and their twins disagree
  python scripts/gpu_probes.py sums    # the fp32 sum per RMSNorm weight: mix-order reduction on/off

`fp8`: on the H100 the kernel tests failed at the tests' small shapes (a SwiGLU cast of 100 rows:
rows 0-63 wrong, 64-99 right; a 96 x 64 weight cast: some columns of an FP8 linear's input gradient
wrong), while a plain cast of 100 x 70 matched bit for bit. For each op and shape this prints the
share of FP8 bytes that differ from the twin, which 64 x 64 tiles differ, whether the kernel gives
the same bytes twice, and whether it left its input intact. Outputs are allocated over memory
filled with a marker byte first, so bytes a kernel never wrote show up as that marker.
`sums`: each block's backward launches four fp32 ATen `sum` reductions (15 us each, 1.6 ms a step
on the H100), beside inductor's kernels. Session 11's reading of inductor (no GPU): its mix-order
reduction, on by default on CUDA, fuses an RMSNorm backward's row reduction (dx) with its weight's
column reduction (dw) and finishes the per-split partial sums with `.sum(dim=0)` in the compiled
graph's wrapper: an ATen reduction per RMSNorm weight (norm1, q_norm, k_norm, norm2). This
compiles XXL's block at batch 32 as inductor's default does, without the fusion, and with fewer,
larger splits, and prints for each the mix-order kernels compiled, the ATen sums launched, the
block step's kernel time and its costliest kernels.
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn

from sfd_scale.kernels import fp8_cast_kernel as kernels
from sfd_scale.kernels import reference

DEVICE = torch.device("cuda")
MARKER = 0x5A
"""A byte no cast of these inputs is likely to produce in bulk: what unwritten output bytes read as."""


def _fill_free_memory() -> None:
    """Let the next allocations land on memory that holds MARKER bytes."""
    block = torch.full((64 << 20,), MARKER, dtype=torch.uint8, device=DEVICE)
    del block


def _tiles(differ: torch.Tensor, tile: int = 64) -> list[tuple[int, int, float]]:
    rows, cols = differ.shape
    return [(i // tile, j // tile, round(differ[i:i + tile, j:j + tile].float().mean().item(), 2))
            for i in range(0, rows, tile) for j in range(0, cols, tile)
            if differ[i:i + tile, j:j + tile].any()]


def _report(name: str, got, again, want, inputs: list[torch.Tensor], before: list[torch.Tensor]) -> None:
    torch.cuda.synchronize()  # a launch error surfaces here, named by this probe, not later
    for label, k, k2, r in zip(("cast", "transposed"), got[:2], again[:2], want[:2]):
        kb, rb = k.view(torch.uint8), r.view(torch.uint8)
        differ = kb != rb
        line = f"{name:42s} {label:10s} {tuple(k.shape)!s:14s} differ {differ.float().mean().item():.3f}"
        if differ.any():
            unwritten = (kb[differ] == MARKER).float().mean().item()
            line += f" (marker bytes among them {unwritten:.2f}) tiles {_tiles(differ)[:8]}"
        line += f" repeatable {torch.equal(kb, k2.view(torch.uint8))}"
        print(line, flush=True)
    intact = all(torch.equal(x, x0) for x, x0 in zip(inputs, before))
    print(f"{'':42s} inputs intact {intact}", flush=True)


def probe_fp8() -> None:
    g = torch.Generator().manual_seed(0)
    e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
    for rows, cols in [(100, 70), (80, 96), (96, 64), (64, 64), (128, 128), (192, 64), (64, 192), (4608, 1536)]:
        for dtype in (torch.bfloat16, torch.float32):
            x = (torch.randn(rows, cols, generator=g) * 3).to(DEVICE, dtype)
            scale = torch.tensor(448 / 12.0, device=DEVICE)
            slots = torch.zeros(3, device=DEVICE)
            for sums in (None, dtype):
                before = [x.clone()]
                _fill_free_memory()
                got = kernels.cast_transpose(x, scale, e4m3, slots[0:1], sums)
                _fill_free_memory()
                again = kernels.cast_transpose(x, scale, e4m3, slots[1:2], sums)
                want = reference.fp8_cast_transpose_reference(x, scale, e4m3, slots[2:3], sums)
                _report(f"cast_transpose {rows}x{cols} {str(dtype)[6:]} sums={sums is not None}", got, again, want,
                        [x], before)
                print(f"{'':42s} amax kernel {slots[0].item():.6g} twin {slots[2].item():.6g}", flush=True)
    for rows, hidden in [(100, 70), (128, 64), (64, 128), (256, 256), (8192, 4096)]:
        h = (torch.randn(rows, 2 * hidden, generator=g) * 3).to(DEVICE, torch.bfloat16)
        dg = torch.randn(rows, hidden, generator=g).to(DEVICE, torch.bfloat16)
        slots = torch.zeros(3, device=DEVICE)
        scale = torch.tensor(448 / 20.0, device=DEVICE)
        before = [h.clone()]
        _fill_free_memory()
        got = kernels.swiglu_cast(h, scale, e4m3, slots[0:1])
        _fill_free_memory()
        again = kernels.swiglu_cast(h, scale, e4m3, slots[1:2])
        want = reference.fp8_swiglu_cast_reference(h, scale, e4m3, slots[2:3])
        _report(f"swiglu_cast {rows}x{hidden}", got, again, want, [h], before)
        scale = torch.tensor(57344 / 40.0, device=DEVICE)
        before = [h.clone(), dg.clone()]
        _fill_free_memory()
        got = kernels.swiglu_backward_cast(h, dg, scale, e5m2, slots[0:1], torch.bfloat16)
        _fill_free_memory()
        again = kernels.swiglu_backward_cast(h, dg, scale, e5m2, slots[1:2], torch.bfloat16)
        want = reference.fp8_swiglu_backward_cast_reference(h, dg, scale, e5m2, slots[2:3], torch.bfloat16)
        _report(f"swiglu_backward_cast {rows}x{hidden}", got, again, want, [h, dg], before)


def probe_sums() -> None:
    from torch._inductor import config as inductor_config
    from torch._inductor import metrics
    from torch.profiler import ProfilerActivity, profile

    from sfd_scale.models.layers import Rope2D
    from sfd_scale.models.lightningdit import LightningDiTBlock
    from sfd_scale.parallel.engine import attach_bf16_weights

    # Inductor's default, without the fusion, and with fewer splits (a smaller final sum: the
    # default picks ~8 splits per SM, at least 16 rows each).
    settings = {"default": {}, "no mix-order": {"triton.mix_order_reduction": False},
                "split 64": {"triton.mix_order_reduction_split_size": 64},
                "split 128": {"triton.mix_order_reduction_split_size": 128}}
    for label, setting in settings.items():
        missing = [key for key in setting if not hasattr(inductor_config.triton, key.removeprefix("triton."))]
        if missing:  # an older torch
            print(f"{label}: this torch's inductor has no {', '.join(missing)}", flush=True)
            continue
        torch._dynamo.reset()
        metrics.reset()
        holder = nn.Module()
        holder.blocks = nn.ModuleList([LightningDiTBlock(1536, 24, 4.0, "sdpa")])  # XXL's block at batch 32
        holder.to(DEVICE)
        attach_bf16_weights(holder)
        block = holder.blocks[0]
        rope = Rope2D(64, 16).to(DEVICE)
        x = torch.randn(32, 256, 1536, device=DEVICE, requires_grad=True)
        c = torch.randn(32, 1536, device=DEVICE)
        block.compile()

        def step() -> None:
            for p in (x, *block.parameters()):
                p.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = block(x, c, rope)
            out.float().square().mean().backward()

        with inductor_config.patch(setting):
            step()
            step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True,
                         with_stack=True) as prof:
                step()
                torch.cuda.synchronize()
        events = prof.events()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        sums = [e for e in kernels if "reduce_kernel" in e.name and "sum_functor" in e.name]
        print(f"{label}: {metrics.codegen_mix_order_reduction} mix-order kernels compiled, "
              f"{len(sums)} ATen sum kernels ({sum(e.device_time for e in sums):.1f} us), all kernels "
              f"{sum(e.device_time for e in kernels):.1f} us in one block's step", flush=True)
        for event in events:
            if event.device_type == torch.autograd.DeviceType.CPU and event.name in ("aten::sum", "aten::sum_to_size"):
                chain, parent = [], event.cpu_parent
                while parent is not None and len(chain) < 5:
                    chain.append(parent.name)
                    parent = parent.cpu_parent
                print(f"    {event.name} {event.input_shapes} < {' < '.join(chain)}", flush=True)
        for e in sorted(kernels, key=lambda e: -e.device_time)[:12]:
            print(f"    {e.device_time:8.1f} us  {e.name[:110]}", flush=True)


if __name__ == "__main__":
    {"fp8": probe_fp8, "sums": probe_sums}[sys.argv[1]]()
