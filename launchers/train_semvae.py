"""Train the Semantic VAE on frozen DINOv2 features of an image folder (single process).

  python launchers/train_semvae.py --config configs/semvae.yaml \
      --set image_dir=/data/imagenet/train --set encoders.dino_checkpoint=dinov2_vitb14_reg4_pretrain.pth

Writes the weights (safetensors) to `output`; point encoders.semvae_checkpoint of an SFD config at it.
"""
from __future__ import annotations

import argparse

import torch

from sfd_scale.config import SemVAETrainConfig, load_config
from sfd_scale.data.images import ImageFolderIndex, load_image_pm1
from sfd_scale.logging import get_logger
from sfd_scale.models.dinov2 import DinoFeatureEncoder, load_dinov2
from sfd_scale.models.semantic_vae import SemanticVAE, semantic_vae_loss
from sfd_scale.models.weights import save_weights
from sfd_scale.train.stage import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    log = get_logger()
    cfg: SemVAETrainConfig = load_config(args.config, args.overrides, cls=SemVAETrainConfig)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    enc = cfg.encoders
    dino = DinoFeatureEncoder(load_dinov2(enc.dino_checkpoint, enc.dino), enc.dino.input_size).to(device)
    index = ImageFolderIndex.scan(cfg.image_dir)
    torch.manual_seed(cfg.training.seed)
    semvae = SemanticVAE(enc.semvae).to(device)

    @torch.no_grad()
    def next_batch(generator: torch.Generator) -> tuple[torch.Tensor]:
        picks = torch.randint(0, len(index), (cfg.training.batch_size,), generator=generator)
        images = torch.stack([load_image_pm1(index.samples[i][0], cfg.image_size) for i in picks])
        return (dino(images.to(device)),)

    fit(semvae, next_batch, lambda feats: semantic_vae_loss(semvae, feats), cfg.training, "semantic VAE")
    save_weights(cfg.output, semvae.state_dict())
    log.info("wrote %s", cfg.output)


if __name__ == "__main__":
    main()
