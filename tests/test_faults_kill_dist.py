"""kill -9 of one rank and of all ranks, two processes (ddp and fsdp2, gloo on CPU), at seeded
random points including during a checkpoint write; then resume. After the last resume the run
equals an uninterrupted one of the same engine bit for bit: parameters, EMA, optimizer state
(the fsdp2 DCP folder converted to one state dict), data position, torch generators, losses.

fsdp2 also meets a flipped byte in the newest checkpoint before its last resume: the resume
falls back to the previous checkpoint and still ends bit-identical (one more interval redone).
SFD_FAULT_SEED changes the drawn points.
"""
from __future__ import annotations

import os
import random

import pytest
import torch
import yaml

from dist_worker import launch, read_losses
from fault_worker import CKPT_EVERY, assert_identical, assert_same_checkpoint, check_after_kill, run_until_killed
from fixtures import tiny_sfd_config, write_latent_folder
from sfd_scale.config import to_dict
from sfd_scale.train.checkpoint import CheckpointStore

STEPS = 8
SEED = int(os.environ.get("SFD_FAULT_SEED", "5"))

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-dist")
    data = write_latent_folder(root / "latents")
    cfg = tiny_sfd_config(data, train=dict(max_steps=STEPS, ckpt_every=CKPT_EVERY, keep_last=2, log_every=1))
    (root / "cfg.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    return root


def _args(ws, run_dir, engine: str) -> list[str]:
    return ["--config", str(ws / "cfg.yaml"), "--run-dir", str(run_dir), "--max-steps", str(STEPS),
            "--dump", str(run_dir.with_suffix(".pt")), "--set", f"parallel.engine={engine}"]


def _assert_same_as_straight(ws, engine: str, run_dir) -> None:
    straight = torch.load(ws / f"{engine}-straight.pt", weights_only=True)
    faulted = torch.load(run_dir.with_suffix(".pt"), weights_only=True)
    assert faulted["step"] == straight["step"] == STEPS and faulted["world_size"] == 2
    assert_identical(faulted["model"], straight["model"], "model")
    assert_identical(faulted["ema"], straight["ema"], "ema")
    assert_same_checkpoint(run_dir, ws / f"{engine}-straight", STEPS)
    losses = read_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses == read_losses(ws / f"{engine}-straight")
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def test_ddp_kill_one_rank_then_all_ranks_mid_write(ws):
    launch(2, _args(ws, ws / "ddp-straight", "ddp"), ws / "logs-ddp-straight")
    rng = random.Random(f"ddp-{SEED}")
    run_dir = ws / "ddp"
    at = rng.randint(1, 5)
    run_until_killed(2, _args(ws, run_dir, "ddp"), ws / "logs-ddp-0", f"after_step:{at}", ranks="1")
    newest = check_after_kill(run_dir / "checkpoints", "after_step", at, 0)
    at = newest + CKPT_EVERY * rng.randint(1, 2)
    run_until_killed(2, _args(ws, run_dir, "ddp"), ws / "logs-ddp-1", f"in_write:{at}", ranks="all")
    check_after_kill(run_dir / "checkpoints", "in_write", at, newest)
    launch(2, _args(ws, run_dir, "ddp"), ws / "logs-ddp-final")
    _assert_same_as_straight(ws, "ddp", run_dir)


def test_fsdp2_kill_one_rank_mid_write_then_all_ranks_then_a_corrupt_checkpoint(ws):
    launch(2, _args(ws, ws / "fsdp2-straight", "fsdp2"), ws / "logs-fsdp2-straight")
    rng = random.Random(f"fsdp2-{SEED}")
    run_dir = ws / "fsdp2"
    at = CKPT_EVERY * rng.randint(1, 3)
    run_until_killed(2, _args(ws, run_dir, "fsdp2"), ws / "logs-fsdp2-0", f"in_write:{at}", ranks="1")
    newest = check_after_kill(run_dir / "checkpoints", "in_write", at, 0)
    at = rng.randint(max(newest + 1, 5), 7)  # leaves two complete checkpoints behind
    run_until_killed(2, _args(ws, run_dir, "fsdp2"), ws / "logs-fsdp2-1", f"after_step:{at}", ranks="all")
    newest = check_after_kill(run_dir / "checkpoints", "after_step", at, newest)

    store = CheckpointStore(run_dir / "checkpoints")
    assert store.complete_steps() == [newest - CKPT_EVERY, newest]
    shard = store.step_dir(newest) / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    outputs = launch(2, _args(ws, run_dir, "fsdp2"), ws / "logs-fsdp2-final")
    assert f"skipping checkpoint step {newest}" in outputs[0] and "dcp/__1_0.distcp has sha256" in outputs[0]
    assert f"resumed from step {newest - CKPT_EVERY}" in outputs[0]
    _assert_same_as_straight(ws, "fsdp2", run_dir)
