"""LightningDiT with SFD's dual-time conditioning and a REPA projector, in one readable file.

The SFD-specific lines: two timestep embedders of width D/2 (`t_embedder_sem`, `t_embedder_tex`)
whose outputs are concatenated into the conditioning vector, and the REPA projector that reads
the hidden state after block `repa_depth`. Everything else is LightningDiT: patch size 1 on a
16 x 16 latent, sin-cos absolute positions plus 2-D RoPE, RMSNorm, qk-norm, SwiGLU, AdaLN-Zero.
The model knows nothing about parallelism; `sfd_scale.parallel` applies that from outside.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from sfd_scale.config import ModelConfig
from sfd_scale.models.weights import load_strict, read_state_dict
from sfd_scale.models.layers import (DENSE, Attention, LabelEmbedder, LinearSpec, RMSNorm, Rope2D,
                                     SwiGLU, TimestepEmbedder, resolve_attention,
                                     sincos_pos_embed_2d)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Size:
    depth: int
    hidden_size: int
    num_heads: int


# Names used by the reference (LightningDiT-XXL is "1p0B" there).
SIZES: dict[str, Size] = {
    "S": Size(12, 384, 6),
    "B": Size(12, 768, 12),
    "L": Size(24, 1024, 16),
    "XL": Size(28, 1152, 16),
    "XXL": Size(24, 1536, 24),
    "1p6B": Size(28, 1792, 28),
}


def resolve_size(cfg: ModelConfig) -> Size:
    if cfg.size == "custom":
        size = Size(cfg.depth, cfg.hidden_size, cfg.num_heads)
        if min(size.depth, size.hidden_size, size.num_heads) <= 0:
            raise ValueError("model.size=custom needs model.depth, model.hidden_size and "
                             "model.num_heads set to positive values")
        return size
    if cfg.size not in SIZES:
        raise ValueError(f"model.size: unknown size {cfg.size!r} (known: {', '.join(SIZES)}, custom)")
    return SIZES[cfg.size]


class LightningDiTBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, attention: str,
                 linears: LinearSpec = DENSE) -> None:
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, attention, linears)
        self.norm2 = RMSNorm(hidden_size)
        self.mlp = SwiGLU(hidden_size, int(2 / 3 * mlp_ratio * hidden_size), linears)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: Rope2D) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a.unsqueeze(1) * self.attn(self.norm1.modulated(x, shift_a, scale_a), rope)
        x = x + gate_m.unsqueeze(1) * self.mlp(self.norm2.modulated(x, shift_m, scale_m))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_dim: int) -> None:
        super().__init__()
        self.norm_final = RMSNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(self.norm_final.modulated(x, shift, scale))


class PatchEmbed(nn.Module):
    """Conv patchify; `x_embedder.proj` is the reference's key."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Contiguous tokens: every linear of every block then reads rows without a hidden copy
        # (and FP8 linears with row-wise scales accept only row-major inputs).
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # (B, N, D)


