"""FP8 cast-transpose: one read of a matrix writes its FP8 cast in both layouts, the largest
absolute value (into a slot of an amax history), and optionally its column sums.

Why: the backward of an FP8 linear needs the output gradient dy in FP8 row by row (for the input
gradient's matmul) and column by column (for the weight gradient's: Hopper's FP8 matmuls take both
operands contracted along contiguous memory), its amax (for the next steps' scale) and, with a
bias, its column sums (the bias gradient). Inductor emits those as three or four kernels that each
read dy again; the kernel reads it once (`docs/benchmarks.md`, "Kernel plans without a GPU").

The op is defined here without Triton. It runs the kernel (`fp8_cast_kernel`, imported on first
use) on CUDA tensors, and on the CPU under Triton's interpreter; elsewhere on the CPU it computes
with the plain-PyTorch twin, `sfd_scale.kernels.reference.fp8_cast_transpose_reference`.
"""
from __future__ import annotations

import torch

from sfd_scale.kernels import triton_installed, triton_interpreting
from sfd_scale.kernels.reference import (fp8_cast_transpose_reference, fp8_swiglu_backward_cast_reference,
                                        fp8_swiglu_cast_reference, transpose_reference)


def _twin_runs(t: torch.Tensor) -> bool:
    """Whether the ops compute with their PyTorch twins: where Triton cannot run their kernels
    (not installed, or off CUDA outside its interpreter), as `fast_paths` decides for the others."""
    return not triton_installed() or (t.device.type != "cuda" and not triton_interpreting())


def _check_amax_out(amax_out: torch.Tensor) -> None:
    if amax_out.numel() != 1 or amax_out.dtype != torch.float32:
        raise ValueError(f"an FP8 cast writes its amax into a one-element float32 tensor, got "
                         f"{amax_out.dtype} of shape {tuple(amax_out.shape)}")


