"""Time our FP8 cast kernels (kernels/fp8_cast_kernel.py) on the matrices one block of a delayed-FP8
step casts, and the three large ones on other tiles (programs looping down the rows among them):
microseconds a call and the copy rate from the bytes each must move. What a whole-step profile
cannot say: which tile is fastest. It prints (and writes as `fastest_tiles`) the fastest tile of
each compared kernel in the form `SFD_FP8_TILES` takes, so a step can run on them
(`fp8_cast_kernel.TILES_ENV`).

  python launchers/bench_fp8_kernels.py --json runs/bench/fp8_kernels.json    # GPU, XXL's shapes
  TRITON_INTERPRET=1 python launchers/bench_fp8_kernels.py --tokens 64 --dim 32 --hidden 32 --repeats 1

Shapes: `--tokens` rows (batch x tokens: 32 x 256 at XXL), model width `--dim` and SwiGLU width
`--hidden`. Each call's bytes are its inputs read and its outputs written once (partials aside).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from sfd_scale.atomic import atomic_write_bytes
from sfd_scale.bench import _timed
from sfd_scale.kernels import fp8_cast_kernel

CAST_TILES = [fp8_cast_kernel.CAST_TILE, (64, 64, 8), (128, 64, 8), (64, 64, 4, 4, 1), (64, 64, 4, 4, 3),
              (64, 64, 8, 8, 3)]
"""Tiles (`fp8_cast_kernel.Tile`: rows, columns, warps, row blocks a program, pipeline stages) of
the cast-transpose, compared on a step's largest cast (the qkv gradient's): the launched one first."""
SWIGLU_TILES = [fp8_cast_kernel.CAST_TILE, (64, 64, 8), (64, 64, 4, 4, 3), (64, 64, 8, 4, 3)]
"""Tiles of the SwiGLU activation cast to compare: the launched one first."""
SWIGLU_BACKWARD_TILES = [fp8_cast_kernel.SWIGLU_BACKWARD_TILE, (64, 64, 4), (64, 64, 8), (128, 32, 8), (32, 64, 4),
                         (128, 64, 8), (32, 128, 4), (64, 32, 8, 4, 3), (64, 64, 8, 4, 3), (64, 64, 8, 2, 2)]
"""Tiles of the SwiGLU gradient kernel to compare: the launched one first."""


def describe(tile: tuple[int, ...]) -> str:
    """'64x64 4 warps', with ', 4 row blocks, 3 stages' where a program loops down the rows."""
    tile = fp8_cast_kernel.Tile(*tile)
    loop = f", {tile.row_blocks} row blocks, {tile.stages} stages" if (tile.row_blocks, tile.stages) != (1, 1) else ""
    return f"{tile.rows}x{tile.cols} {tile.warps} warps{loop}"


Case = tuple[str, str | None, tuple[int, ...] | None, int, Callable[[], object]]
"""(name, op whose tiles it compares or None, tile, bytes moved, call)."""


def _cases(tokens: int, dim: int, hidden: int, device: torch.device) -> list[Case]:
    """Each cast a block's step makes, each on its tiles."""
    g = torch.Generator(device=device).manual_seed(0)
    bf16 = dict(device=device, dtype=torch.bfloat16)
    scale = torch.ones((), device=device)
    slot = torch.zeros(1, device=device)
    e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
    h = torch.randn(tokens, 2 * hidden, generator=g, **bf16)
    dg = torch.randn(tokens, hidden, generator=g, **bf16)
    cases = []
    for name, rows, cols, fp8, sums, tiles in (
            ("cast weight qkv", 3 * dim, dim, e4m3, None, CAST_TILES[:1]),
            ("cast weight w12", 2 * hidden, dim, e4m3, None, CAST_TILES[:1]),
            ("cast gradient qkv (+ bias sums)", tokens, 3 * dim, e5m2, torch.bfloat16, CAST_TILES),
            ("cast gradient proj (+ bias sums)", tokens, dim, e5m2, torch.bfloat16, CAST_TILES[:1])):
        x = torch.randn(rows, cols, generator=g, **bf16)
        compared = "cast_transpose" if len(tiles) > 1 else None
        cases += [(f"{name}, tile {describe(tile)}", compared, tile, rows * cols * 4,
                   lambda x=x, fp8=fp8, sums=sums, tile=tile: fp8_cast_kernel.cast_transpose(x, scale, fp8, slot, sums,
                                                                                               tile))
                  for tile in tiles]
    cases += [(f"swiglu activation cast, tile {describe(tile)}", "swiglu_cast", tile, tokens * hidden * 6,
               lambda tile=tile: fp8_cast_kernel.swiglu_cast(h, scale, e4m3, slot, tile)) for tile in SWIGLU_TILES]
    x8 = torch.zeros(tokens, dim, device=device, dtype=e4m3)
    cases.append(("transpose input", None, None, tokens * dim * 2, lambda: fp8_cast_kernel.transpose(x8)))
    cases += [(f"swiglu gradient cast, tile {describe(tile)}", "swiglu_backward_cast", tile, tokens * hidden * 10,
               lambda tile=tile: fp8_cast_kernel.swiglu_backward_cast(h, dg, scale, e5m2, slot, torch.bfloat16, tile))
              for tile in SWIGLU_BACKWARD_TILES]
    return cases


def fastest_tiles(rows: list[dict]) -> dict[str, str]:
    """Each compared kernel's fastest tile, as `fp8_cast_kernel.TILES_ENV` names it."""
    best: dict[str, dict] = {}
    for row in rows:
        op = row.get("compares")
        if op is not None and (op not in best or row["us"] < best[op]["us"]):
            best[op] = row
    return {op: row["tile"] for op, row in best.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32 * 256)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name, compares, tile, nbytes, call in _cases(args.tokens, args.dim, args.hidden, device):
        call()  # compile
        # Calls queued back to back between two events: one call between them would time the
        # host's launches too (~30-100 us here, more than most of these kernels take).
        seconds = min(_timed(lambda: [call() for _ in range(args.repeats)], device) for _ in range(3)) / args.repeats
        rows.append({"kernel": name, "compares": compares, "tile": tile and fp8_cast_kernel.tile_name(tile),
                     "us": seconds * 1e6, "bytes": nbytes, "tb_per_s": nbytes / seconds / 1e12})
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton's interpreter: not a figure)"
    fastest = fastest_tiles(rows)
    print(f"{name}, {args.tokens} tokens, width {args.dim}, SwiGLU width {args.hidden}")
    print("| kernel | us/call | MB | TB/s |\n|---|---|---|---|")
    print("\n".join(f"| {r['kernel']} | {r['us']:.1f} | {r['bytes'] / 1e6:.1f} | {r['tb_per_s']:.2f} |" for r in rows))
    print("fastest: " + fp8_cast_kernel.TILES_ENV + "=" + ",".join(f"{op}={tile}" for op, tile in fastest.items()))
    if args.json:
        report = {"device": name, "rows": rows, "fastest_tiles": fastest}
        atomic_write_bytes(Path(args.json), (json.dumps(report, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
