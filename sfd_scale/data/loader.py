"""Batches of composite latents from reference-layout shards: shuffled, sharded by rank, resumable.

`LatentShardDataset` opens every shard once and reads a batch with positioned reads
(`os.preadv`) straight into the batch tensors: no file is opened per sample, nothing is
memory-mapped (page faults on fresh mappings cost more than the copy on small VMs), and rows
that lie next to each other in a shard are read with one call. A sample is returned as the
reference `ImgLatentDataset` returns it, batched:
  x (B, C_tex + C_sem, H, W) float32: ((texture - mean) / std, (semantic - mean) / std) * multiplier
  y (B,) int64
  feats_dino (B, C_dino, H, W) float32
with the stored or the flipped copy of all three chosen together per sample.

`ShardLoader` defines each epoch by one global order: a permutation and per-sample flip bits
drawn from a generator seeded with (seed, epoch). Every step consumes the next
`batch_size * world_size` entries of that order and rank r takes its `batch_size` block, so
ranks are disjoint and the loader state is one global position, the same on every rank and
valid for any world size with the same global batch. Batches are read ahead by background
threads; on a CUDA device they are staged in pinned host buffers, copied asynchronously and
the DINO features are widened to float32 on the GPU (half the host traffic of widening them
on the CPU).
"""
from __future__ import annotations

