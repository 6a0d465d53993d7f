"""NVIDIA DALI decoding with the ADM center crop (optional: `pip install nvidia-dali-cuda130`).

The graph reproduces `images.center_crop_arr` step by step, in the order Pillow computes it:
box-halving while the short side >= 2 * size, bicubic resize of the short side to `size`, centre
crop. Pillow resamples separably, horizontal pass first, rounding to uint8 after each pass; the
graph does the same (float resize per axis, round half up, clamp). Box-halving is exact: an even
side averages pixel pairs (a linear resize to exactly half size samples pair midpoints); an odd
side 2n+1 makes Pillow average pairs around one middle triple (or a left-out middle pixel),
which depends on floating-point ties in Pillow's coefficients, so the block's layout per
side length comes from a table computed by replaying Pillow's arithmetic (`box_halving_layout`).
The bicubic step differs from Pillow's fixed-point weights only in rare roundings; DALI's CPU
decoder agrees with the PIL path to a few levels on a handful of pixels (figures in
tests/test_dali.py and docs/benchmarks.md).

Two ways in:
  * `DaliDecoder`: a list of files in, a batch of (3, S, S) images in [-1, 1] out (extraction;
    unreadable files are reported, a batch DALI rejects is decoded with PIL instead);
  * `dali_reader_batches`: DALI's own readers over a file list or webdataset tar shards
    (images with `.cls` labels), split across ranks by DALI's shard_id / num_shards.
`device_id=None` runs DALI without a GPU (decoders on 'cpu'); otherwise JPEGs are decoded on
the GPU ('mixed') and the whole crop runs there.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .images import DecodedBatch, ImageFolderIndex, decode_with_pil, uint8_to_pm1

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.pipeline import do_not_convert
    from nvidia.dali.plugin.pytorch import feed_ndarray
    _IMPORT_ERROR: str | None = None
except ImportError as _exc:  # DALI is optional: the PIL path needs none of this
    _IMPORT_ERROR = f"{_exc} (pip install nvidia-dali-cuda130)"

    def do_not_convert(func):  # type: ignore[no-redef]
        return func

logger = logging.getLogger(__name__)

# Box-halvings unrolled in the graph: short sides up to size * 2**5 (8192 px for 256 crops);
# each one adds graph nodes, and building the graph costs seconds per halving.
MAX_HALVINGS = 5
MAX_SIDE = 65535  # DALI's lookup tables take 16-bit keys: longer sides are not supported
TAR_IMAGE_EXTENSIONS = "jpg;jpeg;JPEG;png;webp;bmp"


def dali_import_error() -> str | None:
    """None when DALI can be imported, else why not (for the decoder choice log line)."""
    return _IMPORT_ERROR


def adm_crop_graph(encoded, image_size: int, decode_device: str):
    """DALI graph: encoded images -> (image_size, image_size, 3) uint8 ADM center crops.

    Must be called inside a pipeline definition built with enable_conditionals=True (the
    number of halvings differs per image).
    """

    # EXIF orientation is ignored, as Pillow's Image.open (and torchvision's loader) ignore it.
    shape = fn.peek_image_shape(encoded, dtype=types.INT64, adjust_orientation=False)
    height, width = shape[0], shape[1]
    image = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB,
                              adjust_orientation=False, jpeg_fancy_upsampling=True)
    for _ in range(MAX_HALVINGS):
        if dmath.min(height, width) >= 2 * image_size:
            layout = fn.cast(fn.lookup_table(fn.cast(fn.stack(height, width), dtype=types.INT32),
                                             **_layout_table()), dtype=types.INT64)
            image = _box_halve(image, width, layout[1], height, axis=1)  # Pillow: horizontal first
            image = _box_halve(image, height, layout[0], width // 2, axis=0)
            height, width = height // 2, width // 2
    scale = image_size / fn.cast(dmath.min(height, width), dtype=types.FLOAT64)
    new_height = _round_half_up(fn.cast(height, dtype=types.FLOAT64) * scale)
    new_width = _round_half_up(fn.cast(width, dtype=types.FLOAT64) * scale)
    image = _resize_like_pil(image, height, new_width, new_height, types.INTERP_CUBIC, True)
    top = (new_height - image_size) // 2
    left = (new_width - image_size) // 2
    return fn.slice(image, fn.cast(fn.stack(top, left), dtype=types.INT32),
                    np.array([image_size, image_size], dtype=np.int32), axes=[0, 1],
                    normalized_anchor=False, normalized_shape=False)


@do_not_convert
def _resize_like_pil(image, height, new_width, new_height, interp, antialias):
    """Two separable passes (width, then height), each rounded to uint8 as Pillow does."""

    def size(h, w):
        return fn.cast(fn.stack(h, w), dtype=types.FLOAT)

    # Linear without antialiasing at exactly half size samples the midpoint of each pixel
    # pair: the box average; cubic with antialiasing widens its kernel on downscaling as
    # Pillow's bicubic does.
    wide = fn.resize(image, size=size(height, new_width), interp_type=interp, antialias=antialias,
                     dtype=types.FLOAT)
    image = _to_uint8(wide)
    tall = fn.resize(image, size=size(new_height, new_width), interp_type=interp, antialias=antialias,
                     dtype=types.FLOAT)
    return _to_uint8(tall)


@do_not_convert
def box_halving_layout(length: int) -> tuple[int, int, int]:
    """How Pillow's box filter halves a side of odd `length` = 2n + 1 (to n).

    Returns (left, right, triples): pixels [0, left) are averaged in pairs, then `triples`
    (0 or 1) mean of pixels [left, left + 3), then pairs over [right, length); with no triple
    the pixel between left and right = left + 1 is left out. Replays Pillow's `precompute_coeffs` in float64 for the
    cells around the middle, where its coefficients tie; elsewhere the cells are plain pairs.
    """
    if length < 11 or length % 2 == 0:
        raise ValueError(f"box_halving_layout needs an odd length >= 11, got {length}")
    n = length // 2
    scale = float(length) / n
    support = 0.5 * scale
    cells = {}
    for i in range(n // 2 - 2, n // 2 + 3):
        center = (i + 0.5) * scale
        first = max(int(center - support + 0.5), 0)
        stop = min(int(center + support + 0.5), length)
        cells[i] = [j for j in range(first, stop) if -0.5 < (j - center + 0.5) * (1.0 / scale) <= 0.5]
    lo, hi = n // 2 - 2, n // 2 + 2
    if cells[lo] != [2 * lo, 2 * lo + 1] or cells[hi] != [2 * hi + 1, 2 * hi + 2]:
        raise ValueError(f"unexpected Pillow box cells for length {length}: {cells}")
    middle = [cells[i] for i in range(lo + 1, hi)]
    triples = [c for c in middle if len(c) == 3]
    if len(triples) > 1:
        raise ValueError(f"Pillow box cells for length {length} hold overlapping triples: {middle}")
    left = triples[0][0] if triples else next(c[0] for c in middle if c[0] % 2 == 1) - 1
    right = triples[-1][-1] + 1 if triples else left + 1
    expected = ([[j, j + 1] for j in range(2 * (lo + 1), left, 2)] + [[left + 2 * k + i for i in range(3)]
                for k in range(len(triples))] + [[j, j + 1] for j in range(right, 2 * hi + 1, 2)])
    if middle != expected:
        raise ValueError(f"unexpected Pillow box cells for length {length}: {middle}")
    return left, right, len(triples)


@do_not_convert
def _layout_table() -> dict:
    """lookup_table arguments: odd side length -> packed (left - n + 2, right - n, triples)."""
    if _LAYOUT_TABLE:
        return _LAYOUT_TABLE
    keys, values = [], []
    for length in range(11, MAX_SIDE + 1, 2):
        left, right, triples = box_halving_layout(length)
        n = length // 2
        keys.append(length)
        values.append(float((left - n + 2) * 16 + (right - n) * 4 + triples))
    _LAYOUT_TABLE.update(keys=keys, values=values, default_value=-1.0)
    return _LAYOUT_TABLE


_LAYOUT_TABLE: dict = {}


def _box_halve(image, length, packed, other, axis: int):
    """Pillow's box filter from `length` to length // 2 along `axis` (0: height, 1: width);
    `other` is the image's size along the other axis, `packed` the side's `_layout_table` code."""

    if length % 2 == 0:
        halved = _pairs(image, length, other, axis)
    else:
        half = length // 2
        left = packed // 16 + half - 2
        right = (packed // 4) % 4 + half
        left_pairs = _pairs(_slice(image, 0, left, axis), left, other, axis)
        right_pairs = _pairs(_slice(image, right, length - right, axis), length - right, other, axis)
        if packed % 4 == 1:
            halved = fn.cat(left_pairs, _mean3(image, left, axis), right_pairs, axis=axis)
        else:  # Pillow's weights leave the middle pixel out
            halved = fn.cat(left_pairs, right_pairs, axis=axis)
    return _to_uint8(fn.cast(halved, dtype=types.FLOAT))


@do_not_convert
def _slice(image, start, size, axis: int):

    return fn.slice(image, fn.cast(fn.stack(start), dtype=types.INT64), fn.cast(fn.stack(size), dtype=types.INT64),
                    axes=[axis], normalized_anchor=False, normalized_shape=False)


@do_not_convert
def _pairs(image, length, other, axis: int):
    """Average pixel pairs along `axis` (even `length`): a linear resize to exactly half size
    samples each pair's midpoint."""

    size = fn.stack(length // 2, other) if axis == 0 else fn.stack(other, length // 2)
    return fn.resize(image, size=fn.cast(size, dtype=types.FLOAT), interp_type=types.INTERP_LINEAR,
                     antialias=False, dtype=types.FLOAT)


@do_not_convert
def _mean3(image, start, axis: int):

    block = fn.cast(_slice(image, start, 3, axis), dtype=types.FLOAT)
    return fn.reductions.mean(block, axes=[axis], keep_dims=True, dtype=types.FLOAT)


@do_not_convert
def _to_uint8(x):

    return fn.cast(dmath.clamp(dmath.floor(x + 0.5), 0, 255), dtype=types.UINT8)


@do_not_convert
def _round_half_up(x):
    """int64 of floor(x + 0.5); equals Python's round() except at exact .5 ties, which cannot
    occur for the resize targets when image_size is a power of two (the SFD sizes)."""

    return fn.cast(dmath.floor(x + 0.5), dtype=types.INT64)


def _to_torch(output, device: torch.device) -> torch.Tensor:
    """A uniform DALI TensorList (B, S, S, 3) uint8 -> torch tensor on `device`."""
    tensor = output.as_tensor()
    out = torch.empty(tensor.shape(), dtype=torch.uint8, device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(tensor, out, cuda_stream=stream)
    return out


class DaliDecoder:
    """Files -> ADM-cropped images in [-1, 1] with DALI (GPU 'mixed' decoding, or CPU-only).

    Files are read by Python threads and fed to the pipeline; a file that cannot be read is
    reported as a failure, and a batch the DALI decoder rejects (corrupt or unsupported data)
    is decoded with PIL instead, which names the bad files.
    """

    def __init__(self, image_size: int, max_batch_size: int, device_id: int | None = None,
                 num_threads: int = 4) -> None:
        if image_size <= 0 or max_batch_size <= 0:
            raise ValueError(f"image_size and max_batch_size must be positive, got {image_size}, {max_batch_size}")
        reason = dali_import_error()
        if reason is not None:
            raise ImportError(f"DALI decoding needs NVIDIA DALI: {reason}")
        self.image_size = image_size
        self.max_batch_size = max_batch_size
        self.device_id = device_id
        self.num_threads = num_threads
        self.device = torch.device("cuda", device_id) if device_id is not None else torch.device("cpu")
        self.name = "dali-mixed" if device_id is not None else "dali-cpu"
        self._io = ThreadPoolExecutor(num_threads, "dali-read")
        self._pipe = self._build()

    def _build(self):
        decode_device = "mixed" if self.device_id is not None else "cpu"

        @pipeline_def(batch_size=self.max_batch_size, num_threads=self.num_threads, device_id=self.device_id,
                      enable_conditionals=True, exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            return adm_crop_graph(encoded, self.image_size, decode_device)

        pipe = pipeline()
        pipe.build()
        return pipe

    def decode(self, paths: Sequence[str | os.PathLike]) -> DecodedBatch:
        if len(paths) > self.max_batch_size:
            raise ValueError(f"{len(paths)} files exceed the decoder's batch size {self.max_batch_size}")
        contents = list(self._io.map(_read_bytes, paths))
        failures = {i: c for i, c in enumerate(contents) if isinstance(c, str)}
        readable = [i for i, c in enumerate(contents) if not isinstance(c, str)]
        if not readable:
            return DecodedBatch(torch.empty(0, 3, self.image_size, self.image_size, device=self.device), failures)
        try:
            self._pipe.feed_input("encoded", [np.frombuffer(contents[i], dtype=np.uint8) for i in readable])
            (crops,) = self._pipe.run()
            images = uint8_to_pm1(_to_torch(crops, self.device))
        except RuntimeError as exc:
            # A DALI error invalidates the pipeline: rebuild it, and let PIL sort this batch out.
            logger.warning("DALI rejected a batch of %d files starting with %s (%s); decoding it with PIL",
                           len(readable), paths[readable[0]], _dali_reason(exc))
            self._pipe = self._build()
            batch = decode_with_pil([paths[i] for i in readable], self.image_size, self._io)
            failures.update({readable[k]: why for k, why in batch.failures.items()})
            images = batch.images.to(self.device)
        return DecodedBatch(images, dict(sorted(failures.items())))

    def close(self) -> None:
        self._io.shutdown()


def _dali_reason(exc: Exception) -> str:
    """The line of a DALI pipeline error that says what went wrong."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "encountered:" in lines and lines.index("encountered:") + 1 < len(lines):
        return lines[lines.index("encountered:") + 1]
    return lines[0] if lines else type(exc).__name__


def _read_bytes(path: str | os.PathLike) -> bytes | str:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return f"cannot read image {path}: {exc}"
    return data if data else f"empty image file {path}"


def dali_reader_batches(
    source: ImageFolderIndex | Sequence[str | os.PathLike],
    image_size: int,
    batch_size: int,
    device_id: int | None = None,
    shard_id: int = 0,
    num_shards: int = 1,
    num_threads: int = 4,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over `source` with DALI's readers: (images (B, 3, S, S) in [-1, 1], labels (B,)).

    `source` is an image folder index (file-list reader, labels from the folders) or a list of
    webdataset tar shards whose samples hold an image and a `.cls` text label. Rank `shard_id`
    of `num_shards` reads its contiguous share in order (DALI's sharding); the last batch may
    be short. Files DALI cannot decode stop the pass with DALI's error: use `DaliDecoder` where
    bad files must be skipped.
    """
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"need 0 <= shard_id < num_shards, got {shard_id} and {num_shards}")
    tars = not isinstance(source, ImageFolderIndex)
    if tars:
        missing = [str(p) for p in source if not Path(p).is_file()]
        if missing or not source:
            raise FileNotFoundError(f"tar shards not found: {missing or 'none given'}")
    device = torch.device("cuda", device_id) if device_id is not None else torch.device("cpu")
    decode_device = "mixed" if device_id is not None else "cpu"

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, enable_conditionals=True)
    def pipeline():
        common = dict(shard_id=shard_id, num_shards=num_shards, random_shuffle=False, pad_last_batch=True,
                      name="reader")
        if tars:
            encoded, label = fn.readers.webdataset(paths=[str(p) for p in source],
                                                   ext=[TAR_IMAGE_EXTENSIONS, "cls"],
                                                   missing_component_behavior="error", **common)
        else:
            encoded, label = fn.readers.file(files=[str(p) for p, _ in source.samples],
                                             labels=[y for _, y in source.samples], **common)
        return adm_crop_graph(encoded, image_size, decode_device), label

    pipe = pipeline()
    pipe.build()
    total = pipe.reader_meta("reader")["epoch_size"]
    # DALI's shard k holds samples [k * N // S, (k + 1) * N // S).
    remaining = (shard_id + 1) * total // num_shards - shard_id * total // num_shards
    while remaining > 0:
        crops, labels = pipe.run()
        take = min(remaining, batch_size)
        images = uint8_to_pm1(_to_torch(crops, device))[:take]
        if tars:
            values = [int(bytes(np.array(labels[i])).decode().strip()) for i in range(take)]
        else:
            values = [int(np.array(labels[i]).reshape(-1)[0]) for i in range(take)]
        remaining -= take
        yield images, torch.tensor(values, dtype=torch.int64)