class LightningDiT(nn.Module):
    """SFD velocity model: (x_t, t_tex, t_sem, y) -> velocity [, REPA projection]."""

    def __init__(self, cfg: ModelConfig, linears: LinearSpec = DENSE) -> None:
        super().__init__()
        size = resolve_size(cfg)
        if cfg.input_size % cfg.patch_size:
            raise ValueError(f"model.input_size {cfg.input_size} is not divisible by "
                             f"model.patch_size {cfg.patch_size}")
        if not 0 < cfg.semantic_channels < cfg.in_channels:
            raise ValueError(f"model.semantic_channels must lie in (0, in_channels={cfg.in_channels}), "
                             f"got {cfg.semantic_channels}")
        if not 0 <= cfg.repa_depth <= size.depth:
            raise ValueError(f"model.repa_depth must lie in [0, depth={size.depth}], got {cfg.repa_depth}")
        d = size.hidden_size
        if d % 2:
            raise ValueError(f"hidden size {d} must be even (two timestep embedders of width D/2)")
        self.cfg = cfg
        self.size = size
        self.in_channels = cfg.in_channels
        self.semantic_channels = cfg.semantic_channels
        self.patch_size = cfg.patch_size
        self.grid = cfg.input_size // cfg.patch_size
        self.num_classes = cfg.num_classes
        self.repa_depth = cfg.repa_depth
        self.attention_backend, _ = resolve_attention(cfg.attention)
        # Dtype of the residual stream under autocast; training may lower it (fast_paths.apply_residual_precision).
        self.residual_dtype = torch.float32

        self.x_embedder = PatchEmbed(cfg.in_channels, d, cfg.patch_size)
        self.t_embedder_sem = TimestepEmbedder(d // 2)
        self.t_embedder_tex = TimestepEmbedder(d // 2)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob)
        # A frozen Parameter rather than a buffer: reference checkpoints (and their parameter
        # counts) include it.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2, d), requires_grad=False)
        self.feat_rope = Rope2D(d // size.num_heads, self.grid)
        self.blocks = nn.ModuleList(
            LightningDiTBlock(d, size.num_heads, cfg.mlp_ratio, cfg.attention, linears)
            for _ in range(size.depth))
        self.final_layer = FinalLayer(d, cfg.patch_size ** 2 * cfg.in_channels)
        if cfg.repa_depth > 0:
            self.repa_projector = nn.Sequential(
                nn.Linear(d, cfg.repa_projector_dim), nn.SiLU(),
                nn.Linear(cfg.repa_projector_dim, cfg.repa_projector_dim), nn.SiLU(),
                nn.Linear(cfg.repa_projector_dim, cfg.repa_feature_dim))
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Tensor-parallel linears (not nn.Linear) initialise themselves; checkpoints overwrite them.
        self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid)[None])
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # patchify initialised like a Linear
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for emb in (self.t_embedder_sem, self.t_embedder_tex):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        # AdaLN-Zero: every residual branch and the output start at exactly zero, so the
        # untrained network is the identity on its residual stream and predicts zero velocity.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        b, p, c, g = x.shape[0], self.patch_size, self.in_channels, self.grid
        x = x.view(b, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, g * p, g * p)

    def condition(self, t_tex: torch.Tensor, t_sem: torch.Tensor, y: torch.Tensor,
                  drop_labels: bool, generator: torch.Generator | None = None,
                  label_uniforms: torch.Tensor | None = None) -> torch.Tensor:
        """c = [emb(t_sem), emb(t_tex)] + emb(y): (B, D). Semantic half first, as the reference."""
        t_emb = torch.cat([self.t_embedder_sem(t_sem), self.t_embedder_tex(t_tex)], dim=1)
        return t_emb + self.y_embedder(y, drop_labels, generator, label_uniforms)

    def forward(self, x: torch.Tensor, t_tex: torch.Tensor, t_sem: torch.Tensor, y: torch.Tensor,
                return_repa: bool | None = None, generator: torch.Generator | None = None,
                label_uniforms: torch.Tensor | None = None):
        """x (B, C, H, W) with texture channels first; t_tex, t_sem (B,); y (B,) labels.

        Trap (as in the reference): in train mode labels are dropped for CFG and the REPA
        projection is returned too, (velocity, repa (B, N, 768)); in eval mode only velocity.
        `return_repa` overrides the second choice. Label dropout compares one uniform per sample
        with the dropout probability: `label_uniforms` (B,) when given (drawn beforehand, as a
        replayed CUDA graph needs), else draws from `generator`.
        """
        if return_repa is None:
            return_repa = self.training
        if return_repa and self.repa_depth == 0:
            raise ValueError("REPA output requested but model.repa_depth is 0")
        h = self.x_embedder(x) + self.pos_embed                      # (B, N, D)
        if torch.amp.is_autocast_available(h.device.type) and torch.is_autocast_enabled(h.device.type):
            # Under autocast the residual stream has `residual_dtype` whatever the weights' dtype:
            # fp32 by default, as with the reference's fp32 weights; engines that compute with bf16
            # weights (FSDP2's param_dtype, DeepSpeed's bf16 mode) would otherwise carry it in bf16,
            # which more than doubles the output's rounding error.
            h = h.to(self.residual_dtype)
        c = self.condition(t_tex, t_sem, y, drop_labels=self.training, generator=generator,
                           label_uniforms=label_uniforms)
        repa = None
        for index, block in enumerate(self.blocks, start=1):
            h = block(h, c, self.feat_rope)
            if return_repa and index == self.repa_depth:
                repa = self.repa_projector(h)                         # (B, N, repa_feature_dim)
        out = self.unpatchify(self.final_layer(h, c))                # (B, C, H, W)
        return (out, repa) if return_repa else out


def build_model(cfg: ModelConfig, linears: LinearSpec = DENSE) -> LightningDiT:
    try:
        return LightningDiT(cfg, linears)
    except ValueError as exc:
        raise ValueError(f"while building LightningDiT ({cfg.size}): {exc}") from exc


SFD_WEIGHTS_SOURCE = "Hugging Face SFD-Project/SFD (model_weights/...), or an export of this project"


def load_lightningdit(path: str | Path, cfg: ModelConfig, prefer: tuple[str, ...] = ("ema", "model")
                      ) -> LightningDiT:
    """Build a LightningDiT from `cfg` and load weights strictly by key.

    Accepts reference training checkpoints (`.pt` with `model`/`ema`/`opt`/`config`; the EMA
    weights are taken first by default), plain state dicts and safetensors files.
    """
    state = read_state_dict(path, what=f"LightningDiT-{cfg.size}", where_to_get=SFD_WEIGHTS_SOURCE,
                            prefer=prefer)
    model = build_model(cfg)
    load_strict(model, state, source=str(path))
    return model


def count_parameters(model: nn.Module) -> int:
    """All parameters, frozen ones included (the reference counts pos_embed)."""
    return sum(p.numel() for p in model.parameters())
