"""The bundled CPU demo data set: scikit-learn's 8x8 digits as an RGB image folder.

1797 images, 10 classes, 16 grey levels, shipped inside scikit-learn (no download). Upscaled
(bilinear) to `image_size` so the whole pipeline (crop, extract, train, sample, evaluate) runs
end to end on a laptop. `digits_arrays` gives the same pixels as arrays, for classifiers.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .images import ImageFolderIndex
from sfd_scale.atomic import atomic_write_bytes

_MARKER = ".complete.json"  # written last: its presence means every PNG is in place
_GREY_LEVELS = 16


def digits_arrays(image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (1797, S, S, 3), labels int64 (1797,)) with S = image_size."""
    if image_size < 8:
        raise ValueError(f"image_size must be at least the digits' native 8, got {image_size}")
    from sklearn.datasets import load_digits  # scikit-learn is only needed for the demo

    digits = load_digits()
    grey = np.rint(digits.images * (255.0 / _GREY_LEVELS)).astype(np.uint8)  # 0..16 -> 0..255
    images = np.stack([
        np.asarray(Image.fromarray(g).resize((image_size, image_size), Image.BILINEAR))
        for g in grey
    ])
    rgb = np.repeat(images[..., None], 3, axis=-1)
    return rgb, digits.target.astype(np.int64)


def write_digits_folder(root: str | os.PathLike, image_size: int = 32) -> ImageFolderIndex:
    """Write the digits as `root/<digit>/NNNN.png` (NNNN = index in the data set) once.

    A folder completed earlier with the same image_size is reused as is; one completed with a
    different size is an error rather than a silent mix.
    """
    root = Path(root)
    marker = root / _MARKER
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("image_size") != image_size:
            raise ValueError(
                f"{root} holds digits at image_size={done.get('image_size')}, asked for {image_size}; "
                f"use another folder"
            )
        return ImageFolderIndex.scan(root)
    images, labels = digits_arrays(image_size)
    for digit in range(10):
        (root / str(digit)).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        atomic_write_bytes(root / str(label) / f"{i:04d}.png", buf.getvalue())
    atomic_write_bytes(marker, json.dumps({"count": len(images), "image_size": image_size}).encode())
    return ImageFolderIndex.scan(root)
