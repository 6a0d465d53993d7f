"""Extraction of an image folder into shards + stats: content, resume, skipped images, ranks."""
from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from sfd_scale.data.extract import EMPTY_SHARD_SUFFIX, SKIPPED_REPORT, extract_folder, write_latent_stats
from sfd_scale.data.images import ImageFolderIndex, hflip, load_image_pm1
from sfd_scale.data.shards import SHARD_KEYS, read_shard, read_stats, shard_name, validate_shard, write_shard

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


class KillingEncoder(FakeEncoder):
    """Kills its own process (SIGKILL: no cleanup, like an OOM kill) on call number `kill_at`."""

    def __init__(self, kill_at: int) -> None:
        super().__init__()
        self.calls, self.kill_at = 0, kill_at

    def __call__(self, images):
        self.calls += 1
        if self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(images)


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


def _all_bytes(out_dir):
    """Every file of an extraction folder: shards, stats, skipped report, empty markers."""
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _extract_rank(rank, world_size, port, image_root, out_dir):
    """One rank of a gloo extraction run in a spawned process."""
    code = 0
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        report = extract_folder(ImageFolderIndex.scan(image_root), out_dir, FakeEncoder(), shard_size=2,
                                image_size=IMAGE_SIZE, batch_size=2, seed=3, rank=rank, world_size=world_size)
        # Shard k belongs to rank k % world_size.
        assert all(int(p.stem[-3:]) % world_size == rank for p in report.shards_written), report
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        code = 1
    os._exit(code)  # gloo teardown at interpreter exit sometimes aborts; the result is decided


def _extract_then_die(image_root, out_dir, kill_at):
    extract_folder(ImageFolderIndex.scan(image_root), out_dir, KillingEncoder(kill_at), shard_size=2,
                   image_size=IMAGE_SIZE, batch_size=2, seed=3)


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


def _with_unreadable(root):
    """7 good images and a class of 2 unreadable ones: in shards of 2 the last one is empty."""
    _image_folder(root)
    (root / "class3").mkdir()
    (root / "class3" / "broken.png").write_bytes(b"\x89PNG truncated")
    (root / "class3" / "empty.jpg").write_bytes(b"")
    return root


def test_two_ranks_write_the_same_bytes_as_one(tmp_path):
    root = _with_unreadable(tmp_path / "images")
    single = tmp_path / "single"
    extract_folder(ImageFolderIndex.scan(root), single, FakeEncoder(), shard_size=2, image_size=IMAGE_SIZE,
                   batch_size=2, seed=3)
    assert (single / (shard_name(0, 4)[:-len(".safetensors")] + EMPTY_SHARD_SUFFIX)).exists()
    assert (single / SKIPPED_REPORT).read_text() == "class3/broken.png\nclass3/empty.jpg\n"

    torch.multiprocessing.spawn(_extract_rank, args=(2, _free_port(), str(root), str(tmp_path / "two")),
                                nprocs=2, join=True)
    assert _all_bytes(tmp_path / "two") == _all_bytes(single)


def test_killed_extraction_resumes_with_identical_output(tmp_path):
    root = _with_unreadable(tmp_path / "images")
    reference = tmp_path / "reference"
    extract_folder(ImageFolderIndex.scan(root), reference, FakeEncoder(), shard_size=2, image_size=IMAGE_SIZE,
                   batch_size=2, seed=3)

    out = tmp_path / "out"
    # Calls 1-2 encode shard 0 (stored, flipped); call 4 is in the middle of shard 1.
    worker = multiprocessing.get_context("spawn").Process(target=_extract_then_die, args=(str(root), str(out), 4))
    worker.start()
    worker.join(120)
    assert worker.exitcode == -signal.SIGKILL
    assert sorted(p.name for p in out.glob("*.safetensors")) == [shard_name(0, 0)]
    assert not (out / "latents_stats.pt").exists()
    # What a kill during a shard write leaves behind is cleaned up, never read as a shard.
    stale = out / f".{shard_name(0, 1)}.tmp.99999"
    stale.write_bytes(b"half a shard")

    encoder = FakeEncoder()
    report = extract_folder(ImageFolderIndex.scan(root), out, encoder, shard_size=2, image_size=IMAGE_SIZE,
                            batch_size=2, seed=3)
    assert [p.name for p in report.shards_reused] == [shard_name(0, 0)]
    assert encoder.images_seen == 2 * 5  # the 5 readable images of shards 1-3, stored and flipped
    assert not stale.exists()
    assert _all_bytes(out) == _all_bytes(reference)


