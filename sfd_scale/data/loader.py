"""Batches of composite latents from reference-layout shards: shuffled, sharded by rank, resumable.

`LatentShardDataset` opens every shard once and copies a batch's rows straight into reused
batch tensors; no file is opened per sample. Two ways to read (`ReadMode`):
  mmap (default): each shard is memory-mapped once, read-only, for the dataset's life, and each
    row is one memcpy out of the mapping (one torch copy where the stored dtype is widened).
    A row is announced (MADV_WILLNEED) before its first copy, so rows not in the page cache are
    read from disk together rather than fault by fault; later copies skip the system call while
    its pages stay mapped (every copy is announced when the shards exceed half the memory).
    Against pread on the 2-core dev VM (docs/benchmarks.md, "Loader"): 1.7x with the shards
    cached and mapped, 1.0x on the first touch of cached shards (page faults), 2.1x from disk.
  pread: positioned reads (`os.preadv`) into the batch rows, neighbouring rows in one call;
    the kernel's page-cache copy is slower than a user-space memcpy, but nothing is mapped.
Both give bit-identical batches. A sample is returned as the reference `ImgLatentDataset`
returns it, batched:
  x (B, C_tex + C_sem, H, W) float32: ((texture - mean) / std, (semantic - mean) / std) * multiplier
  y (B,) int64
  feats_dino (B, C_dino, H, W) float32
with the stored or the flipped copy of all three chosen together per sample.

Memory with mmap: the mappings are shared and read-only, so they cost address space, not
memory: no commit charge, no swap, and a mapped page is the page-cache page itself (clean, so
under pressure the kernel unmaps and drops it as it would in pread mode; a later touch faults
it back in). Mapping
1.1 TB of shards is fine in a 128 TB address space. What it does cost, and where it can bite:
  - page tables, 8 bytes per 4 KiB touched (0.2 %): up to ~2.2 GB per process for 1.1 TB,
    ~18 GB for 8 ranks on a node once every rank has touched every shard (unswappable);
  - RSS includes the mapped page cache, so a job monitor that kills on RSS (rather than on
    cgroup memory, which charges page cache in both modes) may see a huge process;
  - `ulimit -v` (RLIMIT_AS) below the shards' total size refuses the mapping (the error says so).
Use read_mode="pread" where any of these matters. A shard must not be truncated in place while
mapped (touching the missing pages raises SIGBUS): sizes are checked against the headers when
mapping and before every batch, which catches it except during that batch's copy; our
writers replace files atomically (a new inode), which a mapping never sees.

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
import enum
import logging
import mmap
import os
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from sfd_scale.config import DataConfig

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
# pread mode: rows of a key stored in another dtype are read into a staging buffer this many
# rows long and widened at once, while still in the CPU cache (a DINO row is 384 KiB in float16).
_WIDEN_ROWS = 2


class ReadMode(str, enum.Enum):
    """How `LatentShardDataset` gets rows out of the shards (see the module docstring)."""

    MMAP = "mmap"
    PREAD = "pread"


DEFAULT_READ_MODE = ReadMode.MMAP  # measured faster (docs/benchmarks.md, "Loader")


@dataclass
class HostBatch:
    """Tensors one batch is read into; `x` and `feats` are written in place by `gather_into`."""

    x: torch.Tensor  # (B, C_tex + C_sem, H, W) float32
    labels: torch.Tensor  # (B,) int64
    feats: torch.Tensor  # (B, C_dino, H, W), float32 or the stored DINO dtype
    staging: dict[str, torch.Tensor]  # pread mode: (_WIDEN_ROWS, ...) stored-dtype rows of keys to widen
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


@dataclass
class _Target:
    """Where one key's rows of a batch go."""

    output: torch.Tensor  # (B, C, H, W) output rows (a channel range of x, or feats)
    rows: np.ndarray | None  # (B, row_bytes) uint8 view of `output`; None when the key is widened
    staging: torch.Tensor | None  # pread mode, widened keys: stored-dtype rows read before widening


