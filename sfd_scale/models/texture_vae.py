"""Texture VAE: the LDM AutoencoderKL that VA-VAE and SD-VAE f16d32 use (SPEC section 1).

256 x 256 images in [-1, 1] -> a diagonal Gaussian over 32 x 16 x 16 latents -> images. Module
and parameter names follow the LDM layout exactly (`encoder.down.0.block.0.norm1.weight`,
`encoder.mid.attn_1.q.weight`, `decoder.up.4.upsample.conv.weight`, `quant_conv.weight`, ...)
so that the released VA-VAE / SD-VAE checkpoints load with `load_texture_vae`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sfd_scale.models.weights import load_strict, read_state_dict

logger = logging.getLogger(__name__)

TEXTURE_VAE_SOURCE = (
    "Hugging Face hustvl/vavae-imagenet256-f16d32-dinov2 (vavae-imagenet256-f16d32-dinov2.pt) "
    "or the SFD release SFD-Project/SFD"
)
# Keys of LDM training checkpoints that belong to the training loss (LPIPS, discriminator) or to
# VA-VAE's vision-foundation alignment, not to the autoencoder used at inference.
TRAINING_ONLY_PREFIXES = ("loss.", "foundation_model.", "linear_proj.")
# A full latent-diffusion checkpoint keeps its autoencoder under this prefix.
FIRST_STAGE_PREFIX = "first_stage_model."
GROUPNORM_GROUPS = 32
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclass
class TextureVAEConfig:
    """Architecture of the LDM AutoencoderKL; the defaults are VA-VAE / SD-VAE f16d32."""

    ch: int = 128
    """Base channel count; level i has ch * ch_mult[i] channels (multiples of 32 for GroupNorm)."""
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    """Channel multiplier per resolution level; the image shrinks 2x between levels."""
    num_res_blocks: int = 2
    """ResNet blocks per encoder level (the decoder uses one more per level)."""
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    """Feature-map sizes (relative to `resolution`) at which self-attention follows each block."""
    z_channels: int = 32
    """Channels at the encoder output / decoder input (the encoder emits 2x for mean and logvar)."""
    embed_dim: int = 32
    """Latent channels after quant_conv: what the diffusion model sees."""
    resolution: int = 256
    """Nominal image size; only used to place the attention levels."""
    in_channels: int = 3
    """Image channels in."""
    out_ch: int = 3
    """Image channels out."""
    dropout: float = 0.0
    """Dropout inside the ResNet blocks."""

    def __post_init__(self) -> None:
        if not self.ch_mult:
            raise ValueError("TextureVAEConfig.ch_mult is empty; give one multiplier per level.")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % GROUPNORM_GROUPS]
        if bad:
            raise ValueError(
                f"TextureVAEConfig: channel counts {bad} (ch={self.ch} x ch_mult={self.ch_mult}) "
                f"are not multiples of {GROUPNORM_GROUPS}, which GroupNorm needs; change ch."
            )
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"TextureVAEConfig.resolution={self.resolution} is not divisible by the "
                f"downsample factor {self.downsample_factor} = 2^(len(ch_mult) - 1)."
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class DiagonalGaussian:
    """Diagonal Gaussian over channel-first latents; `moments` holds mean then logvar on dim 1."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        # The LDM clamp keeps exp() finite for untrained or diverging encoders.
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to N(0, I) per sample, summed over all latent elements (the LDM quantity): (B,)."""
        per_element = self.mean.pow(2) + self.var - 1.0 - self.logvar
        return 0.5 * per_element.flatten(1).sum(dim=1)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPNORM_GROUPS, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Two 3x3 convs with GroupNorm + swish before each; a 1x1 `nin_shortcut` when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convs for q, k, v and the output."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): one head of width C, scaled by C^-0.5 as in LDM.
        q, k, v = (
            proj(normed).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """3x3 stride-2 conv after padding one zero row/column at the bottom/right only (LDM)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `block[i]` then (if any) `attn[i]`, then an optional resampler.

    The resampler is registered as `downsample` (encoder) or `upsample` (decoder), the LDM names.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        with_attn: bool,
        dropout: float,
        resampler: tuple[str, nn.Module] | None,
    ) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, dropout)
            for i in range(num_blocks)
        )
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks) if with_attn)
        self.resampler_name = None
        if resampler is not None:
            self.resampler_name, module = resampler
            self.add_module(self.resampler_name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        if self.resampler_name is not None:
            x = getattr(self, self.resampler_name)(x)
        return x


class MidBlock(nn.Module):
    """ResNet -> attention -> ResNet at the lowest resolution."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> (B, 2 * z_channels, H / f, W / f) moments (double_z)."""

    def __init__(self, cfg: TextureVAEConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        channels, res = cfg.ch, cfg.resolution
        for i, mult in enumerate(cfg.ch_mult):
            out_channels = cfg.ch * mult
            last = i == len(cfg.ch_mult) - 1
            self.down.append(
                Level(
                    channels,
                    out_channels,
                    cfg.num_res_blocks,
                    with_attn=res in cfg.attn_resolutions,
                    dropout=cfg.dropout,
                    resampler=None if last else ("downsample", Downsample(out_channels)),
                )
            )
            channels = out_channels
            res = res if last else res // 2
        self.mid = MidBlock(channels, cfg.dropout)
        self.norm_out = _group_norm(channels)
        self.conv_out = nn.Conv2d(channels, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h * f, w * f).

    `up[i]` serves resolution level i (0 = full size) and runs from the deepest level up; each
    level has num_res_blocks + 1 ResNet blocks, as in LDM.
    """

    def __init__(self, cfg: TextureVAEConfig) -> None:
        super().__init__()
        channels = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, channels, 3, padding=1)
        self.mid = MidBlock(channels, cfg.dropout)
        levels: list[Level] = []
        for i in reversed(range(len(cfg.ch_mult))):
            out_channels = cfg.ch * cfg.ch_mult[i]
            levels.append(
                Level(
                    channels,
                    out_channels,
                    cfg.num_res_blocks + 1,
                    with_attn=res in cfg.attn_resolutions,
                    dropout=cfg.dropout,
                    resampler=None if i == 0 else ("upsample", Upsample(out_channels)),
                )
            )
            channels = out_channels
            res = res if i == 0 else res * 2
        # Registered full-size level first so the keys read decoder.up.<level index>.
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = _group_norm(channels)
        self.conv_out = nn.Conv2d(channels, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """LDM AutoencoderKL: `encode(images) -> DiagonalGaussian`, `decode(z) -> images`."""

    def __init__(self, cfg: TextureVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return self.cfg.downsample_factor

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """images (B, in_channels, H, W) in [-1, 1] -> Gaussian over (B, embed_dim, H/f, W/f)."""
        _check_images(images, self.cfg.in_channels, self.downsample_factor)
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, embed_dim, h, w) -> images (B, out_ch, h * f, w * f), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self,
        images: torch.Tensor,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(images)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


def texture_vae_loss(
    model: AutoencoderKL,
    images: torch.Tensor,
    kl_weight: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Plain VAE objective for training a small texture VAE (the CPU demo), no GAN or LPIPS.

    loss = l1 + mse + kl_weight * kl, where l1 and mse are means over pixels and kl is the LDM
    KL (summed over latent elements, averaged over the batch).
    """
    recon, posterior = model(images, sample_posterior=True, generator=generator)
    l1 = (recon - images).abs().mean()
    mse = (recon - images).pow(2).mean()
    kl = posterior.kl().mean()
    return {"loss": l1 + mse + kl_weight * kl, "l1": l1, "mse": mse, "kl": kl}


def load_texture_vae(path: str | Path, cfg: TextureVAEConfig | None = None) -> AutoencoderKL:
    """Build an AutoencoderKL from `cfg` (default f16d32) and load weights from `path`, strictly.

    Accepts plain state dicts and LDM training checkpoints (weights under `state_dict`, with the
    loss / discriminator / foundation-model keys dropped and a `first_stage_model.` prefix
    removed). Returns the model in eval mode.
    """
    cfg = cfg if cfg is not None else TextureVAEConfig()
    state_dict = read_state_dict(
        path, what="texture VAE (LDM AutoencoderKL)", where_to_get=TEXTURE_VAE_SOURCE,
        prefer=("state_dict", "model"),
    )
    state_dict = _autoencoder_weights(state_dict)
    model = AutoencoderKL(cfg)
    load_strict(model, state_dict, source=str(path))
    return model.eval()


def _autoencoder_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = FIRST_STAGE_PREFIX
    if any(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    kept = {k: v for k, v in state_dict.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    if len(kept) != len(state_dict):
        logger.info(
            "texture VAE: ignored %d training-only keys (loss, alignment)", len(state_dict) - len(kept)
        )
    return kept


def _check_images(images: torch.Tensor, channels: int, factor: int) -> None:
    if images.dim() != 4 or images.shape[1] != channels:
        raise ValueError(
            f"texture VAE expects images (B, {channels}, H, W); got {tuple(images.shape)}."
        )
    if images.shape[2] % factor or images.shape[3] % factor:
        raise ValueError(
            f"texture VAE: image size {tuple(images.shape[2:])} is not divisible by the "
            f"downsample factor {factor}."
        )
