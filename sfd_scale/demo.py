"""The CPU demo: the whole SFD method, end to end, at toy size on scikit-learn's digits.

Stages (each writes into the work folder and is skipped when its output already exists):
  1. digits -> RGB image folder (real data, 10 classes);
  2. a small LDM AutoencoderKL trained on them (texture latents);
  3. a small ViT of the DINOv2 architecture, trained as a digit classifier so that its patch
     features carry class information (pretrained DINOv2 cannot be downloaded here);
  4. the Semantic VAE trained on those features (semantic latents);
  5. extraction into reference-layout shards with per-channel statistics;
  6. SFD training of a tiny LightningDiT with the real loss (MSE + cosine + REPA);
  7. class-conditional sampling (three-phase ODE, CFG) and texture-only decoding;
  8. two figures a reader can judge: the linear-probe accuracy of the semantic latents, and the
     accuracy of an independent digit classifier (SVC fitted on the real digits) on the samples.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sfd_scale.config import DemoConfig, to_dict
from sfd_scale.data.demo_digits import digits_arrays, write_digits_folder
from sfd_scale.data.encoders import composite_encode_fn
from sfd_scale.data.extract import extract_folder
from sfd_scale.data.images import ImageFolderIndex, load_image_pm1
from sfd_scale.eval.generate import LatentStats, decode_to_uint8, generate_latents, save_grid
from sfd_scale.models.dinov2 import DinoFeatureEncoder, DinoViT, load_dinov2
from sfd_scale.models.semantic_vae import SemanticVAE, load_semantic_vae, semantic_vae_loss
from sfd_scale.models.texture_vae import AutoencoderKL, load_texture_vae, texture_vae_loss
from sfd_scale.models.weights import save_weights
from sfd_scale.train.stage import fit, random_batches
from sfd_scale.train.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    grid_path: Path
    semantic_probe_accuracy: float
    dino_probe_accuracy: float
    sample_accuracy: float
    classifier_real_accuracy: float
    seconds: float


def _load_images(index: ImageFolderIndex, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([load_image_pm1(path, image_size) for path, _ in index.samples])
    labels = torch.tensor([label for _, label in index.samples], dtype=torch.long)
    return images, labels


def train_texture_vae(cfg: DemoConfig, images: torch.Tensor, path: Path) -> AutoencoderKL:
    vae_cfg = cfg.sfd.encoders.texture_vae
    if not path.is_file():
        torch.manual_seed(cfg.texture_vae.seed)
        vae = AutoencoderKL(vae_cfg)
        fit(vae, random_batches(images, batch_size=cfg.texture_vae.batch_size),
            lambda x: texture_vae_loss(vae, x, cfg.texture_vae_kl_weight), cfg.texture_vae,
            "texture VAE")
        save_weights(path, vae.state_dict())
    return load_texture_vae(path, vae_cfg)


class _ProbeHead(nn.Module):
    """Mean-pooled patch features -> class logits: makes the stand-in encoder class-aware."""

    def __init__(self, encoder: DinoFeatureEncoder, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feat_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images).mean(dim=(2, 3)))


def train_dino_standin(cfg: DemoConfig, images: torch.Tensor, labels: torch.Tensor,
                       path: Path) -> DinoFeatureEncoder:
    dino_cfg = cfg.sfd.encoders.dino
    if not path.is_file():
        torch.manual_seed(cfg.dino.seed)
        encoder = DinoFeatureEncoder(DinoViT(dino_cfg), dino_cfg.input_size)
        encoder.model.requires_grad_(True)   # the wrapper freezes it; here we train it once
        classifier = _ProbeHead(encoder, cfg.sfd.model.num_classes)
        fit(classifier, random_batches(images, labels, batch_size=cfg.dino.batch_size),
            lambda x, y: {"loss": F.cross_entropy(classifier(x), y)}, cfg.dino, "DINO stand-in")
        save_weights(path, encoder.model.state_dict())
    return DinoFeatureEncoder(load_dinov2(path, dino_cfg), dino_cfg.input_size)


@torch.no_grad()
def _batched(fn, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


def train_semvae(cfg: DemoConfig, feats: torch.Tensor, path: Path) -> SemanticVAE:
    sem_cfg = cfg.sfd.encoders.semvae
    if not path.is_file():
        torch.manual_seed(cfg.semvae.seed)
        semvae = SemanticVAE(sem_cfg)
        fit(semvae, random_batches(feats, batch_size=cfg.semvae.batch_size),
            lambda f: semantic_vae_loss(semvae, f), cfg.semvae, "semantic VAE")
        save_weights(path, semvae.state_dict())
    return load_semantic_vae(path, sem_cfg)


def linear_probe_accuracy(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """Held-out accuracy (25 %) of a logistic regression on flattened features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x = features.reshape(len(features), -1)
    x_tr, x_te, y_tr, y_te = train_test_split(x, labels, test_size=0.25, random_state=seed,
                                              stratify=labels)
    scaler = StandardScaler().fit(x_tr)
    probe = LogisticRegression(max_iter=2000).fit(scaler.transform(x_tr), y_tr)
    return float(probe.score(scaler.transform(x_te), y_te))


