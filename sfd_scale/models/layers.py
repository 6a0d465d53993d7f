"""Building blocks of LightningDiT: RMSNorm, 2-D RoPE, SwiGLU, attention, embedders.

Parameter and buffer names follow the reference checkpoints (SPEC section 2), so released weights
load by key.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from sfd_scale.host_copy import to_device_async

log = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as the reference does) with a learnable weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        # Slot for a fused kernel (sfd_scale.models.fast_paths); a plain attribute, not state.
        self.modulate_fn: Callable[..., torch.Tensor] = _norm_then_modulate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def modulated(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """modulate(self(x), shift, scale): the AdaLN input of a block, one fusable unit."""
        return self.modulate_fn(x, self.weight, shift, scale, self.eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation: x (B, N, D), shift/scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32, rounded back to x's dtype before the weight (as the reference does)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def _norm_then_modulate(x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor,
                        scale: torch.Tensor, eps: float) -> torch.Tensor:
    return modulate(rms_norm(x, weight, eps), shift, scale)


def swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...)."""
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each interleaved pair of x by the angles whose cosines and sines the tables hold:
    x * cos + (-x1, x0, -x3, x2, ...) * sin.

    The sign goes onto the small table and x's pairs are only swapped (a flip): inductor fuses a
    flip into its consumer, while a stack of x's halves became a buffer (q and k written and read
    once more in fp32). Same values: -(a * b) == (-a) * b."""
    signed_sin = torch.stack((-sin[..., 0::2], sin[..., 1::2]), dim=-1).flatten(-2)
    return x * cos + swap_pairs(x) * signed_sin


class Rope2D(nn.Module):
    """EVA-style 2-D rotary embedding on a square token grid.

    The first half of each head's channels rotates with the token's row, the second half with its
    column; frequencies theta^(-2k/d) with d = head_dim / 2, each repeated for an interleaved pair.
    The tables are persistent buffers (`freqs_cos`, `freqs_sin`) because reference checkpoints hold them.
    """

    def __init__(self, head_dim: int, grid: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
        half = head_dim // 2
        inv_freq = theta ** (-torch.arange(0, half, 2).float() / half)      # (half/2,)
        pos = torch.arange(grid).float()
        angles = torch.outer(pos, inv_freq).repeat_interleave(2, dim=-1)    # (grid, half)
        rows = angles[:, None, :].expand(grid, grid, half)
        cols = angles[None, :, :].expand(grid, grid, half)
        table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)  # (N, head_dim)
        self.register_buffer("freqs_cos", table.cos())
        self.register_buffer("freqs_sin", table.sin())
        # Slot for a fused kernel (sfd_scale.models.fast_paths); a plain attribute, not state.
        self.rotate: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = rope_rotate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, heads, N, head_dim) -> same shape, rotated by token position."""
        return self.rotate(x, self.freqs_cos, self.freqs_sin)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention: the reference every fused kernel is tested against."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.float().softmax(dim=-1).type_as(v) @ v


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch SDPA: picks flash/cuDNN/memory-efficient kernels on GPU, math on CPU."""
    return F.scaled_dot_product_attention(q, k, v)


ATTENTION_BACKENDS = {"sdpa": attention_sdpa, "math": attention_math}
"""The plain-PyTorch backends; `sfd_scale.models.fast_paths` adds the optional fused ones."""


def resolve_attention(name: str) -> tuple[str, Callable[..., torch.Tensor]]:
    """(backend name, function) for `model.attention`; 'auto' is chosen once per process and
    logged once. The choice itself lives in `sfd_scale.models.fast_paths`."""
    from sfd_scale.models import fast_paths  # imported here: fast_paths builds on this module

    return fast_paths.resolve_attention(name)


def _dense(in_features: int, out_features: int) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=True)


@dataclass(frozen=True)
class LinearSpec:
    """How a block's big projections are built: the slot tensor parallelism fills (megatron-style).

    `column(in, out)` makes a layer whose output features are split over `tp_size` ranks (qkv,
    w12); `row(in, out)` one whose input features are split and whose output is reduced (proj,
    w3). Both return plain tensors. Each rank's column output is laid out [q_r, k_r, v_r] and
    [gate_r, value_r], so forward code is the same for every tp size.
    """

    column: Callable[[int, int], nn.Module] = _dense
    row: Callable[[int, int], nn.Module] = _dense
    tp_size: int = 1


DENSE = LinearSpec()


class Attention(nn.Module):
    """Multi-head self-attention with qkv bias, per-head RMS qk-norm and 2-D RoPE."""

    def __init__(self, dim: int, num_heads: int, attention: str = "auto",
                 linears: LinearSpec = DENSE) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        if num_heads % linears.tp_size:
            raise ValueError(f"num_heads {num_heads} is not divisible by the tensor-parallel size "
                             f"{linears.tp_size}")
        self.num_heads = num_heads // linears.tp_size                # heads on this rank
        self.head_dim = dim // num_heads
        self.qkv = linears.column(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = linears.row(dim, dim)
        _, self.attend = resolve_attention(attention)

    def forward(self, x: torch.Tensor, rope: Rope2D) -> torch.Tensor:
        b, n, _ = x.shape
        # Split along the qkv axis of the matmul's layout, then move heads forward: the backward
        # then stacks dq, dk, dv straight into the layout the qkv matmul's backward reads (a
        # permute before the unbind would cost one more copy of the whole qkv gradient).
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)                                   # each (B, N, heads, head_dim)
        # The qk-norm too runs before heads move forward: its per-(token, head) statistics then
        # come out in the order its output is written, and inductor computes both in one kernel
        # (moved after, the statistics were two kernels of their own that read q and k once more).
        q, k = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2)
        out = self.attend(rope(q), rope(k), v.transpose(1, 2))   # (B, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


def silu_gate(h: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation on the fused w12 output h (..., 2H) laid out [gate, value] -> (..., H)."""
    gate, value = h.chunk(2, dim=-1)
    return F.silu(gate) * value


class SwiGLU(nn.Module):
    """SwiGLU MLP with the gate and value projections fused into one `w12` matmul."""

    def __init__(self, dim: int, hidden: int, linears: LinearSpec = DENSE) -> None:
        super().__init__()
        if hidden % linears.tp_size:
            raise ValueError(f"SwiGLU hidden size {hidden} is not divisible by the tensor-parallel "
                             f"size {linears.tp_size}")
        self.w12 = linears.column(dim, 2 * hidden)
        self.w3 = linears.row(hidden, dim)
        # Slot for a fused kernel (sfd_scale.models.fast_paths); a plain attribute, not state.
        self.activation: Callable[[torch.Tensor], torch.Tensor] = silu_gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.activation(self.w12(x)))


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of a scalar time (cos first, then sin) followed by a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                               device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t, self.frequency_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row (index num_classes) for the null label of CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor, drop: bool, generator: torch.Generator | None = None,
                uniforms: torch.Tensor | None = None) -> torch.Tensor:
        """With `drop`, each label becomes the null label where its uniform draw is below the dropout
        probability: `uniforms` (one per label, already drawn) or fresh draws from `generator`."""
        if drop and self.dropout_prob > 0:
            if uniforms is None:
                uniforms = to_device_async(torch.rand(labels.shape, generator=generator, device="cpu"), labels.device)
            labels = torch.where(uniforms < self.dropout_prob, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table (grid*grid, dim): first half encodes the column, second
    half the row; each half is [sin(p w), cos(p w)] with w_k = 10000^(-k / (dim/4))."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()
