"""Encode an image folder into latent shards (reference layout) plus per-channel statistics.

The encoders (texture VAE, DINOv2, SemVAE) are built elsewhere and passed in as one function,
`encode_fn(images_pm1) -> {'latents', 'latents_sv', 'feats_dino'}`, so this stage only decodes
images, batches them, and writes files. Each image is encoded as stored and horizontally
flipped (the reference stores both). Shard k holds images [k * shard_size, (k + 1) * shard_size)
of the folder index, minus unreadable ones, which are skipped, logged and listed in
`skipped.txt`.

Distributed: rank r of w writes the shards k with k % w == r, each under a temporary name
renamed when complete. Shard names, contents and random draws depend only on (seed, k), never
on the rank count, so any number of ranks writes the same bytes as one. Runs are resumable: a
shard whose file exists and validates is kept. Each shard's header carries the exact
per-channel partial statistics of its latents (count, mean, sum of squared deviations); after
all shards exist, rank 0 merges them in shard order into `latents_stats.pt` and
`latents_sv_stats.pt` (exact mean and unbiased std) and writes `skipped.txt`. A shard none
of whose images can be read leaves a small `<shard>.empty.json` marker instead (a shard file
needs at least the array shapes), so its skipped files are still reported and resume skips it.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch

from sfd_scale.atomic import atomic_write_bytes

from .images import DecodedBatch, ImageDecoder, ImageFolderIndex, PilDecoder, hflip
from .shards import (
    FEATURE_KEYS,
    FLIP_SUFFIX,
    LABEL_KEY,
    SHARD_DTYPES,
    STATS_KEYS,
    RunningStats,
    as_torch,
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
EMPTY_SHARD_SUFFIX = ".empty.json"
STATS_METADATA_KEY = "stats"
# Ranks wait for the slowest one before the statistics: on a resumed run one rank may have
# all its shards while another encodes for hours.
BARRIER_TIMEOUT = timedelta(days=7)
_STATS_CHUNK = 1024  # samples per float64 stats update: bounds memory on 10k-sample shards


@dataclass
class ExtractionReport:
    """What one `extract_folder` call did on this rank."""

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
    decoder: ImageDecoder | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> ExtractionReport:
    """Write this rank's shards of `index` that are not already complete, then the statistics.

    Args:
        index: the images and labels, in order.
        out_dir: folder for shards, `latents_stats.pt`, `latents_sv_stats.pt`, `skipped.txt`.
        encode_fn: (B, 3, image_size, image_size) float32 in [-1, 1] -> dict with `latents`,
            `latents_sv`, `feats_dino`, each (B, C, H, W); stored as float32/float32/float16.
        shard_size: images of the index per shard (the reference uses 10 000).
        image_size: ADM center-crop size.
        batch_size: images per `encode_fn` call (the flipped copies go in a second call).
        seed: seeds torch's global RNG per shard, for stochastic encoders.
        num_workers: PIL decoding threads when no `decoder` is given (0 decodes inline).
        decoder: batch image decoder (see `images.select_decoder`); PIL by default.
        rank, world_size: this process's place; with world_size > 1 a torch.distributed
            process group must be initialized (only barriers are used, any backend).

    Statistics are exact per-channel mean and unbiased std over all non-flipped samples of
    every shard in `out_dir`; the reference instead estimates them from a random subset of up
    to 10 000 non-flipped samples (`get_latent_stats`).
    """
    for name, value in (("shard_size", shard_size), ("image_size", image_size), ("batch_size", batch_size)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    if world_size > 1 and not torch.distributed.is_initialized():
        raise ValueError(f"extraction with world_size={world_size} needs an initialized torch.distributed "
                         "process group (the launcher starts one under torchrun or srun)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = ExtractionReport(num_images=len(index))
    own_decoder = decoder is None
    if decoder is None:
        decoder = PilDecoder(image_size, num_workers)
    try:
        for shard in range(rank, math.ceil(len(index) / shard_size), world_size):
            _extract_shard(index, out_dir, shard, encode_fn, decoder, shard_size, image_size, batch_size,
                           seed, report)
    finally:
        if own_decoder:
            decoder.close()
    if world_size > 1:
        torch.distributed.barrier()
    if rank == 0:
        finalize_extraction(out_dir)
    if world_size > 1:
        torch.distributed.barrier()  # nobody returns before the statistics exist
    return report


def _extract_shard(index: ImageFolderIndex, out_dir: Path, shard: int, encode_fn: EncodeFn,
                   decoder: ImageDecoder, shard_size: int, image_size: int, batch_size: int, seed: int,
                   report: ExtractionReport) -> None:
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
        return
    _remove_stale_temporaries(path)
    torch.manual_seed(_shard_seed(seed, shard))
    arrays, skipped = _encode_members(index, members, encode_fn, decoder, batch_size)
    report.skipped.extend(skipped)
    if arrays is None:
        logger.warning("shard %s: no readable image among %d, marked empty", path.name, len(members))
        marker = {**expected, "skipped": skipped}
        atomic_write_bytes(_empty_marker(path), json.dumps(marker, sort_keys=True).encode())
        return
    stats = {key: _array_stats(arrays[key]).to_dict() for key in STATS_KEYS}
    write_shard(path, arrays, {**expected, "total_size": len(arrays[LABEL_KEY]), "skipped": skipped,
                               STATS_METADATA_KEY: stats})
    report.shards_written.append(path)
    report.num_encoded += len(arrays[LABEL_KEY])
    logger.info("wrote %s (%d samples, %d skipped)", path.name, len(arrays[LABEL_KEY]), len(skipped))


def finalize_extraction(data_dir: str | os.PathLike) -> None:
    """Statistics files and `skipped.txt` from every shard of `data_dir`, in shard order."""
    data_dir = Path(data_dir)
    per_shard = {info.path.name[:-len(".safetensors")]: info.metadata.get("skipped", [])
                 for info in map(validate_shard, list_shards(data_dir))}
    for marker in data_dir.glob("*" + EMPTY_SHARD_SUFFIX):
        per_shard[marker.name[:-len(EMPTY_SHARD_SUFFIX)]] = _read_marker(marker).get("skipped", [])
    skipped = [name for stem in sorted(per_shard) for name in per_shard[stem]]
    atomic_write_bytes(Path(data_dir) / SKIPPED_REPORT, "".join(f"{s}\n" for s in skipped).encode())
    if skipped:
        logger.warning("skipped %d unreadable images, listed in %s", len(skipped), Path(data_dir) / SKIPPED_REPORT)
    write_latent_stats(data_dir)


def write_latent_stats(data_dir: str | os.PathLike) -> None:
    """Exact stats of `latents` and `latents_sv` over all shards; the partial stats stored in
    our shards' headers are used, other shards (e.g. downloaded ones) are read."""
    infos = [validate_shard(path) for path in list_shards(data_dir)]
    for key in STATS_KEYS:
        total = RunningStats(infos[0].channels(key))
        for info in infos:
            if info.channels(key) != total.num_channels:
                raise ValueError(
                    f"shard {info.path}: '{key}' has {info.channels(key)} channels, "
                    f"{infos[0].path.name} has {total.num_channels}"
                )
            stored = info.metadata.get(STATS_METADATA_KEY, {}).get(key)
            if stored is not None:
                part = RunningStats.from_dict(stored, f"shard {info.path} stats for '{key}'")
            else:
                array = open_shard_arrays(info.path, [key])[key]
                part = _array_stats(as_torch(array, info.dtypes[key]))
            total.merge(part)
        write_stats(data_dir, key, total.mean, total.std())
        logger.info("wrote %s stats over %d values per channel", key, total.count)


