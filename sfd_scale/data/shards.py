"""Latent shards in the reference layout (SPEC section 1) and their per-channel statistics.

One safetensors file per shard, N samples each:
  latents, latents_flip         texture latents   (N, C_tex, H, W)   float32
  latents_sv, latents_sv_flip   semantic latents  (N, C_sem, H, W)   float32
  feats_dino, feats_dino_flip   DINOv2 features   (N, C_dino, H, W)  float16
  labels                        class ids         (N,)               int64
The `_flip` keys hold the encodings of the horizontally flipped image. The dtypes are those the
reference extraction writes (VAE `posterior.sample()` in float32; DINO features in half, which
the reference loader casts back with `.float()`); readers accept any float dtype.
Statistics live beside the shards as `<key>_stats.pt` = {'mean', 'std'}, each (1, C, 1, 1)
float32, for key in (`latents`, `latents_sv`).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from sfd_scale.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

TEXTURE_KEY = "latents"
SEMANTIC_KEY = "latents_sv"
DINO_KEY = "feats_dino"
LABEL_KEY = "labels"
FLIP_SUFFIX = "_flip"
FEATURE_KEYS = (TEXTURE_KEY, SEMANTIC_KEY, DINO_KEY)
SHARD_KEYS = (
    TEXTURE_KEY, TEXTURE_KEY + FLIP_SUFFIX,
    SEMANTIC_KEY, SEMANTIC_KEY + FLIP_SUFFIX,
    DINO_KEY, DINO_KEY + FLIP_SUFFIX,
    LABEL_KEY,
)
# What our extraction writes; reading accepts any float dtype for the feature keys.
SHARD_DTYPES = {
    TEXTURE_KEY: torch.float32,
    SEMANTIC_KEY: torch.float32,
    DINO_KEY: torch.float16,
    LABEL_KEY: torch.int64,
}
STATS_KEYS = (TEXTURE_KEY, SEMANTIC_KEY)
SHARD_SUFFIX = ".safetensors"
# Our extraction facts are one JSON string under one key: safetensors writes a multi-key
# metadata map in random order, and resumed shards must be byte-identical.
METADATA_KEY = "sfd_scale"
WHERE_TO_GET = (
    "download the published latents (Hugging Face SFD-Project/SFD, imagenet1k-latents/) "
    "or create them with launchers/extract.py"
)

_ST_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "F64": (np.dtype("<f8"), torch.float64),
    "F32": (np.dtype("<f4"), torch.float32),
    "F16": (np.dtype("<f2"), torch.float16),
    "BF16": (np.dtype("<u2"), torch.bfloat16),  # numpy has no bfloat16: read raw bits
    "I64": (np.dtype("<i8"), torch.int64),
    "I32": (np.dtype("<i4"), torch.int32),
    "I16": (np.dtype("<i2"), torch.int16),
    "I8": (np.dtype("i1"), torch.int8),
    "U8": (np.dtype("u1"), torch.uint8),
    "BOOL": (np.dtype("?"), torch.bool),
}
_TORCH_TO_ST = {tdt: name for name, (_, tdt) in _ST_DTYPES.items()}
_FLOAT_ST = {"F64", "F32", "F16", "BF16"}
_INT_ST = {"I64", "I32", "I16", "I8", "U8"}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def shard_name(rank: int, index: int) -> str:
    """File name of shard `index` written by `rank`, as the reference extraction names it."""
    return f"latents_rank{rank:02d}_shard{index:03d}{SHARD_SUFFIX}"


def list_shards(data_dir: str | os.PathLike) -> list[Path]:
    """All shards of a latent folder, sorted by name (the reference loader's order)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"latent folder not found: {data_dir}; {WHERE_TO_GET}")
    files = sorted(data_dir.glob("*" + SHARD_SUFFIX))
    if not files:
        raise FileNotFoundError(f"no *{SHARD_SUFFIX} shards in {data_dir}; {WHERE_TO_GET}")
    return files


@dataclass(frozen=True)
class ShardInfo:
    """What a shard's header says: sample count, per-key shape and safetensors dtype."""

    path: Path
    num_samples: int
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    metadata: dict[str, Any] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)  # absolute file offset of each array

    def channels(self, key: str) -> int:
        return self.shapes[key][1]

    def spatial(self, key: str) -> tuple[int, int]:
        return self.shapes[key][2], self.shapes[key][3]

    def torch_dtype(self, key: str) -> torch.dtype:
        return _ST_DTYPES[self.dtypes[key]][1]

    def row_bytes(self, key: str) -> int:
        """Bytes of one sample of `key` (arrays are row-major, so a sample is one run)."""
        return math.prod(self.shapes[key][1:]) * _ST_DTYPES[self.dtypes[key]][0].itemsize


