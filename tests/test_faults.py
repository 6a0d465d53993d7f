"""Faults met by one process: a full disk while a checkpoint is written (a real tmpfs when this
machine lets us mount one, and an injected ENOSPC), damaged checkpoints (truncated, flipped byte,
missing file, broken manifest), damaged or missing latent shards, a config with a typo, and
pickled objects in a weight file. Each test checks what the system did and that nothing beyond
the last checkpoint interval was lost. Kills: test_faults_kill*.py; NaN and spikes: test_faults_guard.py.
"""
from __future__ import annotations

import argparse
import ast
import errno
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import safetensors.torch
import torch

import sfd_scale
import sfd_scale.train.checkpoint as ckpt
from fault_worker import assert_identical
from fixtures import tiny_sfd_config, write_latent_folder
from sfd_scale.config import ConfigError, load_config, to_dict
from sfd_scale.data.shards import TEXTURE_KEY, list_shards, validate_shard
from sfd_scale.logging import MetricsLogger
from sfd_scale.models.weights import read_state_dict
from sfd_scale.train.checkpoint import CheckpointNotFoundError, CheckpointWriteError
from sfd_scale.train.trainer import Trainer

STEPS, EVERY = 6, 3  # checkpoints at 3 and 6


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run: what every faulted run must end equal to."""
    root = tmp_path_factory.mktemp("faults")
    data = write_latent_folder(root / "latents")
    cfg = tiny_sfd_config(data, train={"max_steps": STEPS, "ckpt_every": EVERY})
    trainer = Trainer(cfg, root / "straight")
    trainer.fit()
    return {"cfg": cfg, "trainer": trainer, "run": root / "straight", "data": data}


def _state(trainer: Trainer) -> dict:
    engine = trainer.engine
    return {"model": engine.unwrap().state_dict(), "ema": engine.ema_model().state_dict(),
            "optimizer": engine.optimizer.state_dict()["state"], "loader": trainer.loader.state_dict(),
            "generator": trainer.generator.get_state(), "counters": trainer.trainer_state()["counters"]}


def _resume_and_finish(straight, run_dir: Path, expect_step: int) -> Trainer:
    """Resume in `run_dir`, check it starts at `expect_step` and ends equal to the straight run."""
    trainer = Trainer(straight["cfg"], run_dir)
    assert trainer.maybe_resume() and trainer.step == expect_step
    trainer.fit()
    assert_identical(_state(trainer), _state(straight["trainer"]))
    return trainer


def _leftovers(ckpt_root: Path) -> list[str]:
    return sorted(p.name for p in ckpt_root.iterdir() if p.name.startswith("."))


def _flip_byte(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------------------------
# Full disk
# ----------------------------------------------------------------------------------------------
@pytest.fixture()
def tmpfs():
    """mount(path, bytes) a small tmpfs, resize(path, bytes) it; skips where mounting is not allowed."""
    mounted: list[Path] = []

    def mount(path: Path, size: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                  capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            pytest.skip("no mount command here")
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)

    def resize(path: Path, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, timeout=30)

    yield mount, resize
    for path in reversed(mounted):
        subprocess.run(["umount", str(path)], timeout=30)


def _pages(folder: Path) -> int:
    """Bytes `folder`'s files take on a tmpfs (whole 4 KiB pages)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())