def test_stats_from_shard_headers_equal_stats_from_arrays(tmp_path):
    index = _image_folder(tmp_path / "images")
    out = tmp_path / "latents"
    extract_folder(index, out, FakeEncoder(), shard_size=3, image_size=IMAGE_SIZE, batch_size=2)
    header_stats = validate_shard(out / shard_name(0, 1)).metadata["stats"]["latents_sv"]
    assert header_stats["count"] == 3 * 4 * 4 and len(header_stats["mean"]) == 2  # 3 samples of 4x4
    from_headers = {key: read_stats(out, key) for key in ("latents", "latents_sv")}
    # Shards without our header statistics (e.g. downloaded ones) are read instead.
    for path in sorted(out.glob("*.safetensors")):
        write_shard(path, read_shard(path))
    write_latent_stats(out)
    for key, (mean, std) in from_headers.items():
        again = read_stats(out, key)
        torch.testing.assert_close(again[0], mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(again[1], std, rtol=1e-6, atol=0)


def test_distributed_settings_are_checked(tmp_path):
    index = _image_folder(tmp_path / "images", counts=(1,))
    with pytest.raises(ValueError, match="rank=2 world_size=2"):
        extract_folder(index, tmp_path / "out", FakeEncoder(), shard_size=2, image_size=IMAGE_SIZE, rank=2,
                       world_size=2)
    with pytest.raises(ValueError, match="needs an initialized torch.distributed process group"):
        extract_folder(index, tmp_path / "out", FakeEncoder(), shard_size=2, image_size=IMAGE_SIZE, rank=1,
                       world_size=2)


def test_launcher_under_torchrun_matches_the_library_on_one_rank(tmp_path):
    """launchers/extract.py with tiny real encoders, 2 ranks under torchrun, equals one in-process rank."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from fixtures import tiny_sfd_config

    from sfd_scale.config import load_config, to_dict
    from sfd_scale.data.encoders import composite_encode_fn, load_encoders
    from sfd_scale.models.dinov2 import DinoConfig, DinoViT
    from sfd_scale.models.semantic_vae import SemanticVAE, SemanticVAEConfig
    from sfd_scale.models.texture_vae import AutoencoderKL, TextureVAEConfig
    from sfd_scale.models.weights import save_weights

    root = _with_unreadable(tmp_path / "images")
    # 16x16 images: a f4 VAE and a patch-4 ViT both give 4x4 grids.
    vae_cfg = TextureVAEConfig(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], z_channels=4,
                               embed_dim=4, resolution=IMAGE_SIZE)
    dino_cfg = DinoConfig(embed_dim=16, depth=1, num_heads=2, patch_size=4, num_register_tokens=4, pos_grid=4,
                          input_size=IMAGE_SIZE)
    sem_cfg = SemanticVAEConfig(feat_dim=16, latent_channels=2, width=16, depth=1, num_heads=2, grid=4)
    torch.manual_seed(0)
    for name, model in (("vae", AutoencoderKL(vae_cfg)), ("dino", DinoViT(dino_cfg)), ("sem", SemanticVAE(sem_cfg))):
        save_weights(tmp_path / f"{name}.safetensors", model.state_dict())
    cfg = to_dict(tiny_sfd_config(tmp_path / "launched"))
    cfg["encoders"] = {"texture_vae_checkpoint": str(tmp_path / "vae.safetensors"), "texture_vae": to_dict(vae_cfg),
                       "dino_checkpoint": str(tmp_path / "dino.safetensors"), "dino": to_dict(dino_cfg),
                       "semvae_checkpoint": str(tmp_path / "sem.safetensors"), "semvae": to_dict(sem_cfg)}
    config = tmp_path / "extract.yaml"
    config.write_text(yaml.safe_dump(cfg))

    repo = Path(__file__).resolve().parents[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(_free_port())]
    done = subprocess.run([*torchrun, "launchers/extract.py", "--config", str(config), "--images", str(root),
                           "--image-size", str(IMAGE_SIZE), "--shard-size", "2", "--batch-size", "2",
                           "--decoder", "pil"],
                          cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "image decoding: pil on cpu" in done.stderr

    loaded = load_config(config)
    encode = composite_encode_fn(*load_encoders(loaded.encoders, torch.device("cpu")))
    extract_folder(ImageFolderIndex.scan(root), tmp_path / "library", encode, shard_size=2, image_size=IMAGE_SIZE,
                   batch_size=2, seed=loaded.train.seed)
    assert _all_bytes(tmp_path / "launched") == _all_bytes(tmp_path / "library")
    assert validate_shard(tmp_path / "launched" / shard_name(0, 0)).shapes["latents_sv"] == (2, 2, 4, 4)
