"""train.async_metrics: the trainer reads each step's numbers after queueing the next step.

Same numbers, same weights and same skips as the synchronous trainer; the reads lag by one
step except where a step logs or checkpoints; the guard judges one step late, so a rollback
also discards the step run meanwhile. Runs the fused AdamW + EMA kernel (Triton's interpreter
on the CPU).
"""
from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from dist_worker import assert_ranks_match_one_process, read_losses, train_on_two_ranks
from fault_worker import assert_identical
from fixtures import HostReads, tiny_sfd_config, triton_interpreter_without_gpu, write_latent_folder  # noqa: F401
from sfd_scale.parallel.dims import ParallelDims, check_config_fits
from sfd_scale.train.checkpoint import read_state
from sfd_scale.train.trainer import Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_latent_folder(tmp_path_factory.mktemp("async") / "latents")


def _config(data_dir, async_metrics: bool, **sections):
    train = {"async_metrics": async_metrics, **sections.pop("train", {})}
    return tiny_sfd_config(data_dir, optim={"lr": 1e-3, "warmup_steps": 2, "fused_ema": True}, train=train,
                           **sections)


def _poison(trainer: Trainer, steps: set[int], factor: float = float("nan")) -> None:
    """Latents times `factor` (NaN: a bad batch) in the batches of these (1-based) steps."""
    batches = trainer.batches

    def poisoned():
        for x, y, feats in batches:
            yield (x * factor if trainer.step + 1 in steps else x), y, feats

    trainer.batches = poisoned()


def _rows(run_dir) -> list[dict]:
    """The logged training numbers (not timings), NaN written as a string so that rows compare."""
    keys = ("step", "mse", "cos", "repa", "loss", "grad_norm", "lr", "skipped_steps")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: "nan" if row[k] != row[k] else row[k] for k in keys} for row in rows]


def _state(trainer: Trainer) -> dict:
    engine = trainer.engine
    return {"model": engine.unwrap().state_dict(), "ema": engine.ema_model().state_dict(),
            "optimizer": engine.optimizer.state_dict()["state"]}


def test_async_metrics_give_the_synchronous_numbers_weights_and_skips(tmp_path, data_dir):
    runs = {}
    for mode in (False, True):
        trainer = Trainer(_config(data_dir, mode, train={"log_every": 4, "ckpt_every": 4}), tmp_path / str(mode))
        _poison(trainer, {2, 5})  # a skipped step read late (2) and one just after a checkpoint (5)
        trainer.fit(8)
        runs[mode] = trainer
    sync, lagged = runs[False], runs[True]
    assert sync.skipped_steps == lagged.skipped_steps == 2
    assert_identical(_state(lagged), _state(sync))
    assert _rows(tmp_path / "True") == _rows(tmp_path / "False")
    assert [(r["step"], r["skipped_steps"]) for r in _rows(tmp_path / "True")] == [(4, 1), (8, 2)]
    assert_identical(read_state(lagged.store.step_dir(4), "trainer"), read_state(sync.store.step_dir(4), "trainer"))


def test_each_step_is_read_after_the_next_is_queued_except_where_it_logs_or_checkpoints(tmp_path, data_dir):
    trainer = Trainer(_config(data_dir, True, train={"log_every": 3, "ckpt_every": 0}), tmp_path / "run")
    events: list[str] = []
    launch, finish = trainer._launch, trainer._finish

    def logged_launch():
        launched = launch()
        events.append(f"queue {launched.number}")
        return launched

    def logged_finish(launched):
        events.append(f"read {launched.number}")
        return finish(launched)

    trainer._launch, trainer._finish = logged_launch, logged_finish
    trainer.fit(6)
    assert events == ["queue 1", "queue 2", "read 1", "queue 3", "read 2", "read 3",
                      "queue 4", "queue 5", "read 4", "queue 6", "read 5", "read 6"]


def test_queueing_a_step_reads_no_value_back_to_the_host(tmp_path, data_dir):
    # With async metrics nothing between taking a batch and queueing the optimizer may wait for the
    # GPU: loader, loss draws, forward, backward, clip, fused step, metric copies. Spike detection
    # on, so its on-device loss average is queued too.
    trainer = Trainer(_config(data_dir, True, train={"log_every": 100, "ckpt_every": 0},
                              guard={"spike_factor": 3.0, "spike_window": 2}), tmp_path / "run")
    assert trainer.guard.watches_spikes
    trainer.fit(2)  # optimizer state and caches exist
    for _ in range(2):
        with HostReads() as mode:
            launched = trainer._launch()
        assert mode.reads == 0
        trainer._finish(launched)


