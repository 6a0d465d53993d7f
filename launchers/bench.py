"""Benchmark the full SFD training step (loss, backward, clip, AdamW, EMA) on synthetic data.

  python launchers/bench.py --config configs/sfd_xxl.yaml --batch-size 32 --compile blocks \\
      --json runs/bench/xxl.json
  python launchers/bench.py --set model.size=custom --set model.depth=2 --set model.hidden_size=64 \\
      --set model.num_heads=2 --batch-size 4 --steps 3      # a tiny model on the CPU

Without --config the defaults (LightningDiT-XXL, SFD recipe) are measured. A plain-eager baseline
of the same model is measured in the same run unless --no-baseline. Prints a table; --json FILE
also writes every figure (see sfd_scale/bench.py and docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import shlex
import sys

from sfd_scale.bench import BenchOptions, bench_config, format_table, run_benchmark, write_report
from sfd_scale.logging import get_logger
from sfd_scale.models.fast_paths import (ATTENTION_NAMES, COMPILE_INDUCTOR_MODES, COMPILE_MODES, FP8_RECIPES,
                                         RESIDUAL_PRECISIONS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML run configuration (default: the built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set model.size=XL (repeatable)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step on the one device")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=None,
                        help="train.precision (default: the config's; auto = bf16 autocast on GPU)")
    parser.add_argument("--attention", choices=ATTENTION_NAMES, default=None,
                        help="attention backend (default: the config's model.attention)")
    parser.add_argument("--checkpointing", choices=["none", "full", "selective", "ops"], default=None,
                        help="parallel.activation_checkpointing (default: the config's)")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="none",
                        help="torch.compile: each block, the whole model, or none")
    parser.add_argument("--compile-mode", choices=COMPILE_INDUCTOR_MODES, default="default",
                        help="inductor mode of --compile ('reduce-overhead': CUDA graphs)")
    parser.add_argument("--compile-tuning", action="store_true",
                        help="inductor tunes the block sizes of its generated kernels (model.compile_tuning)")
    parser.add_argument("--fp8", choices=FP8_RECIPES, default="none",
                        help="torchao float8 recipe for the blocks' large linears (Ada/Hopper GPUs)")
    parser.add_argument("--residual", choices=list(RESIDUAL_PRECISIONS), default="fp32",
                        help="residual stream dtype under autocast (model.residual_precision; bf16: not the reference's numbers)")
    parser.add_argument("--sync-free", action="store_true",
                        help="no host synchronisation in the step (needs --set optim.fused_ema=true)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay the sync-free step as CUDA graphs (train.cuda_graph; needs --set optim.fused_ema=true)")
    parser.add_argument("--fused-kernels", action="store_true", help="Triton SwiGLU and RoPE kernels")
    parser.add_argument("--device", default=None, help="train.device (default: the config's; auto)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain-eager baseline")
    parser.add_argument("--profile-steps", type=int, default=0, metavar="N",
                        help="then profile N more steps: time by kernel category and the top kernels")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    get_logger()
    overrides = list(args.overrides)
    for key, value in (("train.precision", args.precision), ("train.device", args.device),
                       ("parallel.activation_checkpointing", args.checkpointing)):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = bench_config(args.config, overrides)
    options = BenchOptions(batch_size=args.batch_size, warmup_steps=args.warmup, steps=args.steps,
                           attention=args.attention or cfg.model.attention, compile=args.compile, compile_mode=args.compile_mode, fp8=args.fp8,
                           compile_tuning=args.compile_tuning, residual=args.residual, sync_free=args.sync_free,
                           cuda_graph=args.cuda_graph,
                           fused_kernels=args.fused_kernels, baseline=not args.no_baseline,
                           profile_steps=args.profile_steps)
    command = shlex.join(["python", "launchers/bench.py", *(sys.argv[1:] if argv is None else argv)])
    report = run_benchmark(cfg, options, command=command)
    print(format_table(report))
    if args.json:
        write_report(report, args.json)


if __name__ == "__main__":
    main()