def check_layout(shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str], where: str) -> int:
    """Raise ValueError naming `where` and the key unless the arrays form a valid shard.

    Returns the number of samples. Texture, semantic and DINO arrays must share H and W
    (the loader concatenates texture and semantic channels; REPA pairs tokens with features).
    """
    for key in SHARD_KEYS:
        if key not in shapes:
            raise ValueError(f"shard {where} is missing key '{key}' (a shard holds {list(SHARD_KEYS)})")
    label_shape = shapes[LABEL_KEY]
    if len(label_shape) != 1 or dtypes[LABEL_KEY] not in _INT_ST:
        raise ValueError(
            f"shard {where}: key '{LABEL_KEY}' must be a 1-D integer array, "
            f"got shape {list(label_shape)} dtype {dtypes[LABEL_KEY]}"
        )
    num = label_shape[0]
    ref_hw = None
    for base in FEATURE_KEYS:
        for key in (base, base + FLIP_SUFFIX):
            shape = shapes[key]
            if len(shape) != 4 or dtypes[key] not in _FLOAT_ST:
                raise ValueError(
                    f"shard {where}: key '{key}' must be a 4-D float array (N, C, H, W), "
                    f"got shape {list(shape)} dtype {dtypes[key]}"
                )
            if shape[0] != num:
                raise ValueError(
                    f"shard {where}: key '{key}' has {shape[0]} samples but '{LABEL_KEY}' has {num}"
                )
        if shapes[base + FLIP_SUFFIX] != shapes[base]:
            raise ValueError(
                f"shard {where}: key '{base}{FLIP_SUFFIX}' has shape {list(shapes[base + FLIP_SUFFIX])}, "
                f"'{base}' has {list(shapes[base])}"
            )
        hw = shapes[base][2:]
        if ref_hw is None:
            ref_hw = hw
        elif hw != ref_hw:
            raise ValueError(
                f"shard {where}: key '{base}' is {hw[0]}x{hw[1]} spatially, "
                f"'{TEXTURE_KEY}' is {ref_hw[0]}x{ref_hw[1]}"
            )
    return num