class LatentShardDataset:
    """All samples of a latent folder, indexed 0..N-1 in sorted shard order.

    `read_mode` ("mmap" or "pread", see the module docstring) changes speed and memory
    accounting, never the values.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        latent_norm: bool = True,
        latent_sv_norm: bool = True,
        latent_multiplier: float = 1.0,
        read_mode: ReadMode | str = DEFAULT_READ_MODE,
    ) -> None:
        try:
            self.read_mode = ReadMode(read_mode)
        except ValueError:
            raise ValueError(
                f"read_mode must be one of {[m.value for m in ReadMode]}, got {read_mode!r}"
            ) from None
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
        self._texture_norm = _stats(data_dir, TEXTURE_KEY, self.texture_channels) if latent_norm else None
        self._semantic_norm = (
            _stats(data_dir, SEMANTIC_KEY, self.semantic_channels) if latent_sv_norm else None
        )
        self._readers = 0  # gather_into calls in progress (reader threads); close() waits for them
        self._idle = threading.Condition()
        self._shards: _MappedShards | _PreadShards | None = (
            _MappedShards(self.infos) if self.read_mode is ReadMode.MMAP else _PreadShards(self.infos)
        )
        logger.info(
            "latent dataset %s: %d samples in %d shards (%s), texture %d + semantic %d channels, dino %d, %dx%d",
            data_dir, len(self), len(self.infos), self.read_mode.value, self.texture_channels,
            self.semantic_channels, self.dino_channels, *self.latent_hw,
        )

    @classmethod
    def from_config(cls, data: DataConfig) -> "LatentShardDataset":
        """The shards and normalisation a run's `data` section names."""
        return cls(data.data_dir, latent_norm=data.latent_norm, latent_sv_norm=data.latent_sv_norm,
                   latent_multiplier=data.latent_multiplier, read_mode=data.read_mode)

    def __len__(self) -> int:
        return int(self._ends[-1])

    def close(self) -> None:
        """Unmap / close the shard files (also done when the dataset is garbage-collected).
        No loader may be reading from the dataset any more."""
        idle = getattr(self, "_idle", None)
        if idle is None:  # __init__ failed before the shards were opened
            return
        with idle:
            shards, self._shards = getattr(self, "_shards", None), None  # no new reads from here on
            idle.wait_for(lambda: self._readers == 0)  # reads in progress still use the mapping
        if shards is not None:
            shards.close()

    def __del__(self) -> None:
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
        with self._idle:
            shards = self._shards
            if shards is None:
                raise ValueError("the latent dataset is closed; create a new LatentShardDataset")
            self._readers += 1
        try:
            return self._gather(shards, out, indices, flip)
        finally:
            with self._idle:
                self._readers -= 1
                self._idle.notify_all()

    def _gather(self, shards: "_MappedShards | _PreadShards", out: HostBatch, indices: torch.Tensor,
                flip: torch.Tensor) -> Batch:
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
        targets = {
            key: _Target(output, None, out.staging[key]) if key in out.staging else _Target(output, direct[key], None)
            for key, output in outputs.items()
        }
        idx = indices.numpy().astype(np.int64, copy=False)
        flips = flip.numpy().astype(bool, copy=False)
        shard_of = np.searchsorted(self._ends, idx, side="right")
        # Sorting by (shard, copy, row) turns neighbouring rows into one read and keeps disk
        # access sequential within a shard; each row still lands in its own batch slot.
        order = np.lexsort((idx, flips, shard_of))
        for shard in np.unique(shard_of):
            shards.check(int(shard))
            in_shard = order[shard_of[order] == shard]
            for flipped in (False, True):
                slots = in_shard[flips[in_shard] == flipped]
                if slots.size:
                    shards.read_rows(int(shard), flipped, slots, idx[slots] - self._starts[shard], targets)
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


class _PreadShards:
    """One open descriptor per shard; rows are read with `os.preadv`."""

    def __init__(self, infos: list[ShardInfo]) -> None:
        self.infos = infos
        self._fds: list[int] = []
        for info in infos:
            self._fds.append(os.open(info.path, os.O_RDONLY))

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def check(self, shard: int) -> None:
        """Nothing to do: a read past the end of a truncated file fails by itself."""

    def read_rows(self, shard: int, flipped: bool, slots: np.ndarray, local: np.ndarray,
                  targets: dict[str, _Target]) -> None:
        """preadv rows `local` (ascending) of one shard's copy into batch rows `slots`."""
        fd, info = self._fds[shard], self.infos[shard]
        # A run is a stretch of consecutive rows: one read fills several batch slots.
        run_starts = np.flatnonzero(np.diff(local, prepend=local[0] - 2) != 1).tolist()
        run_ends = run_starts[1:] + [local.size]
        suffix = FLIP_SUFFIX if flipped else ""
        for key, target in targets.items():
            begin, row_bytes = info.offsets[key + suffix], info.row_bytes(key + suffix)
            staging = target.staging
            rows = _row_bytes(staging) if staging is not None else target.rows
            _check_row_bytes(info, key + suffix, rows.shape[1])
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
                        target.output[s].copy_(staging[k])


