"""launchers/bench_data.py on tiny shards: the shards it makes, the JSON it prints, its sums."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from sfd_scale.data.loader import LatentShardDataset
from sfd_scale.data.bench import PerSampleReader, make_bench_shards
from sfd_scale.data.shards import read_stats, validate_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launchers"))
import bench_data  # noqa: E402

TINY = ["--shards", "2", "--per-shard", "24", "--texture-channels", "4", "--semantic-channels", "2",
        "--dino-channels", "8", "--latent-size", "4", "--batch-size", "8", "--baseline-batch-size", "4"]


def test_bench_prints_rates_ratios_and_extrapolation(tmp_path, capsys):
    out = tmp_path / "result.json"
    result = bench_data.main(["--dir", str(tmp_path / "shards"), *TINY, "--seconds", "0.6",
                              "--repeats", "2", "--json", str(out)])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == result == json.loads(out.read_text())

    assert result["samples_in_set"] == 48 and result["batch_size"] == 8 and result["per_sample_batch_size"] == 4
    assert result["sample_shapes"] == {"x": [6, 4, 4], "feats_dino": [8, 4, 4]}
    # texture 4x16 + semantic 2x16 float32, DINO 8x16 float16, label int64
    assert result["bytes_per_sample_read"] == 64 * 4 + 32 * 4 + 128 * 2 + 8
    rates = result["samples_per_s"]
    cuda = torch.cuda.is_available()
    rows = {"per_sample", "loader_mmap", "loader_pread", "loader_gpu_host_path_mmap",
            "loader_gpu_host_path_pread", "copy_ceiling"}
    assert set(rates) == rows | ({"loader_to_device"} if cuda else set())
    assert result["device"] == ("cuda" if cuda else None) and result["default_read_mode"] == "mmap"
    for name, rate in rates.items():
        assert rate > 0 and len(result["samples_per_s_repeats"][name]) == 2
        assert min(result["samples_per_s_repeats"][name]) <= rate <= max(result["samples_per_s_repeats"][name])
        assert result["ratio_vs_per_sample"][name] == pytest.approx(rate / rates["per_sample"], abs=0.01)
        assert result["ratio_vs_copy_ceiling"][name] == pytest.approx(rate / rates["copy_ceiling"], abs=0.01)
    assert result["ratio_vs_per_sample"]["per_sample"] == 1.0
    assert len(result["machine"]["load_average_before"]) == len(result["machine"]["load_average_after"]) == 3
    node = result["per_node"]
    best = max(rates["loader_mmap"], rates["loader_gpu_host_path_mmap"])  # the default mode's
    assert node["ranks_per_node"] == 8 and node["target"] == 16_000
    assert node["extrapolated_samples_per_s"] == pytest.approx(8 * best, rel=1e-3)
    assert node["meets_target"] == (node["extrapolated_samples_per_s"] >= 16_000)
    assert result["machine"]["cpus"] >= 1 and "assumption" in node


def test_bench_shards_have_the_reference_layout_and_are_reused(tmp_path):
    root = make_bench_shards(tmp_path, num_shards=2, per_shard=5, texture_channels=3, semantic_channels=2,
                             dino_channels=6, latent_size=2)
    infos = [validate_shard(p) for p in sorted(root.glob("*.safetensors"))]
    assert [i.path.name for i in infos] == ["latents_rank00_shard000.safetensors",
                                           "latents_rank00_shard001.safetensors"]
    assert infos[0].shapes["latents_flip"] == (5, 3, 2, 2) and infos[0].dtypes["feats_dino"] == "F16"
    assert read_stats(root, "latents_sv")[0].shape == (1, 2, 1, 1)
    stamp = infos[0].path.stat().st_mtime_ns
    make_bench_shards(tmp_path, num_shards=2, per_shard=5, texture_channels=3, semantic_channels=2,
                      dino_channels=6, latent_size=2)
    assert infos[0].path.stat().st_mtime_ns == stamp
    make_bench_shards(tmp_path, num_shards=2, per_shard=5, texture_channels=3, semantic_channels=2,
                      dino_channels=8, latent_size=2)  # another model's shapes: written anew
    assert validate_shard(infos[0].path).shapes["feats_dino"] == (5, 8, 2, 2)


def test_per_sample_reader_equals_the_loader_sample_by_sample(tmp_path):
    root = make_bench_shards(tmp_path, num_shards=2, per_shard=6, texture_channels=3, semantic_channels=2,
                             dino_channels=5, latent_size=2)
    reader = PerSampleReader(root)
    indices, flip = torch.tensor([11, 0, 6, 5]), torch.tensor([True, False, True, False])
    for mode in ("mmap", "pread"):
        for got, want in zip(reader.batch(indices, flip), LatentShardDataset(root, read_mode=mode).gather(indices, flip)):
            assert torch.equal(got, want)
    # The flipped copy really differs from the stored one.
    assert not torch.equal(reader.item(3, True)[0], reader.item(3, False)[0])


def test_decode_bench_times_each_backend_against_pil(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "imgs" / "c").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "c" / f"{i}.jpg")
    result = bench_data.main(["--decode-images", str(tmp_path / "imgs"), "--decoders", "pil", "--device", "cpu",
                              "--image-size", "16", "--batch-size", "2", "--seconds", "0.3", "--threads", "0"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["images"] == 3 and result["image_size"] == 16 and result["batch_size"] == 2
    pil = result["backends"]["pil"]
    assert pil["decoder"] == "pil" and pil["images_per_s"] > 0
    assert pil["vs_pil_levels"] == {"max": 0.0, "mean": 0.0, "fraction_over_1": 0.0}
    with pytest.raises(SystemExit, match="give --dir"):
        bench_data.main([])


def test_encode_bench_runs_the_three_encoders_on_each_image_and_its_flip(tmp_path, capsys):
    out = tmp_path / "encode.json"
    small = ["--set", "dino.depth=1", "--set", "dino.embed_dim=64", "--set", "dino.num_heads=2",
             "--set", "dino.input_size=56", "--set", "semvae.feat_dim=64", "--set", "semvae.width=32",
             "--set", "semvae.depth=1", "--set", "semvae.num_heads=2", "--set", "semvae.grid=4"]
    result = bench_data.main(["--encode", "--device", "cpu", "--batch-size", "2", "--image-size", "64",
                              "--seconds", "0.2", "--json", str(out), *small])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result == json.loads(out.read_text())
    # f16 texture latents with 32 channels, 16 semantic channels, DINO features on the 4 x 4 grid
    assert result["outputs_per_image"] == {"latents": [32, 4, 4], "latents_sv": [16, 4, 4], "feats_dino": [64, 4, 4]}
    assert result["images_per_s"] > 0 and result["bf16"] is False and result["device"] == "cpu"
    with pytest.raises(ValueError, match="semvae.widht"):
        bench_data.main(["--encode", "--device", "cpu", "--set", "semvae.widht=3"])
