"""Latent dataset and loader: normalization, order, rank split, flips, exact resume."""
from __future__ import annotations

import builtins

import pytest
import torch

from sfd_scale.data.loader import LatentShardDataset, ShardLoader
from sfd_scale.data.shards import read_shard, read_stats, shard_name, write_shard, write_stats

C_TEX, C_SEM, C_DINO, HW = 3, 2, 5, 2


def _write_folder(root, sizes=(7, 5), stats=((0.0, 1.0), (0.0, 1.0))):
    """Shards whose values encode the sample id g: texture 100g + c, semantic 100g + 10 + c,
    DINO g + c/8, label g; the flipped copies are the negatives."""
    root.mkdir(parents=True, exist_ok=True)
    start = 0
    for k, n in enumerate(sizes):
        g = torch.arange(start, start + n, dtype=torch.float32).view(n, 1, 1, 1)
        ones = torch.ones(1, 1, HW, HW)
        tex = (100 * g + torch.arange(C_TEX).view(1, -1, 1, 1)) * ones
        sem = (100 * g + 10 + torch.arange(C_SEM).view(1, -1, 1, 1)) * ones
        dino = ((g + torch.arange(C_DINO).view(1, -1, 1, 1) / 8) * ones).half()
        write_shard(root / shard_name(0, k), {
            "latents": tex, "latents_flip": -tex,
            "latents_sv": sem, "latents_sv_flip": -sem,
            "feats_dino": dino, "feats_dino_flip": -dino,
            "labels": torch.arange(start, start + n, dtype=torch.int64),
        })
        start += n
    for key, channels, (mean, std) in (("latents", C_TEX, stats[0]), ("latents_sv", C_SEM, stats[1])):
        write_stats(root, key, torch.full((channels,), mean), torch.full((channels,), std))
    return root


def _ids(batch):
    return batch[1].tolist()


def _flipped(batch):
    return (batch[0][:, C_TEX, 0, 0] < 0).tolist()  # semantic channel 0 is 100g + 10, never 0


def _epoch(loader):
    return [(_ids(b), _flipped(b)) for b in loader]


@pytest.fixture()
def dataset(tmp_path):
    return LatentShardDataset(_write_folder(tmp_path / "lat"))


def test_dataset_layout_and_normalization_numbers(tmp_path):
    root = _write_folder(tmp_path / "lat", stats=((100.0, 4.0), (10.0, 2.0)))
    ds = LatentShardDataset(root, latent_multiplier=0.5)
    assert len(ds) == 12 and (ds.texture_channels, ds.semantic_channels, ds.dino_channels) == (3, 2, 5)
    x, y, f = ds.gather(torch.tensor([8, 2]), torch.tensor([False, True]))
    assert x.shape == (2, 5, 2, 2) and x.dtype == torch.float32
    assert y.tolist() == [8, 2] and y.dtype == torch.int64
    assert f.shape == (2, 5, 2, 2) and f.dtype == torch.float32
    # sample 8, stored: texture (800 + c - 100) / 4 * 0.5, semantic (810 + c - 10) / 2 * 0.5
    assert x[0, :, 0, 0].tolist() == [87.5, 87.625, 87.75, 200.0, 200.25]
    # sample 2 flipped: texture (-200 - c - 100) / 4 * 0.5, semantic (-210 - c - 10) / 2 * 0.5
    assert x[1, :, 1, 1].tolist() == [-37.5, -37.625, -37.75, -55.0, -55.25]
    assert f[0, :, 0, 0].tolist() == [8.0, 8.125, 8.25, 8.375, 8.5]
    assert f[1, :, 0, 0].tolist() == [-2.0, -2.125, -2.25, -2.375, -2.5]

    raw = LatentShardDataset(root, latent_norm=False, latent_sv_norm=False)
    x, _, _ = raw.gather(torch.tensor([11]), torch.tensor([False]))
    assert x[0, :, 0, 0].tolist() == [1100.0, 1101.0, 1102.0, 1110.0, 1111.0]


def test_missing_stats_file_is_named(tmp_path):
    root = _write_folder(tmp_path / "lat")
    (root / "latents_sv_stats.pt").unlink()
    with pytest.raises(FileNotFoundError, match="latents_sv_stats.pt"):
        LatentShardDataset(root)
    assert len(LatentShardDataset(root, latent_sv_norm=False)) == 12
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors shards"):
        LatentShardDataset(tmp_path)


def test_shards_with_different_channels_are_refused(tmp_path):
    root = _write_folder(tmp_path / "lat")
    arrays = {k: torch.zeros(2, 7, HW, HW) for k in ("latents", "latents_flip", "latents_sv", "latents_sv_flip",
                                                      "feats_dino", "feats_dino_flip")}
    write_shard(root / shard_name(0, 2), {**arrays, "labels": torch.zeros(2, dtype=torch.int64)})
    with pytest.raises(ValueError, match=r"shard002.*'latents' samples are \[7, 2, 2\]"):
        LatentShardDataset(root)


