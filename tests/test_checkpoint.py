"""Checkpoint store: exact pickle-free round trips, atomic step folders, retention, integrity, RNG, export."""

from __future__ import annotations

import copy
import json
import logging
import math
import random

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from sfd_scale.train.checkpoint import (
    CheckpointNotFoundError,
    CheckpointStore,
    CorruptCheckpointError,
    flatten_state,
    read_state,
    save_model_export,
    unflatten_state,
    write_state,
)
from sfd_scale.train.rng import capture_rng, restore_rng


def assert_exactly_equal(a, b, where="<root>"):
    """Same structure, same Python types, bit-identical tensors (dtype and shape included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(a, b), where
        return
    if isinstance(a, dict):
        assert isinstance(b, dict), where
        assert list(a.keys()) == list(b.keys()), where
        for (ka, va), kb in zip(a.items(), b.keys()):
            assert type(ka) is type(kb), f"{where} key {ka!r}"
            assert_exactly_equal(va, b[kb], f"{where}.{ka}")
        return
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_exactly_equal(x, y, f"{where}.{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    elif isinstance(a, float):
        assert a == b and math.copysign(1, a) == math.copysign(1, b), where
    else:
        assert a == b, where


def _trained_adamw():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GELU(), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    model(torch.randn(5, 3)).square().mean().backward()
    opt.step()
    return model, opt


def _round_trip(tmp_path, state):
    write_state(tmp_path, "entry", state)
    return read_state(tmp_path, "entry")


# ---------------------------------------------------------------------------------- flatten


def test_adamw_state_round_trips_exactly_and_resumes_identically(tmp_path):
    model, opt = _trained_adamw()
    state = opt.state_dict()
    loaded = _round_trip(tmp_path, state)
    assert_exactly_equal(state, loaded)
    assert loaded["param_groups"][0]["betas"] == (0.9, 0.95) and list(loaded["state"]) == [0, 1, 2, 3]

    twin_model = copy.deepcopy(model)
    twin_opt = torch.optim.AdamW(twin_model.parameters(), lr=5.0)  # lr is overwritten by the load
    twin_opt.load_state_dict(loaded)
    x = torch.randn(7, 3)
    for m, o in ((model, opt), (twin_model, twin_opt)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


def test_nested_python_values_round_trip_exactly(tmp_path):
    state = {
        "int": 3, "big": 2**70, "neg": -7, "float": 0.1, "tiny": 5e-324, "neg_zero": -0.0,
        "nan": float("nan"), "inf": float("inf"), "minus_inf": float("-inf"),
        "flags": [True, False, None], "text": "step-1 ✓", "empty": [(), [], {}],
        "tuple": (1, (2, 3.5), [4, {"a": None}]),
        "mixed_keys": {0: "int", 2.5: "float", None: "none", "s": "str", True: "bool"},
        "tagged_lookalike": {"tensor": "not a tensor", "tuple": [1]},
        "tensors": {
            "bf16": torch.randn(2, 3).to(torch.bfloat16), "bool": torch.tensor([True, False]),
            "int64": torch.tensor([2**62, -1]), "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4),
            "strided": torch.arange(12.0).reshape(3, 4).t(),
        },
        "same_tensor_twice": [torch.ones(2)] * 2,
        "a.b": torch.full((1,), 1.0), "a": {"b": torch.full((1,), 2.0)},  # same dotted name
    }
    loaded = _round_trip(tmp_path, state)
    assert_exactly_equal(state, loaded)
    assert loaded["a.b"].item() == 1.0 and loaded["a"]["b"].item() == 2.0
    tensors, skeleton = flatten_state(state)
    assert "tensors.bf16" in tensors and "a.b#1" in tensors  # tensors are named by their path
    json.dumps(skeleton, allow_nan=False)  # the skeleton is strict JSON (NaN/inf are tagged)


def test_model_state_dict_keeps_its_key_names_in_the_safetensors_file(tmp_path):
    model = torch.nn.Linear(2, 3)
    write_state(tmp_path, "model", model.state_dict())
    assert set(safetensors.torch.load_file(tmp_path / "model.safetensors")) == {"weight", "bias"}


def test_unsupported_values_raise_type_error_naming_the_place():
    with pytest.raises(TypeError, match=r"opt\.extra.*ndarray"):
        flatten_state({"opt": {"extra": np.zeros(2)}})
    with pytest.raises(TypeError, match=r"loader\.epoch.*float64"):
        flatten_state({"loader": {"epoch": np.float64(1.0)}})
    with pytest.raises(TypeError, match="set"):
        flatten_state([{1, 2}])


def test_unflatten_rejects_missing_and_unreferenced_tensors():
    tensors, skeleton = flatten_state({"w": torch.ones(1)})
    with pytest.raises(ValueError, match="'w'.*missing"):
        unflatten_state({}, skeleton)
    with pytest.raises(ValueError, match="not referenced.*extra"):
        unflatten_state({**tensors, "extra": torch.ones(1)}, skeleton)


# ---------------------------------------------------------------------------------- store


def _entries(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    return {"model": model.state_dict(), "ema": {k: v * 0.5 for k, v in model.state_dict().items()},
            "loader": {"epoch": seed, "offsets": [seed, seed + 1]}}


def _flip_byte(path, offset_from_end=3):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_save_load_round_trip_and_folder_layout(tmp_path):
    store = CheckpointStore(tmp_path)
    entries = _entries(1)
    folder = store.save(10, entries, {"step": 10, "config": {"lr": 1e-4}})

    assert folder == tmp_path / "step-00000010"
    names = {p.name for p in folder.iterdir()}
    assert names == {f"{e}.{ext}" for e in entries for ext in ("safetensors", "json")} | {"meta.json", "manifest.json"}
    assert (tmp_path / "latest").read_text() == "step-00000010\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["step"] == 10 and manifest["entries"] == ["model", "ema", "loader"]
    assert set(manifest["files"]) == names - {"manifest.json"}
    assert manifest["files"]["meta.json"]["size"] == (folder / "meta.json").stat().st_size

    loaded, meta = store.load()
    assert meta == {"step": 10, "config": {"lr": 1e-4}}
    assert_exactly_equal(dict(entries["model"]), loaded["model"])
    assert_exactly_equal(entries["loader"], loaded["loader"])
    assert store.latest_step() == 10 and store.complete_steps() == [10]


def test_retention_keeps_the_newest_k(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    for step in (100, 200, 300, 400):
        store.save(step, _entries(step), {})
    assert store.complete_steps() == [300, 400]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000300", "step-00000400"]
    with pytest.raises(ValueError, match="at least 2"):
        CheckpointStore(tmp_path, keep_last=1)


def test_latest_ignores_temp_folders_and_folders_without_a_valid_manifest(tmp_path, caplog):
    store = CheckpointStore(tmp_path, keep_last=3)
    store.save(5, _entries(5), {})
    newest = store.step_dir(5)
    for step, manifest in ((9, None), (8, "{not json"), (7, json.dumps({"format": "other"}))):
        folder = tmp_path / f"step-{step:08d}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes((newest / "model.safetensors").read_bytes() * 3)
        if manifest is not None:
            (folder / "manifest.json").write_text(manifest)
    temp = tmp_path / ".tmp-step-00000010-deadbeef"
    temp.mkdir()
    (temp / "model.safetensors").write_bytes(b"partial")

    assert store.complete_steps() == [5] and store.latest_step() == 5
    with caplog.at_level(logging.WARNING, logger="sfd_scale"):
        assert store.load_latest_valid()[0] == 5
    assert sum("no valid manifest" in r.getMessage() for r in caplog.records) == 3  # steps 7, 8, 9 named
    with pytest.raises(CheckpointNotFoundError, match="step 9"):
        store.load(9)
    store.save(6, _entries(6), {})
    assert not temp.exists()  # leftovers of an interrupted write are cleaned at the next save
    assert store.latest_step() == 6


def test_flipped_byte_fails_load_and_resume_falls_back(tmp_path, caplog):
    store = CheckpointStore(tmp_path)
    store.save(1, _entries(1), {"step": 1})
    store.save(2, _entries(2), {"step": 2})
    _flip_byte(store.step_dir(2) / "ema.safetensors")

    with pytest.raises(CorruptCheckpointError, match=r"ema\.safetensors has sha256 [0-9a-f]{64} but the manifest "):
        store.load(2)
    with caplog.at_level(logging.WARNING, logger="sfd_scale"):
        step, entries, meta = store.load_latest_valid()
    assert (step, meta) == (1, {"step": 1})
    assert_exactly_equal(dict(_entries(1)["ema"]), entries["ema"])
    assert any("step 2" in r.getMessage() and "ema.safetensors" in r.getMessage() for r in caplog.records)


def test_truncated_file_fails_load_and_resume_falls_back(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(1, _entries(1), {})
    store.save(2, _entries(2), {})
    path = store.step_dir(2) / "loader.json"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])

    with pytest.raises(CorruptCheckpointError,
                       match=rf"loader\.json has {size // 2} bytes but the manifest says {size}"):
        store.load(2)
    assert store.load_latest_valid()[0] == 1


def test_resume_without_usable_checkpoint_is_an_error(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    assert store.load_latest_valid(required=False) is None
    with pytest.raises(CheckpointNotFoundError, match="no complete step folder"):
        store.load_latest_valid()
    store.save(1, _entries(1), {})
    (store.step_dir(1) / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError,
                       match="step 1:.*model.safetensors is listed in the manifest but missing"):
        store.load_latest_valid()


def test_saving_an_earlier_step_sets_newer_timeline_aside(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        store.save(step, _entries(step), {"run": "first"})
    store.save(2, _entries(20), {"run": "resumed"})  # resumed from 1, reached 2 again

    assert store.complete_steps() == [1, 2] and store.load()[1] == {"run": "resumed"}
    assert (tmp_path / "abandoned-step-00000003" / "manifest.json").is_file()
    assert (tmp_path / "latest").read_text() == "step-00000002\n"


def test_save_files_hook_covers_engine_files_and_cleans_up_on_failure(tmp_path):
    store = CheckpointStore(tmp_path)

    def engine_writer(folder):
        (folder / "engine").mkdir()
        (folder / "engine" / "rank0.bin").write_bytes(bytes(range(256)))
        write_state(folder, "model", {"w": torch.ones(2)})

    store.save_files(3, engine_writer, {"engine": "demo"}, entries=["model"])
    manifest = store.verify(3)
    assert manifest["files"]["engine/rank0.bin"]["size"] == 256
    entries, meta = store.load(3)
    assert list(entries) == ["model"] and meta == {"engine": "demo"}
    _flip_byte(store.step_dir(3) / "engine" / "rank0.bin")
    with pytest.raises(CorruptCheckpointError, match="engine/rank0.bin"):
        store.verify(3)

    def failing_writer(folder):
        (folder / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.save_files(4, failing_writer, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000003"]


def test_meta_must_be_plain_json(tmp_path):
    store = CheckpointStore(tmp_path)
    with pytest.raises(ValueError, match="plain JSON"):
        store.save(1, {}, {"betas": (0.9, 0.99)})
    with pytest.raises(ValueError, match="plain JSON"):
        store.save(1, {}, {"loss": float("nan")})
    assert store.complete_steps() == []


# ---------------------------------------------------------------------------------- RNG


def _draws():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(3).tolist(),
            torch.rand(3), torch.randn(3))


def test_rng_draws_after_restore_match_draws_after_capture(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached second Gaussian in Python's state
    np.random.randn(1)  # and in NumPy's legacy state
    state = capture_rng()
    expected = _draws()

    store = CheckpointStore(tmp_path)
    store.save(1, {"rng": state}, {})
    _draws()
    restore_rng(state)
    assert_exactly_equal(expected, _draws())

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng(store.load(1)[0]["rng"])  # through safetensors + JSON as well
    assert_exactly_equal(expected, _draws())
    with pytest.raises(ValueError, match="numpy"):
        restore_rng({"python": state["python"], "torch_cpu": state["torch_cpu"]})


# ---------------------------------------------------------------------------------- export


def test_export_loads_with_weights_only_and_matches_reference_layout(tmp_path):
    model = torch.nn.Linear(3, 2)
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    config = {"model": {"model_type": "LightningDiT-B/1", "in_chans": 32}, "betas": (0.9, 0.95), "ema": None}
    pt_path, st_path = save_model_export(tmp_path / "export" / "final.pt", model.state_dict(), ema, config)

    assert st_path == tmp_path / "export" / "final.safetensors"
    payload = torch.load(pt_path, weights_only=True)
    assert set(payload) == {"model", "ema", "config"} and payload["config"] == config
    assert_exactly_equal(dict(model.state_dict()), payload["model"])
    assert_exactly_equal(ema, payload["ema"])
    exported_ema = safetensors.torch.load_file(st_path)  # safetensors sorts keys
    assert set(exported_ema) == set(ema)
    assert_exactly_equal(ema, {k: exported_ema[k] for k in ema})
    with safetensors.safe_open(st_path, "pt") as f:
        assert json.loads(f.metadata()["config"])["model"]["in_chans"] == 32
    assert sorted(p.name for p in pt_path.parent.iterdir()) == ["final.pt", "final.safetensors"]
    with pytest.raises(TypeError, match=r"config\.path.*PosixPath"):
        save_model_export(tmp_path / "x.pt", {}, {}, {"path": tmp_path})
