"""Data pipeline throughput: the shard loader and image decoding.

Loader: measured against a reader that opens the shard file for every sample.

`PerSampleReader` reads one sample at a time through `safetensors.safe_open`, opening the shard
for each item as the reference `ImgLatentDataset` does, and batches with `torch.stack` like a
default-collated DataLoader. `run_loader_benchmark` times it and our `ShardLoader` in each read
mode (mmap, pread) on the same shards, in the same global order, alternating all of them so
that machine load hits each alike, after checking that they deliver identical tensors. One more
figure times one memory copy per sample (rows of in-memory arrays into a reused buffer): the
ceiling of any loader on the machine.

Decoding (`run_decode_benchmark`): images/s of each decoder backend (`images.select_decoder`)
on the same files, and the pixel difference of each backend's crops against the PIL path.
"""
from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open

from sfd_scale.config import EncodersConfig
from sfd_scale.models.dinov2 import DinoFeatureEncoder, DinoViT
from sfd_scale.models.semantic_vae import SemanticVAE
from sfd_scale.models.texture_vae import AutoencoderKL

from .encoders import composite_encode_fn
from .images import hflip, select_decoder
from .loader import DEFAULT_READ_MODE, LatentShardDataset, ReadMode, ShardLoader
from .shards import (
    DINO_KEY,
    FLIP_SUFFIX,
    LABEL_KEY,
    SEMANTIC_KEY,
    TEXTURE_KEY,
    RunningStats,
    list_shards,
    read_stats,
    shard_name,
    validate_shard,
    write_shard,
    write_stats,
)

logger = logging.getLogger(__name__)

RANKS_PER_NODE = 8
NODE_TARGET = 16_000  # samples/s per node: 8 GPUs x 400 images/s x 5 headroom (issue 6)


