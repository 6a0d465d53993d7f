"""Shard format (reference layout), validation, memory-mapped reads and latent statistics."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sfd_scale.data.shards import (
    SHARD_KEYS,
    RunningStats,
    as_torch,
    open_shard_arrays,
    read_shard,
    read_stats,
    shard_name,
    stats_path,
    validate_shard,
    write_shard,
    write_stats,
)


def _arrays(n=5, c_tex=4, c_sem=3, c_dino=6, hw=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(n, c_tex, hw, hw, generator=g),
        "latents_flip": torch.randn(n, c_tex, hw, hw, generator=g),
        "latents_sv": torch.randn(n, c_sem, hw, hw, generator=g),
        "latents_sv_flip": torch.randn(n, c_sem, hw, hw, generator=g),
        "feats_dino": torch.randn(n, c_dino, hw, hw, generator=g).half(),
        "feats_dino_flip": torch.randn(n, c_dino, hw, hw, generator=g).half(),
        "labels": torch.arange(n, dtype=torch.int64) * 3,
    }


def test_shard_name_matches_reference_extraction():
    assert shard_name(0, 0) == "latents_rank00_shard000.safetensors"
    assert shard_name(3, 12) == "latents_rank03_shard012.safetensors"


def test_round_trip_keys_dtypes_shapes_values(tmp_path):
    arrays = _arrays()
    path = tmp_path / shard_name(0, 0)
    write_shard(path, arrays, {"total_size": 5, "skipped": ["a/b.jpg"]})
    back = read_shard(path)
    assert sorted(back) == sorted(SHARD_KEYS)
    assert back["latents"].dtype == torch.float32 and back["latents_sv"].dtype == torch.float32
    assert back["feats_dino"].dtype == torch.float16 and back["labels"].dtype == torch.int64
    assert back["latents"].shape == (5, 4, 8, 8) and back["latents_sv"].shape == (5, 3, 8, 8)
    assert back["feats_dino_flip"].shape == (5, 6, 8, 8) and back["labels"].shape == (5,)
    for key in SHARD_KEYS:
        assert torch.equal(back[key], arrays[key]), key
    info = validate_shard(path)
    assert info.num_samples == 5 and info.channels("latents_sv") == 3 and info.spatial("feats_dino") == (8, 8)
    assert info.metadata == {"total_size": 5, "skipped": ["a/b.jpg"]}
    assert read_shard(path, ["labels"]).keys() == {"labels"}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_write_is_byte_deterministic(tmp_path):
    meta = {"seed": 1, "image_size": 16, "skipped": [], "total_size": 5, "shard_size": 9}
    write_shard(tmp_path / "a.safetensors", _arrays(), meta)
    write_shard(tmp_path / "b.safetensors", _arrays(), dict(reversed(list(meta.items()))))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_validate_names_shard_and_missing_key(tmp_path):
    arrays = _arrays()
    del arrays["feats_dino_flip"]
    path = tmp_path / "foreign.safetensors"
    save_file(arrays, str(path))
    with pytest.raises(ValueError, match=r"foreign\.safetensors is missing key 'feats_dino_flip'"):
        validate_shard(path)
    with pytest.raises(ValueError, match="missing key 'feats_dino_flip'"):
        write_shard(tmp_path / "x.safetensors", arrays)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("key, value, message", [
    ("latents_sv", torch.zeros(4, 3, 8, 8), r"'latents_sv' has 4 samples but 'labels' has 5"),
    ("latents_flip", torch.zeros(5, 2, 8, 8), r"'latents_flip' has shape \[5, 2, 8, 8\]"),
    ("feats_dino", torch.zeros(5, 6, 4, 4).half(), r"'feats_dino' must be|'feats_dino' is 4x4"),
    ("labels", torch.zeros(5, 1, dtype=torch.int64), r"'labels' must be a 1-D integer array"),
    ("latents", torch.zeros(5, 4, 8), r"'latents' must be a 4-D float array"),
])
def test_validate_rejects_inconsistent_arrays(tmp_path, key, value, message):
    arrays = _arrays()
    arrays[key] = value
    if key == "feats_dino":
        arrays["feats_dino_flip"] = value.clone()
    path = tmp_path / "bad.safetensors"
    save_file(arrays, str(path))
    with pytest.raises(ValueError, match=message):
        validate_shard(path)


def test_validate_detects_truncation_and_missing_file(tmp_path):
    path = tmp_path / "t.safetensors"
    write_shard(path, _arrays())
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="t.safetensors.*truncated"):
        validate_shard(path)
    path.write_bytes(b"\x01")
    with pytest.raises(ValueError, match="t.safetensors"):
        validate_shard(path)
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        validate_shard(tmp_path / "gone.safetensors")


def test_memory_mapped_arrays_equal_loaded_arrays(tmp_path):
    arrays = _arrays(n=4)
    arrays["feats_dino"] = arrays["feats_dino"].to(torch.bfloat16)
    path = tmp_path / "m.safetensors"
    write_shard(path, arrays)
    mapped = open_shard_arrays(path, SHARD_KEYS)
    assert isinstance(mapped["latents"], np.memmap)
    np.testing.assert_array_equal(mapped["latents_sv_flip"][[3, 1]], arrays["latents_sv_flip"][[3, 1]].numpy())
    np.testing.assert_array_equal(mapped["labels"], [0, 3, 6, 9])
    # bfloat16 comes back as raw bits; as_torch restores the stored values.
    assert torch.equal(as_torch(mapped["feats_dino"], "BF16"), arrays["feats_dino"])
    assert torch.equal(as_torch(mapped["latents"][1:3], "F32"), arrays["latents"][1:3])


def test_zero_sample_shard_round_trips(tmp_path):
    path = tmp_path / "e.safetensors"
    write_shard(path, _arrays(n=0))
    assert validate_shard(path).num_samples == 0
    assert open_shard_arrays(path, ["latents"])["latents"].shape == (0, 4, 8, 8)


def test_running_stats_equals_torch_over_concatenation_with_merge():
    g = torch.Generator().manual_seed(0)
    # A large common offset: a naive sum-of-squares in float32 would lose the std here.
    chunks = [1000.0 + torch.randn(n, 3, 4, 5, generator=g) * torch.tensor([0.5, 1.0, 2.0]).view(1, 3, 1, 1)
              for n in (1, 7, 4, 10)]
    a, b = RunningStats(3), RunningStats(3)
    for x in chunks[:2]:
        a.update(x)
    for x in chunks[2:]:
        b.update(x)
    a.merge(b)
    full = torch.cat(chunks).double()
    assert a.count == 22 * 20
    torch.testing.assert_close(a.mean, full.mean(dim=(0, 2, 3)), rtol=0, atol=1e-10)
    torch.testing.assert_close(a.std(), full.std(dim=(0, 2, 3)), rtol=1e-10, atol=0)  # unbiased, like torch.std
    torch.testing.assert_close(a.std(unbiased=False), full.std(dim=(0, 2, 3), unbiased=False), rtol=1e-10, atol=0)
    merged_into_empty = RunningStats(3)
    merged_into_empty.merge(a)
    torch.testing.assert_close(merged_into_empty.std(), a.std(), rtol=0, atol=0)


def test_running_stats_hand_numbers_and_errors():
    s = RunningStats(1)
    s.update(torch.tensor([1.0, 2.0, 3.0, 6.0]).view(4, 1))
    assert s.mean.item() == 3.0
    assert s.std().item() == pytest.approx((14 / 3) ** 0.5)  # squared deviations 4+1+0+9 over 3
    with pytest.raises(ValueError, match=r"expected \(N, 1, ...\)"):
        s.update(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="more than 1"):
        RunningStats(2).std()


def test_stats_files_round_trip(tmp_path):
    mean = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    std = torch.tensor([1.0, 2.0, 0.25], dtype=torch.float64)
    path = write_stats(tmp_path, "latents_sv", mean, std)
    assert path == stats_path(tmp_path, "latents_sv") and path.name == "latents_sv_stats.pt"
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"mean", "std"}
    assert raw["mean"].shape == (1, 3, 1, 1) and raw["std"].dtype == torch.float32
    got_mean, got_std = read_stats(tmp_path, "latents_sv")
    assert got_mean.flatten().tolist() == [0.5, -1.0, 2.0] and got_std.flatten().tolist() == [1.0, 2.0, 0.25]
    assert not any(name.startswith(".") for name in os.listdir(tmp_path))


def test_stats_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="latents_stats.pt"):
        read_stats(tmp_path, "latents")
    with pytest.raises(ValueError, match="std must be positive"):
        write_stats(tmp_path, "latents", torch.zeros(2), torch.tensor([1.0, 0.0]))
    torch.save({"mean": torch.zeros(3), "std": torch.ones(3)}, stats_path(tmp_path, "latents"))
    with pytest.raises(ValueError, match=r"latents_stats.pt.*\(1, C, 1, 1\)"):
        read_stats(tmp_path, "latents")


def test_running_stats_survive_json_exactly():
    import json

    s = RunningStats(3)
    s.update(torch.randn(7, 3, 2, 2, generator=torch.Generator().manual_seed(4)) * 3 + 1)
    back = RunningStats.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back.count == s.count == 28
    assert torch.equal(back.mean, s.mean) and torch.equal(back.m2, s.m2)  # bit-exact float64
    with pytest.raises(ValueError, match="shard x.safetensors: not a RunningStats state"):
        RunningStats.from_dict({"count": 2, "mean": [0.0]}, "shard x.safetensors")


def test_shard_info_locates_every_sample_row(tmp_path):
    arrays = _arrays(n=3)
    path = tmp_path / "rows.safetensors"
    write_shard(path, arrays)
    info = validate_shard(path)
    data = path.read_bytes()
    for key in SHARD_KEYS:
        row = info.row_bytes(key)
        assert info.torch_dtype(key) == arrays[key].dtype
        for i in range(3):
            start = info.offsets[key] + i * row
            assert data[start:start + row] == arrays[key][i].contiguous().numpy().tobytes(), (key, i)
