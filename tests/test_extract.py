"""Extraction of an image folder into shards + stats: content, resume, skipped images."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sfd_scale.data.extract import SKIPPED_REPORT, extract_folder
from sfd_scale.data.images import ImageFolderIndex, hflip, load_image_pm1
from sfd_scale.data.shards import SHARD_KEYS, read_shard, read_stats, shard_name

IMAGE_SIZE = 16


class FakeEncoder:
    """Deterministic stand-in for VAE + DINOv2 + SemVAE: 4x4 average pools of the image.

    The texture latent adds noise from torch's global RNG, like `posterior.sample()`, so the
    per-shard seeding is exercised.
    """

    def __init__(self) -> None:
        self.images_seen = 0

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.images_seen += images.shape[0]
        pooled = F.avg_pool2d(images, 4)  # (B, 3, 4, 4)
        return {
            "latents": torch.cat([pooled, pooled[:, :1] * 3], dim=1) + 0.1 * torch.randn(images.shape[0], 4, 4, 4),
            "latents_sv": pooled[:, :2] * 2,
            "feats_dino": torch.cat([pooled, -pooled], dim=1),
        }


def _image_folder(root, counts=(3, 2, 2)):
    rng = np.random.default_rng(0)
    for c, count in enumerate(counts):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(count):
            w, h = int(rng.integers(17, 41)), int(rng.integers(17, 41))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return ImageFolderIndex.scan(root)


def _shard_bytes(out_dir):
    return {p.name: p.read_bytes() for p in sorted(out_dir.glob("*.safetensors"))}


def test_extract_writes_reference_layout_and_exact_stats(tmp_path):
    index = _image_folder(tmp_path / "images")
    out = tmp_path / "latents"
    report = extract_folder(index, out, FakeEncoder(), shard_size=3, image_size=IMAGE_SIZE, batch_size=2)
    names = [shard_name(0, k) for k in range(3)]  # 7 images in shards of 3, 3, 1
    assert [p.name for p in report.shards_written] == names and report.num_encoded == 7
    shards = [read_shard(out / n) for n in names]
    assert [len(s["labels"]) for s in shards] == [3, 3, 1]
    assert sorted(shards[0]) == sorted(SHARD_KEYS)
    assert torch.cat([s["labels"] for s in shards]).tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert shards[0]["latents"].dtype == torch.float32 and shards[0]["feats_dino"].dtype == torch.float16
    assert shards[0]["latents_sv"].shape == (3, 2, 4, 4) and shards[0]["feats_dino_flip"].shape == (3, 6, 4, 4)

    # Deterministic keys equal a direct encoding of the cropped image and of its flip.
    image = load_image_pm1(index.samples[4][0], IMAGE_SIZE)[None]
    direct, direct_flip = FakeEncoder()(image), FakeEncoder()(hflip(image))
    torch.testing.assert_close(shards[1]["latents_sv"][1:2], direct["latents_sv"])
    torch.testing.assert_close(shards[1]["latents_sv_flip"][1:2], direct_flip["latents_sv"])
    torch.testing.assert_close(shards[1]["feats_dino_flip"][1:2], direct_flip["feats_dino"].half())

    # Stats: exact mean and unbiased std of all non-flipped latents, per channel.
    for key in ("latents", "latents_sv"):
        values = torch.cat([s[key] for s in shards]).double()
        mean, std = read_stats(out, key)
        assert mean.shape == (1, values.shape[1], 1, 1)
        torch.testing.assert_close(mean.double(), values.mean(dim=(0, 2, 3), keepdim=True), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(std.double(), values.std(dim=(0, 2, 3), keepdim=True), rtol=1e-6, atol=1e-7)
    assert (out / SKIPPED_REPORT).read_text() == ""


def test_resume_recreates_only_the_missing_shard_with_identical_bytes(tmp_path):
    index = _image_folder(tmp_path / "images")
    out = tmp_path / "latents"
    extract_folder(index, out, FakeEncoder(), shard_size=3, image_size=IMAGE_SIZE, batch_size=2, seed=5)
    before = _shard_bytes(out)
    stats_before = (out / "latents_stats.pt").read_bytes()
    (out / shard_name(0, 1)).unlink()

    encoder = FakeEncoder()
    torch.manual_seed(123)  # the global RNG state before the run must not matter
    report = extract_folder(index, out, encoder, shard_size=3, image_size=IMAGE_SIZE, batch_size=2, seed=5)
    assert [p.name for p in report.shards_written] == [shard_name(0, 1)]
    assert [p.name for p in report.shards_reused] == [shard_name(0, 0), shard_name(0, 2)]
    assert encoder.images_seen == 2 * 3  # shard 1's images, stored and flipped
    assert _shard_bytes(out) == before
    assert (out / "latents_stats.pt").read_bytes() == stats_before


def test_invalid_shard_is_recreated_and_changed_settings_are_refused(tmp_path):
    index = _image_folder(tmp_path / "images")
    out = tmp_path / "latents"
    extract_folder(index, out, FakeEncoder(), shard_size=3, image_size=IMAGE_SIZE, batch_size=2)
    before = _shard_bytes(out)
    damaged = out / shard_name(0, 2)
    damaged.write_bytes(damaged.read_bytes()[:-10])
    report = extract_folder(index, out, FakeEncoder(), shard_size=3, image_size=IMAGE_SIZE, batch_size=2)
    assert [p.name for p in report.shards_written] == [shard_name(0, 2)]
    assert _shard_bytes(out) == before
    with pytest.raises(ValueError, match=r"shard000.*image_size=16 but this run has 8"):
        extract_folder(index, out, FakeEncoder(), shard_size=3, image_size=8, batch_size=2)


def test_unreadable_images_are_skipped_and_reported(tmp_path):
    root = tmp_path / "images"
    _image_folder(root)
    good = (root / "class1" / "0.png").read_bytes()
    (root / "class1" / "0b_truncated.png").write_bytes(good[: len(good) // 2])
    (root / "class2" / "zz_bogus.jpg").write_text("not an image")
    index = ImageFolderIndex.scan(root)
    assert len(index) == 9
    out = tmp_path / "latents"
    report = extract_folder(index, out, FakeEncoder(), shard_size=4, image_size=IMAGE_SIZE, batch_size=3)
    assert report.skipped == ["class1/0b_truncated.png", "class2/zz_bogus.jpg"]
    assert report.num_encoded == 7
    assert (out / SKIPPED_REPORT).read_text().splitlines() == report.skipped
    labels = torch.cat([read_shard(p, ["labels"])["labels"] for p in report.shards_written])
    assert labels.tolist() == [0, 0, 0, 1, 1, 2, 2]

    # On resume the reused shards still report their skipped files.
    again = extract_folder(index, out, FakeEncoder(), shard_size=4, image_size=IMAGE_SIZE, batch_size=3)
    assert again.shards_written == [] and again.skipped == report.skipped
    assert (out / SKIPPED_REPORT).read_text().splitlines() == report.skipped


def test_threaded_decoding_gives_the_same_shards(tmp_path):
    index = _image_folder(tmp_path / "images")
    extract_folder(index, tmp_path / "a", FakeEncoder(), shard_size=4, image_size=IMAGE_SIZE, batch_size=1)
    extract_folder(index, tmp_path / "b", FakeEncoder(), shard_size=4, image_size=IMAGE_SIZE, batch_size=1,
                   num_workers=2)
    assert _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "b")


def test_encode_fn_output_is_checked(tmp_path):
    index = _image_folder(tmp_path / "images", counts=(1,))

    def missing_semantic(images):
        return {"latents": images[:, :, ::4, ::4], "feats_dino": images[:, :, ::4, ::4]}

    with pytest.raises(ValueError, match=r"encode_fn must return keys \['latents', 'latents_sv', 'feats_dino'\]"):
        extract_folder(index, tmp_path / "out", missing_semantic, shard_size=2, image_size=IMAGE_SIZE, batch_size=1)


def test_digits_demo_folder_extracts_and_loads(tmp_path):
    from sfd_scale.data.demo_digits import digits_arrays, write_digits_folder
    from sfd_scale.data.loader import LatentShardDataset, ShardLoader

    images, labels = digits_arrays(32)
    assert images.shape == (1797, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (1797,) and sorted(set(labels.tolist())) == list(range(10))
    assert images.max() == 255 and images.min() == 0
    index = write_digits_folder(tmp_path / "digits", image_size=32)
    assert len(index) == 1797 and index.classes == tuple(str(d) for d in range(10))
    path, label = index.samples[100]
    i = int(path.stem)
    assert label == labels[i]
    np.testing.assert_array_equal(np.asarray(Image.open(path)), images[i])
    stamp = path.stat().st_mtime_ns
    assert len(write_digits_folder(tmp_path / "digits", image_size=32)) == 1797
    assert path.stat().st_mtime_ns == stamp  # complete folder reused, not rewritten
    with pytest.raises(ValueError, match="image_size=32, asked for 16"):
        write_digits_folder(tmp_path / "digits", image_size=16)

    out = tmp_path / "latents"
    report = extract_folder(index, out, FakeEncoder(), shard_size=1000, image_size=IMAGE_SIZE, batch_size=256)
    assert report.num_encoded == 1797 and len(report.shards_written) == 2
    x, y, f = next(iter(ShardLoader(LatentShardDataset(out), batch_size=64, seed=0)))
    assert x.shape == (64, 6, 4, 4) and y.shape == (64,) and f.shape == (64, 6, 4, 4)
    # Normalized with the data set's own stats: per-channel mean ~0 and std ~1 over the batch.
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.5