import collections
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from .shards import (
    DINO_KEY,
    FLIP_SUFFIX,
    LABEL_KEY,
    SEMANTIC_KEY,
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
_IOV_MAX = 1024  # Linux limit on buffers per preadv call
# Rows of a key stored in another dtype are read into a staging buffer this many rows long and
# widened at once, while they are still in the CPU cache (a DINO row is 384 KiB in float16).
_WIDEN_ROWS = 2


@dataclass
class HostBatch:
    """Tensors one batch is read into; `x` and `feats` are written in place by `gather_into`."""

    x: torch.Tensor  # (B, C_tex + C_sem, H, W) float32
    labels: torch.Tensor  # (B,) int64
    feats: torch.Tensor  # (B, C_dino, H, W), float32 or the stored DINO dtype
    staging: dict[str, torch.Tensor]  # (_WIDEN_ROWS, ...) stored-dtype rows of keys to widen
    ready: Any = None  # CUDA event: the last device copy out of these tensors has finished

    def __post_init__(self) -> None:
        self._held_alone = [_storage_users(t) for t in (self.x, self.labels, self.feats)]

    def rows(self, n: int) -> Batch:
        return self.x[:n], self.labels[:n], self.feats[:n]

    def unused(self) -> bool:
        """True when nothing outside this object refers to the output tensors any more, so
        they can be overwritten; a consumer still holding a batch (or a view of it) keeps it."""
        now = [_storage_users(t) for t in (self.x, self.labels, self.feats)]
        return None not in now and now == self._held_alone


def _storage_users(t: torch.Tensor) -> int | None:
    """References to a tensor's memory (tensors, views, numpy arrays); None if unknown."""
    count = getattr(torch._C, "_storage_Use_Count", None)  # private, but the only exact test
    return None if count is None else count(t.untyped_storage()._cdata)


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
        # The stored DINO dtype of the first shard: what a device loader stages and copies.
        self.dino_storage_dtype = first.torch_dtype(DINO_KEY)
        counts = np.array([info.num_samples for info in self.infos], dtype=np.int64)
        self._ends = np.cumsum(counts)
        self._starts = self._ends - counts
        # Labels are 8 bytes a sample: keep them all in memory instead of one read per sample.
        self._labels = torch.cat([
            as_torch(open_shard_arrays(info.path, [LABEL_KEY])[LABEL_KEY], info.dtypes[LABEL_KEY]).to(torch.int64)
            for info in self.infos
        ])
        self._fds: list[int] = []
        for info in self.infos:
            self._fds.append(os.open(info.path, os.O_RDONLY))
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

    def close(self) -> None:
        """Close the shard files (also done when the dataset is garbage-collected)."""
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            self.close()

    def new_host_batch(self, batch_size: int, feats_dtype: torch.dtype = torch.float32,
                       pin_memory: bool = False) -> HostBatch:
        """Empty tensors for `gather_into`; reuse them across batches to avoid page faults."""
        h, w = self.latent_hw

        def empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.empty(*shape, dtype=dtype, pin_memory=pin_memory)

        staging = {}
        for key, channels in ((TEXTURE_KEY, self.texture_channels), (SEMANTIC_KEY, self.semantic_channels)):
            stored = {info.torch_dtype(key) for info in self.infos}
            if stored != {torch.float32}:
                staging[key] = torch.empty(_WIDEN_ROWS, channels, h, w, dtype=_widest(stored))
        stored_dino = {info.torch_dtype(DINO_KEY) for info in self.infos}
        if stored_dino != {feats_dtype}:
            staging[DINO_KEY] = torch.empty(_WIDEN_ROWS, self.dino_channels, h, w, dtype=_widest(stored_dino))
        return HostBatch(
            x=empty(batch_size, self.texture_channels + self.semantic_channels, h, w),
            labels=empty(batch_size, dtype=torch.int64),
            feats=empty(batch_size, self.dino_channels, h, w, dtype=feats_dtype),
            staging=staging,
        )

    def gather(self, indices: torch.Tensor, flip: torch.Tensor) -> Batch:
        """Samples `indices` (B,), each the flipped copy where `flip` (B,) is True, in new tensors."""
        out = self.new_host_batch(indices.numel())
        return self.gather_into(out, indices, flip)

    def gather_into(self, out: HostBatch, indices: torch.Tensor, flip: torch.Tensor) -> Batch:
        """Read samples `indices` into the first B rows of `out` and return those rows."""
        if indices.dim() != 1 or flip.shape != indices.shape:
            raise ValueError(
                f"indices and flip must both be (B,), got {list(indices.shape)} and {list(flip.shape)}"
            )
        b = indices.numel()
        if b > out.x.shape[0]:
            raise ValueError(f"{b} samples do not fit a host batch of {out.x.shape[0]} rows")
        if b and (int(indices.min()) < 0 or int(indices.max()) >= len(self)):
            raise ValueError(
                f"sample indices must lie in [0, {len(self)}), got {int(indices.min())}..{int(indices.max())}"
            )
        x, labels, feats = out.rows(b)
        ct = self.texture_channels
        outputs = {TEXTURE_KEY: x[:, :ct], SEMANTIC_KEY: x[:, ct:], DINO_KEY: feats}
        x_bytes = _row_bytes(x)
        split = x_bytes.shape[1] * ct // x.shape[1]  # texture rows first, semantic rows after
        direct = {TEXTURE_KEY: x_bytes[:, :split], SEMANTIC_KEY: x_bytes[:, split:], DINO_KEY: _row_bytes(feats)}
        dest = {key: (out.staging[key], outputs[key]) if key in out.staging else direct[key] for key in outputs}
        idx = indices.numpy().astype(np.int64, copy=False)
        flips = flip.numpy().astype(bool, copy=False)
        shard_of = np.searchsorted(self._ends, idx, side="right")
        # Sorting by (shard, copy, row) turns neighbouring rows into one read and keeps disk
        # access sequential within a shard; each row still lands in its own batch slot.
        order = np.lexsort((idx, flips, shard_of))
        for shard in np.unique(shard_of):
            in_shard = order[shard_of[order] == shard]
            for flipped in (False, True):
                slots = in_shard[flips[in_shard] == flipped]
                if slots.size:
                    self._read_rows(int(shard), flipped, slots, idx[slots] - self._starts[shard], dest)
        labels.copy_(self._labels[indices])
        # In place, but the same operations in the same order as the reference's
        # (latent - mean) / std, so the values are bit-identical.
        if self._texture_norm is not None:
            x[:, :ct].sub_(self._texture_norm[0]).div_(self._texture_norm[1])
        if self._semantic_norm is not None:
            x[:, ct:].sub_(self._semantic_norm[0]).div_(self._semantic_norm[1])
        if self.latent_multiplier != 1.0:
            x.mul_(self.latent_multiplier)
        return x, labels, feats

    def _read_rows(self, shard: int, flipped: bool, slots: np.ndarray, local: np.ndarray,
                   dest: dict[str, Any]) -> None:
        """preadv rows `local` (ascending) of one shard's copy into batch rows `slots`.

        `dest[key]` is either (B, row_bytes) uint8 views of the output rows (read straight
        in) or (staging, output rows) for keys stored in another dtype.
        """
        fd, info = self._fds[shard], self.infos[shard]
        # A run is a stretch of consecutive rows: one read fills several batch slots.
        run_starts = np.flatnonzero(np.diff(local, prepend=local[0] - 2) != 1).tolist()
        run_ends = run_starts[1:] + [local.size]
        suffix = FLIP_SUFFIX if flipped else ""
        for key, target in dest.items():
            begin, row_bytes = info.offsets[key + suffix], info.row_bytes(key + suffix)
            staging, output = target if isinstance(target, tuple) else (None, None)
            rows = _row_bytes(staging) if staging is not None else target
            if rows.shape[1] != row_bytes:
                raise ValueError(
                    f"shard {info.path}: '{key}{suffix}' rows are {row_bytes} bytes, "
                    f"the batch expects {rows.shape[1]} (mixed dtypes across shards?)"
                )
            step = _IOV_MAX if staging is None else staging.shape[0]
            for start, end in zip(run_starts, run_ends):
                for chunk in range(start, end, step):
                    stop = min(end, chunk + step)
                    offset = begin + int(local[chunk]) * row_bytes
                    if staging is None:
                        _pread_full(fd, [rows[s] for s in slots[chunk:stop].tolist()], offset, info.path)
                        continue
                    _pread_full(fd, [rows[:stop - chunk]], offset, info.path)
                    for k, s in enumerate(slots[chunk:stop].tolist()):
                        output[s].copy_(staging[k])


def _row_bytes(t: torch.Tensor) -> np.ndarray:
    """Contiguous (B, ...) tensor -> writable (B, row_bytes) uint8 numpy view of its memory."""
    return t.reshape(t.shape[0], -1).view(torch.uint8).numpy()


def _pread_full(fd: int, buffers: list[np.ndarray], offset: int, path: os.PathLike) -> None:
    """Fill `buffers` from `offset` on; short reads (signals) are continued, EOF is an error."""
    views = [memoryview(buf).cast("B") for buf in buffers]
    while views:
        got = os.preadv(fd, views, offset)
        if got == 0:
            raise ValueError(f"shard {path} ended before byte {offset}; the file is truncated")
        offset += got
        while views and got >= len(views[0]):
            got -= len(views[0])
            views.pop(0)
        if views and got:
            views[0] = views[0][got:]


def _widest(dtypes: set[torch.dtype]) -> torch.dtype:
    if len(dtypes) != 1:
        raise ValueError(f"shards store one key in different dtypes {sorted(map(str, dtypes))}; "
                         "re-extract them with one dtype")
    return next(iter(dtypes))


def _stats(data_dir: str | os.PathLike, key: str, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = read_stats(data_dir, key)
    if mean.shape[1] != channels:
        raise ValueError(
            f"stats file for '{key}' in {data_dir} has {mean.shape[1]} channels, the shards have {channels}"
        )
    return mean, std


class ShardLoader:
    """Epochs of shuffled, drop-last batches for one rank, with exact mid-epoch resume.

    Args:
        dataset: the shards.
        batch_size: samples per rank and step.
        seed, rank, world_size, random_flip: see the module docstring.
        prefetch: batches read ahead by background threads (0 reads in the caller's thread).
        num_threads: reader threads (reads release the GIL, so threads use several cores).
        device: where batches are delivered. A CUDA device gets pinned staging buffers, an
            asynchronous copy on a side stream and DINO widening on the GPU; None or CPU
            returns host tensors.
        feats_dtype: dtype of the delivered DINO features; float32 as the reference delivers
            them, or the stored float16 for consumers that widen them on their own device.

    Host buffers are reused from a ring of `prefetch + 2` sets when nothing refers to them any
    more (fresh memory is page-faulted in, which costs more than the read
    itself); a batch the caller still holds is never overwritten.
    """

    def __init__(
        self,
        dataset: LatentShardDataset,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        random_flip: bool = True,
        prefetch: int = 2,
        num_threads: int = 2,
        device: torch.device | str | None = None,
        feats_dtype: torch.dtype = torch.float32,
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
        if prefetch < 0 or num_threads < 1:
            raise ValueError(f"need prefetch >= 0 and num_threads >= 1, got {prefetch} and {num_threads}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.random_flip = random_flip
        self.prefetch = prefetch
        self.num_threads = num_threads
        self.device = torch.device(device) if device is not None else None
        self._cuda = self.device is not None and self.device.type == "cuda"
        self.feats_dtype = feats_dtype
        self.epoch = 0
        self.position = 0  # entries of this epoch's global order consumed by all ranks together
        self._plan_cache: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._idle_ring: dict[int, HostBatch] | None = None  # buffers of the last finished epoch

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
        starts = range(self.position, len(self.dataset) - self.global_batch_size + 1, self.global_batch_size)
        blocks = [slice(s + self.rank * self.batch_size, s + (self.rank + 1) * self.batch_size) for s in starts]
        pool = (ThreadPoolExecutor(self.num_threads, "shard-reader", initializer=_one_intraop_thread)
                if self.prefetch else None)
        pending: collections.deque[Future] = collections.deque()
        # Buffers carry over from epoch to epoch, but two live iterators never share them.
        ring, self._idle_ring = self._idle_ring or {}, None
        try:
            for i, block in enumerate(blocks):
                if pool is None:
                    host = self._read(ring, i, order[block], flip[block])
                else:
                    while len(pending) <= self.prefetch and i + len(pending) < len(blocks):
                        j = i + len(pending)
                        pending.append(pool.submit(self._read, ring, j, order[blocks[j]], flip[blocks[j]]))
                    host = pending.popleft().result()
                batch = self._deliver(host)
                self.position += self.global_batch_size
                # Advance before yielding so a state saved after this batch resumes at the next.
                self._roll_if_done()
                yield batch
        finally:
            for future in pending:
                future.cancel()
            if pool is not None:
                pool.shutdown(wait=True)  # no thread may still write into a buffer we hand out
            self._idle_ring = ring

    def _read(self, ring: dict[int, HostBatch], step: int, indices: torch.Tensor,
              flip: torch.Tensor) -> HostBatch:
        host = self._host_batch(ring, step)
        if host.ready is not None:
            host.ready.synchronize()  # the previous device copy out of this buffer is done
        self.dataset.gather_into(host, indices, flip)
        return host

    def _host_batch(self, ring: dict[int, HostBatch], step: int) -> HostBatch:
        # A CUDA device gets the stored dtype and widens after the copy.
        feats_dtype = self.dataset.dino_storage_dtype if self._cuda else self.feats_dtype
        # Slot `step % ring` last held batch step - ring, which is no longer in flight.
        slot = step % (self.prefetch + 2)
        host = ring.get(slot)
        if host is None or not host.unused():
            host = self.dataset.new_host_batch(self.batch_size, feats_dtype, pin_memory=self._cuda)
            ring[slot] = host
        return host

    def _deliver(self, host: HostBatch) -> Batch:
        if not self._cuda:
            # Fresh views, not the ring's own tensor objects: a view held by the caller is
            # what `unused` counts.
            return host.rows(self.batch_size)
        copy_stream = _copy_stream(self.device)
        with torch.cuda.stream(copy_stream):
            x = host.x.to(self.device, non_blocking=True)
            labels = host.labels.to(self.device, non_blocking=True)
            feats = host.feats.to(self.device, non_blocking=True).to(self.feats_dtype)
            host.ready = torch.cuda.Event()
            host.ready.record(copy_stream)
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(copy_stream)
        for t in (x, labels, feats):
            t.record_stream(current)  # the caching allocator must not reuse them early
        return x, labels, feats

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


def _one_intraop_thread() -> None:
    # Reader threads are the parallelism; nested OpenMP teams per thread would oversubscribe
    # the cores. With the OpenMP backend this setting is per thread: the caller's is unchanged.
    torch.set_num_threads(1)


_COPY_STREAMS: dict[torch.device, Any] = {}


def _copy_stream(device: torch.device) -> Any:
    """One side stream per device for host-to-device batch copies."""
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]


def _epoch_seed(seed: int, epoch: int) -> int:
    # Distinct, well-spread seeds per (seed, epoch); 63 bits keep manual_seed happy.
    return (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + 1) % (2**63)
