"""Sampling N images across every rank, resumable, into an ADM-style `.npz`.

The N global indices are cut into fixed chunks of `sample.batch_size` ([0, B), [B, 2B), ...);
chunk k belongs to rank k mod world_size. A sample's noise depends only on (seed, index) and
its label only on (index, N), and a chunk's composition does not depend on the rank count, so
the images do not depend on how many ranks drew them (for dopri5 too, whose adaptive steps are
shared within a batch).

Each finished chunk is one file, `parts/part-<start>-<end>.npz` (images, labels, indices),
written atomically: a killed run leaves whole parts or none, and a rerun redraws only the
chunks whose file is missing or unreadable. `parts/settings.json` records everything that
decides the pixels; a rerun with different settings into the same folder is refused rather than
mixing two runs. Rank 0 finally streams the parts into `samples.npz` (`arr_0` uint8
(N, H, W, 3), `labels` (N,)) without holding all images in memory.
"""
from __future__ import annotations

import io
import json
import logging
import os
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sfd_scale.atomic import atomic_path, atomic_write_bytes
from sfd_scale.config import MODEL_FAST_PATH_KEYS, ModelConfig, SFDConfig, from_dict, load_yaml, to_dict
from sfd_scale.diffusion.sampler import balanced_labels
from sfd_scale.eval.generate import (LatentStats, decode_to_uint8, generate_latents,
                                     load_model_for_sampling, save_grid)
from sfd_scale.eval.metrics import read_npy_header
from sfd_scale.parallel import distributed
from sfd_scale.parallel.dims import ParallelDims

log = logging.getLogger(__name__)

PARTS_DIR = "parts"
SETTINGS_FILE = "settings.json"
SAMPLES_FILE = "samples.npz"
GRID_FILE = "grid.png"
PNG_DIR = "images"
GRID_IMAGES = 100
PRECISIONS = ("fp32", "bf16")

ImageFn = Callable[[torch.Tensor, torch.Tensor], np.ndarray]
"""(global indices (B,), labels (B,)) -> uint8 images (B, H, W, 3)."""


