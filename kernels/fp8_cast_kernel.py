"""The Triton kernels behind `sfd_scale.kernels.fp8_cast` (which says why): one read of a matrix
writes its FP8 cast in both layouts, per-program amaxes and, optionally, per-program column sums;
a second, small kernel reduces those partials in a fixed order (no atomics, so results do not
depend on the order programs run in) and writes the amax into its history slot and the column
sums in the bias's dtype. Done in PyTorch, that was four small kernels a cast. Also a plain tiled
transpose of an FP8 matrix. Uses Triton builtins only: see the package docstring.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sfd_scale.kernels import triton_interpreting


class Tile(NamedTuple):
    """How a cast kernel's programs cover a matrix: blocks of `rows` x `cols`, `warps` a program,
    `row_blocks` blocks down a column strip per program (a loop whose amax and column sums
    accumulate in registers: fewer programs, reductions and partials), that loop software-pipelined
    over `stages` (Triton's num_stages; 1: not pipelined). launchers/bench_fp8_kernels.py compares
    tiles on a GPU."""

    rows: int
    cols: int
    warps: int
    row_blocks: int = 1
    stages: int = 1


CAST_TILE = Tile(64, 64, 4)
"""The cast-transpose's and the SwiGLU activation cast's programs."""
SWIGLU_BACKWARD_TILE = Tile(64, 32, 8)
"""The SwiGLU gradient kernel's programs: 64 x 64 with 4 warps held 201 registers a thread (sm_90
ptxas), so an SM ran 8 warps and the kernel moved ~1.9 TB/s on an H200; 64 x 32 with 8 warps
holds 80, and an SM runs 24 warps."""
DEFAULT_TILES = {"cast_transpose": CAST_TILE, "swiglu_cast": CAST_TILE, "swiglu_backward_cast": SWIGLU_BACKWARD_TILE}
"""Each cast kernel's tile when nothing says otherwise."""
TILES_ENV = "SFD_FP8_TILES"
"""Environment variable that overrides tiles, e.g. `swiglu_backward_cast=64x32x8x4x3,cast_transpose=64x64x8`
(rows x columns x warps[ x row blocks x stages], see `Tile`): how a GPU session runs a whole step on
the tiles `launchers/bench_fp8_kernels.py` found fastest before they become the defaults."""


def tile_name(tile: Tile) -> str:
    """The tile as `TILES_ENV` writes it: 64x32x8, or 64x32x8x4x3 where a program loops down the rows."""
    tile = Tile(*tile)
    return "x".join(map(str, tile if (tile.row_blocks, tile.stages) != (1, 1) else tile[:3]))


def parse_tiles(spec: str) -> dict[str, Tile]:
    """The tiles a `TILES_ENV` value names; ValueError naming the variable and the bad part."""
    tiles = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        op, _, sizes = part.partition("=")
        try:
            numbers = [int(n) for n in sizes.split("x")]
            tile = Tile(*numbers) if 3 <= len(numbers) <= 5 else None
        except ValueError:
            tile = None
        if op not in DEFAULT_TILES or tile is None or min(tile) < 1 or any(n & (n - 1) for n in tile[:3]):
            raise ValueError(f"{TILES_ENV}: {part!r} is not OP=ROWSxCOLSxWARPS[xROW_BLOCKSxSTAGES] with OP one of "
                             f"{', '.join(DEFAULT_TILES)} and powers of two for rows, columns and warps")
        tiles[op] = tile
    return tiles


def active_tiles() -> Mapping[str, Tile]:
    """Each cast kernel's tile: the defaults, overridden by `TILES_ENV` (read at each call, so a
    process that sets it before its first cast runs on it)."""
    return _tiles_for(os.environ.get(TILES_ENV, ""))


@functools.cache
def _tiles_for(spec: str) -> Mapping[str, Tile]:
    return MappingProxyType({**DEFAULT_TILES, **parse_tiles(spec)})
_FINISH_AMAX_BLOCK = 16384
"""Most amax partials the finishing kernel loads at once: all of them at XXL's sizes (<= 16,384)."""
_FINISH_SUM_ROWS = 128
_FINISH_SUM_COLS = 64
"""A finishing program's tile of column-sum partials: every row block at XXL's 8,192 tokens (128),
64 columns (256-byte rows)."""
_FINISH_WARPS = 8
_TRANSPOSE_BLOCK = 128
"""Rows and columns of a transposed tile: 128 bytes, a full memory transaction, each way."""


