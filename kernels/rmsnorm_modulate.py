"""Fused RMSNorm + AdaLN modulation: y = rmsnorm(x) * weight * (1 + scale) + shift, in one pass.

Unfused, a block reads and writes the (B, N, D) residual stream four times for this (norm, weight,
scale, shift); fused it reads x once and writes y once. The backward recomputes the normalised row
from x and the saved 1/rms instead of storing it.

Plain-PyTorch twin: `sfd_scale.kernels.reference.rmsnorm_modulate_reference`.
Uses Triton builtins only (`tl.reduce`, not the `tl.sum` helper): see the package docstring.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_ROWS_PER_PROGRAM = 16
"""Backward: tokens of one sample per program; each program writes one partial sum for the weight,
scale and shift gradients, reduced afterwards in PyTorch."""


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _forward_kernel(x_ptr, w_ptr, shift_ptr, opsc_ptr, y_ptr, rstd_ptr, tokens, dim, eps,
                    BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    sample = row // tokens
    cols = tl.arange(0, BLOCK_D)
    mask = cols < dim
    x_raw = tl.load(x_ptr + row * dim + cols, mask=mask, other=0.0)
    x = x_raw.to(tl.float32)
    rstd = tl.rsqrt(tl.reduce(x * x, 0, _add) / dim + eps)
    # RMSNorm rounds the normalised row to x's dtype before the weight (a no-op for float32).
    normed = (x * rstd).to(x_raw.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    opsc = tl.load(opsc_ptr + sample * dim + cols, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + sample * dim + cols, mask=mask, other=0.0).to(tl.float32)
    y = normed * w * opsc + shift
    tl.store(y_ptr + row * dim + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _backward_kernel(x_ptr, w_ptr, opsc_ptr, rstd_ptr, dy_ptr, dx_ptr, dw_part_ptr, dscale_part_ptr,
                     dshift_part_ptr, tokens, dim, chunks, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    sample = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    opsc = tl.load(opsc_ptr + sample * dim + cols, mask=col_mask, other=0.0).to(tl.float32)
    acc_w = tl.full([BLOCK_D], 0.0, tl.float32)
    acc_scale = tl.full([BLOCK_D], 0.0, tl.float32)
    acc_shift = tl.full([BLOCK_D], 0.0, tl.float32)
    for i in range(ROWS):
        token = chunk * ROWS + i
        # A vector comparison: Triton's interpreter rejects a vector mask `&` a scalar condition.
        mask = col_mask & (cols * 0 + token < tokens)
        row = sample * tokens + token
        x = tl.load(x_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
        # Past the last token x and dy read as 0, so any finite 1/rms will do: read a valid one.
        rstd = tl.load(rstd_ptr + sample * tokens + tl.minimum(token, tokens - 1))
        normed = x * rstd
        acc_w += dy * opsc * normed
        acc_scale += dy * normed * w
        acc_shift += dy
        dnormed = dy * opsc * w
        # d/dx of x * rstd(x): rstd * (dn - n * mean(dn * n))
        dx = rstd * (dnormed - normed * (tl.reduce(dnormed * normed, 0, _add) / dim))
        tl.store(dx_ptr + row * dim + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    part = (sample * chunks + chunk) * dim + cols
    tl.store(dw_part_ptr + part, acc_w, mask=col_mask)
    tl.store(dscale_part_ptr + part, acc_scale, mask=col_mask)
    tl.store(dshift_part_ptr + part, acc_shift, mask=col_mask)


@torch.library.custom_op("sfd_scale::rmsnorm_modulate", mutates_args=())
def _forward_op(x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, one_plus_scale: torch.Tensor,
                eps: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, 1/rms per row); every tensor contiguous."""
    b, n, d = x.shape
    y = torch.empty((b, n, d), dtype=out_dtype, device=x.device)
    rstd = torch.empty(b * n, dtype=torch.float32, device=x.device)
    _forward_kernel[(b * n,)](x, weight, shift, one_plus_scale, y, rstd, n, d, eps,
                              BLOCK_D=triton.next_power_of_2(d))
    return y, rstd


@_forward_op.register_fake
def _(x, weight, shift, one_plus_scale, eps, out_dtype):
    b, n, d = x.shape
    return x.new_empty((b, n, d), dtype=out_dtype), x.new_empty(b * n, dtype=torch.float32)


@torch.library.custom_op("sfd_scale::rmsnorm_modulate_backward", mutates_args=())
def _backward_op(x: torch.Tensor, weight: torch.Tensor, one_plus_scale: torch.Tensor, rstd: torch.Tensor,
                 dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, fp32 partial sums (3, B, chunks, D) of the weight, scale and shift gradients)."""
    b, n, d = x.shape
    chunks = triton.cdiv(n, _ROWS_PER_PROGRAM)
    dx = torch.empty_like(x)
    parts = torch.empty((3, b, chunks, d), dtype=torch.float32, device=x.device)
    _backward_kernel[(b, chunks)](x, weight, one_plus_scale, rstd, dy, dx, parts[0], parts[1], parts[2],
                                  n, d, chunks, ROWS=_ROWS_PER_PROGRAM, BLOCK_D=triton.next_power_of_2(d))
    return dx, parts


@_backward_op.register_fake
def _(x, weight, one_plus_scale, rstd, dy):
    b, n, d = x.shape
    return torch.empty_like(x), x.new_empty((3, b, -(-n // _ROWS_PER_PROGRAM), d), dtype=torch.float32)


def _save_for_backward(ctx, inputs, output) -> None:
    x, weight, shift, one_plus_scale, _, _ = inputs
    ctx.save_for_backward(x, weight, one_plus_scale, output[1])
    ctx.shift_dtype = shift.dtype


def _backward(ctx, dy, _drstd):
    x, weight, one_plus_scale, rstd = ctx.saved_tensors
    dx, parts = _backward_op(x, weight, one_plus_scale, rstd, dy.contiguous())
    dweight = parts[0].sum((0, 1)).to(weight.dtype)
    dscale = parts[1].sum(1).to(one_plus_scale.dtype)
    dshift = parts[2].sum(1).to(ctx.shift_dtype)
    return dx, dweight, dshift, dscale, None, None


# A custom op, not a bare autograd.Function: torch.compile keeps it whole in the graph.
_forward_op.register_autograd(_backward, setup_context=_save_for_backward)


def rmsnorm_modulate(x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                     eps: float = 1e-6, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fused `modulate(RMSNorm(x), shift, scale)`: x (B, N, D), weight (D,), shift/scale (B, D).

    `out_dtype` defaults to the dtype PyTorch's promotion gives the unfused expression; pass the
    autocast dtype when the consumer is a linear layer under autocast (it would cast anyway).
    """
    if x.dim() != 3 or weight.shape != x.shape[-1:] or shift.shape != (x.shape[0], x.shape[2]) \
            or scale.shape != shift.shape:
        raise ValueError(f"rmsnorm_modulate: expected x (B, N, D), weight (D,), shift/scale (B, D); got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(shift.shape)}, {tuple(scale.shape)}")
    if out_dtype is None:
        out_dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype),
                                        torch.promote_types(shift.dtype, scale.dtype))
    one_plus_scale = 1 + scale  # rounded in scale's dtype, as `modulate` does
    return _forward_op(x.contiguous(), weight.contiguous(), shift.contiguous(), one_plus_scale.contiguous(),
                       eps, out_dtype)[0]
