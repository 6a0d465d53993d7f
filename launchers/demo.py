"""Run the CPU demo: `python launchers/demo.py --config configs/demo.yaml [--set key=value ...]`."""
from __future__ import annotations

import argparse
import os

from sfd_scale.config import DemoConfig, load_config
from sfd_scale.demo import run_demo
from sfd_scale.logging import get_logger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set sfd.train.max_steps=500")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    log = get_logger()
    cfg = load_config(args.config, args.overrides, cls=DemoConfig)
    result = run_demo(cfg)
    log.info("done in %.0f s", result.seconds)
    print(f"\nsample grid (one row per class 0-9): {result.grid_path}")
    print(f"linear-probe accuracy of the semantic latents: {result.semantic_probe_accuracy:.1%} "
          f"(stand-in DINO features: {result.dino_probe_accuracy:.1%})")
    print(f"digit classifier (SVC on real digits, {result.classifier_real_accuracy:.1%} on held-out real "
          f"images) on the generated samples: {result.sample_accuracy:.1%} of samples show the "
          f"requested class (chance: 10%)")


if __name__ == "__main__":
    main()