class _MappedShards:
    """Each shard mapped once, shared and read-only; a row is one copy out of the mapping.

    Rows are announced to the kernel (MADV_WILLNEED) before they are copied, so rows not in the
    page cache are read from disk together. Once this process has copied a row, its pages stay
    mapped while they stay cached, and the hint is only a system call per row and key (~25 % of
    the copy): so a row is announced only on its first copy, unless the shards are too large to
    stay cached (more than half the machine's memory), where every copy may fault again.
    """

    def __init__(self, infos: list[ShardInfo]) -> None:
        self.infos = infos
        self._sizes = [_file_bytes(info) for info in infos]
        self.hint_every_copy = sum(self._sizes) > _physical_memory_bytes() // 2
        # Per shard: rows of the stored (0) and the flipped (1) copy this process has copied.
        self._copied = [np.zeros((2, info.num_samples), dtype=bool) for info in infos]
        self._maps: list[mmap.mmap] = []
        # Per shard and key: (N, row_bytes) uint8 numpy rows (read-only, for plain copies)
        # and (N, C, H, W) tensors of the stored dtype (for widening copies).
        self._rows: list[dict[str, np.ndarray]] = []
        self._typed: list[dict[str, torch.Tensor]] = []
        try:
            for info, size in zip(infos, self._sizes):
                self._map(info, size)
        except BaseException:
            self.close()
            raise

    def _map(self, info: ShardInfo, size: int) -> None:
        fd = os.open(info.path, os.O_RDONLY)
        try:
            # The size at mapping time, not only the header's: touching a page past the end of
            # the file would be a SIGBUS instead of an error.
            actual = os.fstat(fd).st_size
            if actual < size:
                raise ValueError(f"shard {info.path} has {actual} bytes, its header needs {size}; "
                                 "the file is truncated")
            try:
                mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)  # MAP_SHARED: no private copies
            except OSError as exc:
                raise OSError(f"cannot memory-map shard {info.path} ({exc}); with a low `ulimit -v` "
                              "use read_mode='pread'") from exc
        finally:
            os.close(fd)  # the mapping keeps its own descriptor
        self._maps.append(mapping)
        whole = np.frombuffer(mapping, dtype=np.uint8)
        with warnings.catch_warnings():
            # Read-only memory: these tensors are only ever copied from.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            whole_t = torch.frombuffer(mapping, dtype=torch.uint8)
        rows, typed = {}, {}
        for key in (base + suffix for base in (TEXTURE_KEY, SEMANTIC_KEY, DINO_KEY) for suffix in ("", FLIP_SUFFIX)):
            begin, n, row_bytes = info.offsets[key], info.num_samples, info.row_bytes(key)
            dtype = info.torch_dtype(key)
            if begin % dtype.itemsize:
                raise ValueError(f"shard {info.path}: '{key}' starts at byte {begin}, not aligned to its "
                                 f"{dtype.itemsize}-byte elements; read it with read_mode='pread'")
            rows[key] = whole[begin:begin + n * row_bytes].reshape(n, row_bytes)
            typed[key] = whole_t[begin:begin + n * row_bytes].view(dtype).view(info.shapes[key])
        self._rows.append(rows)
        self._typed.append(typed)

    def close(self) -> None:
        # The views go first: numpy's pin the mappings, torch's would dangle after unmapping.
        self._rows, self._typed = [], []
        maps, self._maps = self._maps, []
        for mapping in maps:
            mapping.close()

    def check(self, shard: int) -> None:
        """Refuse a shard truncated since it was mapped (copying from it would be a SIGBUS)."""
        actual = self._maps[shard].size()  # fstat of the mapped file
        if actual < self._sizes[shard]:
            info = self.infos[shard]
            raise ValueError(f"shard {info.path} shrank to {actual} bytes while mapped, its header "
                             f"needs {self._sizes[shard]}; the file is truncated")

    def read_rows(self, shard: int, flipped: bool, slots: np.ndarray, local: np.ndarray,
                  targets: dict[str, _Target]) -> None:
        """Copy rows `local` of one shard's copy into batch rows `slots`."""
        info, mapping = self.infos[shard], self._maps[shard]
        suffix = FLIP_SUFFIX if flipped else ""
        # Announce the rows before copying any, so rows not in the page cache are read from
        # disk together: a fault alone reads ~128 KiB synchronously (0.5x pread from disk
        # without the hint, 2.1x with it). MADV_RANDOM would stop fault read-around: 10x
        # slower from disk.
        copied = self._copied[shard][int(flipped)]
        announce = local if self.hint_every_copy else local[~copied[local]]
        for key in targets:
            starts = info.offsets[key + suffix] + announce * info.row_bytes(key + suffix)
            pages = starts - starts % mmap.PAGESIZE
            for page, end in zip(pages.tolist(), (starts + info.row_bytes(key + suffix)).tolist()):
                mapping.madvise(mmap.MADV_WILLNEED, page, end - page)
        copied[local] = True
        pairs = list(zip(slots.tolist(), local.tolist()))
        for key, target in targets.items():
            if target.rows is None:
                source_t = self._typed[shard][key + suffix]
                for s, r in pairs:
                    target.output[s].copy_(source_t[r])
                continue
            # numpy row assignment is a plain memcpy, a third faster than a torch copy_ per row.
            source, rows = self._rows[shard][key + suffix], target.rows
            _check_row_bytes(info, key + suffix, rows.shape[1])
            for s, r in pairs:
                rows[s] = source[r]


def _physical_memory_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _file_bytes(info: ShardInfo) -> int:
    """Bytes the header says the file has: the end of its last array (every array is N rows)."""
    return max(info.offsets[key] + info.num_samples * info.row_bytes(key) for key in info.offsets)


def _check_row_bytes(info: ShardInfo, key: str, expected: int) -> None:
    if info.row_bytes(key) != expected:
        raise ValueError(
            f"shard {info.path}: '{key}' rows are {info.row_bytes(key)} bytes, "
            f"the batch expects {expected} (mixed dtypes across shards?)"
        )


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