@torch.library.custom_op("sfd_scale::fp8_cast_transpose", mutates_args=("amax_out",))
def _cast_transpose_op(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, amax_out: torch.Tensor,
                       sums_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _twin_runs(x):
        return fp8_cast_transpose_reference(x, scale, fp8_dtype, amax_out, sums_dtype)
    from sfd_scale.kernels.fp8_cast_kernel import cast_transpose

    return cast_transpose(x, scale, fp8_dtype, amax_out, sums_dtype)


def _outputs_like(x: torch.Tensor, fp8_dtype: torch.dtype, sums_dtype: torch.dtype | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty outputs of an FP8 cast of a matrix shaped like `x` (what the fake kernels return)."""
    rows, cols = x.shape
    return (x.new_empty((rows, cols), dtype=fp8_dtype), x.new_empty((cols, rows), dtype=fp8_dtype),
            x.new_empty((cols,), dtype=sums_dtype) if sums_dtype is not None else x.new_empty((0,), dtype=torch.float32))


@_cast_transpose_op.register_fake
def _(x, scale, fp8_dtype, amax_out, sums_dtype):
    return _outputs_like(x, fp8_dtype, sums_dtype)


def fp8_cast_transpose(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, amax_out: torch.Tensor,
                       sums_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (rows, cols) -> (x * scale saturated to `fp8_dtype`, the same transposed and contiguous,
    x's column sums accumulated in float32 and returned in `sums_dtype`, or an empty tensor for
    None); amax(|x|) is written in float32 into the one-element `amax_out` (0 where it is not
    finite): a slot of an amax history, with no kernel of its own. `scale` a one-element float32
    tensor. A custom op: torch.compile keeps it whole in the graph."""
    if x.dim() != 2 or scale.numel() != 1:
        raise ValueError(f"fp8_cast_transpose takes a matrix and a one-element scale, got shapes "
                         f"{tuple(x.shape)} and {tuple(scale.shape)}")
    _check_amax_out(amax_out)
    return _cast_transpose_op(x.contiguous(), scale.float().reshape(()), fp8_dtype, amax_out, sums_dtype)


@torch.library.custom_op("sfd_scale::fp8_swiglu_cast", mutates_args=("amax_out",))
def _swiglu_cast_op(h: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, amax_out: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    if _twin_runs(h):
        return fp8_swiglu_cast_reference(h, scale, fp8_dtype, amax_out)
    from sfd_scale.kernels.fp8_cast_kernel import swiglu_cast

    return swiglu_cast(h, scale, fp8_dtype, amax_out)


@_swiglu_cast_op.register_fake
def _(h, scale, fp8_dtype, amax_out):
    return _outputs_like(h[:, : h.shape[1] // 2], fp8_dtype, None)[:2]


def fp8_swiglu_cast(h: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, amax_out: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp8_cast_transpose` of silu(gate) * value for h (rows, 2H) = [gate, value], without column
    sums: the SwiGLU and the cast of its output for the next FP8 matmul in one read of h, both
    layouts written in the forward (so the backward need not recompute the activation from h for
    the weight gradient)."""
    if h.dim() != 2 or h.shape[1] % 2:
        raise ValueError(f"fp8_swiglu_cast takes h (rows, 2H), got shape {tuple(h.shape)}")
    _check_amax_out(amax_out)
    return _swiglu_cast_op(h.contiguous(), scale.float().reshape(()), fp8_dtype, amax_out)


@torch.library.custom_op("sfd_scale::fp8_swiglu_backward_cast", mutates_args=("amax_out",))
def _swiglu_backward_cast_op(h: torch.Tensor, dg: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype,
                             amax_out: torch.Tensor, sums_dtype: torch.dtype | None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _twin_runs(h):
        return fp8_swiglu_backward_cast_reference(h, dg, scale, fp8_dtype, amax_out, sums_dtype)
    from sfd_scale.kernels.fp8_cast_kernel import swiglu_backward_cast

    return swiglu_backward_cast(h, dg, scale, fp8_dtype, amax_out, sums_dtype)


@_swiglu_backward_cast_op.register_fake
def _(h, dg, scale, fp8_dtype, amax_out, sums_dtype):
    return _outputs_like(h, fp8_dtype, sums_dtype)


def fp8_swiglu_backward_cast(h: torch.Tensor, dg: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype,
                             amax_out: torch.Tensor, sums_dtype: torch.dtype | None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fp8_cast_transpose` of the gradient of h (rows, 2H) = [gate, value] through the SwiGLU
    silu(gate) * value, given its output's gradient dg (rows, H): the backward of the SwiGLU and the
    cast of its result in one read of h and dg, with the gradient never written in h's dtype (one
    write and one read of a rows x 2H matrix fewer than the two separately)."""
    if h.dim() != 2 or dg.shape != (h.shape[0], h.shape[1] // 2) or h.shape[1] % 2:
        raise ValueError(f"fp8_swiglu_backward_cast takes h (rows, 2H) and dg (rows, H), got shapes "
                         f"{tuple(h.shape)} and {tuple(dg.shape)}")
    _check_amax_out(amax_out)
    return _swiglu_backward_cast_op(h.contiguous(), dg.contiguous(), scale.float().reshape(()), fp8_dtype, amax_out,
                                    sums_dtype)


@torch.library.custom_op("sfd_scale::fp8_transpose", mutates_args=())
def _transpose_op(x8: torch.Tensor) -> torch.Tensor:
    if _twin_runs(x8):
        return transpose_reference(x8)
    from sfd_scale.kernels.fp8_cast_kernel import transpose

    return transpose(x8)


@_transpose_op.register_fake
def _(x8):
    return x8.new_empty((x8.shape[1], x8.shape[0]))


def fp8_transpose(x8: torch.Tensor) -> torch.Tensor:
    """x8 (rows, cols), an FP8 matrix -> the same transposed and contiguous (cols, rows), bit for
    bit: what an FP8 weight-gradient matmul takes of the layer's input, saved row by row by the
    forward. An op of its own because torch.compile, left to itself, fused this copy into an
    unrelated reduction kernel of the backward, whose transposed accesses then ran at a third of
    the copy rate (the H200 profile of 2026-11-27, docs/benchmarks.md)."""
    if x8.dim() != 2 or x8.element_size() != 1:
        raise ValueError(f"fp8_transpose takes a matrix of one-byte elements, got {x8.dtype} of shape {tuple(x8.shape)}")
    return _transpose_op(x8.contiguous())