def write_shard(
    path: str | os.PathLike,
    arrays: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Validate and atomically write one shard; `metadata` (JSON-able) is stored in the header."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in arrays.items()}
    for key, t in tensors.items():
        if t.dtype not in _TORCH_TO_ST:
            raise ValueError(f"shard {path}: key '{key}' has unsupported dtype {t.dtype}")
    check_layout(
        {k: tuple(t.shape) for k, t in tensors.items()},
        {k: _TORCH_TO_ST[t.dtype] for k, t in tensors.items()},
        str(path),
    )
    header_meta = None
    if metadata:
        header_meta = {METADATA_KEY: json.dumps(dict(metadata), sort_keys=True)}
    atomic_write_bytes(path, save(tensors, metadata=header_meta))


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header and check it against the file size.

    Returns (header, byte offset of the data section). Any inconsistency, e.g. a truncated
    copy, is a ValueError naming the shard.
    """
    if not path.is_file():
        raise FileNotFoundError(f"shard not found: {path}; {WHERE_TO_GET}")
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"shard {path} is not a safetensors file (only {file_size} bytes)")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(file_size - 8, _MAX_HEADER_BYTES):
            raise ValueError(
                f"shard {path} has a corrupt header (length {header_len}, file {file_size} bytes)"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"shard {path} has a corrupt header: {exc}") from exc
    data_start = 8 + header_len
    data_size = file_size - data_start
    data_end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        dtype = entry.get("dtype")
        if dtype not in _ST_DTYPES:
            raise ValueError(f"shard {path}: key '{key}' has unsupported dtype {dtype}")
        begin, end = entry["data_offsets"]
        expected = math.prod(entry["shape"]) * _ST_DTYPES[dtype][0].itemsize
        if end - begin != expected or end > data_size:
            raise ValueError(
                f"shard {path}: key '{key}' data [{begin}, {end}) does not fit its shape "
                f"{entry['shape']} or the file ({data_size} data bytes); the file is truncated or corrupt"
            )
        data_end = max(data_end, end)
    if data_end != data_size:
        raise ValueError(f"shard {path}: header covers {data_end} data bytes, file has {data_size}")
    return header, data_start


def validate_shard(path: str | os.PathLike) -> ShardInfo:
    """Check a shard's header (keys, shapes, dtypes, sizes) without reading its data."""
    path = Path(path)
    header, data_start = _read_header(path)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    shapes = {k: tuple(v["shape"]) for k, v in tensors.items()}
    dtypes = {k: v["dtype"] for k, v in tensors.items()}
    num = check_layout(shapes, dtypes, str(path))
    raw_meta = (header.get("__metadata__") or {}).get(METADATA_KEY)
    metadata = json.loads(raw_meta) if raw_meta else {}
    offsets = {k: data_start + v["data_offsets"][0] for k, v in tensors.items()}
    return ShardInfo(path=path, num_samples=num, shapes=shapes, dtypes=dtypes, metadata=metadata,
                     offsets=offsets)


def read_shard(path: str | os.PathLike, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Load whole arrays of one shard (all keys, or `keys`) into memory."""
    path = Path(path)
    header, _ = _read_header(path)  # clear errors for missing or truncated files
    names = sorted(k for k in header if k != "__metadata__")
    keys = names if keys is None else list(keys)
    for key in keys:
        if key not in names:
            raise ValueError(f"shard {path} has no key '{key}' (keys: {names})")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in keys}
    except SafetensorError as exc:
        raise ValueError(f"cannot read shard {path}: {exc}") from exc


def open_shard_arrays(path: str | os.PathLike, keys: Iterable[str]) -> dict[str, np.ndarray]:
    """Memory-map arrays of one shard: indexing reads only the touched pages, and the OS page
    cache keeps hot data in RAM across epochs. BF16 arrays come back as raw uint16 bits
    (see `as_torch`)."""
    path = Path(path)
    header, data_start = _read_header(path)
    out: dict[str, np.ndarray] = {}
    for key in keys:
        if key not in header or key == "__metadata__":
            raise ValueError(f"shard {path} has no key '{key}'")
        entry = header[key]
        np_dtype = _ST_DTYPES[entry["dtype"]][0]
        shape = tuple(entry["shape"])
        if math.prod(shape) == 0:
            out[key] = np.empty(shape, dtype=np_dtype)  # mmap cannot map zero bytes
        else:
            out[key] = np.memmap(
                path, dtype=np_dtype, mode="r", offset=data_start + entry["data_offsets"][0], shape=shape
            )
    return out


def as_torch(array: np.ndarray, st_dtype: str) -> torch.Tensor:
    """numpy array read from a shard -> torch tensor of the stored dtype, never a view of the
    read-only file mapping (fancy-indexed reads are already private copies)."""
    if not array.flags.writeable:
        array = np.array(array)
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if st_dtype == "BF16":
        tensor = tensor.view(torch.bfloat16)
    return tensor


class RunningStats:
    """Exact streaming per-channel mean and std over (N, C, ...) arrays.

    Chan et al.'s parallel update in float64: each batch contributes (count, mean, M2) and
    partial results merge exactly, so per-rank statistics can be combined later.
    """

    def __init__(self, num_channels: int) -> None:
        if num_channels <= 0:
            raise ValueError(f"num_channels must be positive, got {num_channels}")
        self.num_channels = num_channels
        self.count = 0
        self.mean = torch.zeros(num_channels, dtype=torch.float64)
        self.m2 = torch.zeros(num_channels, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        """Add every element of a (N, C, ...) batch to its channel's statistics."""
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"expected (N, {self.num_channels}, ...) values, got shape {list(x.shape)}")
        values = x.detach().to(torch.float64).transpose(0, 1).reshape(self.num_channels, -1)
        n = values.shape[1]
        if n == 0:
            return
        mean = values.mean(dim=1)
        m2 = (values - mean[:, None]).square().sum(dim=1)
        self._combine(n, mean, m2)

    def merge(self, other: "RunningStats") -> None:
        """Fold another partial result (e.g. another rank's) into this one."""
        if other.num_channels != self.num_channels:
            raise ValueError(f"cannot merge stats of {other.num_channels} channels into {self.num_channels}")
        if other.count:
            self._combine(other.count, other.mean, other.m2)

    def _combine(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (n_a * n_b / n)
        self.count = n

    def to_dict(self) -> dict[str, Any]:
        """JSON-able exact state (Python floats print and parse back to the same float64)."""
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any], where: str = "stats") -> "RunningStats":
        try:
            stats = cls(len(state["mean"]))
            stats.count = int(state["count"])
            stats.mean = torch.tensor(state["mean"], dtype=torch.float64)
            stats.m2 = torch.tensor(state["m2"], dtype=torch.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: not a RunningStats state ({exc})") from exc
        if stats.m2.shape != stats.mean.shape or stats.count < 0:
            raise ValueError(f"{where}: inconsistent RunningStats state")
        return stats

    def std(self, unbiased: bool = True) -> torch.Tensor:
        """Per-channel std; unbiased (N - 1) by default like `torch.std` in the reference."""
        dof = self.count - 1 if unbiased else self.count
        if dof <= 0:
            raise ValueError(
                f"std needs more than {1 if unbiased else 0} values per channel, have {self.count}"
            )
        return (self.m2 / dof).sqrt()


def stats_path(data_dir: str | os.PathLike, key: str) -> Path:
    return Path(data_dir) / f"{key}_stats.pt"


def write_stats(data_dir: str | os.PathLike, key: str, mean: torch.Tensor, std: torch.Tensor) -> Path:
    """Atomically save per-channel stats as {'mean','std'} of shape (1, C, 1, 1) float32."""
    if mean.numel() != std.numel():
        raise ValueError(f"stats for '{key}': mean has {mean.numel()} channels, std {std.numel()}")
    if not bool((std > 0).all()):
        raise ValueError(
            f"stats for '{key}': std must be positive in every channel, got {std.flatten().tolist()}"
        )
    c = mean.numel()
    stats = {
        "mean": mean.detach().reshape(1, c, 1, 1).to(torch.float32).cpu().clone(),
        "std": std.detach().reshape(1, c, 1, 1).to(torch.float32).cpu().clone(),
    }
    buf = io.BytesIO()
    torch.save(stats, buf)
    path = stats_path(data_dir, key)
    atomic_write_bytes(path, buf.getvalue())
    return path


def read_stats(data_dir: str | os.PathLike, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Load (mean, std), each (1, C, 1, 1) float32, from `<data_dir>/<key>_stats.pt`."""
    path = stats_path(data_dir, key)
    if not path.is_file():
        raise FileNotFoundError(
            f"latent statistics file not found: {path}; it ships with the published latents "
            f"(Hugging Face SFD-Project/SFD, imagenet1k-latents/) and launchers/extract.py writes it"
        )
    stats = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(stats, dict) or "mean" not in stats or "std" not in stats:
        raise ValueError(f"stats file {path} must hold a dict with 'mean' and 'std'")
    mean, std = stats["mean"], stats["std"]
    if mean.dim() != 4 or mean.shape[0] != 1 or mean.shape[2:] != (1, 1) or std.shape != mean.shape:
        raise ValueError(
            f"stats file {path}: 'mean' and 'std' must both be (1, C, 1, 1), "
            f"got {list(mean.shape)} and {list(std.shape)}"
        )
    if not bool((std > 0).all()):
        raise ValueError(f"stats file {path}: 'std' has non-positive entries")
    return mean.to(torch.float32), std.to(torch.float32)
