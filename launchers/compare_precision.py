"""Loss curves of bf16, FP8 and bf16-residual training from the same seed, on the same batches: trust
FP8 or a bf16 residual stream only after this.

  python launchers/compare_precision.py --config configs/sfd_xxl.yaml --set data.data_dir=/data/latents \\
      --recipes none rowwise --steps 300 --batch-size 32 --compile blocks --json runs/fp8_vs_bf16.json

Each recipe trains a fresh model from the config's seed for --steps steps on the first --pool
batches of the data (synthetic latents when data.data_dir is unset) and reports the relative gap
of its smoothed loss curve from the first recipe's ('none' is bf16). FP8 needs torchao and an
Ada/Hopper GPU; on the CPU torchao emulates it (slow; tests use a tiny model).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sfd_scale.atomic import atomic_write_bytes
from sfd_scale.bench import Variant, bench_config
from sfd_scale.logging import get_logger
from sfd_scale.models.fast_paths import COMPILE_MODES, FP8_RECIPES
from sfd_scale.precision_curve import BF16_RESIDUAL, format_comparison, loss_curves
from sfd_scale.train.trainer import resolve_device


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML run configuration (default: the built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--recipes", nargs="+", default=["none", "rowwise"],
                        help=f"the first is the reference; each an FP8 recipe ({', '.join(FP8_RECIPES)}; 'none' = "
                             f"bf16), '{BF16_RESIDUAL}', or one of each joined by '+'")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pool", type=int, default=64, help="distinct batches, cycled")
    parser.add_argument("--window", type=int, default=10, help="moving-average window of the compared curves")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="none")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write both curves as JSON")
    args = parser.parse_args(argv)
    get_logger()
    cfg = bench_config(args.config, args.overrides)
    base = Variant("reference", cfg.model.attention, args.compile, False)

    def write(report: dict) -> None:  # after each recipe: a run cut short keeps the finished curves
        if args.json:
            atomic_write_bytes(Path(args.json), (json.dumps(report, indent=2) + "\n").encode())

    report = loss_curves(cfg, base, args.recipes, args.steps, args.batch_size, args.pool,
                         resolve_device(cfg.train.device), args.window, on_curve=write)
    print(format_comparison(report))


if __name__ == "__main__":
    main()