def test_the_guard_judges_one_step_late_and_its_rollback_discards_the_step_run_meanwhile(
        tmp_path, data_dir, caplog):
    # Steps 5-7 are NaN; rollback_after 3. Step 7 is judged while step 8 is queued, so the
    # rollback to checkpoint 4 also throws away step 8's update: checkpoint 8 holds step 4's weights.
    cfg = _config(data_dir, True, train={"log_every": 8, "ckpt_every": 4, "keep_last": 3},
                  guard={"rollback_after": 3})
    trainer = Trainer(cfg, tmp_path / "lagged")
    _poison(trainer, {5, 6, 7})
    with caplog.at_level(logging.WARNING, logger="sfd_scale"):
        trainer.fit(8)
    assert "step 7: 3 consecutive bad steps since step 5" in caplog.text
    assert "rolled model, EMA and optimizer back to checkpoint step 4 (updates of 4 steps discarded)" in caplog.text
    folder = trainer.store.step_dir
    for entry in ("model", "ema"):
        assert_identical(read_state(folder(8), entry), read_state(folder(4), entry))
    saved = read_state(folder(8), "trainer")
    assert saved["counters"] == {"step": 8, "skipped_steps": 3}
    assert saved["guard"]["rollbacks"] == 1 and saved["guard"]["rolled_back_steps"] == 4
    assert saved["guard"]["consecutive_bad"] == 0  # step 8's outcome was not judged: its update is gone

    # The synchronous trainer rolls back after step 7 and trains step 8 from step 4's weights.
    sync = Trainer(_config(data_dir, False, train={"log_every": 8, "ckpt_every": 4, "keep_last": 3},
                           guard={"rollback_after": 3}), tmp_path / "sync")
    _poison(sync, {5, 6, 7})
    sync.fit(8)
    assert read_state(sync.store.step_dir(8), "trainer")["guard"]["rolled_back_steps"] == 3
    assert not torch.equal(read_state(sync.store.step_dir(8), "model")["x_embedder.proj.weight"],
                           read_state(folder(4), "model")["x_embedder.proj.weight"])


def test_async_metrics_resume_exactly(tmp_path, data_dir):
    cfg = _config(data_dir, True, train={"log_every": 2, "ckpt_every": 3})
    straight = Trainer(cfg, tmp_path / "straight")
    straight.fit(6)
    first = Trainer(cfg, tmp_path / "resumed")
    first.fit(3)
    second = Trainer(cfg, tmp_path / "resumed")
    assert second.maybe_resume() and second.step == 3
    second.fit(6)
    assert_identical(_state(second), _state(straight))


def test_spike_detection_sees_the_same_losses_read_late(tmp_path, data_dir):
    guards = {}
    for mode in (False, True):
        trainer = Trainer(_config(data_dir, mode, train={"log_every": 8, "ckpt_every": 4},
                                  guard={"spike_factor": 3.0, "spike_window": 2}), tmp_path / str(mode))
        _poison(trainer, {4, 6}, 1e3)
        trainer.fit(8)
        guards[mode] = trainer.guard.state_dict()
    assert guards[True]["spikes"] == 2
    assert guards[True] == guards[False]


@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_ranks_with_async_metrics_match_one_process(tmp_path, data_dir, engine):
    # Spike detection on: the rank-averaged loss is all-reduced inside every step.
    cfg = _config(data_dir, True, train={"log_every": 2, "ckpt_every": 3}, guard={"spike_factor": 5.0, "spike_window": 2})
    single = Trainer(cfg, tmp_path / "single")
    single.fit(4)
    assert_ranks_match_one_process(train_on_two_ranks(tmp_path, cfg, engine, engine, 4), single, steps=(2, 4))


@pytest.mark.distributed
def test_fsdp2_fused_optimizer_resumes_exactly_from_its_sharded_state(tmp_path, data_dir):
    cfg = _config(data_dir, True, train={"log_every": 2, "ckpt_every": 2})
    straight = train_on_two_ranks(tmp_path, cfg, "fsdp2", "straight", 4)
    train_on_two_ranks(tmp_path, cfg, "fsdp2", "resumed", 2)
    resumed = train_on_two_ranks(tmp_path, cfg, "fsdp2", "resumed", 4)  # from the DCP checkpoint of step 2
    assert resumed["step"] == straight["step"] == 4
    assert_identical(resumed["model"], straight["model"])
    assert_identical(resumed["ema"], straight["ema"])


@pytest.mark.parametrize("settings, message", [
    ({"train": {"async_metrics": True}}, "train.async_metrics needs optim.fused_ema=true"),
    ({"optim": {"fused_ema": True}, "parallel": {"engine": "deepspeed", "zero_stage": 2}},
     "optim.fused_ema runs with parallel.engine local, ddp or fsdp2"),
    ({"model": {"compile": "blocks", "compile_mode": "reduce-overhead"}, "parallel": {"engine": "fsdp2"}},
     "model.compile_mode=reduce-overhead \\(CUDA graphs\\) does not work with parallel.engine=fsdp2"),
])
def test_fast_path_settings_that_cannot_work_together_are_refused(data_dir, settings, message):
    cfg = tiny_sfd_config(data_dir, **settings)
    with pytest.raises(ValueError, match=message):
        check_config_fits(cfg, ParallelDims(world_size=1, rank=0, local_rank=0, tp=1))


@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_compiled_blocks_fused_optimizer_and_async_metrics_on_two_ranks_train_like_one_process(
        tmp_path, data_dir, engine):
    # The multi-GPU candidate configurations, all together (inductor's CPU backend here).
    cfg = _config(data_dir, True, train={"log_every": 2, "ckpt_every": 0})
    single = Trainer(cfg, tmp_path / "single")
    single.fit(4)
    compiled = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compile="blocks"))
    got = train_on_two_ranks(tmp_path, compiled, engine, "compiled", 4)["losses"]
    want = read_losses(tmp_path / "single")
    assert sorted(got) == sorted(want) == [2, 4]
    assert [got[s] for s in (2, 4)] == pytest.approx([want[s] for s in (2, 4)], rel=1e-4)
