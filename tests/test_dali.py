"""DALI decoding (CPU-only mode) against the PIL path: crops, bad files, readers, extraction.

Tolerance of DALI-CPU against PIL on real JPEGs (scikit-learn's china.jpg and flower.jpg,
640x427), in uint8 levels: at most MAX_LEVELS on any pixel and channel, MEAN_LEVELS on average,
and at most FRACTION_OVER_1 of the values off by more than one level. Measured with DALI
2.4.0: max 4, mean <= 0.013, fraction over one level <= 0.0004 at 256, 128 and 64 (0, 1 and 2
box-halvings). Box-halving alone is exact (checked with lossless PNGs where the bicubic step is
the identity).
"""
from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is optional (pip install nvidia-dali-cuda130)",
                    exc_type=ImportError)

from sfd_scale.data import dali_pipeline  # noqa: E402
from sfd_scale.data.dali_pipeline import DaliDecoder, box_halving_layout, dali_reader_batches  # noqa: E402
from sfd_scale.data.extract import extract_folder  # noqa: E402
from sfd_scale.data.images import (  # noqa: E402
    ImageFolderIndex,
    PilDecoder,
    center_crop_arr,
    load_image_pm1,
    select_decoder,
    to_tensor_pm1,
)
from sfd_scale.data.shards import read_shard  # noqa: E402

MAX_LEVELS = 6
MEAN_LEVELS = 0.05
FRACTION_OVER_1 = 0.002


