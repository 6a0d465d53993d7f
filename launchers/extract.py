"""Encode an image folder into reference-layout latent shards, on one or many GPUs.

  python launchers/extract.py --config configs/sfd_xl.yaml --images /data/imagenet/train \
      --set data.data_dir=/data/imagenet_latents \
      --set encoders.texture_vae_checkpoint=... --set encoders.dino_checkpoint=... \
      --set encoders.semvae_checkpoint=...
  torchrun --nproc_per_node 8 launchers/extract.py ...      (or srun with one task per GPU)

Writes data.data_dir/latents_rank00_shardNNN.safetensors (each image and its flip), the
per-channel statistics and skipped.txt. Rank r encodes the shards k with k % world == r in
bf16 on its GPU; the output is the same for any number of ranks. A killed run resumes:
finished shards are kept. --decoder chooses the image decoding (auto: DALI on GPUs when it is
installed, else PIL).
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from sfd_scale.config import SFDConfig, load_config
from sfd_scale.data.encoders import composite_encode_fn, load_encoders
from sfd_scale.data.extract import BARRIER_TIMEOUT, extract_folder
from sfd_scale.data.images import DECODER_BACKENDS, ImageFolderIndex, select_decoder
from sfd_scale.logging import get_logger
from sfd_scale.parallel import distributed
from sfd_scale.parallel.dims import ParallelDims


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--images", required=True, help="class-subfolder image root")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--decoder", choices=DECODER_BACKENDS, default="auto")
    parser.add_argument("--workers", type=int, default=4, help="image decoding threads")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    log = get_logger()
    cfg: SFDConfig = load_config(args.config, args.overrides)
    dims = ParallelDims.from_env()
    if torch.cuda.is_available():
        device = torch.device("cuda", dims.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if dims.world_size > 1:
        # Only barriers cross ranks: gloo needs no GPU and tolerates the long waits.
        distributed.init_process_group(dims, "gloo", torch.device("cpu"), timeout=BARRIER_TIMEOUT)
    try:
        encode = composite_encode_fn(*load_encoders(cfg.encoders, device), bf16=device.type == "cuda")
        decoder = select_decoder(args.decoder, args.image_size, args.batch_size, device, args.workers)
        try:
            report = extract_folder(ImageFolderIndex.scan(args.images), cfg.data.data_dir, encode,
                                    shard_size=args.shard_size, image_size=args.image_size,
                                    batch_size=args.batch_size, seed=cfg.train.seed, decoder=decoder,
                                    rank=dims.rank, world_size=dims.world_size)
        finally:
            decoder.close()
        log.info("rank %d: %d images in the folder, %d encoded, %d shards written, %d reused, %d skipped",
                 dims.rank, report.num_images, report.num_encoded, len(report.shards_written),
                 len(report.shards_reused), len(report.skipped))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
    distributed.exit_after_distributed_run()
