"""The Triton kernel behind `sfd_scale.kernels.fp8_cast` (which says why): one read of a matrix
writes its FP8 cast in both layouts, per-program amaxes and, optionally, per-program column sums.

Partial amaxes and column sums are reduced in PyTorch afterwards: no atomics, so results do not
depend on the order programs run in. Uses Triton builtins only: see the package docstring.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sfd_scale.kernels import triton_interpreting

_BLOCK_ROWS = 64
_BLOCK_COLS = 64


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _cast_transpose_kernel(x_ptr, scale_ptr, out_ptr, out_t_ptr, amax_part_ptr, colsum_part_ptr, rows, cols,
                           fp8_max, COLUMN_SUMS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    row_block = tl.program_id(0)
    col_block = tl.program_id(1)
    r = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    c = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    x = tl.load(x_ptr + r[:, None] * cols + c[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.minimum(tl.maximum(x * tl.load(scale_ptr), -fp8_max), fp8_max).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + r[:, None] * cols + c[None, :], y, mask=mask)
    # The transposed store: Triton stages the tile through shared memory so each row of out_t is
    # written contiguously.
    tl.store(out_t_ptr + c[None, :] * rows + r[:, None], y, mask=mask)
    tile_amax = tl.reduce(tl.reduce(tl.abs(x), 1, _max), 0, _max)
    tl.store(amax_part_ptr + row_block * tl.num_programs(1) + col_block, tile_amax)
    if COLUMN_SUMS:
        tl.store(colsum_part_ptr + row_block * cols + c, tl.reduce(x, 0, _add), mask=c < cols)


def cast_transpose(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, column_sums: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sfd_scale.kernels.fp8_cast.fp8_cast_transpose` on a contiguous matrix, by the kernel."""
    rows, cols = x.shape
    if rows * cols >= 2 ** 31:  # the kernel's offsets are 32-bit
        raise ValueError(f"fp8_cast_transpose: a {rows} x {cols} matrix is too large for the kernel (< 2**31 elements)")
    # Triton's interpreter rounds to FP8 wrongly (-7.875 -> -4.0 in e5m2): interpreted, the kernel
    # stores the float32 values it would round, and torch rounds them (a GPU rounds in the kernel).
    stored = torch.float32 if triton_interpreting() else fp8_dtype
    out = torch.empty((rows, cols), dtype=stored, device=x.device)
    out_t = torch.empty((cols, rows), dtype=stored, device=x.device)
    grid = (triton.cdiv(rows, _BLOCK_ROWS), triton.cdiv(cols, _BLOCK_COLS))
    amax_part = torch.empty(grid, dtype=torch.float32, device=x.device)
    colsum_part = torch.empty((grid[0], cols) if column_sums else (0,), dtype=torch.float32, device=x.device)
    _cast_transpose_kernel[grid](x, scale, out, out_t, amax_part, colsum_part, rows, cols,
                                 torch.finfo(fp8_dtype).max, COLUMN_SUMS=column_sums,
                                 BLOCK_ROWS=_BLOCK_ROWS, BLOCK_COLS=_BLOCK_COLS)
    column_total = colsum_part.sum(0) if column_sums else colsum_part
    return out.to(fp8_dtype), out_t.to(fp8_dtype), amax_part.amax(), column_total
