"""Encode an image folder into latent shards (reference layout) plus per-channel statistics.

The encoders (texture VAE, DINOv2, SemVAE) are built elsewhere and passed in as one function,
`encode_fn(images_pm1) -> {'latents', 'latents_sv', 'feats_dino'}`, so this stage only decodes
images, batches them, and writes files. Each image is encoded as stored and horizontally
flipped (the reference stores both). Shard k holds images [k * shard_size, (k + 1) * shard_size)
of the folder index, minus unreadable ones, which are skipped, logged and listed in
`skipped.txt`. Runs are resumable: a shard whose file exists and validates is kept, and each
shard's random state (e.g. `posterior.sample()`) is seeded from (seed, shard index), so a
re-created shard has the same bytes as in an uninterrupted run.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch

from .images import ImageFolderIndex, hflip, load_image_pm1
from .shards import (
    FEATURE_KEYS,
    FLIP_SUFFIX,
    LABEL_KEY,
    SHARD_DTYPES,
    STATS_KEYS,
    RunningStats,
    as_torch,
    atomic_write_bytes,
    list_shards,
    open_shard_arrays,
    shard_name,
    validate_shard,
    write_shard,
    write_stats,
)

logger = logging.getLogger(__name__)

EncodeFn = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]
SKIPPED_REPORT = "skipped.txt"
_STATS_CHUNK = 1024  # samples per float64 stats update: bounds memory on 10k-sample shards


@dataclass
class ExtractionReport:
    """What one `extract_folder` call did."""

    num_images: int
    num_encoded: int = 0
    shards_written: list[Path] = field(default_factory=list)
    shards_reused: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # paths relative to the image root


def extract_folder(
    index: ImageFolderIndex,
    out_dir: str | os.PathLike,
    encode_fn: EncodeFn,
    shard_size: int = 10_000,
    image_size: int = 256,
    batch_size: int = 32,
    *,
    seed: int = 0,
    num_workers: int = 0,
) -> ExtractionReport:
    """Write every shard of `index` that is not already complete, then the statistics.

    Args:
        index: the images and labels, in order.
        out_dir: folder for shards, `latents_stats.pt`, `latents_sv_stats.pt`, `skipped.txt`.
        encode_fn: (B, 3, image_size, image_size) float32 in [-1, 1] -> dict with `latents`,
            `latents_sv`, `feats_dino`, each (B, C, H, W); stored as float32/float32/float16.
        shard_size: images of the index per shard (the reference uses 10 000).
        image_size: ADM center-crop size.
        batch_size: images per `encode_fn` call (the flipped copies go in a second call).
        seed: seeds torch's global RNG per shard, for stochastic encoders.
        num_workers: threads decoding images ahead of the encoder (0 decodes inline).

    Statistics are exact per-channel mean and unbiased std over all non-flipped samples of
    every shard in `out_dir`; the reference instead estimates them from a random subset of up
    to 10 000 non-flipped samples (`get_latent_stats`).
    """
    for name, value in (("shard_size", shard_size), ("image_size", image_size), ("batch_size", batch_size)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = ExtractionReport(num_images=len(index))
    pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
    try:
        for shard in range(math.ceil(len(index) / shard_size)):
            members = index.samples[shard * shard_size:(shard + 1) * shard_size]
            expected = {
                "image_size": image_size,
                "shard_size": shard_size,
                "seed": seed,
                "sources_sha256": _sources_digest(index, members),
            }
            path = out_dir / shard_name(0, shard)
            reused = _reuse(path, expected, len(members))
            if reused is not None:
                report.shards_reused.append(path)
                report.skipped.extend(reused)
                continue
            torch.manual_seed(_shard_seed(seed, shard))
            arrays, skipped = _encode_members(index, members, encode_fn, image_size, batch_size, pool)
            report.skipped.extend(skipped)
            if arrays is None:
                logger.warning("shard %s: no readable image among %d, not written", path.name, len(members))
                continue
            write_shard(path, arrays, {**expected, "total_size": len(arrays[LABEL_KEY]), "skipped": skipped})
            report.shards_written.append(path)
            report.num_encoded += len(arrays[LABEL_KEY])
            logger.info("wrote %s (%d samples, %d skipped)", path.name, len(arrays[LABEL_KEY]), len(skipped))
    finally:
        if pool is not None:
            pool.shutdown()
    atomic_write_bytes(out_dir / SKIPPED_REPORT, "".join(f"{s}\n" for s in report.skipped).encode())
    if report.skipped:
        logger.warning("skipped %d unreadable images, listed in %s",
                       len(report.skipped), out_dir / SKIPPED_REPORT)
    write_latent_stats(out_dir)
    return report


def write_latent_stats(data_dir: str | os.PathLike) -> None:
    """Compute exact stats of `latents` and `latents_sv` over all shards and write the files."""
    infos = [validate_shard(path) for path in list_shards(data_dir)]
    for key in STATS_KEYS:
        stats = RunningStats(infos[0].channels(key))
        for info in infos:
            if info.channels(key) != stats.num_channels:
                raise ValueError(
                    f"shard {info.path}: '{key}' has {info.channels(key)} channels, "
                    f"{infos[0].path.name} has {stats.num_channels}"
                )
            array = open_shard_arrays(info.path, [key])[key]
            for start in range(0, info.num_samples, _STATS_CHUNK):
                stats.update(as_torch(array[start:start + _STATS_CHUNK], info.dtypes[key]))
        write_stats(data_dir, key, stats.mean, stats.std())
        logger.info("wrote %s stats over %d values per channel", key, stats.count)


def _reuse(path: Path, expected: dict, num_members: int) -> list[str] | None:
    """Skipped-file list of an existing complete shard, or None when it must be (re)written."""
    if not path.exists():
        return None
    try:
        info = validate_shard(path)
    except ValueError as exc:
        logger.warning("re-creating invalid shard: %s", exc)
        return None
    meta = info.metadata
    for key, value in expected.items():
        if meta.get(key) != value:
            raise ValueError(
                f"shard {path} was written with {key}={meta.get(key)!r} but this run has {value!r}; "
                f"extract into a fresh folder or delete the old shards"
            )
    skipped = list(meta.get("skipped", []))
    if info.num_samples + len(skipped) != num_members:
        logger.warning("re-creating %s: %d samples + %d skipped != %d images",
                       path, info.num_samples, len(skipped), num_members)
        return None
    return skipped


def _encode_members(
    index: ImageFolderIndex,
    members: Sequence[tuple[Path, int]],
    encode_fn: EncodeFn,
    image_size: int,
    batch_size: int,
    pool: ThreadPoolExecutor | None,
) -> tuple[dict[str, torch.Tensor] | None, list[str]]:
    """Encode one shard's images; returns (shard arrays or None if none readable, skipped)."""
    parts: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    skipped: list[str] = []
    for chunk, loaded in _decoded_batches(members, image_size, batch_size, pool):
        images, labels = [], []
        for (path, label), item in zip(chunk, loaded):
            if isinstance(item, Exception):
                logger.warning("skipping %s", item)
                skipped.append(index.relative(path))
            else:
                images.append(item)
                labels.append(label)
        if not images:
            continue
        x = torch.stack(images)
        for suffix, batch in (("", x), (FLIP_SUFFIX, hflip(x))):
            for key, value in _checked_encode(encode_fn, batch).items():
                parts[key + suffix].append(value)
        parts[LABEL_KEY].append(torch.tensor(labels, dtype=SHARD_DTYPES[LABEL_KEY]))
    if not parts:
        return None, skipped
    return {k: torch.cat(v) for k, v in parts.items()}, skipped