def test_batches_never_open_files(dataset):
    loader = ShardLoader(dataset, batch_size=4, seed=0)
    real_open = builtins.open

    def no_open(*args, **kwargs):
        raise AssertionError(f"file opened while batching: {args[0]}")

    builtins.open = no_open
    try:
        batches = list(loader)
    finally:
        builtins.open = real_open
    assert len(batches) == 3


def test_order_is_a_seeded_shuffle_covering_the_epoch(dataset):
    first = _epoch(ShardLoader(dataset, batch_size=4, seed=3))
    assert first == _epoch(ShardLoader(dataset, batch_size=4, seed=3))
    assert first != _epoch(ShardLoader(dataset, batch_size=4, seed=4))
    ids = [i for batch, _ in first for i in batch]
    assert sorted(ids) == list(range(12)) and ids != list(range(12))

    loader = ShardLoader(dataset, batch_size=5, seed=3)  # 12 // 5 = 2 batches, the tail dropped
    assert len(loader) == 2
    epoch0, epoch1 = _epoch(loader), _epoch(loader)
    assert [len(ids) for ids, _ in epoch0] == [5, 5]
    assert len({i for ids, _ in epoch0 for i in ids}) == 10
    assert epoch0 != epoch1 and loader.epoch == 2


def test_two_ranks_are_disjoint_and_cover_the_epoch(dataset):
    ranks = [ShardLoader(dataset, batch_size=3, seed=1, rank=r, world_size=2) for r in range(2)]
    single = ShardLoader(dataset, batch_size=6, seed=1)
    per_rank = [_epoch(loader) for loader in ranks]
    for step, (ids_single, flips_single) in enumerate(_epoch(single)):
        ids0, flips0 = per_rank[0][step]
        ids1, flips1 = per_rank[1][step]
        assert not set(ids0) & set(ids1)
        # The global batch is the same whatever the rank count.
        assert ids0 + ids1 == ids_single and flips0 + flips1 == flips_single
    assert sorted(i for ids, _ in per_rank[0] + per_rank[1] for i in ids) == list(range(12))
    with pytest.raises(ValueError, match="rank=2 world_size=2"):
        ShardLoader(dataset, batch_size=3, rank=2, world_size=2)
    with pytest.raises(ValueError, match="exceeds the 12 samples"):
        ShardLoader(dataset, batch_size=7, world_size=2)


def test_flips_use_both_copies_consistently(dataset):
    loader = ShardLoader(dataset, batch_size=4, seed=0)
    seen = set()
    for _ in range(4):
        for x, y, f in loader:
            flipped = x[:, C_TEX, 0, 0] < 0
            # texture, semantic and DINO come from the same copy (channel 1: nonzero for g = 0)
            assert torch.equal(flipped, x[:, 1, 0, 0] < 0) and torch.equal(flipped, f[:, 1, 0, 0] < 0)
            assert torch.equal(x[:, 0, 0, 0].abs(), 100 * y.float())
            seen.update(flipped.tolist())
    assert seen == {False, True}
    plain = ShardLoader(dataset, batch_size=4, seed=0, random_flip=False)
    assert not any(flag for _, flips in _epoch(plain) for flag in flips)


def test_resume_mid_epoch_equals_uninterrupted(dataset):
    reference = ShardLoader(dataset, batch_size=2, seed=7)
    expected = [b for _ in range(3) for b in reference]  # 3 epochs of 6 batches

    loader = ShardLoader(dataset, batch_size=2, seed=7)
    got = []
    for i, batch in enumerate(loader):
        got.append(batch)
        if i == 3:
            state = loader.state_dict()
            break
    assert state["epoch"] == 0 and state["position"] == 8

    resumed = ShardLoader(dataset, batch_size=2, seed=7)
    resumed.load_state_dict(state)
    while len(got) < len(expected):
        got.extend(resumed)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        for ta, tb in zip(a, b):
            assert torch.equal(ta, tb)


def test_state_after_last_batch_points_at_next_epoch(dataset):
    loader = ShardLoader(dataset, batch_size=4, seed=0)
    list(loader)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0


