"""Image decoding and the ADM preprocessing used before latent extraction (SPEC section 1).

Pipeline per image: `load_rgb` (any PIL mode -> RGB) -> `center_crop_arr` (ADM box-halving,
bicubic resize, center crop) -> `to_tensor_pm1` ((3, H, W) float32 in [-1, 1]). The flipped copy
stored beside each latent is the horizontal flip of the cropped image (`hflip`).
`ImageFolderIndex` lists `root/<class>/...` images with the labels torchvision's ImageFolder
would give them, so our labels match the published ImageNet latents.

Batches of files are decoded by an `ImageDecoder`: `PilDecoder` (the reference path, threads)
or `dali_pipeline.DaliDecoder` (NVIDIA DALI on the GPU, or DALI's CPU-only mode).
`select_decoder` is the one place that chooses between them, and logs the choice.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

DECODER_BACKENDS = ("auto", "pil", "dali", "dali-cpu")

# torchvision's IMG_EXTENSIONS: the files ImageFolder would pick up (matched case-insensitively).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM center crop: box-halve while the short side >= 2 * size, bicubic-resize the short
    side to `image_size`, then crop the central `image_size` x `image_size` square."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    # Halving with a box filter first avoids the aliasing a single large bicubic step would add.
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC
    )
    width, height = pil_image.size
    left = (width - image_size) // 2
    top = (height - image_size) // 2
    return pil_image.crop((left, top, left + image_size, top + image_size))


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file fully and convert it to RGB (grayscale, CMYK, palette, RGBA...).

    Raises FileNotFoundError when the file is missing and ValueError naming the file when it
    cannot be decoded (corrupt, truncated, not an image).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            # load() forces the full decode so truncation surfaces here, not later.
            img.load()
            # convert("RGB") drops alpha as torchvision's default loader does.
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode image {path}: {exc}") from exc


def to_tensor_pm1(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1], computed as ToTensor then
    Normalize(0.5, 0.5) so values are bit-identical to the reference transform."""
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode!r}; use load_rgb first")
    arr = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W, 3)
    x = arr.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    return x.sub_(0.5).div_(0.5)


def uint8_to_pm1(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1], the same operations as
    `to_tensor_pm1`, so equal crops give bit-equal tensors on any device."""
    x = images.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
    return x.sub_(0.5).div_(0.5)


def hflip(images: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of (..., H, W) images; equals PIL's FLIP_LEFT_RIGHT of the crop."""
    return torch.flip(images, dims=(-1,))