def _digit_features(images_uint8: np.ndarray) -> np.ndarray:
    """(B, S, S, 3) uint8 -> (B, 64) in the 0..16 range of sklearn's 8x8 digits (box-downsampled)."""
    grey = torch.from_numpy(images_uint8).float().mean(-1)[:, None]          # (B, 1, S, S)
    small = F.adaptive_avg_pool2d(grey, 8)[:, 0]                             # (B, 8, 8)
    return (small / 255.0 * 16.0).reshape(len(images_uint8), -1).numpy()


def digit_classifier(image_size: int, seed: int = 0):
    """An SVC fitted on the real digits (independent of every generator stage) and its held-out
    accuracy on real images."""
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    images, labels = digits_arrays(image_size)
    x = _digit_features(images)
    x_tr, x_te, y_tr, y_te = train_test_split(x, labels, test_size=0.25, random_state=seed,
                                              stratify=labels)
    svc = SVC(gamma="scale").fit(x_tr, y_tr)
    return svc, float(svc.score(x_te, y_te))


def run_demo(cfg: DemoConfig) -> DemoResult:
    t0 = time.perf_counter()
    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    enc = cfg.sfd.encoders
    shards = Path(cfg.sfd.data.data_dir)

    log.info("[1/8] digits -> image folder")
    index = write_digits_folder(work / "images", cfg.image_size)
    images, labels = _load_images(index, cfg.image_size)

    log.info("[2/8] texture VAE")
    vae = train_texture_vae(cfg, images, Path(enc.texture_vae_checkpoint))
    log.info("[3/8] DINOv2-architecture stand-in encoder")
    dino = train_dino_standin(cfg, images, labels, Path(enc.dino_checkpoint))
    feats = _batched(dino, images)
    log.info("[4/8] semantic VAE")
    semvae = train_semvae(cfg, feats, Path(enc.semvae_checkpoint))

    log.info("[5/8] extraction -> %s", shards)
    extract_folder(index, shards, composite_encode_fn(vae, dino, semvae), shard_size=cfg.shard_size, image_size=cfg.image_size,
                   batch_size=256, seed=cfg.sfd.train.seed)

    semantic = _batched(lambda f: semvae.encode(f).mode(), feats).numpy()
    sem_probe = linear_probe_accuracy(semantic, labels.numpy())
    dino_probe = linear_probe_accuracy(feats.mean(dim=(2, 3)).numpy(), labels.numpy())
    log.info("linear probe accuracy: semantic latents %.3f, stand-in DINO features %.3f",
             sem_probe, dino_probe)

    log.info("[6/8] SFD training")
    trainer = Trainer(cfg.sfd, Path(cfg.sfd.train.output_dir) / cfg.sfd.train.exp_name)
    trainer.maybe_resume()
    trainer.fit()

    log.info("[7/8] sampling")
    num_classes = cfg.sfd.model.num_classes
    sample_labels = torch.arange(num_classes).repeat_interleave(cfg.samples_per_class)
    latents = generate_latents(trainer.engine.ema_model(), sample_labels, torch.arange(len(sample_labels)),
                               cfg.sfd.sample, cfg.sfd.diffusion)
    samples = decode_to_uint8(latents, cfg.sfd.model.semantic_channels,
                              LatentStats.from_data(cfg.sfd.data), vae)
    grid = save_grid(samples, work / "samples.png", columns=cfg.samples_per_class)

    log.info("[8/8] evaluation")
    svc, real_acc = digit_classifier(cfg.image_size)
    sample_acc = float((svc.predict(_digit_features(samples)) == sample_labels.numpy()).mean())
    result = DemoResult(grid, sem_probe, dino_probe, sample_acc, real_acc, time.perf_counter() - t0)
    report = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(result).items()}
    (work / "demo_result.json").write_text(json.dumps({**report, "config": to_dict(cfg)}, indent=2))
    return result
