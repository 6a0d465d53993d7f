"""Train the Semantic VAE on frozen DINOv2 features of an image folder, on one process or many.

  python launchers/train_semvae.py --config configs/semvae.yaml \
      --set image_dir=/data/imagenet/train --set encoders.dino_checkpoint=dinov2_vitb14_reg4_pretrain.pth

The same command runs on many processes under any of the three launchers; choose the engine in
the config (parallel.engine=ddp|fsdp2|deepspeed, with parallel.zero_stage for DeepSpeed).
training.batch_size is the global batch, split over the ranks:
  torchrun --nproc_per_node 8 launchers/train_semvae.py --config ... --set parallel.engine=fsdp2
  deepspeed --num_gpus 8 launchers/train_semvae.py --config ... --set parallel.engine=deepspeed
  srun --ntasks-per-node 8 python launchers/train_semvae.py --config ... --set parallel.engine=ddp
Checkpoints go to <run_dir>/checkpoints and a run resumes from the latest one (run.resume=auto).
At the end rank 0 writes the (EMA) weights to `output`; point encoders.semvae_checkpoint of an
SFD config at that file.
"""
from __future__ import annotations

import argparse
import logging

from sfd_scale.config import SemVAETrainConfig, load_config
from sfd_scale.logging import get_logger
from sfd_scale.parallel.distributed import destroy_process_group, exit_after_distributed_run
from sfd_scale.train.semvae_stage import process_layout, train_semvae


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML stage configuration (configs/semvae.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set training.lr=2e-4 (repeatable)")
    # The deepspeed launcher passes --local_rank=N; it must agree with LOCAL_RANK when both exist.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    log = get_logger()
    cfg: SemVAETrainConfig = load_config(args.config, args.overrides, cls=SemVAETrainConfig)
    dims = process_layout(cfg, args.local_rank)
    if not dims.is_main:  # srun sets no RANK, which get_logger reads: quiet the other ranks here
        log.setLevel(logging.WARNING)
    train_semvae(cfg, dims)
    destroy_process_group()


if __name__ == "__main__":
    main()
    exit_after_distributed_run()
