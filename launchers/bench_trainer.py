"""Time the real trainer loop (shards -> loader -> engine step -> metric reads) on synthetic
reference-layout shards of the configured model's shapes, on one process or under a launcher:

  python launchers/bench_trainer.py --config configs/sfd_xxl.yaml --batch-size 32 --json xxl_trainer.json
  torchrun --nproc_per_node 8 launchers/bench_trainer.py --config configs/sfd_xxl.yaml \\
      --set parallel.engine=fsdp2 --batch-size 32 --work-dir /shared/bench

Uses the config's model, engine and parallel settings; --batch-size is per data-parallel rank.
Engines with the fused AdamW + EMA kernel (local, ddp, fsdp2; CUDA, or the CPU under
TRITON_INTERPRET=1) run the loop synchronously and with train.async_metrics. Rank 0 prints a
table; --json FILE also writes the figures (sfd_scale/trainer_bench.py). --work-dir must be
visible to every rank (rank 0 writes the shards there once).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sfd_scale.atomic import atomic_write_bytes
from sfd_scale.bench import bench_config
from sfd_scale.logging import get_logger
from sfd_scale.parallel import distributed
from sfd_scale.trainer_bench import LOOPS, format_trainer_report, run_trainer_benchmark


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML run configuration (default: the built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per data-parallel rank and step")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop mode")
    parser.add_argument("--samples", type=int, default=1024, help="synthetic samples in the shards")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench_trainer"),
                        help="shards (kept for the next run) and the runs' logs")
    parser.add_argument("--loops", choices=LOOPS, default="both",
                        help="the loop modes to time (both: synchronous and async metrics, where the engine has them)")
    parser.add_argument("--resident-batch", action="store_true",
                        help="train on one batch kept on the device, as bench.py does: the difference to a run "
                             "with the loader is the loader's cost")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="then profile this many steps of the last loop mode: where the time goes, where the GPU idles")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the figures as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    get_logger()
    cfg = bench_config(args.config, args.overrides)
    report = run_trainer_benchmark(cfg, args.batch_size, args.warmup, args.steps, args.samples, args.work_dir,
                                   args.profile_steps, args.loops, args.resident_batch)
    if distributed.rank() == 0:
        print(format_trainer_report(report))
        if args.json:
            atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode())
    distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    distributed.exit_after_distributed_run()