def load_image_pm1(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """File -> (3, image_size, image_size) float32 in [-1, 1] (load, ADM crop, normalize)."""
    return to_tensor_pm1(center_crop_arr(load_rgb(path), image_size))


@dataclass
class DecodedBatch:
    """The decodable files of a request, in request order, and why the others were skipped."""

    images: torch.Tensor  # (n_ok, 3, S, S) float32 in [-1, 1], on the decoder's device
    failures: dict[int, str] = field(default_factory=dict)  # request position -> reason


class ImageDecoder(Protocol):
    """Decodes batches of image files into ADM center crops."""

    name: str
    device: torch.device

    def decode(self, paths: Sequence[str | os.PathLike]) -> DecodedBatch: ...

    def close(self) -> None: ...


def decode_with_pil(paths: Sequence[str | os.PathLike], image_size: int,
                    pool: Executor | None = None) -> DecodedBatch:
    """PIL path for a batch: unreadable files become failures (named), never exceptions."""
    loaded = list(pool.map(_try_load, paths, [image_size] * len(paths)) if pool is not None
                  else (_try_load(p, image_size) for p in paths))
    failures = {i: str(item) for i, item in enumerate(loaded) if isinstance(item, Exception)}
    images = [item for item in loaded if not isinstance(item, Exception)]
    stacked = torch.stack(images) if images else torch.empty(0, 3, image_size, image_size)
    return DecodedBatch(stacked, failures)


def _try_load(path: str | os.PathLike, image_size: int) -> torch.Tensor | Exception:
    try:
        return load_image_pm1(path, image_size)
    except (ValueError, OSError) as exc:  # unreadable or vanished file: skip, never crash
        return exc


class PilDecoder:
    """The reference decoding (Pillow), `num_workers` threads per batch (0: inline)."""

    name = "pil"
    device = torch.device("cpu")

    def __init__(self, image_size: int, num_workers: int = 0) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        from concurrent.futures import ThreadPoolExecutor

        self.image_size = image_size
        self._pool = ThreadPoolExecutor(num_workers, "pil-decode") if num_workers else None

    def decode(self, paths: Sequence[str | os.PathLike]) -> DecodedBatch:
        return decode_with_pil(paths, self.image_size, self._pool)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def select_decoder(backend: str, image_size: int, batch_size: int, device: torch.device | str = "cpu",
                   num_workers: int = 4) -> ImageDecoder:
    """The one dispatch point for image decoding; logs what it chose and why.

    backend: 'pil'; 'dali' (GPU decoding on `device`, which must be CUDA); 'dali-cpu' (DALI
    without a GPU); 'auto' = 'dali' when DALI is installed and `device` is CUDA, else 'pil'
    (the PIL path is bit-exact with the reference preprocessing, DALI's CPU mode is not).
    """
    from .dali_pipeline import DaliDecoder, dali_import_error

    if backend not in DECODER_BACKENDS:
        raise ValueError(f"image decoder backend {backend!r} is not one of {DECODER_BACKENDS}")
    device = torch.device(device)
    if backend == "auto":
        missing = dali_import_error()
        backend = "dali" if device.type == "cuda" and missing is None else "pil"
        why = "DALI and a CUDA device" if backend == "dali" else (
            f"no CUDA device ({device})" if device.type != "cuda" else f"DALI missing: {missing}")
        logger.info("image decoder auto -> %s (%s)", backend, why)
    if backend == "dali" and device.type != "cuda":
        raise ValueError(f"image decoder 'dali' decodes on a GPU, but the device is {device}; "
                         "use 'dali-cpu' or 'pil'")
    if backend == "pil":
        decoder: ImageDecoder = PilDecoder(image_size, num_workers)
    else:
        device_id = (device.index if device.index is not None else torch.cuda.current_device()) \
            if backend == "dali" else None
        decoder = DaliDecoder(image_size, batch_size, device_id=device_id, num_threads=max(1, num_workers))
    logger.info("image decoding: %s on %s, %dx%d ADM center crops", decoder.name, decoder.device,
                image_size, image_size)
    return decoder


@dataclass(frozen=True)
class ImageFolderIndex:
    """Images under `root/<class>/...` with labels from the sorted class folder names.

    Matches torchvision's ImageFolder: classes are the sorted sub-folder names, files are found
    recursively (following links) in sorted order, extensions matched case-insensitively.
    """

    root: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[Path, int], ...]

    @classmethod
    def scan(cls, root: str | os.PathLike) -> "ImageFolderIndex":
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        classes = tuple(sorted(e.name for e in os.scandir(root) if e.is_dir()))
        if not classes:
            raise FileNotFoundError(f"no class folders in {root}; expected root/<class>/<images>")
        samples: list[tuple[Path, int]] = []
        empty: list[str] = []
        for label, name in enumerate(classes):
            found = _images_under(root / name)
            if not found:
                empty.append(name)
            samples.extend((p, label) for p in found)
        if empty:
            # torchvision refuses empty classes too; one almost always means a broken copy.
            raise FileNotFoundError(
                f"no images with extensions {IMG_EXTENSIONS} in class folders {empty} of {root}"
            )
        return cls(root=root, classes=classes, samples=tuple(samples))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Path, int]:
        return self.samples[i]

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    def relative(self, path: Path) -> str:
        """Path relative to the root, for reports."""
        return path.relative_to(self.root).as_posix()


def _images_under(folder: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, _, filenames in sorted(os.walk(folder, followlinks=True)):
        for fname in sorted(filenames):
            if fname.lower().endswith(IMG_EXTENSIONS):
                found.append(Path(dirpath) / fname)
    return found
