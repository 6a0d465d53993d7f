"""Batches of composite latents from reference-layout shards: shuffled, sharded by rank, resumable.

`LatentShardDataset` memory-maps every shard once (no file is opened per sample) and gathers a
batch with one indexed read per shard and key. A sample is returned as the reference
`ImgLatentDataset` returns it, batched:
  x (B, C_tex + C_sem, H, W) float32: ((texture - mean) / std, (semantic - mean) / std) * multiplier
  y (B,) int64
  feats_dino (B, C_dino, H, W) float32
with the stored or the flipped copy of all three chosen together per sample.

`ShardLoader` defines each epoch by one global order: a permutation and per-sample flip bits
drawn from a generator seeded with (seed, epoch). Every step consumes the next
`batch_size * world_size` entries of that order and rank r takes its `batch_size` block, so
ranks are disjoint and the loader state is one global position, the same on every rank and
valid for any world size with the same global batch.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterator

import numpy as np
import torch

from .shards import (
    DINO_KEY,
    FLIP_SUFFIX,
    LABEL_KEY,
    SEMANTIC_KEY,
    SHARD_KEYS,
    TEXTURE_KEY,
    ShardInfo,
    as_torch,
    list_shards,
    open_shard_arrays,
    read_stats,
    validate_shard,
)

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class LatentShardDataset:
    """All samples of a latent folder, indexed 0..N-1 in sorted shard order."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        latent_norm: bool = True,
        latent_sv_norm: bool = True,
        latent_multiplier: float = 1.0,
    ) -> None:
        paths = list_shards(data_dir)
        self.infos: list[ShardInfo] = [validate_shard(p) for p in paths]
        first = self.infos[0]
        for info in self.infos[1:]:
            for key in (TEXTURE_KEY, SEMANTIC_KEY, DINO_KEY):
                if info.shapes[key][1:] != first.shapes[key][1:]:
                    raise ValueError(
                        f"shard {info.path}: '{key}' samples are {list(info.shapes[key][1:])}, "
                        f"but {first.path.name} has {list(first.shapes[key][1:])}"
                    )
        self.texture_channels = first.channels(TEXTURE_KEY)
        self.semantic_channels = first.channels(SEMANTIC_KEY)
        self.dino_channels = first.channels(DINO_KEY)
        self.latent_hw = first.spatial(TEXTURE_KEY)
        self.latent_multiplier = latent_multiplier
        self._arrays = [open_shard_arrays(info.path, SHARD_KEYS) for info in self.infos]
        counts = torch.tensor([info.num_samples for info in self.infos], dtype=torch.int64)
        self._ends = counts.cumsum(0)
        self._starts = self._ends - counts
        self._texture_norm = _stats(data_dir, TEXTURE_KEY, self.texture_channels) if latent_norm else None
        self._semantic_norm = (
            _stats(data_dir, SEMANTIC_KEY, self.semantic_channels) if latent_sv_norm else None
        )
        logger.info(
            "latent dataset %s: %d samples in %d shards, texture %d + semantic %d channels, dino %d, %dx%d",
            data_dir, len(self), len(self.infos), self.texture_channels, self.semantic_channels,
            self.dino_channels, *self.latent_hw,
        )

    def __len__(self) -> int:
        return int(self._ends[-1])

    def gather(self, indices: torch.Tensor, flip: torch.Tensor) -> Batch:
        """Samples `indices` (B,), each the flipped copy where `flip` (B,) is True."""
        if indices.dim() != 1 or flip.shape != indices.shape:
            raise ValueError(
                f"indices and flip must both be (B,), got {list(indices.shape)} and {list(flip.shape)}"
            )
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= len(self)):
            raise ValueError(
                f"sample indices must lie in [0, {len(self)}), got {indices.min()}..{indices.max()}"
            )
        b = indices.numel()
        h, w = self.latent_hw
        texture = torch.empty(b, self.texture_channels, h, w)
        semantic = torch.empty(b, self.semantic_channels, h, w)
        dino = torch.empty(b, self.dino_channels, h, w)
        labels = torch.empty(b, dtype=torch.int64)
        shard_of = torch.searchsorted(self._ends, indices, right=True)
        for shard in shard_of.unique().tolist():
            info, arrays = self.infos[shard], self._arrays[shard]
            in_shard = shard_of == shard
            shard_rows = in_shard.nonzero().squeeze(1)
            labels[shard_rows] = as_torch(arrays[LABEL_KEY][_local(indices[shard_rows], self._starts[shard])],
                                          info.dtypes[LABEL_KEY]).to(torch.int64)
            for flipped, suffix in ((False, ""), (True, FLIP_SUFFIX)):
                rows = (in_shard & (flip == flipped)).nonzero().squeeze(1)
                if rows.numel() == 0:
                    continue
                local = _local(indices[rows], self._starts[shard])
                for out, key in ((texture, TEXTURE_KEY), (semantic, SEMANTIC_KEY), (dino, DINO_KEY)):
                    out[rows] = as_torch(arrays[key + suffix][local], info.dtypes[key]).to(torch.float32)
        if self._texture_norm is not None:
            texture = (texture - self._texture_norm[0]) / self._texture_norm[1]
        if self._semantic_norm is not None:
            semantic = (semantic - self._semantic_norm[0]) / self._semantic_norm[1]
        # Texture first, semantic last: the channel split the model and sampler assume.
        x = torch.cat([texture, semantic], dim=1) * self.latent_multiplier
        return x, labels, dino