def _decoded_batches(
    members: Sequence[tuple[Path, int]], image_size: int, batch_size: int, pool: ThreadPoolExecutor | None
) -> Iterator[tuple[Sequence[tuple[Path, int]], list[torch.Tensor | Exception]]]:
    """Yield (chunk, decoded images or the exception per file), one batch at a time; with a
    pool the next batch decodes while the caller encodes this one."""
    chunks = [members[i:i + batch_size] for i in range(0, len(members), batch_size)]
    if pool is None:
        for chunk in chunks:
            yield chunk, [_try_load(p, image_size) for p, _ in chunk]
        return
    in_flight: collections.deque[list[Future]] = collections.deque()
    for i, chunk in enumerate(chunks):
        while len(in_flight) < 2 and i + len(in_flight) < len(chunks):
            ahead = chunks[i + len(in_flight)]
            in_flight.append([pool.submit(_try_load, p, image_size) for p, _ in ahead])
        yield chunk, [f.result() for f in in_flight.popleft()]


def _try_load(path: Path, image_size: int) -> torch.Tensor | Exception:
    try:
        return load_image_pm1(path, image_size)
    except (ValueError, OSError) as exc:  # unreadable or vanished file: skip, never crash
        return exc


def _checked_encode(encode_fn: EncodeFn, images: torch.Tensor) -> dict[str, torch.Tensor]:
    out = encode_fn(images)
    result = {}
    for key in FEATURE_KEYS:
        if key not in out:
            raise ValueError(f"encode_fn must return keys {list(FEATURE_KEYS)}, got {sorted(out)}")
        value = out[key]
        if value.dim() != 4 or value.shape[0] != images.shape[0]:
            raise ValueError(
                f"encode_fn['{key}'] must be ({images.shape[0]}, C, H, W) for {images.shape[0]} images, "
                f"got {list(value.shape)}"
            )
        result[key] = value.detach().to("cpu", SHARD_DTYPES[key])
    return result


def _sources_digest(index: ImageFolderIndex, members: Sequence[tuple[Path, int]]) -> str:
    """Fingerprint of a shard's input list, so a changed image folder is not silently mixed in."""
    text = "\n".join(f"{index.relative(p)}\t{label}" for p, label in members)
    return hashlib.sha256(text.encode()).hexdigest()


def _shard_seed(seed: int, shard: int) -> int:
    return (seed * 1_000_003 + shard) % (2**63)
