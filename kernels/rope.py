"""2-D rotary embedding on interleaved pairs, forward and backward in one pass each.

Unfused, `Rope2D` builds the rotated copy of x (a stack and a flatten) and does two multiplies and
an add over (B, heads, N, head_dim); fused it reads x and the (N, head_dim) tables once and writes
the result once. The backward is the inverse rotation: the same kernel with the sine terms
transposed and negated.

Plain-PyTorch twin: `sfd_scale.kernels.reference.rope_reference`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_ROWS = 32
"""Rows (one token of one head of one sample) per program."""


@triton.jit
def _rotate_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, rows, tokens, head_dim,
                   INVERSE: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # Whole rows are loaded and stored contiguously, then split into even/odd channels in
    # registers: loads of every other element (the first version) reached only ~0.6 TB/s.
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]        # (ROWS, 1)
    col = tl.arange(0, BLOCK_D)[None, :]                                # (1, BLOCK_D)
    mask = (row < rows) & (col < head_dim)
    offset = row * head_dim + col
    table = (row % tokens) * head_dim + col
    x_even, x_odd = _pairs(tl.load(x_ptr + offset, mask=mask, other=0.0), ROWS, BLOCK_D)
    cos_even, cos_odd = _pairs(tl.load(cos_ptr + table, mask=mask, other=0.0), ROWS, BLOCK_D)
    sin_even, sin_odd = _pairs(tl.load(sin_ptr + table, mask=mask, other=0.0), ROWS, BLOCK_D)
    if INVERSE:
        # Transposed rotation: dx_e = dy_e c_e + dy_o s_o, dx_o = dy_o c_o - dy_e s_e.
        sin_even, sin_odd = -sin_odd, -sin_even
    out_even = x_even * cos_even - x_odd * sin_even
    out_odd = x_odd * cos_odd + x_even * sin_odd
    out = tl.reshape(tl.join(out_even, out_odd), (ROWS, BLOCK_D))
    tl.store(out_ptr + offset, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pairs(t, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """(ROWS, BLOCK_D) -> its even and odd columns, each (ROWS, BLOCK_D // 2), in float32."""
    return tl.split(tl.reshape(t.to(tl.float32), (ROWS, BLOCK_D // 2, 2)))


@torch.library.custom_op("sfd_scale::rope_rotate", mutates_args=())
def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype,
            inverse: bool) -> torch.Tensor:
    head_dim, tokens = x.shape[-1], x.shape[-2]
    rows = x.numel() // head_dim
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    _rotate_kernel[(triton.cdiv(rows, _ROWS),)](x, cos, sin, out, rows, tokens, head_dim, INVERSE=inverse,
                                                ROWS=_ROWS, BLOCK_D=triton.next_power_of_2(head_dim))
    return out


@_rotate.register_fake
def _(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype, inverse: bool) -> torch.Tensor:
    return torch.empty(x.shape, dtype=out_dtype, device=x.device)


def _save_tables(ctx, inputs, output) -> None:
    x, cos, sin, _, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.x_dtype, ctx.inverse = x.dtype, inverse


def _rotate_backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    # The gradient of a rotation is the opposite rotation.
    return _rotate(dy.contiguous(), cos, sin, ctx.x_dtype, not ctx.inverse), None, None, None, None


# A custom op, not a bare autograd.Function: torch.compile keeps it whole in the graph.
_rotate.register_autograd(_rotate_backward, setup_context=_save_tables)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rotate x (B, heads, N, head_dim) by `Rope2D`'s (N, head_dim) tables (no gradient to them).

    `out_dtype` defaults to PyTorch's promotion of x and the tables, as the unfused expression.
    """
    if x.dim() != 4 or x.shape[-1] % 2 or cos.shape != x.shape[-2:] or sin.shape != cos.shape:
        raise ValueError(f"rope: expected x (B, heads, N, head_dim) with even head_dim and tables (N, "
                         f"head_dim); got {tuple(x.shape)}, {tuple(cos.shape)}, {tuple(sin.shape)}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rope: the fused kernel gives no gradient to the cos/sin tables")
    if out_dtype is None:
        out_dtype = torch.promote_types(x.dtype, cos.dtype)
    return _rotate(x.contiguous(), cos.contiguous(), sin.contiguous(), out_dtype, False)
