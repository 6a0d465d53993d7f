"""A start-up check of the FP8 cast kernels against their PyTorch twins, on the device that will
run them, before a model trains with them.

Why: Triton compiles a kernel per device, dtype and size class, and a miscompile can corrupt some
of those binaries and spare others. On an H100 (2026-11-27) the kernels then wrote wrong FP8 bytes
and a training step went NaN, while the CPU's interpreter ran them correctly
(docs/benchmarks.md, sessions 10 and 11). Triton specialises a size by whether it is divisible by
16, and every FP8 layer's sizes are (`fast_paths._fp8_eligible`, tokens in multiples of 16): so
the cast kernels checked here at small such sizes are the very binaries a training step launches
at any model size, run in milliseconds. (The small reduction that finishes each cast compiles per
size; it writes no FP8 and is checked here at these sizes.)
"""
from __future__ import annotations

import torch

from sfd_scale.kernels import fp8_cast, reference

ROWS, COLS, HIDDEN = 128, 128, 64
"""Check sizes: divisible by 16, as every FP8 layer's are, and more than one tile each way."""
INPUT_DTYPES = (torch.bfloat16, torch.float32)
"""What a step casts: activations and gradients under bf16 autocast, fp32 weights (bf16 copies
with optim.bf16_weights), fp32 activations without autocast."""
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def fp8_kernel_failures(device: torch.device) -> list[str]:
    """Each way the FP8 ops (`sfd_scale.kernels.fp8_cast`) running their kernels on `device`
    disagree with their PyTorch twins, one line each; empty when they agree. The casts and
    transposes must match bit for bit; the SwiGLU casts, whose exp may differ from torch's in the
    last bit, in all but 1 % of their bytes and by one FP8 step at most."""
    g = torch.Generator().manual_seed(0)
    failures = []
    for dtype in INPUT_DTYPES:
        x = (torch.randn(ROWS, COLS, generator=g) * 3).to(device, dtype)
        x[1, 2], x[-1, -1] = 1e4, -1e4  # beyond FP8's range once scaled: saturate
        h = (torch.randn(ROWS, 2 * HIDDEN, generator=g) * 3).to(device, dtype)
        dg = torch.randn(ROWS, HIDDEN, generator=g).to(device, dtype)
        name = str(dtype).removeprefix("torch.")
        for fp8, sums in dict.fromkeys(((E4M3, None), (E5M2, dtype), (E5M2, torch.float32))):  # sums: a bias's dtype
            scale = _scale(fp8, 2e3, device)
            failures += _compare(f"fp8_cast_transpose({name} {ROWS}x{COLS} -> {fp8}, sums {sums})", 0.0, device,
                                 lambda slot: fp8_cast.fp8_cast_transpose(x, scale, fp8, slot, sums),
                                 lambda slot: reference.fp8_cast_transpose_reference(x, scale, fp8, slot, sums))
            failures += _compare(f"fp8_swiglu_backward_cast({name} {ROWS}x{2 * HIDDEN} -> {fp8}, sums {sums})", 0.01,
                                 device,
                                 lambda slot: fp8_cast.fp8_swiglu_backward_cast(h, dg, scale, fp8, slot, sums),
                                 lambda slot: reference.fp8_swiglu_backward_cast_reference(h, dg, scale, fp8, slot,
                                                                                           sums))
        scale = _scale(E4M3, 20.0, device)
        failures += _compare(f"fp8_swiglu_cast({name} {ROWS}x{2 * HIDDEN} -> {E4M3})", 0.01, device,
                             lambda slot: fp8_cast.fp8_swiglu_cast(h, scale, E4M3, slot),
                             lambda slot: reference.fp8_swiglu_cast_reference(h, scale, E4M3, slot))
    x8 = torch.arange(ROWS * COLS, dtype=torch.int32).remainder(256).to(torch.uint8).view(ROWS, COLS).to(device)
    what = f"fp8_transpose({ROWS}x{COLS})"
    try:
        if not torch.equal(fp8_cast.fp8_transpose(x8.view(E4M3)).view(torch.uint8), x8.t()):
            failures.append(f"{what}: bytes differ from the transposed matrix's")
    except Exception as error:  # noqa: BLE001 - a kernel that fails to compile or launch fails the check
        failures.append(_raised(what, error))
    return failures


def _raised(what: str, error: Exception) -> str:
    return f"{what}: raised {type(error).__name__}: {str(error)[:200]}"


def _scale(fp8: torch.dtype, largest: float, device: torch.device) -> torch.Tensor:
    """The scale that maps `largest` onto `fp8`'s largest finite value."""
    return torch.tensor(torch.finfo(fp8).max / largest, device=device)


def _compare(what: str, allowed: float, device: torch.device, kernel, twin) -> list[str]:
    """Run `kernel` and `twin` (each given its amax slot) and say how they differ: FP8 outputs
    (uint8 views) in more than the `allowed` share of bytes or by more than one step, the amax, the
    column sums."""
    slots = torch.full((2,), -1.0, device=device)
    want = twin(slots[1:2])
    try:
        got = kernel(slots[0:1])
    except Exception as error:  # noqa: BLE001 - a kernel that fails to compile or launch fails the check
        return [_raised(what, error)]
    problems = []
    for label, k, r in zip(("cast", "transposed"), got[:2], want[:2]):
        kb, rb = k.view(torch.uint8).cpu(), r.view(torch.uint8).cpu()
        differ = (kb != rb).float().mean().item()
        steps = (kb.int() - rb.int()).abs().max().item()
        if differ > allowed or (differ and steps > 1):
            problems.append(f"{label}: {differ:.1%} of the bytes differ (allowed {allowed:.0%}), by up to {steps}")
    if not torch.allclose(slots[0], slots[1], rtol=1e-5, atol=0.0):
        problems.append(f"amax {slots[0].item():.6g}, twin {slots[1].item():.6g}")
    if len(got) > 2 and not (got[2].dtype == want[2].dtype and torch.allclose(
            got[2].float().cpu(), want[2].float().cpu(), rtol=1e-2 if got[2].dtype == torch.bfloat16 else 1e-5,
            atol=1e-2)):
        problems.append("column sums differ")
    return [f"{what}: {'; '.join(problems)}"] if problems else []
