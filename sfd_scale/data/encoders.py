"""The three encoders behind the composite latent, bundled into one extraction function."""
from __future__ import annotations

import contextlib

import torch

from sfd_scale.config import EncodersConfig
from sfd_scale.data.extract import EncodeFn
from sfd_scale.models.dinov2 import DinoFeatureEncoder, load_dinov2
from sfd_scale.models.semantic_vae import SemanticVAE, load_semantic_vae
from sfd_scale.models.texture_vae import AutoencoderKL, load_texture_vae


def composite_encode_fn(vae: AutoencoderKL, dino: DinoFeatureEncoder, semvae: SemanticVAE,
                        bf16: bool = False) -> EncodeFn:
    """images in [-1, 1] -> {latents, latents_sv, feats_dino} as the reference shards hold them.

    Texture latents are posterior samples (`posterior.sample()`, SPEC section 1); semantic latents
    are the Semantic VAE's posterior mean, so the semantic target is a deterministic function of
    the image. bf16 autocast runs the encoders on GPU; outputs are returned in float32.
    """
    device = next(vae.parameters()).device

    @torch.no_grad()
    def encode(images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = images.to(device)
        cast = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
        with cast:
            feats = dino(images)
            latents = vae.encode(images).sample()
            semantic = semvae.encode(feats.float()).mode()
        return {"latents": latents.float().cpu(), "latents_sv": semantic.float().cpu(),
                "feats_dino": feats.float().cpu()}

    return encode


def load_encoders(cfg: EncodersConfig, device: torch.device
                  ) -> tuple[AutoencoderKL, DinoFeatureEncoder, SemanticVAE]:
    """Load all three from their checkpoint paths (each fails clearly when its file is missing)."""
    for key in ("texture_vae_checkpoint", "dino_checkpoint", "semvae_checkpoint"):
        if not getattr(cfg, key):
            raise ValueError(f"encoders.{key} is not set: pass --set encoders.{key}=<path>")
    vae = load_texture_vae(cfg.texture_vae_checkpoint, cfg.texture_vae).to(device)
    dino = DinoFeatureEncoder(load_dinov2(cfg.dino_checkpoint, cfg.dino), cfg.dino.input_size).to(device)
    semvae = load_semantic_vae(cfg.semvae_checkpoint, cfg.semvae).to(device)
    return vae, dino, semvae
