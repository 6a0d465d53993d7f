"""FP8 cast-transpose: one read of a matrix writes its FP8 cast in both layouts, the largest
absolute value, and optionally its column sums.

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

from sfd_scale.kernels import triton_interpreting
from sfd_scale.kernels.reference import fp8_cast_transpose_reference


@torch.library.custom_op("sfd_scale::fp8_cast_transpose", mutates_args=())
def _cast_transpose_op(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, column_sums: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.device.type == "cpu" and not triton_interpreting():
        return fp8_cast_transpose_reference(x, scale, fp8_dtype, column_sums)
    from sfd_scale.kernels.fp8_cast_kernel import cast_transpose

    return cast_transpose(x, scale, fp8_dtype, column_sums)


@_cast_transpose_op.register_fake
def _(x, scale, fp8_dtype, column_sums):
    rows, cols = x.shape
    return (x.new_empty((rows, cols), dtype=fp8_dtype), x.new_empty((cols, rows), dtype=fp8_dtype),
            x.new_empty((), dtype=torch.float32), x.new_empty((cols,) if column_sums else (0,), dtype=torch.float32))


def fp8_cast_transpose(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, column_sums: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (rows, cols) -> (x * scale saturated to `fp8_dtype`, the same transposed and contiguous,
    amax(|x|) in float32, x's float32 column sums or an empty tensor); `scale` a float32 scalar
    tensor. A custom op: torch.compile keeps it whole in the graph."""
    if x.dim() != 2 or scale.numel() != 1:
        raise ValueError(f"fp8_cast_transpose takes a matrix and a one-element scale, got shapes "
                         f"{tuple(x.shape)} and {tuple(scale.shape)}")
    return _cast_transpose_op(x.contiguous(), scale.float().reshape(()), fp8_dtype, column_sums)
