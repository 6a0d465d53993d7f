"""Per-rank bytes of parameters, gradients, optimizer state and EMA for each engine and world size,
measured on the real sharding of a meta-device model (nothing is allocated; runs on a laptop).

    python launchers/memory_report.py --size XXL --world 1 8 64 --engines ddp fsdp2
"""
from __future__ import annotations

import argparse

from sfd_scale.config import ModelConfig
from sfd_scale.models.lightningdit import SIZES
from sfd_scale.parallel.memory import ENGINES, format_table, rank_bytes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="XXL", choices=list(SIZES), help="LightningDiT size (SFD settings)")
    parser.add_argument("--world", type=int, nargs="+", default=[1, 8, 64], help="world sizes")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--last-rank", action="store_true",
                        help="also measure the last rank (the smallest shards when sizes do not divide)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cfg = ModelConfig(size=args.size)
    rows = []
    for engine in args.engines:
        for world in args.world:
            ranks = sorted({0, world - 1}) if args.last_rank else [0]
            rows.extend(rank_bytes(cfg, engine, world, rank) for rank in ranks)
    print(format_table(rows))


if __name__ == "__main__":
    main()