def test_full_disk_keeps_the_previous_checkpoint_and_resume_loses_one_interval(straight, tmp_path, tmpfs):
    mount, resize = tmpfs
    one_checkpoint = _pages(straight["trainer"].store.step_dir(EVERY))
    ckpt_root = tmp_path / "run" / "checkpoints"
    mount(ckpt_root, one_checkpoint * 3 // 2)          # room for the first checkpoint, not the second
    trainer = Trainer(straight["cfg"], tmp_path / "run")
    with pytest.raises(RuntimeError, match=rf"writing checkpoint step 6 into {re.escape(str(ckpt_root))}/"
                                           r"\.tmp-step-00000006-\w+ failed.*No space left on device"):
        trainer.fit()
    store = trainer.store
    assert store.complete_steps() == [3] and store.verify(3)
    assert _leftovers(ckpt_root) == []                 # the partial folder is gone, its space freed
    resize(ckpt_root, one_checkpoint * 4)              # the operator frees space, the job restarts
    _resume_and_finish(straight, tmp_path / "run", expect_step=3)


def test_injected_enospc_in_a_state_file_or_the_manifest_names_the_folder(straight, tmp_path, monkeypatch):
    real_save = safetensors.torch.save_file

    def disk_full_at_step_6(tensors, filename, metadata=None):
        if ".tmp-step-00000006-" in str(filename):
            Path(filename).write_bytes(b"\0" * 100)    # a partial file, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_at_step_6)
    trainer = Trainer(straight["cfg"], tmp_path / "state")
    with pytest.raises(RuntimeError, match=r"writing checkpoint step 6 into .*/state/checkpoints/\.tmp-step-"
                                           r"00000006-\w+ failed on 1 rank\(s\): rank 0: OSError: \[Errno 28\]"):
        trainer.fit()
    assert trainer.store.complete_steps() == [3] and _leftovers(trainer.store.root) == []
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    _resume_and_finish(straight, tmp_path / "state", expect_step=3)

    real_write = ckpt._write_synced

    def manifest_fails(path, text):
        if path.name == ckpt.MANIFEST_NAME and "00000006" in path.parent.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, text)

    monkeypatch.setattr(ckpt, "_write_synced", manifest_fails)
    trainer = Trainer(straight["cfg"], tmp_path / "manifest")
    with pytest.raises(CheckpointWriteError, match=r"cannot write checkpoint step 6 into .*\.tmp-step-00000006-\w+ "
                                                   r"\(for .*step-00000006\): \[Errno 28\] No space left on device; "
                                                   r"the temporary folder was removed, and the newest complete "
                                                   r"checkpoint is .*manifest/checkpoints/step-00000003"):
        trainer.fit()
    assert trainer.store.complete_steps() == [3] and _leftovers(trainer.store.root) == []


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints
# ----------------------------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "truncated model": (lambda f: _truncate(f / "model.safetensors"),
                        r"model.safetensors has \d+ bytes but the manifest says \d+ \(truncated"),
    "flipped byte in the optimizer": (lambda f: _flip_byte(f / "optimizer.safetensors", -5),
                                      r"optimizer.safetensors has sha256 \w+ but the manifest says"),
    "flipped byte in the trainer state": (lambda f: _flip_byte(f / "trainer.json", 20),
                                          r"trainer.json has sha256"),
    "missing rng file": (lambda f: (f / "rng" / "rank00000.safetensors").unlink(),
                         r"rng/rank00000.safetensors is listed in the manifest but missing"),
    "broken manifest": (lambda f: (f / "manifest.json").write_text('{"format": "sfd-scale-chec'),
                        r"skipping step folder 6 \(no valid manifest.*manifest.json"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(straight, tmp_path, caplog, damage):
    run = tmp_path / "run"
    shutil.copytree(straight["run"], run)
    harm, message = DAMAGES[damage]
    harm(run / "checkpoints" / "step-00000006")
    with caplog.at_level(logging.WARNING, logger="sfd_scale"):
        trainer = _resume_and_finish(straight, run, expect_step=3)
    assert re.search(message, caplog.text), caplog.text
    assert "step-00000006" in caplog.text
    assert trainer.store.complete_steps() == [3, 6] and trainer.store.verify(6)  # rewritten whole


def test_every_checkpoint_damaged_is_an_error_not_a_silent_fresh_start(straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight["run"], run)
    for step in (3, 6):
        _flip_byte(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors", -5)
    trainer = Trainer(straight["cfg"], run)            # train.resume=auto
    with pytest.raises(CheckpointNotFoundError, match=r"step folders exist but no usable checkpoint is under "
                                                      r".*step 6: .*model.safetensors has sha256.*step 3: .*"
                                                      r"To start a new run instead, turn resume off"):
        trainer.maybe_resume()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000003", "step-00000006"]


# ----------------------------------------------------------------------------------------------
# Damaged and missing shards
# ----------------------------------------------------------------------------------------------
def _copy_data(straight, tmp_path: Path) -> Path:
    return Path(shutil.copytree(straight["data"], tmp_path / "latents"))


def _flip_header_digit(path: Path) -> None:
    data = path.read_bytes()
    match = re.search(rb'"shape":\[(\d)', data[: 8 + int.from_bytes(data[:8], "little")])
    digit = match.group(1)
    data = data[: match.start(1)] + (b"2" if digit != b"2" else b"3") + data[match.end(1):]
    path.write_bytes(data)


@pytest.mark.parametrize("harm, message", [
    (_flip_header_digit, r"shard .*latents_rank00_shard001.safetensors: key '\w+' data .* does not fit its shape"),
    (_truncate, r"shard .*latents_rank00_shard001.safetensors.*(truncated|corrupt)"),
])
def test_damaged_shard_header_or_length_stops_before_training(straight, tmp_path, harm, message):
    data = _copy_data(straight, tmp_path)
    harm(data / "latents_rank00_shard001.safetensors")
    cfg = tiny_sfd_config(data)
    with pytest.raises(ValueError, match=message):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_flipped_bit_in_shard_data_is_caught_as_a_non_finite_step(straight, tmp_path):
    """A bit flip inside the data keeps the file valid (shards carry no checksum); one that turns a
    value into inf/NaN is caught by the non-finite guard: exactly the steps that read it are skipped."""
    data = _copy_data(straight, tmp_path)
    shard = data / "latents_rank00_shard000.safetensors"
    info = validate_shard(shard)
    values = safetensors.torch.load_file(shard)[TEXTURE_KEY]
    sample = 3
    flat = values[sample].flatten()
    element = int(torch.nonzero((flat.abs() >= 1) & (flat.abs() < 2))[0])   # exponent 0x7f: bit 30 -> inf/NaN
    offset = info.offsets[TEXTURE_KEY] + (sample * flat.numel() + element) * 4
    _flip_byte(shard, offset + 3, 0x40)
    assert not torch.isfinite(safetensors.torch.load_file(shard)[TEXTURE_KEY][sample].flatten()[element])
    validate_shard(shard)                                # still a valid file

    trainer = Trainer(tiny_sfd_config(data, data={"random_flip": False}), tmp_path / "run")
    skipped = [trainer.train_step().skipped for _ in range(10)]   # two epochs of 5 steps
    want = [False] * 10
    for epoch in (0, 1):
        order, _ = trainer.loader.epoch_plan(epoch)
        position = int(torch.nonzero(order == sample)[0])  # sample 3 of shard 0 is global index 3
        want[epoch * 5 + position // 8] = True
    assert skipped == want and trainer.skipped_steps == 2


def test_missing_shard_is_refused_on_resume_and_an_empty_folder_is_named(straight, tmp_path):
    data = _copy_data(straight, tmp_path)
    cfg = tiny_sfd_config(data, train={"max_steps": STEPS, "ckpt_every": EVERY})
    Trainer(cfg, tmp_path / "run").fit(EVERY)
    (data / "latents_rank00_shard001.safetensors").unlink()
    trainer = Trainer(cfg, tmp_path / "run")
    with pytest.raises(ValueError, match=r"data loader state was saved with num_samples=40 but this loader has 24"):
        trainer.maybe_resume()
    for shard in list_shards(data):
        shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"no \*.safetensors shards in {re.escape(str(data))}; download"):
        Trainer(cfg, tmp_path / "run2")


# ----------------------------------------------------------------------------------------------
# Configs with a typo
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("yaml_text, overrides, message", [
    ("train:\n  max_step: 10\n", [], r"run.yaml: unknown key train.max_step \(valid keys in train.: .*max_steps"),
    ("gaurd:\n  rollback_after: 3\n", [], r"run.yaml: unknown key gaurd \(valid keys in the top level: .*guard"),
    ("parallel:\n  engine: fsdp\n", [], r"run.yaml: parallel.engine = 'fsdp' is not one of \['local', 'ddp', 'fsdp2'"),
    ("train:\n  ckpt_every: 1e4\n", [], r"run.yaml: train.ckpt_every must be an integer, got '1e4'"),
    ("", ["optim.lr=1e-4x"], r"run.yaml \(with --set overrides\): optim.lr must be a number, got '1e-4x'"),
])
def test_config_typos_name_the_file_and_key(tmp_path, yaml_text, overrides, message):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  data_dir: /somewhere\n" + yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, overrides)


# ----------------------------------------------------------------------------------------------
# Safe loading
# ----------------------------------------------------------------------------------------------
def test_pickled_objects_need_the_explicit_opt_in(tmp_path, caplog):
    path = tmp_path / "old_run.pt"
    weights = {"w": torch.arange(3.0)}
    torch.save({"model": weights, "args": argparse.Namespace(lr=1e-4)}, path)   # REPA-style checkpoint
    with pytest.raises(ValueError, match=r"old_run.pt' is not a plain tensor checkpoint.*allow_unsafe_pickle=True"):
        read_state_dict(path, "old run", "nowhere")
    with caplog.at_level(logging.WARNING, logger="sfd_scale"):
        loaded = read_state_dict(path, "old run", "nowhere", allow_unsafe_pickle=True)
    assert_identical(loaded, weights)
    assert "unpickling it in full because allow_unsafe_pickle is set" in caplog.text


def test_our_checkpoints_hold_no_pickle_and_every_torch_load_is_weights_only(straight):
    folder = straight["trainer"].store.step_dir(STEPS)
    assert {p.suffix for p in folder.rglob("*") if p.is_file()} == {".safetensors", ".json"}
    unsafe = []
    for path in Path(sfd_scale.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for func in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            for call in (n for n in ast.walk(func) if isinstance(n, ast.Call)):
                if ast.unparse(call.func) != "torch.load":
                    continue
                flag = next((k.value for k in call.keywords if k.arg == "weights_only"), None)
                if not (isinstance(flag, ast.Constant) and flag.value is True) and func.name != "_load_torch_unsafe":
                    unsafe.append(f"{path.name}:{call.lineno} in {func.name}")
    assert unsafe == []


def test_metrics_logging_draws_nothing_from_the_global_torch_generator(straight, tmp_path):
    """fit() opens the metrics logger after resume restored the generators: a draw there makes a
    resumed run's RNG state differ from an uninterrupted one."""
    before = torch.get_rng_state()
    MetricsLogger(tmp_path, to_dict(straight["cfg"]), wandb_mode="disabled").close()
    assert torch.equal(torch.get_rng_state(), before)
