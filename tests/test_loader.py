"""Latent dataset and loader: normalization, order, rank split, flips, exact resume, in both read
modes (mmap, pread), which must agree bit for bit."""
from __future__ import annotations

import builtins

import pytest
import torch

from sfd_scale.data.bench import make_bench_shards
from sfd_scale.data.loader import DEFAULT_READ_MODE, LatentShardDataset, ReadMode, ShardLoader, _MappedShards
from sfd_scale.data.shards import read_shard, read_stats, shard_name, validate_shard, write_shard, write_stats

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


@pytest.fixture(params=["mmap", "pread"])
def dataset(tmp_path, request):
    return LatentShardDataset(_write_folder(tmp_path / "lat"), read_mode=request.param)


@pytest.mark.parametrize("mode", ["mmap", "pread"])
def test_dataset_layout_and_normalization_numbers(tmp_path, mode):
    root = _write_folder(tmp_path / "lat", stats=((100.0, 4.0), (10.0, 2.0)))
    ds = LatentShardDataset(root, latent_multiplier=0.5, read_mode=mode)
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

    raw = LatentShardDataset(root, latent_norm=False, latent_sv_norm=False, read_mode=mode)
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


@pytest.mark.parametrize("mode", ["mmap", "pread"])
def test_gather_equals_per_sample_reads_for_runs_duplicates_and_both_copies(tmp_path, mode):
    root = _write_folder(tmp_path / "lat", stats=((3.0, 2.0), (-1.0, 0.5)))
    ds = LatentShardDataset(root, read_mode=mode)
    # Runs (4,5,6 across the shard end at 7, then 7,8), a duplicate, and both copies mixed.
    indices = [5, 4, 6, 8, 7, 4, 11, 0, 1]
    flips = [False, False, True, False, False, False, True, True, True]
    got = ds.gather(torch.tensor(indices), torch.tensor(flips))
    for a, b in zip(got, _reference_gather(root, indices, flips)):
        assert torch.equal(a, b)


def _store_texture_bf16_dino_float32(root):
    """Rewrite every shard with texture latents in bfloat16 and DINO features in float32."""
    for path in sorted(root.glob("*.safetensors")):
        arrays = read_shard(path)
        for key in ("latents", "latents_flip"):
            arrays[key] = arrays[key].to(torch.bfloat16)
        for key in ("feats_dino", "feats_dino_flip"):
            arrays[key] = arrays[key].float()
        write_shard(path, arrays)


@pytest.mark.parametrize("mode", ["mmap", "pread"])
def test_other_stored_dtypes_are_widened(tmp_path, mode):
    root = _write_folder(tmp_path / "lat")
    _store_texture_bf16_dino_float32(root)
    ds = LatentShardDataset(root, read_mode=mode)
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


@pytest.mark.parametrize("mode, message", [("mmap", "shrank to 200 bytes while mapped"),
                                           ("pread", "ended before byte")])
def test_shard_truncated_after_opening_is_named(tmp_path, mode, message):
    root = _write_folder(tmp_path / "lat")
    ds = LatentShardDataset(root, read_mode=mode)
    path = root / shard_name(0, 1)
    path.write_bytes(path.read_bytes()[:200])  # in place: the same file, now shorter
    # With mmap, copying from the lost pages would kill the process with SIGBUS instead.
    with pytest.raises(ValueError, match=rf"shard .*shard001.safetensors {message}"):
        ds.gather(torch.tensor([11]), torch.tensor([True]))
    x, _, _ = ds.gather(torch.tensor([3]), torch.tensor([False]))  # the intact shard still reads
    assert x[0, 0, 0, 0].item() == 300.0
    with pytest.raises(ValueError, match="do not fit a host batch of 2 rows"):
        ds.gather_into(ds.new_host_batch(2), torch.tensor([1, 2, 3]), torch.tensor([False] * 3))
    with pytest.raises(ValueError, match=r"sample indices must lie in \[0, 12\)"):
        ds.gather(torch.tensor([12]), torch.tensor([False]))
    ds.close()
    ds.close()  # idempotent
    with pytest.raises(ValueError, match="dataset is closed"):
        ds.gather(torch.tensor([3]), torch.tensor([False]))


@pytest.mark.parametrize("mode", ["mmap", "pread"])
def test_shard_truncated_before_opening_is_refused_at_open(tmp_path, mode):
    root = _write_folder(tmp_path / "lat")
    path = root / shard_name(0, 1)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"shard .*shard001.safetensors.*truncated"):
        LatentShardDataset(root, read_mode=mode)


def test_mapping_refuses_a_file_shorter_than_its_header(tmp_path):
    # Truncated between reading the header and mapping: the size is checked again on the open file.
    root = _write_folder(tmp_path / "lat")
    info = validate_shard(root / shard_name(0, 0))
    info.path.write_bytes(info.path.read_bytes()[:-8])
    with pytest.raises(ValueError, match=rf"shard .*shard000.safetensors has {info.path.stat().st_size} "
                                         rf"bytes, its header needs {info.path.stat().st_size + 8}"):
        _MappedShards([info])


def _mapped(path):
    with open("/proc/self/maps") as f:
        return sum(line.rstrip().endswith(str(path)) for line in f)