def _sample_jpegs() -> list[Path]:
    import sklearn.datasets

    folder = Path(sklearn.datasets.__file__).parent / "images"
    return [folder / "china.jpg", folder / "flower.jpg"]


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of [-1, 1] images in uint8 levels."""
    return ((a - b).abs() * 127.5).round()


@pytest.fixture(scope="module")
def decoders():
    made = {size: DaliDecoder(size, max_batch_size=8, device_id=None, num_threads=2) for size in (256, 128, 64)}
    yield made
    for decoder in made.values():
        decoder.close()


@pytest.mark.parametrize("size", [256, 128, 64])
def test_dali_cpu_matches_pil_on_real_jpegs(decoders, size):
    paths = _sample_jpegs()
    batch = decoders[size].decode(paths)
    assert batch.failures == {} and batch.images.shape == (2, 3, size, size)
    assert batch.images.dtype == torch.float32 and batch.images.device.type == "cpu"
    for image, path in zip(batch.images, paths):
        diff = _levels(image, load_image_pm1(path, size))
        assert diff.max() <= MAX_LEVELS, (path.name, size, diff.max())
        assert diff.mean() <= MEAN_LEVELS, (path.name, size, diff.mean())
        assert (diff > 1).float().mean() <= FRACTION_OVER_1, (path.name, size)


def test_box_halving_layout_replays_pillow():
    rng = np.random.default_rng(0)
    seen = set()
    for length in range(11, 2001, 2):
        left, right, triples = box_halving_layout(length)
        seen.add((left - length // 2, right - length // 2, triples))
        row = rng.integers(0, 256, (1, length), dtype=np.uint8)
        cells = [[j, j + 1] for j in range(0, left, 2)] + [[left, left + 1, left + 2]] * triples + \
                [[j, j + 1] for j in range(right, length, 2)]
        assert len(cells) == length // 2
        ours = [int(np.floor(row[0, c].mean() + 0.5)) for c in cells]
        pil = np.asarray(Image.fromarray(row).resize((length // 2, 1), Image.BOX))[0].tolist()
        assert ours == pil, length
    # odd half, even half with the triple left or right of the middle, and the left-out pixel
    assert seen == {(-1, 2, 1), (-2, 1, 1), (0, 3, 1), (0, 1, 0)}
    with pytest.raises(ValueError, match="odd length"):
        box_halving_layout(100)


def test_box_halving_in_the_graph_is_exact(tmp_path, decoders):
    # After halving, the short side is exactly 64: the bicubic step is the identity, so the
    # crop is Pillow's box-halving alone. The long sides take every layout of
    # box_halving_layout, once across (width pass) and once down (height pass).
    first_of_layout = {}
    for length in range(131, 1001, 2):
        n = length // 2
        left, right, triples = box_halving_layout(length)
        first_of_layout.setdefault((left - n, right - n, triples), length)
    assert len(first_of_layout) == 4
    rng = np.random.default_rng(1)
    sizes = [(128, 200), (129, 130)] + [(129, s) for s in first_of_layout.values()] + \
        [(s, 128) for s in first_of_layout.values()]
    paths = []
    for k, (h, w) in enumerate(sizes):
        paths.append(tmp_path / f"{k}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    images = torch.cat([decoders[64].decode(paths[i:i + 8]).images for i in range(0, len(paths), 8)])
    for image, path, hw in zip(images, paths, sizes, strict=True):
        assert torch.equal(image, to_tensor_pm1(center_crop_arr(Image.open(path).convert("RGB"), 64))), hw


def _encoded(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=95)
    return buf.getvalue()


def test_bad_files_are_reported_and_modes_converted(tmp_path, decoders, caplog):
    rng = np.random.default_rng(2)
    rgb = Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8))
    files = {
        "rgb.jpg": _encoded(rgb),
        "gray.jpg": _encoded(rgb.convert("L")),
        "cmyk.jpg": _encoded(rgb.convert("CMYK")),
        "truncated.jpg": _encoded(rgb)[:800],
        "garbage.jpg": b"not an image",
        "empty.jpg": b"",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    good = [tmp_path / n for n in ("rgb.jpg", "gray.jpg", "cmyk.jpg")]
    clean = decoders[64].decode(good)  # DALI decodes these itself
    assert clean.failures == {}
    for image, path in zip(clean.images, good):
        assert _levels(image, load_image_pm1(path, 64)).max() <= MAX_LEVELS, path.name

    paths = [tmp_path / n for n in files] + [tmp_path / "missing.jpg"]
    with caplog.at_level(logging.WARNING, logger="sfd_scale.data.dali_pipeline"):
        batch = decoders[64].decode(paths)
    assert sorted(batch.failures) == [3, 4, 5, 6]
    assert "truncated.jpg" in batch.failures[3] and "garbage.jpg" in batch.failures[4]
    assert "empty image file" in batch.failures[5] and "missing.jpg" in batch.failures[6]
    assert "decoding it with PIL" in caplog.text  # the truncated file made DALI reject the batch
    assert batch.images.shape == (3, 3, 64, 64)
    for image, path in zip(batch.images, good):  # PIL took over: exact
        assert torch.equal(image, load_image_pm1(path, 64))
    # The pipeline was rebuilt and works again.
    assert decoders[64].decode(good[:1]).failures == {}


def test_select_decoder_is_the_one_dispatch_point(caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="sfd_scale.data.images"):
        auto = select_decoder("auto", 32, 4, "cpu")
    assert isinstance(auto, PilDecoder)
    assert "auto -> pil (no CUDA device (cpu))" in caplog.text and "image decoding: pil on cpu" in caplog.text
    cpu = select_decoder("dali-cpu", 32, 4, "cpu", num_workers=1)
    assert isinstance(cpu, DaliDecoder) and cpu.name == "dali-cpu"
    cpu.close()
    with pytest.raises(ValueError, match="decodes on a GPU, but the device is cpu"):
        select_decoder("dali", 32, 4, "cpu")
    with pytest.raises(ValueError, match="not one of"):
        select_decoder("nvjpeg", 32, 4, "cpu")
    monkeypatch.setattr(dali_pipeline, "_IMPORT_ERROR", "No module named 'nvidia.dali' (pip install ...)")
    with pytest.raises(ImportError, match="needs NVIDIA DALI"):
        select_decoder("dali-cpu", 32, 4, "cpu")


def _folder(root: Path) -> ImageFolderIndex:
    china, flower = _sample_jpegs()
    for cls, sources in {"a": [china], "b": [flower, china, flower]}.items():
        (root / cls).mkdir(parents=True)
        for i, src in enumerate(sources):
            (root / cls / f"{i}.jpg").write_bytes(src.read_bytes())
    return ImageFolderIndex.scan(root)


def test_file_list_and_tar_readers_shard_and_crop_like_pil(tmp_path):
    index = _folder(tmp_path / "images")
    expected = torch.stack([load_image_pm1(p, 64) for p, _ in index.samples])

    shards = [list(dali_reader_batches(index, 64, batch_size=3, shard_id=r, num_shards=2, num_threads=1))
              for r in range(2)]
    images = torch.cat([b[0] for shard in shards for b in shard])
    labels = torch.cat([b[1] for shard in shards for b in shard])
    assert [len(b[1]) for b in shards[0]] == [2] and [len(b[1]) for b in shards[1]] == [2]
    assert labels.tolist() == [0, 1, 1, 1]
    assert _levels(images, expected).max() <= MAX_LEVELS

    tar = tmp_path / "shard-000.tar"
    with tarfile.open(tar, "w") as tf:
        for i, (path, label) in enumerate(index.samples):
            tf.add(path, arcname=f"{i:05d}.jpg")
            info = tarfile.TarInfo(f"{i:05d}.cls")
            info.size = len(str(label))
            tf.addfile(info, io.BytesIO(str(label).encode()))
    batches = list(dali_reader_batches([tar], 64, batch_size=3, num_threads=1))
    assert [len(b[1]) for b in batches] == [3, 1]
    assert torch.cat([b[1] for b in batches]).tolist() == [0, 1, 1, 1]
    assert _levels(torch.cat([b[0] for b in batches]), expected).max() <= MAX_LEVELS
    with pytest.raises(FileNotFoundError, match="gone.tar"):
        next(dali_reader_batches([tmp_path / "gone.tar"], 64, batch_size=2))


def test_extraction_with_the_dali_cpu_decoder(tmp_path, decoders):
    index = _folder(tmp_path / "images")
    (tmp_path / "images" / "b" / "9_broken.jpg").write_bytes(b"\xff\xd8 broken")
    index = ImageFolderIndex.scan(tmp_path / "images")

    def encode(images):  # deterministic 16x16 average pools
        pooled = torch.nn.functional.avg_pool2d(images, 16)
        return {"latents": pooled, "latents_sv": pooled[:, :2], "feats_dino": pooled}

    dali = extract_folder(index, tmp_path / "dali", encode, shard_size=3, image_size=64, batch_size=2,
                          decoder=decoders[64])
    pil = extract_folder(index, tmp_path / "pil", encode, shard_size=3, image_size=64, batch_size=2)
    assert dali.skipped == pil.skipped == ["b/9_broken.jpg"]
    for a, b in zip(sorted((tmp_path / "dali").glob("*.safetensors")), sorted((tmp_path / "pil").glob("*.safetensors"))):
        got, want = read_shard(a), read_shard(b)
        assert torch.equal(got["labels"], want["labels"])
        for key in ("latents", "latents_flip", "latents_sv_flip"):
            # Means of 256 pixels: far inside the per-pixel tolerance.
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=MEAN_LEVELS / 127.5 * 4)


def test_decode_bench_reports_dali_cpu_against_pil(tmp_path):
    from sfd_scale.data.bench import run_decode_benchmark

    result = run_decode_benchmark(_sample_jpegs(), image_size=64, batch_size=2, backends=("pil", "dali-cpu"),
                                  device="cpu", num_workers=1, seconds=0.3)
    dali = result["backends"]["dali-cpu"]
    assert dali["decoder"] == "dali-cpu" and dali["images_per_s"] > 0
    assert dali["vs_pil_levels"]["max"] <= MAX_LEVELS and dali["vs_pil_levels"]["mean"] <= MEAN_LEVELS