# Triton's own combine functions for tl.reduce. Compiled, they reduce as any would; Triton's
# interpreter recognises them and reduces with numpy, where a combine function of ours runs once per
# element (a 64 x 64 tile's amax: 4,096 interpreted calls, most of a CPU test's time).
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine


# No float min or max in a kernel that stores FP8. Triton miscompiled such kernels' FP8 stores on
# Hopper when they held a NaN-propagating one (PTX max.NaN.f32: triton-lang/triton#11111, and these
# kernels' CUDA tests, docs/benchmarks.md); only a compare and select is reported clean, and it
# doubled a cast's registers here. So the amax is an integer max over the magnitudes' bits, and the
# saturation is the conversion's own (PTX cvt.rn.satfinite: beyond the largest finite value, inf
# included, gives that value; NaN stays NaN), as the twins clamp.


@triton.jit
def _magnitude_bits(v):
    # |v| as int32 bits (sign bit cleared): non-negative floats order as their bits do and a NaN's
    # lie above inf's, so a max of these is an integer max (PTX max.s32), and NaN or inf makes the
    # amax non-finite, which the finishing kernel records as 0, as the twins do.
    return v.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _amax(largest_bits):
    # The float amax of a tile of magnitude bits.
    return tl.reduce(tl.reduce(largest_bits, 1, _MAX), 0, _MAX).to(tl.float32, bitcast=True)


@triton.jit
def _cast_transpose_kernel(x_ptr, scale_ptr, out_ptr, out_t_ptr, amax_part_ptr, colsum_part_ptr, rows, cols,
                           COLUMN_SUMS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                           ROW_BLOCKS: tl.constexpr, STAGES: tl.constexpr):
    # A program casts ROW_BLOCKS blocks down one column strip; its amax and column sums accumulate
    # elementwise and are reduced once, after the loop.
    row_group = tl.program_id(0)
    col_block = tl.program_id(1)
    c = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    scale = tl.load(scale_ptr)
    largest = tl.full([BLOCK_ROWS, BLOCK_COLS], 0, tl.int32)
    total = tl.full([BLOCK_ROWS, BLOCK_COLS], 0.0, tl.float32)
    for i in tl.range(0, ROW_BLOCKS, num_stages=STAGES):
        r = (row_group * ROW_BLOCKS + i) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        mask = (r[:, None] < rows) & (c[None, :] < cols)
        x = tl.load(x_ptr + r[:, None] * cols + c[None, :], mask=mask, other=0.0).to(tl.float32)
        y = (x * scale).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + r[:, None] * cols + c[None, :], y, mask=mask)
        # The transposed store: Triton stages the tile through shared memory so each row of out_t
        # is written contiguously.
        tl.store(out_t_ptr + c[None, :] * rows + r[:, None], y, mask=mask)
        largest = tl.maximum(largest, _magnitude_bits(x))
        if COLUMN_SUMS:
            total += x
    tl.store(amax_part_ptr + row_group * tl.num_programs(1) + col_block, _amax(largest))
    if COLUMN_SUMS:
        tl.store(colsum_part_ptr + row_group * cols + c, tl.reduce(total, 0, _SUM), mask=c < cols)