def _stats(data_dir: str | os.PathLike, key: str, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = read_stats(data_dir, key)
    if mean.shape[1] != channels:
        raise ValueError(
            f"stats file for '{key}' in {data_dir} has {mean.shape[1]} channels, the shards have {channels}"
        )
    return mean, std


def _local(indices: torch.Tensor, start: torch.Tensor) -> np.ndarray:
    return (indices - start).numpy()


class ShardLoader:
    """Epochs of shuffled, drop-last batches for one rank, with exact mid-epoch resume."""

    def __init__(
        self,
        dataset: LatentShardDataset,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        random_flip: bool = True,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if batch_size * world_size > len(dataset):
            raise ValueError(
                f"global batch {batch_size} x {world_size} ranks exceeds the {len(dataset)} samples "
                f"of the data set"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.random_flip = random_flip
        self.epoch = 0
        self.position = 0  # entries of this epoch's global order consumed by all ranks together
        self._plan_cache: tuple[int, torch.Tensor, torch.Tensor] | None = None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Steps per epoch (the tail that does not fill a global batch is dropped)."""
        return len(self.dataset) // self.global_batch_size

    def epoch_plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(order (N,) int64, flip (N,) bool) of an epoch: a pure function of (seed, epoch)."""
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            n = len(self.dataset)
            order = torch.randperm(n, generator=gen)
            if self.random_flip:
                flip = torch.rand(n, generator=gen) < 0.5
            else:
                flip = torch.zeros(n, dtype=torch.bool)
            self._plan_cache = (epoch, order, flip)
        return self._plan_cache[1], self._plan_cache[2]

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch; afterwards the state points at the next epoch."""
        self._roll_if_done()
        epoch = self.epoch
        order, flip = self.epoch_plan(epoch)
        while self.epoch == epoch:
            start = self.position + self.rank * self.batch_size
            block = slice(start, start + self.batch_size)
            batch = self.dataset.gather(order[block], flip[block])
            self.position += self.global_batch_size
            # Advance before yielding so a state saved after this batch resumes at the next.
            self._roll_if_done()
            yield batch

    def _roll_if_done(self) -> None:
        if self.position + self.global_batch_size > len(self.dataset):
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs; the shuffle and flip generators are re-derived from
        (seed, epoch), so their state is implied by these numbers."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_samples": len(self.dataset),
            "random_flip": self.random_flip,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken (any rank count with the same data)."""
        mine_by_key = {"seed": self.seed, "num_samples": len(self.dataset), "random_flip": self.random_flip}
        for key, mine in mine_by_key.items():
            if key not in state:
                raise ValueError(f"data loader state has no '{key}' (keys: {sorted(state)})")
            if state[key] != mine:
                raise ValueError(
                    f"data loader state was saved with {key}={state[key]!r} but this loader has {mine!r}; "
                    f"resume with the same data folder and data settings"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self.dataset):
            raise ValueError(
                f"data loader state has epoch={epoch} position={position} for {len(self.dataset)} samples"
            )
        if state.get("global_batch_size") != self.global_batch_size:
            logger.info("data loader resumes with global batch %d (saved with %s)",
                        self.global_batch_size, state.get("global_batch_size"))
        self.epoch, self.position = epoch, position


def _epoch_seed(seed: int, epoch: int) -> int:
    # Distinct, well-spread seeds per (seed, epoch); 63 bits keep manual_seed happy.
    return (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + 1) % (2**63)