def _array_stats(values: torch.Tensor) -> RunningStats:
    stats = RunningStats(values.shape[1])
    for start in range(0, values.shape[0], _STATS_CHUNK):
        stats.update(values[start:start + _STATS_CHUNK])
    return stats


def _empty_marker(path: Path) -> Path:
    return path.with_name(path.name[:-len(".safetensors")] + EMPTY_SHARD_SUFFIX)


def _read_marker(marker: Path) -> dict:
    try:
        return json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"empty-shard marker {marker} is unreadable ({exc}); delete it to redo the shard") from exc


def _check_settings(where: Path, meta: Mapping, expected: Mapping) -> None:
    for key, value in expected.items():
        if meta.get(key) != value:
            raise ValueError(
                f"shard {where} was written with {key}={meta.get(key)!r} but this run has {value!r}; "
                f"extract into a fresh folder or delete the old shards"
            )


def _reuse(path: Path, expected: dict, num_members: int) -> list[str] | None:
    """Skipped-file list of an existing complete shard, or None when it must be (re)written."""
    marker = _empty_marker(path)
    if marker.exists() and not path.exists():
        meta = _read_marker(marker)
        _check_settings(marker, meta, expected)
        return list(meta.get("skipped", []))
    if not path.exists():
        return None
    try:
        info = validate_shard(path)
    except ValueError as exc:
        logger.warning("re-creating invalid shard: %s", exc)
        return None
    meta = info.metadata
    _check_settings(path, meta, expected)
    skipped = list(meta.get("skipped", []))
    if info.num_samples + len(skipped) != num_members:
        logger.warning("re-creating %s: %d samples + %d skipped != %d images",
                       path, info.num_samples, len(skipped), num_members)
        return None
    return skipped


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files a killed writer of this shard left behind (atomic_write_bytes names)."""
    for stale in path.parent.glob(f".{path.name}.tmp.*"):
        logger.info("removing %s left by an interrupted run", stale.name)
        stale.unlink(missing_ok=True)


def _encode_members(
    index: ImageFolderIndex,
    members: Sequence[tuple[Path, int]],
    encode_fn: EncodeFn,
    decoder: ImageDecoder,
    batch_size: int,
) -> tuple[dict[str, torch.Tensor] | None, list[str]]:
    """Encode one shard's images; returns (shard arrays or None if none readable, skipped)."""
    parts: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    skipped: list[str] = []
    for chunk, decoded in _decoded_batches(members, decoder, batch_size):
        labels = []
        for i, (path, label) in enumerate(chunk):
            if i in decoded.failures:
                logger.warning("skipping %s", decoded.failures[i])
                skipped.append(index.relative(path))
            else:
                labels.append(label)
        if not labels:
            continue
        x = decoded.images
        for suffix, batch in (("", x), (FLIP_SUFFIX, hflip(x))):
            for key, value in _checked_encode(encode_fn, batch).items():
                parts[key + suffix].append(value)
        parts[LABEL_KEY].append(torch.tensor(labels, dtype=SHARD_DTYPES[LABEL_KEY]))
    if not parts:
        return None, skipped
    return {k: torch.cat(v) for k, v in parts.items()}, skipped


def _decoded_batches(
    members: Sequence[tuple[Path, int]], decoder: ImageDecoder, batch_size: int
) -> Iterator[tuple[Sequence[tuple[Path, int]], DecodedBatch]]:
    """Yield (chunk, decoded chunk); the next chunk decodes on a helper thread while the
    caller encodes this one."""
    chunks = [members[i:i + batch_size] for i in range(0, len(members), batch_size)]
    with ThreadPoolExecutor(1, "decode-ahead") as ahead:
        pending: Future | None = None
        for i, chunk in enumerate(chunks):
            current = pending.result() if pending is not None else decoder.decode([p for p, _ in chunk])
            pending = (ahead.submit(decoder.decode, [p for p, _ in chunks[i + 1]])
                       if i + 1 < len(chunks) else None)
            yield chunk, current


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