@triton.jit
def _swiglu_cast_kernel(h_ptr, scale_ptr, out_ptr, out_t_ptr, amax_part_ptr, rows, hidden,
                        BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, ROW_BLOCKS: tl.constexpr,
                        STAGES: tl.constexpr):
    # silu(gate) * value of h = [gate | value] in float32, cast like `_cast_transpose_kernel` casts
    # a given matrix (the activation itself is never written in h's dtype).
    row_group = tl.program_id(0)
    col_block = tl.program_id(1)
    c = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    scale = tl.load(scale_ptr)
    largest = tl.full([BLOCK_ROWS, BLOCK_COLS], 0, tl.int32)
    for i in tl.range(0, ROW_BLOCKS, num_stages=STAGES):
        r = (row_group * ROW_BLOCKS + i) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        mask = (r[:, None] < rows) & (c[None, :] < hidden)
        gate = tl.load(h_ptr + r[:, None] * 2 * hidden + c[None, :], mask=mask, other=0.0).to(tl.float32)
        value = tl.load(h_ptr + r[:, None] * 2 * hidden + hidden + c[None, :], mask=mask, other=0.0).to(tl.float32)
        a = gate / (1.0 + tl.exp(-gate)) * value
        y = (a * scale).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + r[:, None] * hidden + c[None, :], y, mask=mask)
        tl.store(out_t_ptr + c[None, :] * rows + r[:, None], y, mask=mask)
        largest = tl.maximum(largest, _magnitude_bits(a))
    tl.store(amax_part_ptr + row_group * tl.num_programs(1) + col_block, _amax(largest))


@triton.jit
def _swiglu_backward_cast_kernel(h_ptr, dg_ptr, scale_ptr, out_ptr, out_t_ptr, amax_part_ptr, colsum_part_ptr, rows,
                                 hidden, COLUMN_SUMS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                                 BLOCK_COLS: tl.constexpr, ROW_BLOCKS: tl.constexpr, STAGES: tl.constexpr):
    # The gradient of w12's output h = [gate | value] from the SwiGLU's output gradient dg, cast
    # like `_cast_transpose_kernel` casts a given matrix: the tile's gate and value columns at once.
    row_group = tl.program_id(0)
    col_block = tl.program_id(1)
    c = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    width = 2 * hidden
    scale = tl.load(scale_ptr)
    largest = tl.full([BLOCK_ROWS, BLOCK_COLS], 0, tl.int32)
    total_gate = tl.full([BLOCK_ROWS, BLOCK_COLS], 0.0, tl.float32)
    total_value = tl.full([BLOCK_ROWS, BLOCK_COLS], 0.0, tl.float32)
    for i in tl.range(0, ROW_BLOCKS, num_stages=STAGES):
        r = (row_group * ROW_BLOCKS + i) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        mask = (r[:, None] < rows) & (c[None, :] < hidden)
        gate = tl.load(h_ptr + r[:, None] * width + c[None, :], mask=mask, other=0.0).to(tl.float32)
        value = tl.load(h_ptr + r[:, None] * width + hidden + c[None, :], mask=mask, other=0.0).to(tl.float32)
        dg = tl.load(dg_ptr + r[:, None] * hidden + c[None, :], mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-gate))
        d_gate = dg * value * sig * (1.0 + gate * (1.0 - sig))  # d silu(g)/dg = sig * (1 + g * (1 - sig))
        d_value = dg * gate * sig
        cast_gate = (d_gate * scale).to(out_ptr.dtype.element_ty)
        cast_value = (d_value * scale).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + r[:, None] * width + c[None, :], cast_gate, mask=mask)
        tl.store(out_ptr + r[:, None] * width + hidden + c[None, :], cast_value, mask=mask)
        tl.store(out_t_ptr + c[None, :] * rows + r[:, None], cast_gate, mask=mask)
        tl.store(out_t_ptr + (hidden + c[None, :]) * rows + r[:, None], cast_value, mask=mask)
        largest = tl.maximum(largest, tl.maximum(_magnitude_bits(d_gate), _magnitude_bits(d_value)))
        if COLUMN_SUMS:
            total_gate += d_gate
            total_value += d_value
    tl.store(amax_part_ptr + row_group * tl.num_programs(1) + col_block, _amax(largest))
    if COLUMN_SUMS:
        tl.store(colsum_part_ptr + row_group * width + c, tl.reduce(total_gate, 0, _SUM), mask=c < hidden)
        tl.store(colsum_part_ptr + row_group * width + hidden + c, tl.reduce(total_value, 0, _SUM), mask=c < hidden)


