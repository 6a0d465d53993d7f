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


def fp8_cast_transpose_reference(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, column_sums: bool
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (rows, cols) -> (x * scale saturated to `fp8_dtype`, the same transposed and contiguous,
    amax(|x|) in float32, x's float32 column sums or an empty tensor)."""
    fp8_max = torch.finfo(fp8_dtype).max
    cast = (x.float() * scale).clamp(-fp8_max, fp8_max).to(fp8_dtype)
    sums = x.sum(0, dtype=torch.float32) if column_sums else x.new_empty(0, dtype=torch.float32)
    return cast, cast.t().contiguous(), x.detach().abs().amax().float(), sums
