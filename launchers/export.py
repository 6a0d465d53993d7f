"""Export a training checkpoint of any engine as one consolidated file in the reference layout.

    python launchers/export.py --run runs/sfd_xxl [--step 400000] --out sfd_xxl.pt

writes sfd_xxl.pt ({'model', 'ema', 'config'}, loadable with torch.load(weights_only=True), by
`sfd_scale.models.lightningdit.load_lightningdit` and by the reference inference code) and
sfd_xxl.safetensors (the EMA weights). Runs in one process, without GPUs or a process group,
whatever engine and world size wrote the checkpoint.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from sfd_scale.logging import get_logger
from sfd_scale.parallel.factory import export_step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="run folder (holds checkpoints/)")
    parser.add_argument("--step", type=int, default=None, help="step to export (default: the latest complete one)")
    parser.add_argument("--out", required=True, type=Path, help="output .pt path (a .safetensors twin is written too)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    log = get_logger()
    pt, st = export_step(args.run, args.out, args.step)
    log.info("wrote %s and %s", pt, st)


if __name__ == "__main__":
    main()
