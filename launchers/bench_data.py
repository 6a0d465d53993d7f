"""Data pipeline throughput: the shard loader against a per-sample reader, or image decoding.

  python launchers/bench_data.py --dir /tmp/bench_shards            # makes 2 x 1000 samples once
  python launchers/bench_data.py --dir D --shards 3 --per-shard 1000 --seconds 30 --json out.json
  python launchers/bench_data.py --encode --device cuda --batch-size 64    # extraction's encoders, images/s
  python launchers/bench_data.py --decode-images /data/imagenet/val --decoders pil,dali --device cuda \
      --batch-size 64 --threads 8

Shards hold the SFD shapes (32 + 16 latent channels at 16x16, 768x16x16 float16 DINO features,
both copies) unless the shape options say otherwise. Prints one JSON line with samples/s of the
per-sample reader, of our loader in each read mode (mmap, pread; CPU output and the host side of
the GPU path), of one memory copy per sample (the machine's ceiling), the ratios, the load
average before and after, and the per-node extrapolation. With
--decode-images it instead times each image decoder on the same files (the first --max-images
of the folder) and prints their crops' difference from the PIL path.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sfd_scale.config import EncodersConfig, apply_overrides, from_dict
from sfd_scale.data.bench import make_bench_shards, run_decode_benchmark, run_encode_benchmark, run_loader_benchmark
from sfd_scale.data.images import ImageFolderIndex
from sfd_scale.logging import get_logger


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, help="shard folder (created when empty)")
    parser.add_argument("--decode-images", type=Path, default=None,
                        help="time image decoding on this class-subfolder image root instead")
    parser.add_argument("--decoders", default="pil,dali", help="comma-separated decoder backends")
    parser.add_argument("--encode", action="store_true",
                        help="time extraction's encoders (DINOv2, texture VAE, Semantic VAE; random weights) instead")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="with --encode: encoder shapes, e.g. --set semvae.width=256 (default: SFD's)")
    parser.add_argument("--device", default="cuda",
                        help="CUDA device for the 'dali' decoder and the loader's device path (skipped without CUDA)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--max-images", type=int, default=2048)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--texture-channels", type=int, default=32)
    parser.add_argument("--semantic-channels", type=int, default=16)
    parser.add_argument("--dino-channels", type=int, default=768)
    parser.add_argument("--latent-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--baseline-batch-size", type=int, default=32,
                        help="batch of the per-sample reader (the reference DataLoader's)")
    parser.add_argument("--seconds", type=float, default=12.0, help="timed seconds per reader, all repeats")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=2, help="loader reader threads / decoder workers")
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    log = get_logger()
    if args.decode_images is not None:
        return _decode(args, log)
    if args.encode:
        return _encode(args, log)
    if args.dir is None:
        raise SystemExit("bench_data.py: give --dir (loader benchmark) or --decode-images")
    make_bench_shards(args.dir, args.shards, args.per_shard, args.texture_channels,
                      args.semantic_channels, args.dino_channels, args.latent_size)
    result = run_loader_benchmark(args.dir, batch_size=args.batch_size, seconds=args.seconds,
                                  repeats=args.repeats, num_threads=args.threads, prefetch=args.prefetch,
                                  baseline_batch_size=args.baseline_batch_size, device=args.device)
    line = json.dumps(result)
    print(line, flush=True)
    if args.json is not None:
        args.json.write_text(line + "\n")
    rates, ratios = result["samples_per_s"], result["ratio_vs_per_sample"]
    for name, rate in rates.items():
        log.info("%-28s %9.0f samples/s  x%.2f per-sample  %.0f%% of the copy ceiling", name, rate, ratios[name],
                 100 * result["ratio_vs_copy_ceiling"][name])
    log.info("default read mode %s; per node (x%d ranks) %.0f/s vs target %d; load average %s -> %s",
             result["default_read_mode"], result["per_node"]["ranks_per_node"],
             result["per_node"]["extrapolated_samples_per_s"], result["per_node"]["target"],
             result["machine"]["load_average_before"], result["machine"]["load_average_after"])
    if "loader_to_device" in rates:
        log.info("loader to %s, synchronized: %.0f/s", result["device"], rates["loader_to_device"])
    return result


def _decode(args: argparse.Namespace, log) -> dict:
    paths = [p for p, _ in ImageFolderIndex.scan(args.decode_images).samples[:args.max_images]]
    result = run_decode_benchmark(paths, args.image_size, args.batch_size, tuple(args.decoders.split(",")),
                                  args.device, args.threads, args.seconds)
    line = json.dumps(result)
    print(line, flush=True)
    if args.json is not None:
        args.json.write_text(line + "\n")
    for name, r in result["backends"].items():
        log.info("%s (%s): %.0f images/s, vs PIL %s", name, r["decoder"], r["images_per_s"], r["vs_pil_levels"])
    return result


def _encode(args: argparse.Namespace, log) -> dict:
    encoders = from_dict(EncodersConfig, apply_overrides({}, args.overrides), "bench_data.py --set")
    device = args.device if args.device != "cuda" or torch.cuda.is_available() else "cpu"
    result = run_encode_benchmark(encoders, batch_size=args.batch_size, image_size=args.image_size, device=device,
                                  seconds=args.seconds)
    line = json.dumps(result)
    print(line, flush=True)
    if args.json is not None:
        args.json.write_text(line + "\n")
    log.info("extraction encoders on %s: %.1f images/s (each with its flip)", result["device"], result["images_per_s"])
    return result


if __name__ == "__main__":
    main()
