"""Encode an image folder into reference-layout latent shards (single process; PIL decoding).

  python launchers/extract.py --config configs/sfd_xl.yaml --images /data/imagenet/train \
      --set data.data_dir=/data/imagenet_latents \
      --set encoders.texture_vae_checkpoint=... --set encoders.dino_checkpoint=... \
      --set encoders.semvae_checkpoint=...

Writes data.data_dir/latents_rank00_shardNNN.safetensors (each image and its flip), the
per-channel statistics and skipped.txt. A killed run resumes: finished shards are kept.
"""
from __future__ import annotations

import argparse

import torch

from sfd_scale.config import SFDConfig, load_config
from sfd_scale.data.encoders import composite_encode_fn, load_encoders
from sfd_scale.data.extract import extract_folder
from sfd_scale.data.images import ImageFolderIndex
from sfd_scale.logging import get_logger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--images", required=True, help="class-subfolder image root")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4, help="image decoding threads")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    log = get_logger()
    cfg: SFDConfig = load_config(args.config, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encode = composite_encode_fn(*load_encoders(cfg.encoders, device), bf16=device.type == "cuda")
    report = extract_folder(ImageFolderIndex.scan(args.images), cfg.data.data_dir, encode,
                            shard_size=args.shard_size, image_size=args.image_size,
                            batch_size=args.batch_size, seed=cfg.train.seed, num_workers=args.workers)
    log.info("%d images: %d encoded, %d shards written, %d reused, %d skipped",
             report.num_images, report.num_encoded, len(report.shards_written),
             len(report.shards_reused), len(report.skipped))


if __name__ == "__main__":
    main()