@triton.jit
def _transpose_kernel(x_ptr, out_ptr, rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    # Bytes in, bytes out (an FP8 matrix viewed as uint8): a tile read along rows, written along
    # columns, staged through shared memory like the cast kernel's transposed store.
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    c = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    tile = tl.load(x_ptr + r[:, None] * cols + c[None, :], mask=mask)
    tl.store(out_ptr + c[None, :] * rows + r[:, None], tile, mask=mask)


@triton.jit
def _finish_kernel(amax_part_ptr, parts, amax_out_ptr, colsum_part_ptr, sums_ptr, row_blocks, cols,
                   COLUMN_SUMS: tl.constexpr, AMAX_BLOCK: tl.constexpr, SUM_ROWS: tl.constexpr,
                   SUM_COLS: tl.constexpr):
    # Each loop loads a whole tile, and at XXL's sizes runs once: a loop over small tiles waits for
    # one load per iteration (256 partials, then 8 row blocks at a time, left each call 9-14 us on
    # an H100 or H200, 216 calls a step).
    program = tl.program_id(0)
    if program == 0:
        offsets = tl.arange(0, AMAX_BLOCK)
        largest = tl.full([AMAX_BLOCK], 0, tl.int32)
        for start in range(0, parts, AMAX_BLOCK):
            part = tl.load(amax_part_ptr + start + offsets, mask=start + offsets < parts, other=0.0)
            largest = tl.maximum(largest, part.to(tl.int32, bitcast=True))  # magnitudes: see _magnitude_bits
        amax = tl.reduce(largest, 0, _MAX).to(tl.float32, bitcast=True)
        tl.store(amax_out_ptr, tl.where(amax < float("inf"), amax, 0.0))  # NaN and inf fail the test
    if COLUMN_SUMS:
        c = program * SUM_COLS + tl.arange(0, SUM_COLS)
        rows = tl.arange(0, SUM_ROWS)
        total = tl.full([SUM_COLS], 0.0, tl.float32)
        for start in range(0, row_blocks, SUM_ROWS):
            r = start + rows
            tile = tl.load(colsum_part_ptr + r[:, None] * cols + c[None, :],
                           mask=(r[:, None] < row_blocks) & (c[None, :] < cols), other=0.0)
            total += tl.reduce(tile, 0, _SUM)
        tl.store(sums_ptr + c, total.to(sums_ptr.dtype.element_ty), mask=c < cols)


def cast_transpose(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, amax_out: torch.Tensor,
                   sums_dtype: torch.dtype | None, tile: Tile | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sfd_scale.kernels.fp8_cast.fp8_cast_transpose` on a contiguous matrix, by the kernels, on
    `tile` (default: `active_tiles()`; launchers/bench_fp8_kernels.py compares others)."""
    rows, cols = x.shape
    tile = tile or active_tiles()["cast_transpose"]
    return _launch(rows, cols, cols, fp8_dtype, amax_out, sums_dtype, x.device, tile,
                   lambda grid, out, out_t, amax_part, colsum_part, **meta: _cast_transpose_kernel[grid](
                       x, scale, out, out_t, amax_part, colsum_part, rows, cols,
                       COLUMN_SUMS=sums_dtype is not None, **meta))


def swiglu_cast(h: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, amax_out: torch.Tensor,
                tile: Tile | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`sfd_scale.kernels.fp8_cast.fp8_swiglu_cast` on a contiguous matrix, by the kernels."""
    rows, hidden = h.shape[0], h.shape[1] // 2
    tile = tile or active_tiles()["swiglu_cast"]
    cast, cast_t, _ = _launch(rows, hidden, hidden, fp8_dtype, amax_out, None, h.device, tile,
                              lambda grid, out, out_t, amax_part, colsum_part, **meta: _swiglu_cast_kernel[
                                  grid](h, scale, out, out_t, amax_part, rows, hidden, **meta))
    return cast, cast_t


def swiglu_backward_cast(h: torch.Tensor, dg: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype,
                         amax_out: torch.Tensor, sums_dtype: torch.dtype | None, tile: Tile | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sfd_scale.kernels.fp8_cast.fp8_swiglu_backward_cast` on contiguous matrices, by the kernels."""
    rows, hidden = dg.shape
    tile = tile or active_tiles()["swiglu_backward_cast"]
    return _launch(rows, 2 * hidden, hidden, fp8_dtype, amax_out, sums_dtype, h.device, tile,
                   lambda grid, out, out_t, amax_part, colsum_part, **meta: _swiglu_backward_cast_kernel[grid](
                       h, dg, scale, out, out_t, amax_part, colsum_part, rows, hidden,
                       COLUMN_SUMS=sums_dtype is not None, **meta))


def transpose(x8: torch.Tensor) -> torch.Tensor:
    """`sfd_scale.kernels.fp8_cast.fp8_transpose` on a contiguous matrix, by the kernel."""
    rows, cols = x8.shape
    _check_offsets(rows, cols)
    out = torch.empty((cols, rows), dtype=x8.dtype, device=x8.device)
    grid = (triton.cdiv(rows, _TRANSPOSE_BLOCK), triton.cdiv(cols, _TRANSPOSE_BLOCK))
    _transpose_kernel[grid](x8.view(torch.uint8), out.view(torch.uint8), rows, cols,
                            BLOCK_ROWS=_TRANSPOSE_BLOCK, BLOCK_COLS=_TRANSPOSE_BLOCK)
    return out


def _finish_tiles(parts: int, row_blocks: int) -> dict[str, int]:
    """The finishing kernel's tile sizes for `parts` amax partials and `row_blocks` rows of column
    sums: as many as fit in one load, up to the caps (a power of two each, as Triton's blocks are)."""
    return dict(AMAX_BLOCK=min(triton.next_power_of_2(parts), _FINISH_AMAX_BLOCK),
                SUM_ROWS=min(triton.next_power_of_2(row_blocks), _FINISH_SUM_ROWS), SUM_COLS=_FINISH_SUM_COLS)


def _check_offsets(rows: int, cols: int) -> None:
    if rows * cols >= 2 ** 31:  # the kernels' offsets are 32-bit
        raise ValueError(f"fp8 kernels: a {rows} x {cols} matrix is too large (< 2**31 elements)")


def _launch(rows: int, cols: int, tiled_cols: int, fp8_dtype: torch.dtype, amax_out: torch.Tensor,
            sums_dtype: torch.dtype | None, device: torch.device, tile: Tile, cast_kernel: Callable[..., object]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Allocate a (rows, cols) cast, run `cast_kernel` over `tile`'s programs on `tiled_cols`
    columns (given the tile's launch settings as keywords), then the finishing reduction; returns
    (cast, cast transposed, column sums)."""
    _check_offsets(rows, cols)
    tile = Tile(*tile)
    # Triton's interpreter rounds to FP8 wrongly (-7.875 -> -4.0 in e5m2) and does not saturate:
    # interpreted, the kernel stores the float32 values it would convert, and torch saturates and
    # rounds them as a GPU's conversion does in the kernel.
    interpreted = triton_interpreting()
    stored = torch.float32 if interpreted else fp8_dtype
    out = torch.empty((rows, cols), dtype=stored, device=device)
    out_t = torch.empty((cols, rows), dtype=stored, device=device)
    grid = (triton.cdiv(rows, tile.rows * tile.row_blocks), triton.cdiv(tiled_cols, tile.cols))
    column_sums = sums_dtype is not None
    amax_part = torch.empty(grid, dtype=torch.float32, device=device)
    colsum_part = torch.empty((grid[0], cols) if column_sums else (0,), dtype=torch.float32, device=device)
    cast_kernel(grid, out, out_t, amax_part, colsum_part, BLOCK_ROWS=tile.rows, BLOCK_COLS=tile.cols,
                ROW_BLOCKS=tile.row_blocks, STAGES=tile.stages, num_warps=tile.warps)
    sums = torch.empty((cols,) if column_sums else (0,), dtype=sums_dtype or torch.float32, device=device)
    finish_grid = (triton.cdiv(cols, _FINISH_SUM_COLS) if column_sums else 1,)
    _finish_kernel[finish_grid](amax_part, amax_part.numel(), amax_out, colsum_part, sums, grid[0], cols,
                                COLUMN_SUMS=column_sums, **_finish_tiles(amax_part.numel(), grid[0]),
                                num_warps=_FINISH_WARPS)
    if interpreted:
        fp8_max = torch.finfo(fp8_dtype).max
        out, out_t = out.clamp_(-fp8_max, fp8_max).to(fp8_dtype), out_t.clamp_(-fp8_max, fp8_max).to(fp8_dtype)
    return out, out_t, sums
