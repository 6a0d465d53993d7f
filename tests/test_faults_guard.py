"""Numerical guard: NaN and loss spikes injected into real batches are skipped and counted; N
consecutive bad steps roll model, EMA and optimizer back to the last good checkpoint (optionally
with a lower learning rate), on one process and on two fsdp2 ranks with the NaN on one rank only."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import yaml

from dist_worker import launch
from fault_worker import WORKER, assert_identical, final_checkpoint_state
from fixtures import tiny_sfd_config, write_latent_folder
from sfd_scale.config import ConfigError, SFDConfig, from_dict, to_dict
from sfd_scale.parallel.factory import read_consolidated
from sfd_scale.train.checkpoint import read_state
from sfd_scale.train.guards import GuardError
from sfd_scale.train.trainer import Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_latent_folder(tmp_path_factory.mktemp("guard") / "latents")


def _poison(trainer: Trainer, steps: set[int], factor: float) -> None:
    """Multiply the latents of the batches of these (1-based) steps by `factor` (NaN: a bad batch)."""
    batches = trainer.batches

    def poisoned():
        for x, y, feats in batches:
            yield (x * factor if trainer.step + 1 in steps else x), y, feats

    trainer.batches = poisoned()


def _engine_state(trainer: Trainer) -> dict:
    engine = trainer.engine
    return {"model": engine.unwrap().state_dict(), "ema": engine.ema_model().state_dict(),
            "optimizer": engine.optimizer.state_dict()["state"]}


def _clone(state):
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: _clone(v) for k, v in state.items()}
    return state


def _saved_engine_state(trainer: Trainer, step: int) -> dict:
    folder = trainer.store.step_dir(step)
    return {"model": read_state(folder, "model"), "ema": read_state(folder, "ema"),
            "optimizer": read_state(folder, "optimizer")["state"]}


def _rows(run_dir) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def test_nan_batches_are_skipped_and_counted_and_a_good_step_ends_the_streak(tmp_path, data_dir):
    trainer = Trainer(tiny_sfd_config(data_dir, guard={"rollback_after": 3}), tmp_path / "run")
    _poison(trainer, {2, 4, 5}, float("nan"))
    trainer.train_step()
    before = _clone(_engine_state(trainer))
    assert trainer.train_step().skipped                       # step 2: NaN batch
    assert_identical(_engine_state(trainer), before)          # no optimizer or EMA update
    assert (trainer.skipped_steps, trainer.guard.consecutive_bad, trainer.guard.streak_start) == (1, 1, 2)
    assert not trainer.train_step().skipped                   # step 3 ends the streak
    assert trainer.guard.consecutive_bad == 0 and trainer.guard.streak_start is None
    assert trainer.train_step().skipped and trainer.train_step().skipped      # steps 4, 5
    assert (trainer.skipped_steps, trainer.guard.consecutive_bad, trainer.guard.rollbacks) == (3, 2, 0)
    assert not trainer.train_step().skipped
    assert trainer.guard.consecutive_bad == 0 and trainer.step == 6


def test_consecutive_nan_steps_roll_back_with_a_lower_lr_and_resume_exactly(tmp_path, data_dir, caplog):
    cfg = tiny_sfd_config(data_dir, train={"ckpt_every": 3, "log_every": 1, "keep_last": 3},
                          guard={"rollback_after": 3, "rollback_lr_factor": 0.5})
    straight = Trainer(cfg, tmp_path / "straight")
    _poison(straight, {4, 5, 6}, float("nan"))
    with caplog.at_level(logging.WARNING, logger="sfd_scale"):
        straight.fit(9)
    assert "rolled model, EMA and optimizer back to checkpoint step 3 (updates of 3 steps discarded)" in caplog.text
    # The checkpoint of step 6 was written just after the rollback: the weights of step 3, the
    # data position and counters of step 6.
    assert_identical(_saved_engine_state(straight, 6), _saved_engine_state(straight, 3))
    saved = read_state(straight.store.step_dir(6), "trainer")
    assert saved["counters"] == {"step": 6, "skipped_steps": 3}
    assert saved["guard"]["rollbacks"] == 1 and saved["guard"]["lr_scale"] == 0.5
    assert saved["guard"]["rolled_back_steps"] == 3 and saved["loader"]["position"] == 8  # 6 x 8 - 40
    rows = _rows(tmp_path / "straight")
    assert rows[3]["lr"] == 1e-3 and rows[7]["lr"] == 5e-4 and rows[9]["lr"] == 5e-4

    # Stop after the rollback, resume: the guard's state (the lower lr) comes back with it.
    first = Trainer(cfg, tmp_path / "resumed")
    _poison(first, {4, 5, 6}, float("nan"))
    first.fit(7)
    second = Trainer(cfg, tmp_path / "resumed")
    assert second.maybe_resume() and second.step == 7 and second.guard.lr_scale == 0.5
    second.fit(9)
    assert_identical(_engine_state(second), _engine_state(straight))
    assert second.guard.state_dict() == straight.guard.state_dict()


def test_loss_spikes_roll_back_past_checkpoints_that_hold_a_spiked_update(tmp_path, data_dir, caplog):
    cfg = tiny_sfd_config(data_dir, train={"ckpt_every": 2, "keep_last": 2},
                          guard={"rollback_after": 3, "spike_factor": 5.0, "spike_window": 2})
    trainer = Trainer(cfg, tmp_path / "run")
    _poison(trainer, {5, 6, 7}, 1e3)
    with caplog.at_level(logging.INFO, logger="sfd_scale"):
        trainer.fit(7)
    assert trainer.skipped_steps == 0 and trainer.guard.spikes == 3 and trainer.guard.rollbacks == 1
    assert "step 5: loss spike" in caplog.text
    # Checkpoint 6 holds the update of the spike at step 5: the guard went back to step 4.
    assert "moved checkpoint step 6 to" in caplog.text and "loss spike at step 5" in caplog.text
    assert (trainer.store.root / "abandoned-step-00000006" / "manifest.json").is_file()
    assert "back to checkpoint step 4" in caplog.text
    assert trainer.store.complete_steps() == [4, 7]
    assert_identical(_saved_engine_state(trainer, 7), _saved_engine_state(trainer, 4))


def test_too_many_rollbacks_or_nothing_to_roll_back_to_stop_the_run(tmp_path, data_dir):
    cfg = tiny_sfd_config(data_dir, train={"ckpt_every": 2}, guard={"rollback_after": 1, "max_rollbacks": 1})
    trainer = Trainer(cfg, tmp_path / "twice")
    _poison(trainer, {3, 5}, float("nan"))
    with pytest.raises(GuardError, match=r"step 5: 1 consecutive bad steps .*after 1 rollback\(s\).*max_rollbacks"):
        trainer.fit(6)
    assert trainer.guard.rollbacks == 1

    early = Trainer(tiny_sfd_config(data_dir, train={"ckpt_every": 3}, guard={"rollback_after": 2}),
                    tmp_path / "early")
    _poison(early, {1, 2}, float("nan"))
    with pytest.raises(GuardError, match=r"step 2: a rollback is due but no verified checkpoint exists .*"
                                         r"complete steps: \[\]"):
        early.fit(3)


def test_corrupt_checkpoints_are_passed_over_by_the_rollback(tmp_path, data_dir):
    cfg = tiny_sfd_config(data_dir, train={"ckpt_every": 2, "keep_last": 3}, guard={"rollback_after": 2})
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.fit(6)
    shutil.copyfile(trainer.store.step_dir(2) / "model.safetensors", trainer.store.step_dir(6) / "model.safetensors")
    _poison(trainer, {7, 8}, float("nan"))
    trainer.fit(8)
    assert trainer.guard.rollbacks == 1
    assert_identical(_engine_state(trainer), _saved_engine_state(trainer, 4))


def test_guard_settings_are_validated_with_their_keys(tmp_path, data_dir):
    with pytest.raises(ConfigError, match=r"section guard: rollback_lr_factor=2.0 must lie in \(0, 1\]"):
        from_dict(SFDConfig, {"data": {"data_dir": "x"}, "guard": {"rollback_lr_factor": 2}}, "run.yaml")
    with pytest.raises(ConfigError, match=r"spike_factor=0.5 must be 0 \(off\) or greater than 1"):
        from_dict(SFDConfig, {"data": {"data_dir": "x"}, "guard": {"spike_factor": 0.5}}, "run.yaml")
    with pytest.raises(ValueError, match=r"guard.rollback_after=2 needs periodic checkpoints.*train.ckpt_every=0"):
        Trainer(tiny_sfd_config(data_dir, train={"ckpt_every": 0}, guard={"rollback_after": 2}), tmp_path / "a")
    with pytest.raises(ValueError, match=r"can save 2 checkpoint\(s\) during a streak.*train.keep_last >= 3"):
        Trainer(tiny_sfd_config(data_dir, train={"ckpt_every": 2, "keep_last": 2},
                                guard={"rollback_after": 5, "spike_factor": 4.0}), tmp_path / "b")


@pytest.mark.distributed
def test_fsdp2_nan_on_one_rank_rolls_both_ranks_back(tmp_path, data_dir):
    cfg = tiny_sfd_config(data_dir, train={"ckpt_every": 2, "log_every": 1}, parallel={"engine": "fsdp2"},
                          guard={"rollback_after": 2})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    run_dir = tmp_path / "run"
    outputs = launch(2, ["--config", str(tmp_path / "cfg.yaml"), "--run-dir", str(run_dir), "--max-steps", "4",
                         "--dump", str(tmp_path / "run.pt")], tmp_path / "logs",
                     script=WORKER, env={"SFD_POISON": "nan:3,4", "SFD_POISON_RANKS": "1"})
    assert "rolled model, EMA and optimizer back to checkpoint step 2" in outputs[0]
    dump = torch.load(tmp_path / "run.pt", weights_only=True)
    model, ema = read_consolidated(run_dir / "checkpoints" / "step-00000002", "dcp", cfg.model)
    assert_identical(dump["model"], model, "model")
    assert_identical(dump["ema"], ema, "ema")
    at_4, at_2 = final_checkpoint_state(run_dir, 4), final_checkpoint_state(run_dir, 2)
    assert_identical(at_4["dcp"], at_2["dcp"], "dcp")       # model, EMA and optimizer shards
    assert at_4["trainer"]["counters"] == {"step": 4, "skipped_steps": 2}
    assert at_4["trainer"]["guard"]["rollbacks"] == 1