def test_each_shard_is_mapped_once_for_the_dataset_life(tmp_path):
    root = _write_folder(tmp_path / "lat")
    shards = [root / shard_name(0, k) for k in range(2)]
    ds = LatentShardDataset(root)
    assert ds.read_mode is ReadMode.MMAP is DEFAULT_READ_MODE
    assert [_mapped(p) for p in shards] == [1, 1]
    for _ in range(3):
        list(ShardLoader(ds, batch_size=4, seed=0))
    assert [_mapped(p) for p in shards] == [1, 1]
    ds.close()
    assert [_mapped(p) for p in shards] == [0, 0]
    pread = LatentShardDataset(root, read_mode="pread")
    assert pread.read_mode is ReadMode.PREAD and [_mapped(p) for p in shards] == [0, 0]
    with pytest.raises(ValueError, match=r"read_mode must be one of \['mmap', 'pread'\], got 'mmapp'"):
        LatentShardDataset(root, read_mode="mmapp")


@pytest.mark.parametrize("stored", ["reference", "bf16_texture_f32_dino"])
def test_read_modes_give_bit_identical_batches(tmp_path, stored):
    # Random values, nonzero stats and a multiplier: any byte read from the wrong place differs.
    root = make_bench_shards(tmp_path / "lat", num_shards=3, per_shard=9, texture_channels=3,
                             semantic_channels=2, dino_channels=4, latent_size=2, seed=1)
    if stored != "reference":
        _store_texture_bf16_dino_float32(root)
    modes = [LatentShardDataset(root, latent_multiplier=0.7, read_mode=m) for m in ("mmap", "pread")]
    for feats_dtype in (torch.float32, modes[0].dino_storage_dtype):
        epochs = [[tuple(t.clone() for t in b) for _ in range(2)
                   for b in ShardLoader(ds, batch_size=5, seed=4, prefetch=2, feats_dtype=feats_dtype)]
                  for ds in modes]
        assert len(epochs[0]) == len(epochs[1]) == 10
        for a, b in zip(*epochs):
            assert all(torch.equal(ta, tb) for ta, tb in zip(a, b))
        assert epochs[0][0][2].dtype == feats_dtype
    # ... and both equal the reference's sample-by-sample reads.
    indices, flips = [26, 0, 9, 10, 11, 8], [True, False, False, True, True, False]
    want = _reference_gather(root, indices, flips, sizes=(9, 9, 9))
    for ds in modes:
        got = ds.gather(torch.tensor(indices), torch.tensor(flips))
        assert torch.equal(got[0], want[0] * 0.7) and torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


class _CountingMap:
    """Stands in for a shard's mmap object: counts MADV_WILLNEED hints, answers size()."""

    def __init__(self, mapping):
        self.mapping, self.hints = mapping, 0

    def madvise(self, *args):
        self.hints += 1

    def size(self):
        return self.mapping.size()


@pytest.mark.parametrize("too_large_for_memory", [False, True])
def test_rows_are_announced_on_first_copy_or_always_when_shards_exceed_memory(tmp_path, monkeypatch,
                                                                              too_large_for_memory):
    import sfd_scale.data.loader as loader_module

    if too_large_for_memory:
        monkeypatch.setattr(loader_module, "_physical_memory_bytes", lambda: 1024)
    ds = LatentShardDataset(_write_folder(tmp_path / "lat"), read_mode="mmap")
    shards = ds._shards
    assert shards.hint_every_copy is too_large_for_memory
    maps = shards._maps
    shards._maps = [_CountingMap(m) for m in maps]
    indices, flip = torch.tensor([0, 3, 8]), torch.tensor([False, True, False])  # two shards, both copies
    first = ds.gather(indices, flip)
    assert sum(m.hints for m in shards._maps) == 3 * 3  # three keys per row
    again = ds.gather(indices, flip)
    assert sum(m.hints for m in shards._maps) == (18 if too_large_for_memory else 9)
    ds.gather(torch.tensor([3]), torch.tensor([False]))  # the other copy of row 3: not copied yet
    assert sum(m.hints for m in shards._maps) == (21 if too_large_for_memory else 12)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    shards._maps = maps


@pytest.mark.parametrize("mode", ["mmap", "pread"])
def test_close_waits_for_a_read_in_flight_and_later_reads_are_refused(tmp_path, monkeypatch, mode):
    import threading
    import time

    ds = LatentShardDataset(_write_folder(tmp_path / "lat"), read_mode=mode)
    shards_type, entered, finished = type(ds._shards), threading.Event(), []
    read_rows = shards_type.read_rows

    def slow_read_rows(self, *args):  # a reader thread in the middle of its copy
        entered.set()
        time.sleep(0.3)
        read_rows(self, *args)
        finished.append(True)

    monkeypatch.setattr(shards_type, "read_rows", slow_read_rows)
    got = {}
    reader = threading.Thread(target=lambda: got.update(batch=ds.gather(torch.tensor([0, 8]), torch.tensor([False, True]))))
    reader.start()
    entered.wait()
    ds.close()  # unmapping under that copy was a BufferError or a crash; closing an fd, a read of whatever reuses it
    assert finished == [True, True]  # both reads of the batch (one per shard) were over before close returned
    reader.join()
    assert _ids(got["batch"]) == [0, 8] and _flipped(got["batch"]) == [False, True]
    with pytest.raises(ValueError, match="the latent dataset is closed"):
        ds.gather(torch.tensor([0]), torch.tensor([False]))