@dataclass(frozen=True)
class SamplePlan:
    """Which global indices exist and how they are cut into chunks."""

    num_images: int
    chunk_size: int

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"number of images must be positive, got {self.num_images}")
        if self.chunk_size < 1:
            raise ValueError(f"sample.batch_size must be positive, got {self.chunk_size}")

    def chunks(self) -> list[tuple[int, int]]:
        """(start, end) of every chunk, in index order."""
        return [(s, min(s + self.chunk_size, self.num_images))
                for s in range(0, self.num_images, self.chunk_size)]

    def rank_chunks(self, rank: int, world_size: int) -> list[tuple[int, int]]:
        """The chunks one rank draws: every world_size-th, starting at its rank."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        return self.chunks()[rank::world_size]


def sample_labels(num_images: int, num_classes: int, balanced: bool, seed: int) -> torch.Tensor:
    """Label of every global index: balanced (50 per class for 50k / 1000) or uniform random
    from a generator seeded by `seed`, identical on every rank."""
    if balanced:
        return balanced_labels(num_images, num_classes)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_classes, (num_images,), generator=generator)


# ----------------------------------------------------------------------------------------------
# Finished chunks on disk
# ----------------------------------------------------------------------------------------------
class PartStore:
    """The folder of finished chunks of one sampling run."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.parts_dir = self.out_dir / PARTS_DIR
        self.png_dir = self.out_dir / PNG_DIR

    def path(self, start: int, end: int) -> Path:
        return self.parts_dir / f"part-{start:07d}-{end:07d}.npz"

    def prepare(self, settings: dict[str, Any]) -> None:
        """Create the folder, drop temporaries of a killed run, and record `settings` or check
        them against the recorded ones. Call on one rank before any rank writes."""
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        for folder in (self.parts_dir, self.png_dir):
            for stale in folder.glob(".*.tmp.*"):
                stale.unlink()
        settings = json.loads(json.dumps(settings))  # the form it takes after a JSON round trip
        path = self.parts_dir / SETTINGS_FILE
        if not path.is_file():
            text = json.dumps(settings, indent=2, sort_keys=True) + "\n"
            atomic_write_bytes(path, text.encode())
            return
        recorded = json.loads(path.read_text())
        if recorded != settings:
            keys = sorted(k for k in set(recorded) | set(settings)
                          if recorded.get(k) != settings.get(k))
            raise ValueError(f"'{self.parts_dir}' holds parts drawn with other settings "
                             f"(differing: {', '.join(keys)}); sample into a new --out folder, "
                             f"or delete '{self.parts_dir}' to start over")

    def is_complete(self, start: int, end: int, labels: torch.Tensor) -> bool:
        """True when the chunk's file exists, opens, and holds exactly its indices and labels."""
        path = self.path(start, end)
        if not path.is_file():
            return False
        try:
            with zipfile.ZipFile(path) as zf, zf.open("images.npy") as f:
                shape, _, dtype = read_npy_header(f)
            with np.load(path) as data:
                indices, stored = data["indices"], data["labels"]
        except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as err:
            log.warning("part %s is unreadable (%s); drawing it again", path.name, err)
            return False
        ok = (dtype == np.uint8 and len(shape) == 4 and shape[0] == end - start
              and np.array_equal(indices, np.arange(start, end))
              and np.array_equal(stored, labels[start:end].numpy()))
        if not ok:
            log.warning("part %s does not hold chunk [%d, %d); drawing it again", path.name,
                        start, end)
        return ok

    def write(self, start: int, end: int, images: np.ndarray, labels: np.ndarray) -> Path:
        if images.shape[0] != end - start or images.dtype != np.uint8:
            raise ValueError(f"chunk [{start}, {end}) needs {end - start} uint8 images, got "
                             f"{images.dtype} {images.shape}")
        buffer = io.BytesIO()
        np.savez(buffer, images=images, labels=np.asarray(labels, dtype=np.int64),
                 indices=np.arange(start, end, dtype=np.int64))
        path = self.path(start, end)
        atomic_write_bytes(path, buffer.getvalue())
        return path

    def read_images(self, start: int, end: int) -> np.ndarray:
        path = self.path(start, end)
        try:
            with np.load(path) as data:
                return data["images"]
        except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as err:
            raise ValueError(f"part '{path}' is damaged ({err}); delete it and sample again "
                             "to redraw it") from err

    def iter_images(self, plan: SamplePlan) -> Iterator[np.ndarray]:
        for start, end in plan.chunks():
            yield self.read_images(start, end)

    def missing(self, plan: SamplePlan, labels: torch.Tensor) -> list[tuple[int, int]]:
        return [c for c in plan.chunks() if not self.is_complete(*c, labels)]

    def assemble(self, plan: SamplePlan, labels: torch.Tensor, path: str | Path | None = None
                 ) -> Path:
        """Stream every part, in index order, into one ADM-style npz (atomic)."""
        missing = self.missing(plan, labels)
        if missing:
            raise RuntimeError(f"{len(missing)} of {len(plan.chunks())} chunks are not finished "
                               f"in '{self.parts_dir}' (first: {missing[0]}); run sampling again "
                               "to complete them")
        first = self.read_images(*plan.chunks()[0])
        shape = (plan.num_images, *first.shape[1:])

        def checked() -> Iterator[np.ndarray]:
            for (start, end), images in zip(plan.chunks(), self.iter_images(plan)):
                if images.shape[1:] != first.shape[1:]:
                    raise ValueError(f"part {self.path(start, end)} has images of shape "
                                     f"{images.shape[1:]}, the first part {first.shape[1:]}")
                yield images

        path = Path(path) if path is not None else self.out_dir / SAMPLES_FILE
        write_npz_streaming(path, [("arr_0", shape, np.uint8, checked()),
                                   ("labels", (plan.num_images,), np.int64,
                                    [labels.numpy().astype(np.int64)])])
        return path


