"""DINOv2 ViT with register tokens, and the REPA-style patch-feature encoder built on it.

SFD's semantic stream and REPA target are the normalized patch tokens of a frozen DINOv2
ViT-B/14 with 4 registers (`dinov2_vitb14_reg`, SPEC section 1). Parameter names follow the
torch.hub checkpoint layout (`cls_token`, `register_tokens`, `pos_embed`, `mask_token`,
`patch_embed.proj.*`, `blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,
ls2.gamma}.*`, `norm.*`) so `dinov2_vitb14_reg4_pretrain.pth` loads strictly. `DinoConfig` also
builds tiny encoders of the same architecture for CPU tests and the demo.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sfd_scale.models.weights import load_strict, read_state_dict

DINOV2_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
# Hub architecture letter by width, to name the file users must download.
HUB_ARCH_BY_WIDTH = {384: "s", 768: "b", 1024: "l", 1536: "g"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYERNORM_EPS = 1e-6


@dataclass
class DinoConfig:
    """DINOv2 ViT shape; the defaults are ViT-B/14 with 4 registers (dinov2_vitb14_reg)."""

    embed_dim: int = 768
    """Token width."""
    depth: int = 12
    """Number of transformer blocks."""
    num_heads: int = 12
    """Attention heads per block."""
    patch_size: int = 14
    """Square patch side in pixels."""
    num_register_tokens: int = 4
    """Extra learned tokens after cls that carry no position (0 for the register-free models)."""
    mlp_ratio: float = 4.0
    """MLP hidden width / embed_dim."""
    pos_grid: int = 37
    """Side of the stored position grid: 37 = 518 / 14 for the released models."""
    input_size: int = 224
    """Square size images are resized to before the ViT (224 -> 16 x 16 patches, as in REPA)."""

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"DinoConfig.embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}."
            )
        if self.input_size % self.patch_size:
            raise ValueError(
                f"DinoConfig.input_size={self.input_size} is not a multiple of "
                f"patch_size={self.patch_size}."
            )

    def weights_hint(self) -> tuple[str, str]:
        """(what, where_to_get) for error messages: the released hub file of this shape, if any."""
        arch = HUB_ARCH_BY_WIDTH.get(self.embed_dim)
        if arch is None:
            return (
                f"DINOv2-style ViT (width {self.embed_dim}, no released model)",
                "a checkpoint saved from a DinoViT built with the same DinoConfig",
            )
        registers = f"_reg{self.num_register_tokens}" if self.num_register_tokens else ""
        base = f"dinov2_vit{arch}{self.patch_size}"
        filename = f"{base}{registers}_pretrain.pth"
        return f"DINOv2 ({filename})", f"{DINOV2_BASE_URL}/{base}/{filename} (torch.hub release)"


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: (B, 3, H, W) -> (B, H/p * W/p, D), row-major."""

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (bias on), scaled by head_dim^-0.5."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # (B, N, 3D) -> 3 x (B, heads, N, head_dim)
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual scale; the hub models are built with gamma initialised to 1.0."""

    def __init__(self, dim: int, init: float = 1.0) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale on both residual branches."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.attn = SelfAttention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoViT(nn.Module):
    """DINOv2 vision transformer (inference only: no drop-path, no masking, no heads)."""

    def __init__(self, cfg: DinoConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        if cfg.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, d))
        else:
            self.register_tokens = None
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid**2, d))
        # Only used by DINOv2's masked-image training; kept so the hub checkpoint loads strictly.
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        self.patch_embed = PatchEmbed(cfg.patch_size, d)
        self.blocks = nn.ModuleList(Block(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=LAYERNORM_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        # DINOv2's initialisation, so a randomly built (tiny, demo) encoder gives sane features.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def interpolated_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embedding (1, 1 + grid_h * grid_w, D) for a grid_h x grid_w patch grid.

        The stored grid is resized with bicubic, antialiased interpolation to the exact target
        size: the behaviour of the register models on torch.hub (interpolate_antialias=True,
        interpolate_offset=0) and of REPA's one-off timm resampling, which agree. When the grid
        already matches, the stored tensor is returned as is.
        """
        g = self.cfg.pos_grid
        if (grid_h, grid_w) == (g, g):
            return self.pos_embed
        pos = self.pos_embed.float()
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        d = pos.shape[-1]
        patch_pos = patch_pos.reshape(1, g, g, d).permute(0, 3, 1, 2)  # (1, D, g, g)
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", antialias=True)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, d)
        return torch.cat([cls_pos, patch_pos], dim=1).to(self.pos_embed.dtype)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized images (B, 3, H, W) -> final-norm tokens (B, 1 + registers + patches, D)."""
        p = self.cfg.patch_size
        if images.shape[-2] % p or images.shape[-1] % p:
            raise ValueError(
                f"DINOv2 input size {tuple(images.shape[-2:])} is not a multiple of patch size {p}."
            )
        grid_h, grid_w = images.shape[-2] // p, images.shape[-1] // p
        x = self.patch_embed(images)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.interpolated_pos_embed(grid_h, grid_w).to(x.dtype)
        if self.register_tokens is not None:
            # Registers go between cls and the patches and get no position embedding.
            registers = self.register_tokens.expand(x.shape[0], -1, -1).to(x.dtype)
            x = torch.cat([x[:, :1], registers, x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized patch tokens only (DINOv2's x_norm_patchtokens): (B, N, D), row-major."""
        return self.forward_features(images)[:, 1 + self.cfg.num_register_tokens:]


class DinoFeatureEncoder(nn.Module):
    """Frozen DINOv2 patch features of images in [-1, 1], preprocessed as REPA does.

    [-1, 1] -> [0, 1] (REPA's x / 255 of uint8 images) -> ImageNet mean/std -> bicubic resize to
    `input_size` (224 for 256 images, REPA's 224 * resolution // 256) -> ViT -> normalized patch
    tokens as (B, D, input_size / 14, input_size / 14): 768 x 16 x 16 for ViT-B/14 at 224.
    """

    def __init__(self, model: DinoViT, input_size: int = 224) -> None:
        super().__init__()
        if input_size % model.cfg.patch_size:
            raise ValueError(
                f"DinoFeatureEncoder input_size={input_size} is not a multiple of the patch size "
                f"{model.cfg.patch_size}."
            )
        self.model = model.eval().requires_grad_(False)
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def grid(self) -> int:
        return self.input_size // self.model.cfg.patch_size

    @property
    def feat_dim(self) -> int:
        return self.model.cfg.embed_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"DinoFeatureEncoder expects images (B, 3, H, W); got {tuple(images.shape)}."
            )
        x = (images + 1.0) / 2.0
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        # REPA normalizes first, then resizes (bicubic, no antialias).
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic")
        tokens = self.model.patch_tokens(x)  # (B, grid * grid, D)
        b, _, d = tokens.shape
        return tokens.transpose(1, 2).reshape(b, d, self.grid, self.grid)


def load_dinov2(path: str | Path, cfg: DinoConfig | None = None) -> DinoViT:
    """Build a DinoViT from `cfg` (default ViT-B/14 reg4) and load the hub weights at `path`, strictly.

    Returns the model in eval mode with gradients off (it is only ever a frozen feature extractor).
    """
    cfg = cfg if cfg is not None else DinoConfig()
    what, where_to_get = cfg.weights_hint()
    state_dict = read_state_dict(path, what=what, where_to_get=where_to_get)
    model = DinoViT(cfg)
    load_strict(model, state_dict, source=str(path))
    return model.eval().requires_grad_(False)

