"""Time the real trainer loop (shards -> loader -> step -> metric reads), synchronous and with
train.async_metrics, on synthetic reference-layout shards of the configured model's shapes.

  python launchers/bench_trainer.py --config configs/sfd_xxl.yaml --batch-size 32 --json xxl_trainer.json

Uses the config's model settings (compile, fast paths) and the fused AdamW + EMA step (CUDA, or
the CPU under TRITON_INTERPRET=1). Prints a table; --json FILE also writes the figures
(sfd_scale/trainer_bench.py). `launchers/bench.py` times the step alone, for comparison.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from sfd_scale.atomic import atomic_write_bytes
from sfd_scale.bench import bench_config
from sfd_scale.logging import get_logger
from sfd_scale.trainer_bench import format_trainer_report, run_trainer_benchmark


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML run configuration (default: the built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop mode")
    parser.add_argument("--samples", type=int, default=1024, help="synthetic samples in the shards")
    parser.add_argument("--shard-dir", type=Path, default=None, help="keep the shards here (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the figures as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import json

    args = parse_args(argv)
    get_logger()
    cfg = bench_config(args.config, args.overrides)
    report = run_trainer_benchmark(cfg, args.batch_size, args.warmup, args.steps, args.samples, args.shard_dir)
    print(format_trainer_report(report))
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