def write_npz_streaming(path: str | Path,
                        arrays: list[tuple[str, tuple[int, ...], Any, Iterable[np.ndarray]]]
                        ) -> Path:
    """Write an uncompressed npz whose arrays arrive in row blocks (name, shape, dtype, blocks),
    to a temporary name and then renamed; np.load and ADM's streaming reader both read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, shape, dtype, blocks in arrays:
                dtype = np.dtype(dtype)
                with zf.open(name + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array_header_1_0(f, {
                        "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                        "shape": tuple(shape)})
                    rows = 0
                    for block in blocks:
                        f.write(np.ascontiguousarray(block, dtype=dtype).tobytes())
                        rows += len(block)
                    if rows != shape[0]:
                        raise ValueError(f"{path}: array '{name}' got {rows} rows, expected "
                                         f"{shape[0]}")
    return path


# ----------------------------------------------------------------------------------------------
# Drawing one rank's chunks
# ----------------------------------------------------------------------------------------------
@dataclass
class RankResult:
    drawn: int
    """Images generated by this call."""
    skipped: int
    """Images of chunks that were already finished."""
    seconds: float


def _save_pngs(folder: Path, start: int, images: np.ndarray) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for offset, image in enumerate(images):
        path = folder / f"{start + offset:06d}.png"
        tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, path)


def run_rank(generate: ImageFn, plan: SamplePlan, labels: torch.Tensor, store: PartStore,
             rank: int = 0, world_size: int = 1, save_png: bool = False,
             progress: bool = False) -> RankResult:
    """Draw this rank's unfinished chunks; each is saved (PNGs first, then its part) as soon
    as it is done, so a kill loses at most the chunk in flight."""
    from tqdm import tqdm

    if len(labels) != plan.num_images:
        raise ValueError(f"{len(labels)} labels for {plan.num_images} images")
    mine = plan.rank_chunks(rank, world_size)
    todo = [c for c in mine if not store.is_complete(*c, labels)]
    skipped = sum(e - s for s, e in mine) - sum(e - s for s, e in todo)
    if skipped:
        log.info("rank %d: %d images already drawn, %d to go", rank, skipped,
                 sum(e - s for s, e in todo))
    start_time = time.perf_counter()
    drawn = 0
    with tqdm(total=sum(e - s for s, e in mine), initial=skipped, unit="img", dynamic_ncols=True,
              desc=f"sample (rank {rank}/{world_size})", disable=not progress) as bar:
        for start, end in todo:
            index = torch.arange(start, end)
            images = generate(index, labels[start:end])
            if save_png:
                _save_pngs(store.png_dir, start, images)
            store.write(start, end, images, labels[start:end].numpy())
            drawn += end - start
            bar.update(end - start)
    return RankResult(drawn, skipped, time.perf_counter() - start_time)


# ----------------------------------------------------------------------------------------------
# From a config and a checkpoint
# ----------------------------------------------------------------------------------------------
def guide_model_config(path: str | Path) -> ModelConfig:
    """The `model` section of the AutoGuidance model's YAML (its other sections are not needed,
    so their required keys, such as data.data_dir, need not be filled in)."""
    data = load_yaml(path)
    return from_dict(ModelConfig, data.get("model") or {}, f"{path} (model section)")


def build_image_fn(cfg: SFDConfig, checkpoint: str | Path, device: torch.device,
                   precision: str = "fp32") -> ImageFn:
    """Load the model (EMA weights), the AutoGuidance model if configured, the texture VAE and
    the latent statistics; return the function that turns indices and labels into images."""
    from sfd_scale.models.texture_vae import load_texture_vae

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    model = load_model_for_sampling(checkpoint, cfg.model).to(device)
    guide = None
    if cfg.sample.autoguidance_ckpt:
        if not cfg.sample.autoguidance_config:
            raise ValueError("sample.autoguidance_ckpt is set but sample.autoguidance_config is "
                             "empty; point it at the guiding model's YAML")
        guide_cfg = guide_model_config(cfg.sample.autoguidance_config)
        guide = load_model_for_sampling(cfg.sample.autoguidance_ckpt, guide_cfg).to(device)
    vae = load_texture_vae(cfg.encoders.texture_vae_checkpoint, cfg.encoders.texture_vae).to(device)
    stats = LatentStats.from_data(cfg.data)
    autocast_on = precision == "bf16"

    def generate(indices: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        # bf16 covers the diffusion model only; decoding stays fp32 so the uint8 rounding is exact.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_on):
            latents = generate_latents(model, labels, indices, cfg.sample, cfg.diffusion, guide)
        return decode_to_uint8(latents.float(), cfg.model.semantic_channels, stats, vae)

    return generate


def sampling_settings(cfg: SFDConfig, checkpoint: str | Path, plan: SamplePlan,
                      precision: str) -> dict[str, Any]:
    """Everything that decides the pixels of a run (recorded beside its parts)."""
    def resolved(path: str) -> str:
        return str(Path(path).resolve()) if path else ""

    sample = {k: v for k, v in to_dict(cfg.sample).items() if k not in ("num_images", "batch_size")}
    sample["autoguidance_ckpt"] = resolved(sample["autoguidance_ckpt"])
    return {
        "checkpoint": resolved(str(checkpoint)),
        "num_images": plan.num_images,
        "chunk_size": plan.chunk_size,
        "precision": precision,
        # Fast paths change how the network runs, not its weights; sampling uses only the attention
        # kernel, whose choice changes the pixels by rounding at most.
        "model": {k: v for k, v in to_dict(cfg.model).items() if k not in MODEL_FAST_PATH_KEYS},
        "diffusion": to_dict(cfg.diffusion),
        "sample": sample,
        "texture_vae": resolved(cfg.encoders.texture_vae_checkpoint),
        "latent_stats": resolved(cfg.data.data_dir) if cfg.data.latent_norm else "",
        "latent_multiplier": cfg.data.latent_multiplier,
    }


def _device_for(dims: ParallelDims) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", dims.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def sample_images(cfg: SFDConfig, checkpoint: str | Path, out_dir: str | Path,
                  num_images: int | None = None, save_png: bool = False, precision: str = "fp32",
                  dims: ParallelDims | None = None) -> Path | None:
    """Draw N images (default sample.num_images) on every rank of the launcher's world into
    `out_dir` (a folder all ranks share); returns the final npz path on rank 0, None elsewhere."""
    dims = dims if dims is not None else ParallelDims.from_env()
    device = _device_for(dims)
    own_group = dims.world_size > 1 and not torch.distributed.is_initialized()
    if own_group:
        distributed.init_process_group(dims, cfg.parallel.backend, device)
    try:
        plan = SamplePlan(num_images or cfg.sample.num_images, cfg.sample.batch_size)
        labels = sample_labels(plan.num_images, cfg.model.num_classes, cfg.sample.balanced_labels,
                               cfg.sample.seed)
        store = PartStore(out_dir)
        settings = sampling_settings(cfg, checkpoint, plan, precision)
        distributed.run_on_main(lambda: store.prepare(settings))
        error: BaseException | None = None
        result = RankResult(0, 0, 0.0)
        try:
            generate = build_image_fn(cfg, checkpoint, device, precision)
            result = run_rank(generate, plan, labels, store, dims.rank, dims.world_size,
                              save_png=save_png,
                              progress=cfg.logging.progress_bar and dims.is_main)
        except Exception as err:
            if dims.world_size == 1:
                raise
            error = err  # every rank learns of it below, instead of waiting for this one
        distributed.raise_if_any_failed(error, "sampling")
        drawn = int(distributed.all_reduce(torch.tensor([float(result.drawn)]))[0])
        seconds = float(distributed.all_reduce(torch.tensor([result.seconds]), op="max")[0])
        if drawn:
            log.info("drew %d images on %d rank(s) in %.1f s: %.2f images/s", drawn,
                     dims.world_size, seconds, drawn / max(seconds, 1e-9))
    finally:
        if own_group:
            distributed.destroy_process_group()
    if not dims.is_main:
        return None
    path = store.assemble(plan, labels)
    grid = np.concatenate(list(_first_images(store, plan, GRID_IMAGES)))
    save_grid(grid, Path(out_dir) / GRID_FILE, columns=10)
    log.info("wrote %s (%d images) and %s", path, plan.num_images, Path(out_dir) / GRID_FILE)
    return path


def _first_images(store: PartStore, plan: SamplePlan, count: int) -> Iterator[np.ndarray]:
    left = count
    for images in store.iter_images(plan):
        if left <= 0:
            return
        yield images[:left]
        left -= len(images)
