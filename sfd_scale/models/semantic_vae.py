"""Semantic VAE (SemVAE): compresses DINOv2 patch features into SFD's semantic latent.

SPEC section 1: 768 x 16 x 16 DINOv2 ViT-B/14-reg features -> 16 x 16 x 16 latent. The reference
code does not ship it; this is our design in the shape the paper describes: a transformer VAE
over the 256 patch tokens with a reparameterized, channel-first latent (like the texture latent)
trained to reconstruct the features with MSE + cosine terms and a small KL weight.

    encoder: feats (B, 768, 16, 16) -> tokens -> linear to width + 2-D sin-cos position
             -> depth pre-norm blocks -> LayerNorm -> linear to 2 * latent_channels (mean, logvar)
    decoder: z (B, 16, 16, 16) -> tokens -> linear to width + position -> depth blocks
             -> LayerNorm -> linear to 768 -> (B, 768, 16, 16)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sfd_scale.models.dinov2 import SelfAttention
from sfd_scale.models.layers import sincos_pos_embed_2d
from sfd_scale.models.texture_vae import DiagonalGaussian
from sfd_scale.models.weights import load_strict, read_state_dict

SEMANTIC_VAE_SOURCE = (
    "a Semantic VAE training run of this project (launchers/train_semvae.py); the reference "
    "release does not ship SemVAE weights"
)


@dataclass
class SemanticVAEConfig:
    """SemVAE shape and loss weights; the defaults fit DINOv2 ViT-B/14 features at 16 x 16."""

    feat_dim: int = 768
    """Channels of the DINOv2 features it compresses."""
    latent_channels: int = 16
    """Channels of the semantic latent (the last 16 of SFD's 48 latent channels)."""
    width: int = 512
    """Transformer width of encoder and decoder."""
    depth: int = 4
    """Transformer blocks in the encoder and, separately, in the decoder."""
    num_heads: int = 8
    """Attention heads per block."""
    grid: int = 16
    """Side of the square token grid (16 for 224 / 14)."""
    mlp_ratio: float = 4.0
    """MLP hidden width / width."""
    kl_weight: float = 1e-6
    """Weight of the KL term (KL summed over latent elements, averaged over the batch)."""
    cos_weight: float = 1.0
    """Weight of the (1 - cosine similarity) term."""

    def __post_init__(self) -> None:
        if self.width % self.num_heads:
            raise ValueError(
                f"SemanticVAEConfig.width={self.width} is not divisible by num_heads={self.num_heads}."
            )
        if self.width % 4:
            raise ValueError(
                f"SemanticVAEConfig.width={self.width} must be a multiple of 4 for the 2-D sin-cos "
                "position embedding."
            )


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenTransformer(nn.Module):
    """(B, C_in, g, g) -> tokens -> linear, + position -> blocks -> LN -> linear -> (B, C_out, g, g)."""

    def __init__(self, in_dim: int, out_dim: int, cfg: SemanticVAEConfig) -> None:
        super().__init__()
        self.grid = cfg.grid
        self.in_proj = nn.Linear(in_dim, cfg.width)
        # Fixed, so it is rebuilt from the config rather than stored in checkpoints.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.width, cfg.grid), persistent=False)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.width, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.out_proj = nn.Linear(cfg.width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if (h, w) != (self.grid, self.grid):
            raise ValueError(
                f"Semantic VAE expects a {self.grid} x {self.grid} grid; got {h} x {w} "
                "(set semantic_vae.grid)."
            )
        tokens = self.in_proj(x.flatten(2).transpose(1, 2))  # (B, g*g, width)
        tokens = tokens + self.pos_embed.to(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens)
        out = self.out_proj(self.norm(tokens))  # (B, g*g, out_dim)
        return out.transpose(1, 2).reshape(b, -1, h, w)


class SemanticVAE(nn.Module):
    """`encode(feats) -> DiagonalGaussian` over (B, latent_channels, g, g); `decode(z) -> feats`."""

    def __init__(self, cfg: SemanticVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = TokenTransformer(cfg.feat_dim, 2 * cfg.latent_channels, cfg)
        self.decoder = TokenTransformer(cfg.latent_channels, cfg.feat_dim, cfg)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def encode(self, feats: torch.Tensor) -> DiagonalGaussian:
        """feats (B, feat_dim, g, g) -> Gaussian over (B, latent_channels, g, g)."""
        if feats.dim() != 4 or feats.shape[1] != self.cfg.feat_dim:
            raise ValueError(
                f"Semantic VAE expects features (B, {self.cfg.feat_dim}, {self.cfg.grid}, "
                f"{self.cfg.grid}); got {tuple(feats.shape)}."
            )
        return DiagonalGaussian(self.encoder(feats))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_channels, g, g) -> reconstructed features (B, feat_dim, g, g)."""
        if z.dim() != 4 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(
                f"Semantic VAE expects latents (B, {self.cfg.latent_channels}, {self.cfg.grid}, "
                f"{self.cfg.grid}); got {tuple(z.shape)}."
            )
        return self.decoder(z)

    def forward(
        self, feats: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(feats)
        return self.decode(posterior.sample(generator)), posterior


def semantic_vae_loss_terms(
    recon: torch.Tensor,
    feats: torch.Tensor,
    posterior: DiagonalGaussian,
    cos_weight: float,
    kl_weight: float,
) -> dict[str, torch.Tensor]:
    """loss = mse + cos_weight * cos + kl_weight * kl for channel-first (B, C, h, w) features.

    mse: mean over all elements; cos: mean over batch and positions of 1 - cosine similarity
    along channels; kl: KL to N(0, I) summed over latent elements, averaged over the batch.
    """
    mse = (recon - feats).pow(2).mean()
    cos = (1.0 - F.cosine_similarity(recon, feats, dim=1)).mean()
    kl = posterior.kl().mean()
    loss = mse + cos_weight * cos + kl_weight * kl
    return {"loss": loss, "mse": mse, "cos": cos, "kl": kl}


def semantic_vae_loss(
    model: SemanticVAE, feats: torch.Tensor, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Encode, sample, decode and score `feats` with the weights in `model.cfg`."""
    recon, posterior = model(feats, generator=generator)
    return semantic_vae_loss_terms(recon, feats, posterior, model.cfg.cos_weight, model.cfg.kl_weight)


def load_semantic_vae(
    path: str | Path, cfg: SemanticVAEConfig, prefer: tuple[str, ...] = ("ema", "model", "state_dict")
) -> SemanticVAE:
    """Build a SemanticVAE from `cfg` and load weights from `path` strictly (EMA first by default).

    Returns the model in eval mode.
    """
    state_dict = read_state_dict(
        path, what="Semantic VAE", where_to_get=SEMANTIC_VAE_SOURCE, prefer=prefer
    )
    model = SemanticVAE(cfg)
    load_strict(model, state_dict, source=str(path))
    return model.eval()
