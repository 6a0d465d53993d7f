"""Which kernels torch.compile generates for one transformer block on an H100, and the bytes they
move, worked out on a CPU (no GPU needed; sfd_scale/kernel_plan.py says how and what it leaves out).

    python launchers/kernel_plan.py --size XXL --batch-size 32 --fp8 none delayed --bf16-weights
    python launchers/kernel_plan.py --size XXL --fp8 delayed --kernels      # every kernel, its ops
    python launchers/kernel_plan.py --device cuda --bf16-weights --kernels  # the plan a GPU really runs

Use it before a GPU session to see whether a change fuses as intended; the GPU profile then says
what the bytes cost.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sfd_scale.atomic import atomic_write_bytes
from sfd_scale.config import ModelConfig
from sfd_scale.kernel_plan import BLOCK_BANDWIDTH, format_plan, plan_block
from sfd_scale.models.fast_paths import FP8_RECIPES, RESIDUAL_PRECISIONS
from sfd_scale.models.lightningdit import SIZES, resolve_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="XXL", choices=list(SIZES))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--fp8", nargs="+", default=["none"], choices=FP8_RECIPES, help="one plan each")
    parser.add_argument("--bf16-weights", action="store_true", help="as optim.bf16_weights: bf16 weight copies")
    parser.add_argument("--residual", default="fp32", choices=list(RESIDUAL_PRECISIONS))
    parser.add_argument("--bandwidth", type=float, default=BLOCK_BANDWIDTH / 1e12, metavar="TB/S",
                        help="copy rate that turns bytes into time (default: session 5's H100 figure)")
    parser.add_argument("--kernels", action="store_true", help="list every kernel")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: compile for the GPU here and also list the kernels one step launches")
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args(argv)
    cfg = ModelConfig(size=args.size)
    depth = resolve_size(cfg).depth
    report = {}
    for recipe in args.fp8:
        launched: list[dict] = []
        forward, backward = plan_block(cfg, args.batch_size, recipe, args.bf16_weights, args.residual,
                                       args.device, launched)
        print(f"== {args.size}, batch {args.batch_size}, fp8 {recipe}, "
              f"{'bf16' if args.bf16_weights else 'fp32'} weights, {args.residual} residual, on {args.device}")
        print(format_plan(forward, backward, depth, args.bandwidth * 1e12, args.kernels))
        if launched:
            print("kernels one compiled training step of the block launched (launches, us, name):")
            print("\n".join(f"    {row['calls_per_step']:3.0f} {row['s_per_step'] * 1e6:8.1f}  {row['name'][:150]}"
                             for row in launched))
        report[recipe] = {phase: {"memory_bound_kernels": plan.memory_bound_kernels,
                                  "memory_bound_bytes": plan.memory_bound_bytes,
                                  "kernels": [dict(kind=k.kind, bytes=k.bytes, ops=list(k.ops)) for k in plan.kernels]}
                          for phase, plan in (("forward", forward), ("backward", backward))}
        if launched:
            report[recipe]["launched"] = launched
    if args.json:
        atomic_write_bytes(Path(args.json), (json.dumps(report, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
