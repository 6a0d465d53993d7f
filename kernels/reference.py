"""Plain-PyTorch twins of the Triton kernels: the numbers every fused kernel is tested against.

Each function spells out the same arithmetic as the model's unfused modules (`RMSNorm` then
`modulate`, `SwiGLU`'s activation, `Rope2D`), so a kernel that equals its twin equals the model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rmsnorm_modulate_reference(x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor,
                               scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """rmsnorm(x) * weight * (1 + scale) + shift; x (B, N, D), weight (D,), shift/scale (B, D).

    The norm runs in float32 and is rounded back to x's dtype before the weight, as `RMSNorm` does.
    """
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight
    return normed * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def swiglu_reference(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * value from the fused w12 output h (..., 2H) laid out [gate, value] -> (..., H)."""
    gate, value = h.chunk(2, dim=-1)
    return F.silu(gate) * value


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, heads, N, head_dim) by the (N, head_dim) tables of `Rope2D`:
    (x0, x1) -> (x0 cos0 - x1 sin0, x1 cos1 + x0 sin1)."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos + rotated * sin


def fp8_cast_transpose_reference(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype,
                                 amax_out: torch.Tensor, sums_dtype: torch.dtype | None
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (rows, cols) -> (x * scale saturated to `fp8_dtype`, the same transposed, x's column sums
    accumulated in float32 and returned in `sums_dtype`, or an empty float32 tensor for None);
    writes amax(|x|) in float32 into the one-element `amax_out`, 0 where it is not finite."""
    fp8_max = torch.finfo(fp8_dtype).max
    cast = (x.float() * scale).clamp(-fp8_max, fp8_max).to(fp8_dtype)
    amax = x.detach().abs().amax().float()
    amax_out.copy_(torch.where(amax.isfinite(), amax, 0.0).reshape(amax_out.shape))
    sums = (x.sum(0, dtype=torch.float32).to(sums_dtype) if sums_dtype is not None
            else x.new_empty(0, dtype=torch.float32))
    return cast, cast.t().contiguous(), sums


def swiglu_backward_reference(h: torch.Tensor, dg: torch.Tensor) -> torch.Tensor:
    """The gradient of h (..., 2H) = [gate, value] through silu(gate) * value, given the output's
    gradient dg (..., H), in float32 (the kernels' arithmetic, with sigmoid written out)."""
    gate, value = h.float().chunk(2, dim=-1)
    dg = dg.float()
    sig = 1.0 / (1.0 + torch.exp(-gate))
    return torch.cat([dg * value * sig * (1.0 + gate * (1.0 - sig)), dg * gate * sig], dim=-1)


def fp8_swiglu_backward_cast_reference(h: torch.Tensor, dg: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype,
                                       amax_out: torch.Tensor, sums_dtype: torch.dtype | None
                                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fp8_cast_transpose_reference` of the SwiGLU's input gradient `swiglu_backward_reference(h,
    dg)`, taken in float32 (never rounded to h's dtype first)."""
    return fp8_cast_transpose_reference(swiglu_backward_reference(h, dg), scale, fp8_dtype, amax_out, sums_dtype)


def fp8_swiglu_cast_reference(h: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, amax_out: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp8_cast_transpose_reference` of silu(gate) * value for h (rows, 2H) = [gate, value], taken
    in float32 (never rounded to h's dtype first), without column sums."""
    cast, cast_t, _ = fp8_cast_transpose_reference(swiglu_reference(h.float()), scale, fp8_dtype, amax_out, None)
    return cast, cast_t


def transpose_reference(x: torch.Tensor) -> torch.Tensor:
    """x (rows, cols) -> x transposed and contiguous (cols, rows)."""
    return x.t().contiguous()