def make_bench_shards(
    data_dir: str | os.PathLike,
    num_shards: int = 2,
    per_shard: int = 1000,
    texture_channels: int = 32,
    semantic_channels: int = 16,
    dino_channels: int = 768,
    latent_size: int = 16,
    seed: int = 0,
    num_classes: int = 1000,
) -> Path:
    """Random shards in the reference layout (our writer) plus exact stats; kept if present with
    the same sizes and shapes (labels are not checked)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    want = [data_dir / shard_name(0, k) for k in range(num_shards)]
    shapes = {TEXTURE_KEY: (per_shard, texture_channels, latent_size, latent_size),
              SEMANTIC_KEY: (per_shard, semantic_channels, latent_size, latent_size),
              DINO_KEY: (per_shard, dino_channels, latent_size, latent_size)}
    if all(p.exists() for p in want) and (data_dir / "latents_sv_stats.pt").exists():
        if all({k: tuple(info.shapes[k]) for k in shapes} == shapes for info in map(validate_shard, want)):
            return data_dir
    gen = torch.Generator().manual_seed(seed)
    stats = {TEXTURE_KEY: RunningStats(texture_channels), SEMANTIC_KEY: RunningStats(semantic_channels)}
    hw = (latent_size, latent_size)
    for path in want:
        arrays = {}
        for key, channels in ((TEXTURE_KEY, texture_channels), (SEMANTIC_KEY, semantic_channels)):
            for suffix in ("", FLIP_SUFFIX):
                arrays[key + suffix] = torch.randn(per_shard, channels, *hw, generator=gen) * 2 + 0.5
            stats[key].update(arrays[key])
        for suffix in ("", FLIP_SUFFIX):
            arrays[DINO_KEY + suffix] = torch.randn(per_shard, dino_channels, *hw, generator=gen).half()
        arrays[LABEL_KEY] = torch.randint(0, num_classes, (per_shard,), generator=gen)
        write_shard(path, arrays)
    for key, s in stats.items():
        write_stats(data_dir, key, s.mean, s.std())
    return data_dir


class PerSampleReader:
    """The baseline: every sample opens its shard with `safe_open` and slices three arrays."""

    def __init__(self, data_dir: str | os.PathLike, latent_multiplier: float = 1.0) -> None:
        self.locations: list[tuple[str, int]] = []
        for path in list_shards(data_dir):
            self.locations.extend((str(path), row) for row in range(validate_shard(path).num_samples))
        self.texture_norm = read_stats(data_dir, TEXTURE_KEY)
        self.semantic_norm = read_stats(data_dir, SEMANTIC_KEY)
        self.latent_multiplier = latent_multiplier

    def item(self, index: int, flipped: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        path, row = self.locations[index]
        suffix = FLIP_SUFFIX if flipped else ""
        with safe_open(path, framework="pt", device="cpu") as f:
            texture = f.get_slice(TEXTURE_KEY + suffix)[row:row + 1]
            semantic = f.get_slice(SEMANTIC_KEY + suffix)[row:row + 1]
            dino = f.get_slice(DINO_KEY + suffix)[row:row + 1].float()
            label = f.get_slice(LABEL_KEY)[row:row + 1]
        texture = (texture - self.texture_norm[0]) / self.texture_norm[1]
        semantic = (semantic - self.semantic_norm[0]) / self.semantic_norm[1]
        x = torch.cat([texture, semantic], dim=1)
        if self.latent_multiplier != 1.0:
            x = x * self.latent_multiplier
        return x[0], label[0], dino[0]

    def batch(self, indices: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, ...]:
        items = [self.item(i, f) for i, f in zip(indices.tolist(), flip.tolist())]
        return tuple(torch.stack(parts) for parts in zip(*items))


def _rate(run: Callable[[], int], min_seconds: float) -> float:
    """Samples per second of repeated `run()` calls (each returns its sample count)."""
    start, samples = time.perf_counter(), 0
    while True:
        samples += run()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return samples / elapsed


def _warm_page_cache(data_dir: Path) -> None:
    for path in list_shards(data_dir):
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def run_loader_benchmark(
    data_dir: str | os.PathLike,
    batch_size: int = 256,
    seconds: float = 5.0,
    repeats: int = 3,
    num_threads: int = 2,
    prefetch: int = 2,
    baseline_batch_size: int = 32,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Samples/s of the per-sample reader and of our loader in each read mode on `data_dir`,
    and their ratios.

    With a CUDA `device`, a fourth run times the whole device path (pinned staging, copy,
    DINO widening on the GPU, synchronized per batch) after checking that its first batch equals
    the CPU loader's.

    The per-sample reader collates `baseline_batch_size` samples per batch, the reference's
    DataLoader setting: at 256 its fresh 200 MB batches would be page-faulted in, slowing it
    down by half on small machines, and the ratio would flatter us.

    Our loader is timed in each read mode and two settings: with the reference's output
    (float32 DINO features, rows `loader_<mode>`) and as the host side of GPU training (DINO
    features left in float16, widened on the GPU after the copy, rows
    `loader_gpu_host_path_<mode>`). The machine's load average is recorded before and after:
    other work on the cores slows every row, so compare rows of one run only.
    """
    data_dir = Path(data_dir)
    load_before = os.getloadavg()
    _warm_page_cache(data_dir)
    datasets = {mode: LatentShardDataset(data_dir, read_mode=mode) for mode in ReadMode}
    default_mode = DEFAULT_READ_MODE
    dataset = datasets[default_mode]
    if batch_size > len(dataset):
        raise ValueError(f"batch_size {batch_size} exceeds the {len(dataset)} samples in {data_dir}")
    reader = PerSampleReader(data_dir)
    order, flip = ShardLoader(dataset, batch_size, seed=0).epoch_plan(0)

    # Every reader must deliver the same batch before their speeds mean anything.
    theirs = reader.batch(order[:batch_size], flip[:batch_size])
    for mode, ds in datasets.items():
        ours = ds.gather(order[:batch_size], flip[:batch_size])
        for a, b, name in zip(ours, theirs, ("x", "y", "feats_dino")):
            if not torch.equal(a, b):
                raise RuntimeError(f"loader ({mode.value}) and per-sample reader disagree on '{name}' in {data_dir}")

    state = {"per_sample": 0}

    def per_sample_run() -> int:
        start = state["per_sample"] % (len(dataset) - baseline_batch_size + 1)
        block = slice(start, start + baseline_batch_size)
        reader.batch(order[block], flip[block])
        state["per_sample"] += baseline_batch_size
        return baseline_batch_size

    def loader_run(ds: LatentShardDataset = dataset, **kwargs: Any) -> Callable[[], int]:
        loader = ShardLoader(ds, batch_size, seed=0, prefetch=prefetch, num_threads=num_threads, **kwargs)
        batches = _endless(loader)
        next(batches)  # thread start-up and first-touch of the buffers are not throughput

        def run() -> int:
            return next(batches)[0].shape[0]
        return run

    copy_run = _copy_ceiling(dataset, order, flip, batch_size)
    runs: dict[str, Callable[[], int]] = {"per_sample": per_sample_run}
    for mode, ds in datasets.items():
        runs[f"loader_{mode.value}"] = loader_run(ds)
        runs[f"loader_gpu_host_path_{mode.value}"] = loader_run(ds, feats_dtype=ds.dino_storage_dtype)
    runs["copy_ceiling"] = copy_run
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        on_device = next(iter(ShardLoader(dataset, batch_size, seed=0, device=device)))
        on_host = next(iter(ShardLoader(dataset, batch_size, seed=0, prefetch=0)))
        for a, b, name in zip(on_device, on_host, ("x", "y", "feats_dino")):
            if a.device.type != "cuda" or not torch.equal(a.cpu(), b):
                raise RuntimeError(f"the {device} loader path disagrees with the CPU loader on '{name}'")
        to_device = loader_run(device=device)

        def device_run() -> int:
            n = to_device()
            torch.cuda.synchronize(device)
            return n
        runs["loader_to_device"] = device_run
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            rates[name].append(_rate(run, seconds / repeats))
    median = {name: statistics.median(values) for name, values in rates.items()}
    sample = dataset.infos[0]
    sample_bytes = sum(sample.row_bytes(k) for k in (TEXTURE_KEY, SEMANTIC_KEY, DINO_KEY, LABEL_KEY))
    for ds in datasets.values():
        ds.close()
    best_loader = max(median[f"loader_{default_mode.value}"], median[f"loader_gpu_host_path_{default_mode.value}"])
    return {
        "what": "data_loader_benchmark",
        "data_dir": str(data_dir),
        "samples_in_set": len(dataset),
        "bytes_per_sample_read": sample_bytes,
        "sample_shapes": {
            "x": [dataset.texture_channels + dataset.semantic_channels, *dataset.latent_hw],
            "feats_dino": [dataset.dino_channels, *dataset.latent_hw],
        },
        "batch_size": batch_size,
        "per_sample_batch_size": baseline_batch_size,
        "loader_threads": num_threads,
        "prefetch": prefetch,
        "samples_per_s": {name: round(v, 1) for name, v in median.items()},
        "samples_per_s_repeats": {name: [round(v, 1) for v in vs] for name, vs in rates.items()},
        "ratio_vs_per_sample": {name: round(v / median["per_sample"], 2) for name, v in median.items()},
        "ratio_vs_copy_ceiling": {name: round(v / median["copy_ceiling"], 2) for name, v in median.items()},
        "default_read_mode": default_mode.value,
        "device": str(device) if "loader_to_device" in runs else None,
        "per_node": {
            "ranks_per_node": RANKS_PER_NODE,
            "extrapolated_samples_per_s": round(best_loader * RANKS_PER_NODE, 1),
            "target": NODE_TARGET,
            "meets_target": best_loader * RANKS_PER_NODE >= NODE_TARGET,
            "assumption": (f"one loader process per GPU, each as fast as this one process "
                           f"({default_mode.value} read mode) with "
                           f"{num_threads} reader threads; holds while the node's cores and memory "
                           f"bandwidth scale with its GPU count and the shards are in the page cache"),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
            "torch": torch.__version__,
        },
    }