def test_resume_onto_two_ranks_continues_the_global_order(dataset):
    single = ShardLoader(dataset, batch_size=4, seed=2)
    expected = [(_ids(b), _flipped(b)) for _ in range(2) for b in single]
    first = ShardLoader(dataset, batch_size=4, seed=2)
    it = iter(first)
    next(it)
    state = first.state_dict()
    ranks = [ShardLoader(dataset, batch_size=2, seed=2, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(state)
    rest = [_epoch(loader) + _epoch(loader) for loader in ranks]
    combined = [(a[0] + b[0], a[1] + b[1]) for a, b in zip(*rest)]
    assert combined == expected[1:]


def test_load_state_dict_refuses_other_data_settings(dataset):
    state = ShardLoader(dataset, batch_size=4, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1 but this loader has 2"):
        ShardLoader(dataset, batch_size=4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples=99"):
        ShardLoader(dataset, batch_size=4, seed=1).load_state_dict({**state, "num_samples": 99})


def _reference_gather(root, indices, flips, sizes=(7, 5)):
    """Sample by sample from whole-shard reads, normalized as the reference dataset does."""
    shards = [read_shard(root / shard_name(0, k)) for k in range(len(sizes))]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    t_mean, t_std = read_stats(root, "latents")
    s_mean, s_std = read_stats(root, "latents_sv")
    xs, ys, fs = [], [], []
    for i, flipped in zip(indices, flips):
        k = max(j for j, st in enumerate(starts) if st <= i)
        row, suffix = i - starts[k], "_flip" if flipped else ""
        tex = (shards[k]["latents" + suffix][row:row + 1] - t_mean) / t_std
        sem = (shards[k]["latents_sv" + suffix][row:row + 1] - s_mean) / s_std
        xs.append(torch.cat([tex, sem], dim=1)[0])
        ys.append(shards[k]["labels"][row])
        fs.append(shards[k]["feats_dino" + suffix][row].float())
    return torch.stack(xs), torch.stack(ys), torch.stack(fs)


def test_gather_equals_per_sample_reads_for_runs_duplicates_and_both_copies(tmp_path):
    root = _write_folder(tmp_path / "lat", stats=((3.0, 2.0), (-1.0, 0.5)))
    ds = LatentShardDataset(root)
    # Runs (4,5,6 across the shard end at 7, then 7,8), a duplicate, and both copies mixed.
    indices = [5, 4, 6, 8, 7, 4, 11, 0, 1]
    flips = [False, False, True, False, False, False, True, True, True]
    got = ds.gather(torch.tensor(indices), torch.tensor(flips))
    for a, b in zip(got, _reference_gather(root, indices, flips)):
        assert torch.equal(a, b)


def test_other_stored_dtypes_are_widened(tmp_path):
    root = _write_folder(tmp_path / "lat")
    for k in range(2):
        path = root / shard_name(0, k)
        arrays = read_shard(path)
        for key in ("latents", "latents_flip"):
            arrays[key] = arrays[key].to(torch.bfloat16)
        for key in ("feats_dino", "feats_dino_flip"):
            arrays[key] = arrays[key].float()
        write_shard(path, arrays)
    ds = LatentShardDataset(root)
    x, _, f = ds.gather(torch.tensor([9, 3]), torch.tensor([True, False]))
    ref = _reference_gather(root, [9, 3], [True, False])
    assert torch.equal(x, ref[0]) and torch.equal(f, ref[2]) and f.dtype == torch.float32


def test_prefetching_threads_deliver_the_same_batches(dataset):
    plain = [b for b in ShardLoader(dataset, batch_size=2, seed=5, prefetch=0)]
    threaded = [b for b in ShardLoader(dataset, batch_size=2, seed=5, prefetch=3, num_threads=2)]
    assert len(plain) == len(threaded) == 6
    for a, b in zip(plain, threaded):
        for ta, tb in zip(a, b):
            assert torch.equal(ta, tb)


def test_host_buffers_are_reused_only_when_released(dataset):
    loader = ShardLoader(dataset, batch_size=2, seed=1, prefetch=1)  # a ring of 3 buffer sets
    released = {x.data_ptr() for x, _, _ in loader}
    assert len(released) <= 3  # the epoch's 6 batches go through the same few buffers

    expected = [tuple(t.clone() for t in b) for b in ShardLoader(dataset, batch_size=2, seed=1, prefetch=0)]
    held = list(ShardLoader(dataset, batch_size=2, seed=1, prefetch=1))
    assert len({b[0].data_ptr() for b in held}) == len(held) == 6
    for got, want in zip(held, expected):
        assert all(torch.equal(a, b) for a, b in zip(got, want))

    # Keeping only a view of one tensor of the first batch still protects that batch.
    batches = iter(ShardLoader(dataset, batch_size=2, seed=1, prefetch=1))
    view_of_first = next(batches)[2][1:]
    for _ in batches:
        pass
    assert torch.equal(view_of_first, expected[0][2][1:])


def test_float16_features_for_device_side_widening(dataset):
    x16, y16, f16 = next(iter(ShardLoader(dataset, batch_size=4, seed=2, feats_dtype=torch.float16)))
    x32, y32, f32 = next(iter(ShardLoader(dataset, batch_size=4, seed=2)))
    assert f16.dtype == torch.float16 and torch.equal(f16.float(), f32)
    assert torch.equal(x16, x32) and torch.equal(y16, y32)


def test_shard_truncated_after_opening_is_named(tmp_path):
    root = _write_folder(tmp_path / "lat")
    ds = LatentShardDataset(root)
    path = root / shard_name(0, 1)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"shard .*shard001.safetensors ended before byte"):
        ds.gather(torch.tensor([11]), torch.tensor([True]))
    with pytest.raises(ValueError, match="do not fit a host batch of 2 rows"):
        ds.gather_into(ds.new_host_batch(2), torch.tensor([1, 2, 3]), torch.tensor([False] * 3))
    with pytest.raises(ValueError, match=r"sample indices must lie in \[0, 12\)"):
        ds.gather(torch.tensor([12]), torch.tensor([False]))
    ds.close()
    ds.close()  # idempotent
