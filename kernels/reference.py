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
