"""From a trained SFD model to images: guided ODE sampling, then texture-only decoding."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sfd_scale.config import DataConfig, DiffusionConfig, ModelConfig, SampleConfig
from sfd_scale.data.shards import read_stats
from sfd_scale.diffusion.guidance import GuidedVelocity, VelocityFn
from sfd_scale.diffusion.sampler import SamplerSettings, per_index_noise, sample
from sfd_scale.diffusion.schedule import build_offset_schedule
from sfd_scale.models.lightningdit import LightningDiT, build_model, load_lightningdit
from sfd_scale.models.weights import load_strict
from sfd_scale.train.checkpoint import CheckpointStore, read_state


@dataclass
class LatentStats:
    """Per-channel statistics that normalised the texture latents (1, C, 1, 1)."""

    mean: torch.Tensor
    std: torch.Tensor
    multiplier: float

    @classmethod
    def from_data(cls, data: DataConfig) -> "LatentStats":
        if not data.latent_norm:
            return cls(torch.zeros(1), torch.ones(1), data.latent_multiplier)
        mean, std = read_stats(data.data_dir, "latents")
        return cls(mean, std, data.latent_multiplier)

    def denormalize(self, texture: torch.Tensor) -> torch.Tensor:
        """Inverse of the loader's (x - mean) / std * multiplier."""
        return texture / self.multiplier * self.std.to(texture) + self.mean.to(texture)


def load_model_for_sampling(path: str | Path, cfg: ModelConfig) -> LightningDiT:
    """EMA weights from a step folder of our checkpoints (verified first), or from any file that
    `load_lightningdit` reads (reference `.pt`, plain state dict, safetensors)."""
    path = Path(path)
    if path.is_dir():
        step_dir = path
        store = CheckpointStore(step_dir.parent, keep_last=2)
        store.verify(int(step_dir.name.split("-")[-1]))
        model = build_model(cfg)
        load_strict(model, read_state(step_dir, "ema"), source=str(step_dir / "ema.safetensors"))
        return model.eval()
    return load_lightningdit(path, cfg).eval()


def eval_velocity(model: LightningDiT) -> VelocityFn:
    """The eval-mode forward as a velocity function (no label dropout, no REPA branch)."""
    model.eval()

    def velocity(x, t_tex, t_sem, y):
        return model(x, t_tex, t_sem, y, return_repa=False)

    return velocity


def guided_velocity(model: LightningDiT, cfg: SampleConfig,
                    guide_model: LightningDiT | None = None) -> GuidedVelocity:
    return GuidedVelocity(
        eval_velocity(model), semantic_channels=model.semantic_channels,
        null_label=model.num_classes,
        scale_tex=cfg.cfg_scale if cfg.cfg_scale_tex is None else cfg.cfg_scale_tex,
        scale_sem=cfg.cfg_scale if cfg.cfg_scale_sem is None else cfg.cfg_scale_sem,
        interval_start=cfg.cfg_interval_start,
        guide_model=eval_velocity(guide_model) if guide_model is not None else None)


@torch.no_grad()
def generate_latents(model: LightningDiT, labels: torch.Tensor, indices: torch.Tensor,
                     sample_cfg: SampleConfig, diffusion_cfg: DiffusionConfig,
                     guide_model: LightningDiT | None = None) -> torch.Tensor:
    """Composite latents for the given labels; sample i's noise depends only on (seed, index i)."""
    device = next(model.parameters()).device
    shape = (model.in_channels, model.grid * model.patch_size, model.grid * model.patch_size)
    noise = per_index_noise(indices, shape, sample_cfg.seed, device=device)
    settings = SamplerSettings(solver=sample_cfg.solver, num_steps=sample_cfg.num_steps,
                               atol=sample_cfg.atol, rtol=sample_cfg.rtol,
                               timestep_shift=sample_cfg.timestep_shift)
    schedule = build_offset_schedule(diffusion_cfg.offset, diffusion_cfg.delta_t)
    velocity = guided_velocity(model, sample_cfg, guide_model)
    return sample(velocity, noise, labels.to(device), schedule, settings, model.semantic_channels)


@torch.no_grad()
def decode_to_uint8(latents: torch.Tensor, semantic_channels: int, stats: LatentStats,
                    vae) -> np.ndarray:
    """Drop the semantic channels, un-normalise texture, VAE-decode, clamp: (B, H, W, 3) uint8."""
    texture = stats.denormalize(latents[:, : latents.shape[1] - semantic_channels])
    images = vae.decode(texture).clamp(-1, 1)
    return ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, path: Path, columns: int) -> Path:
    """Tile (B, H, W, 3) uint8 images into one PNG (atomic write)."""
    from PIL import Image

    b, h, w, _ = images.shape
    rows = (b + columns - 1) // columns
    canvas = np.full((rows * h, columns * w, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(canvas).save(tmp, format="PNG")
    tmp.replace(path)
    return path


def make_preview(sample_cfg: SampleConfig, diffusion_cfg: DiffusionConfig, data_cfg: DataConfig,
                 vae, out_dir: Path, num_classes: int, per_class: int = 1, max_classes: int = 16):
    """A `PreviewFn` for the trainer: a small class-conditional grid from the EMA model."""
    stats = LatentStats.from_data(data_cfg)
    classes = torch.arange(min(num_classes, max_classes))
    labels = classes.repeat_interleave(per_class)

    def preview(ema_model: LightningDiT, step: int) -> Path:
        was_training = ema_model.training
        device = next(ema_model.parameters()).device
        latents = generate_latents(ema_model, labels, torch.arange(len(labels)), sample_cfg,
                                   diffusion_cfg)
        images = decode_to_uint8(latents, ema_model.semantic_channels, stats, vae.to(device))
        ema_model.train(was_training)
        return save_grid(images, Path(out_dir) / f"step-{step:08d}.png", columns=per_class)

    return preview