def _endless(loader: ShardLoader):
    while True:
        yield from loader


def _copy_ceiling(dataset: LatentShardDataset, order: torch.Tensor, flip: torch.Tensor,
                  batch_size: int) -> Callable[[], int]:
    """One memcpy per sample: rows of an in-memory array (twice the first shard's size at most
    1024 rows, so it exceeds the CPU caches) gathered into a reused buffer, as many bytes per
    sample as a loader reads."""
    info = dataset.infos[0]
    rows = min(info.num_samples, 512)
    row_bytes = sum(info.row_bytes(k) for k in (TEXTURE_KEY, SEMANTIC_KEY, DINO_KEY))
    source = torch.randint(0, 255, (2 * rows, row_bytes), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    target = torch.empty(batch_size, row_bytes, dtype=torch.uint8)
    picks = order % rows + rows * flip.long()
    state = {"start": 0}

    def run() -> int:
        start = state["start"] % (len(picks) - batch_size + 1)
        torch.index_select(source, 0, picks[start:start + batch_size], out=target)
        state["start"] += batch_size
        return batch_size
    return run


def run_decode_benchmark(
    paths: list[Path],
    image_size: int = 256,
    batch_size: int = 64,
    backends: tuple[str, ...] = ("pil", "dali"),
    device: torch.device | str = "cpu",
    num_workers: int = 4,
    seconds: float = 10.0,
) -> dict[str, Any]:
    """Images/s of each decoder backend on `paths` (cycled), and its crops against PIL's.

    The difference is in uint8 levels over the first batch: max, mean and the fraction of
    values more than one level apart.
    """
    if not paths:
        raise ValueError("run_decode_benchmark needs at least one image")
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    reference = select_decoder("pil", image_size, batch_size, "cpu", num_workers)
    first = reference.decode(batches[0]).images
    reference.close()
    results: dict[str, Any] = {}
    for backend in backends:
        decoder = select_decoder(backend, image_size, batch_size, device, num_workers)
        state = {"i": 0}

        def run() -> int:
            batch = decoder.decode(batches[state["i"] % len(batches)])
            state["i"] += 1
            if batch.images.is_cuda:
                torch.cuda.synchronize(batch.images.device)
            return batch.images.shape[0]

        got = decoder.decode(batches[0]).images.cpu()  # also builds the pipeline, untimed
        levels = ((got - first).abs() * 127.5).round() if got.shape == first.shape else None
        rate = _rate(run, seconds)
        decoder.close()
        results[backend] = {
            "decoder": decoder.name,
            "images_per_s": round(rate, 1),
            "vs_pil_levels": None if levels is None else {
                "max": float(levels.max()), "mean": round(float(levels.mean()), 4),
                "fraction_over_1": round(float((levels > 1).float().mean()), 6)},
        }
    return {
        "what": "image_decode_benchmark",
        "images": len(paths),
        "image_size": image_size,
        "batch_size": batch_size,
        "workers": num_workers,
        "device": str(device),
        "backends": results,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
    }


def run_encode_benchmark(encoders: EncodersConfig, batch_size: int = 64, image_size: int = 256,
                         device: torch.device | str = "cpu", bf16: bool | None = None,
                         seconds: float = 10.0) -> dict[str, Any]:
    """Images/s of extraction's GPU side: DINOv2, the texture VAE and the Semantic VAE (random
    weights of the configured shapes) on each image and its flip, as `extract` runs them.

    The cost of a forward does not depend on the weights' values, so no checkpoint is needed.
    Each timed call ends with the outputs on the CPU, as extraction writes them.
    """
    device = torch.device(device)
    bf16 = device.type == "cuda" if bf16 is None else bf16
    torch.manual_seed(0)
    vae = AutoencoderKL(encoders.texture_vae).to(device).eval()
    dino = DinoFeatureEncoder(DinoViT(encoders.dino), encoders.dino.input_size).to(device).eval()
    semvae = SemanticVAE(encoders.semvae).to(device).eval()
    encode = composite_encode_fn(vae, dino, semvae, bf16=bf16)
    images = torch.rand(batch_size, 3, image_size, image_size, device=device) * 2 - 1
    flipped = hflip(images)

    def run() -> int:
        for batch in (images, flipped):
            encode(batch)
        return batch_size

    run()  # warm-up: kernels, cuDNN autotuning, allocator
    rate = _rate(run, seconds)
    shapes = {key: list(value.shape[1:]) for key, value in encode(images[:1]).items()}
    return {"what": "encode", "device": str(device), "bf16": bf16, "batch_size": batch_size,
            "image_size": image_size, "images_per_s": rate, "outputs_per_image": shapes,
            "note": "each image is encoded twice (it and its flip), as extraction stores both"}
