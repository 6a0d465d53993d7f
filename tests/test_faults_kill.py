"""kill -9 at seeded random points, one process (local engine): every interrupted checkpoint write
is invisible to resume, and after the last resume the run equals an uninterrupted one bit for bit
(parameters, EMA, optimizer, data position, every random generator, the logged losses).

One chain of runs in one folder: each launch resumes from the newest complete checkpoint and is
killed at the next planned point, drawn from a seeded generator (SFD_FAULT_SEED changes the draw);
the last launch runs to the end. The multi-process chains are in test_faults_kill_dist.py.
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

STEPS = 24  # 40 samples, global batch 8: the chain crosses several epochs
SEED = int(os.environ.get("SFD_FAULT_SEED", "5"))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-local")
    data = write_latent_folder(root / "latents")
    cfg = tiny_sfd_config(data, train=dict(max_steps=STEPS, ckpt_every=CKPT_EVERY, keep_last=2, log_every=1))
    (root / "cfg.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    return root


def _args(ws, run_dir, *overrides: str) -> list[str]:
    args = ["--config", str(ws / "cfg.yaml"), "--run-dir", str(run_dir), "--max-steps", str(STEPS),
            "--dump", str(run_dir.with_suffix(".pt"))]
    for o in overrides:
        args += ["--set", o]
    return args


def _draw(point: str, rng: random.Random, before: int) -> str:
    """A fault `point:step[:ms]` that the run resumed from step `before` will reach."""
    if point == "after_step":
        return f"after_step:{rng.randint(before + 1, before + 3)}"
    if point == "timer":
        return f"timer:{before + 1}:{rng.randint(0, 250)}"
    return f"{point}:{before + CKPT_EVERY * rng.randint(1, 2)}"


def test_kill_at_random_points_then_resume_equals_an_uninterrupted_run(ws):
    launch(1, _args(ws, ws / "straight"), ws / "logs-straight")
    run_dir = ws / "faulted"
    rng = random.Random(f"local-{SEED}")
    newest = 0
    plan = ("after_step", "in_write", "after_manifest", "after_rename", "in_retention", "timer")
    for i, point in enumerate(plan):
        fault = _draw(point, rng, newest)
        run_until_killed(1, _args(ws, run_dir), ws / f"logs-{i}-{point}", fault)
        at = int(fault.split(":")[1])
        newest = check_after_kill(run_dir / "checkpoints", point, at, newest)
        assert newest < STEPS, f"fault {fault} came too late to leave work for the final run"
    launch(1, _args(ws, run_dir), ws / "logs-final")

    straight = torch.load(ws / "straight.pt", weights_only=True)
    faulted = torch.load(run_dir.with_suffix(".pt"), weights_only=True)
    assert faulted["step"] == straight["step"] == STEPS
    assert_identical(faulted["model"], straight["model"], "model")
    assert_identical(faulted["ema"], straight["ema"], "ema")
    assert_same_checkpoint(run_dir, ws / "straight", STEPS)
    losses = read_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses == read_losses(ws / "straight")
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", f"step-{STEPS - 2:08d}", f"step-{STEPS:08d}"]
    assert (root / "latest").read_text() == f"step-{STEPS:08d}\n"
