"""Sample images from an SFD checkpoint into a grid PNG and an ADM-style .npz.

  python launchers/sample.py --config configs/sfd_xl.yaml --checkpoint model.pt \
      --set data.data_dir=<latents with stats> --set encoders.texture_vae_checkpoint=<vae> \
      --num-images 100 --out samples/

The checkpoint may be a reference training checkpoint (EMA weights are used), a plain state dict,
a safetensors file, or a step folder of this project (`.../checkpoints/step-00001000`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from sfd_scale.config import SFDConfig, load_config
from sfd_scale.diffusion.sampler import balanced_labels
from sfd_scale.eval.generate import (LatentStats, decode_to_uint8, generate_latents,
                                     load_model_for_sampling, save_grid)
from sfd_scale.logging import get_logger
from sfd_scale.models.texture_vae import load_texture_vae


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--num-images", type=int, default=None, help="default: sample.num_images")
    parser.add_argument("--out", default="samples")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    log = get_logger()
    cfg: SFDConfig = load_config(args.config, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model_for_sampling(args.checkpoint, cfg.model).to(device)
    guide = None
    if cfg.sample.autoguidance_ckpt:
        guide_cfg: SFDConfig = load_config(cfg.sample.autoguidance_config)
        guide = load_model_for_sampling(cfg.sample.autoguidance_ckpt, guide_cfg.model).to(device)
    vae = load_texture_vae(cfg.encoders.texture_vae_checkpoint, cfg.encoders.texture_vae).to(device)
    stats = LatentStats.from_data(cfg.data)
    n = args.num_images or cfg.sample.num_images
    labels = (balanced_labels(n, cfg.model.num_classes) if cfg.sample.balanced_labels
              else torch.randint(0, cfg.model.num_classes, (n,),
                                 generator=torch.Generator().manual_seed(cfg.sample.seed)))
    images = []
    for start in range(0, n, cfg.sample.batch_size):
        index = torch.arange(start, min(n, start + cfg.sample.batch_size))
        latents = generate_latents(model, labels[index], index, cfg.sample, cfg.diffusion, guide)
        images.append(decode_to_uint8(latents, cfg.model.semantic_channels, stats, vae))
        log.info("sampled %d / %d", index[-1].item() + 1, n)
    images = np.concatenate(images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_grid(images[:100], out / "grid.png", columns=10)
    tmp = out / "samples.npz.tmp.npz"
    np.savez(tmp, arr_0=images, labels=labels.numpy())
    tmp.replace(out / "samples.npz")
    log.info("wrote %s and %s", out / "samples.npz", out / "grid.png")


if __name__ == "__main__":
    main()
