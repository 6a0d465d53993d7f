"""Sample N images from an SFD checkpoint into an ADM-style .npz (and a grid PNG), on every rank.

  python launchers/sample.py --config configs/sfd_xl.yaml --checkpoint model.pt \
      --set data.data_dir=<latents with stats> --set encoders.texture_vae_checkpoint=<vae> \
      --num-images 50000 --out samples/sfd_xl

  torchrun --nproc_per_node 8 launchers/sample.py ...    (or srun: one task per GPU)

The checkpoint may be a reference training checkpoint (EMA weights are used), a plain state dict,
a safetensors file, or a step folder of this project (`.../checkpoints/step-00001000`). Guidance
comes from the `sample` section (--set sample.cfg_scale=1.5, sample.autoguidance_ckpt=...).
Rerunning the same command after a kill draws only the chunks that are not finished.
Writes <out>/samples.npz (arr_0 uint8 (N, H, W, 3), labels), <out>/grid.png, <out>/parts/ and,
with --png, <out>/images/NNNNNN.png.
"""
from __future__ import annotations

import argparse

from sfd_scale.config import SFDConfig, load_config
from sfd_scale.eval.sample_run import PRECISIONS, sample_images
from sfd_scale.logging import get_logger
from sfd_scale.parallel.distributed import exit_after_distributed_run


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--num-images", type=int, default=None, help="default: sample.num_images")
    parser.add_argument("--out", default="samples", help="output folder, shared by all ranks")
    parser.add_argument("--png", action="store_true", help="also write one PNG per image")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="bf16: autocast the diffusion model (the reference samples this way)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    get_logger()
    cfg: SFDConfig = load_config(args.config, args.overrides)
    sample_images(cfg, args.checkpoint, args.out, num_images=args.num_images,
                  save_png=args.png, precision=args.precision)


if __name__ == "__main__":
    main()
    exit_after_distributed_run()
