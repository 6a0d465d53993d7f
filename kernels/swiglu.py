"""SwiGLU activation silu(gate) * value on the fused w12 output, forward and backward in one pass each.

Unfused this is a chunk, a silu (one read, one write) and a multiply (two reads, one write); fused
it reads h once and writes the half-width result once. The backward reads h and dy and writes dh.

Plain-PyTorch twin: `sfd_scale.kernels.reference.swiglu_reference`.
Uses Triton builtins only (the sigmoid written out, not `tl.sigmoid`): see the package docstring.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024
"""Columns of one row per program."""


@triton.jit
def _forward_kernel(h_ptr, out_ptr, hidden, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    gate = tl.load(h_ptr + row * 2 * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    value = tl.load(h_ptr + row * 2 * hidden + hidden + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * value
    tl.store(out_ptr + row * hidden + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(h_ptr, dy_ptr, dh_ptr, hidden, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    gate = tl.load(h_ptr + row * 2 * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    value = tl.load(h_ptr + row * 2 * hidden + hidden + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-gate))
    # d silu(g) / dg = sig * (1 + g * (1 - sig))
    dgate = dy * value * sig * (1.0 + gate * (1.0 - sig))
    dvalue = dy * gate * sig
    tl.store(dh_ptr + row * 2 * hidden + cols, dgate.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_ptr + row * 2 * hidden + hidden + cols, dvalue.to(dh_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("sfd_scale::swiglu", mutates_args=())
def _swiglu_op(h: torch.Tensor) -> torch.Tensor:
    hidden = h.shape[-1] // 2
    rows = h.numel() // (2 * hidden)
    out = torch.empty((*h.shape[:-1], hidden), dtype=h.dtype, device=h.device)
    block = min(_BLOCK, triton.next_power_of_2(hidden))
    _forward_kernel[(rows, triton.cdiv(hidden, block))](h, out, hidden, BLOCK=block)
    return out


@_swiglu_op.register_fake
def _(h: torch.Tensor) -> torch.Tensor:
    return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))


@torch.library.custom_op("sfd_scale::swiglu_backward", mutates_args=())
def _swiglu_backward_op(h: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    hidden = h.shape[-1] // 2
    rows = h.numel() // (2 * hidden)
    dh = torch.empty_like(h)
    block = min(_BLOCK, triton.next_power_of_2(hidden))
    _backward_kernel[(rows, triton.cdiv(hidden, block))](h, dy, dh, hidden, BLOCK=block)
    return dh


@_swiglu_backward_op.register_fake
def _(h: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(h)


def _save_input(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _swiglu_backward(ctx, dy):
    (h,) = ctx.saved_tensors
    return _swiglu_backward_op(h, dy.contiguous())


# A custom op, not a bare autograd.Function: torch.compile keeps it whole in the graph.
_swiglu_op.register_autograd(_swiglu_backward, setup_context=_save_input)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * value for h (..., 2H) laid out [gate, value] (each tensor-parallel rank's own
    w12 output has this layout too) -> (..., H) in h's dtype."""
    if h.shape[-1] % 2 or h.numel() == 0:
        raise ValueError(f"swiglu: the last dimension holds [gate, value] and must be even and non-empty, "
                         f"got shape {tuple(h.shape)}")
    return _swiglu_op(h.contiguous())
