"""Write N JPEGs of natural photographs into class subfolders, for decoding benchmarks.

  python scripts/sample_jpegs.py /tmp/jpegs 512

The images are scikit-learn's two sample photographs (640 x 427, like an average ImageNet
image), re-encoded with different quality and crop per file so no two files are identical.
"""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image
from sklearn.datasets import load_sample_images


def main() -> None:
    out, count = Path(sys.argv[1]), int(sys.argv[2])
    photos = [Image.fromarray(array) for array in load_sample_images().images]
    for i in range(count):
        folder = out / f"class{i % 8}"
        folder.mkdir(parents=True, exist_ok=True)
        photo = photos[i % len(photos)]
        crop = photo.crop((i % 40, i % 30, photo.width - (i % 25), photo.height - (i % 20)))
        crop.save(folder / f"img{i:05d}.jpg", quality=75 + i % 20)
    print(f"wrote {count} JPEGs under {out}")


if __name__ == "__main__":
    main()
