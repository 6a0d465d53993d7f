"""Single-process trainer: exact resume, non-finite guard, architecture checks."""
from __future__ import annotations

import json

import pytest
import torch

from fixtures import tiny_sfd_config, write_latent_folder
from sfd_scale.config import model_differences, to_dict
from sfd_scale.train.checkpoint import CheckpointNotFoundError
from sfd_scale.train.trainer import Trainer


@pytest.fixture()
def data_dir(tmp_path):
    return write_latent_folder(tmp_path / "latents")


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _assert_same_state(a: Trainer, b: Trainer):
    for name, sa, sb in (("model", *(t.engine.unwrap().state_dict() for t in (a, b))),
                         ("ema", *(t.engine.ema_model().state_dict() for t in (a, b)))):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k}"
    oa, ob = a.engine.optimizer.state_dict()["state"], b.engine.optimizer.state_dict()["state"]
    for i in oa:
        for k in oa[i]:
            assert torch.equal(oa[i][k], ob[i][k]), f"optimizer {i}.{k}"
    assert a.loader.state_dict() == b.loader.state_dict()
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, data_dir):
    cfg = tiny_sfd_config(data_dir)           # 40 samples, batch 8: step 6 crosses an epoch
    straight = Trainer(cfg, tmp_path / "straight")
    straight.fit(6)

    first = Trainer(cfg, tmp_path / "resumed")
    first.fit(3)                              # stops after the step-3 checkpoint
    del first
    second = Trainer(cfg, tmp_path / "resumed")
    assert second.maybe_resume() and second.step == 3
    second.fit(6)

    _assert_same_state(straight, second)
    straight_log, resumed_log = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert straight_log[6] == resumed_log[6]
    # log_every 2: the straight run's step-4 row averages steps 3 and 4; the resumed run logged
    # step 3 alone (end of the first fit) and step 4 alone (a window of one step after resuming).
    assert straight_log[4] == pytest.approx((resumed_log[3] + resumed_log[4]) / 2, rel=1e-6)
    assert second.store.complete_steps() == [3, 6]


def test_training_reduces_the_loss(tmp_path, data_dir):
    cfg = tiny_sfd_config(data_dir, train={"max_steps": 60, "log_every": 20, "ckpt_every": 0},
                          optim={"lr": 3e-3})
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.fit()
    losses = _losses(tmp_path / "run")
    assert losses[60] < 0.8 * losses[20]


def test_non_finite_loss_skips_the_update(tmp_path, data_dir, monkeypatch):
    trainer = Trainer(tiny_sfd_config(data_dir), tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.engine.unwrap().state_dict().items()}
    ema_before = {k: v.clone() for k, v in trainer.engine.ema_model().state_dict().items()}
    real_terms = trainer.loss_fn.terms

    def poisoned(*args, **kwargs):
        out = real_terms(*args, **kwargs)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(trainer.loss_fn, "terms", poisoned)
    result = trainer.train_step()
    assert result.skipped and trainer.skipped_steps == 1 and trainer.step == 1
    for k, v in trainer.engine.unwrap().state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in trainer.engine.ema_model().state_dict().items():
        assert torch.equal(v, ema_before[k]), k
    monkeypatch.setattr(trainer.loss_fn, "terms", real_terms)
    assert not trainer.train_step().skipped


def test_resume_with_another_architecture_is_an_error(tmp_path, data_dir):
    Trainer(tiny_sfd_config(data_dir), tmp_path / "run").fit(3)
    other = Trainer(tiny_sfd_config(data_dir, model={"depth": 3}), tmp_path / "run")
    with pytest.raises(ValueError, match="another model.*depth"):
        other.maybe_resume()


def test_resume_may_switch_fast_paths_and_reads_older_model_sections(tmp_path, data_dir):
    Trainer(tiny_sfd_config(data_dir, model={"attention": "sdpa"}), tmp_path / "run").fit(3)
    # Another attention kernel (or compile, FP8, Triton kernels) runs the same weights: allowed.
    faster = Trainer(tiny_sfd_config(data_dir, model={"attention": "math", "compile_mode": "reduce-overhead"}),
                     tmp_path / "run")
    assert faster.maybe_resume() and faster.step == 3
    # A model section saved before a setting existed means that setting's default.
    cfg = tiny_sfd_config(data_dir).model
    older = {k: v for k, v in to_dict(cfg).items() if k not in ("fp8", "class_dropout_prob")}
    assert model_differences(older, cfg) == {}
    assert model_differences({**older, "depth": 5}, cfg) == {"depth": (5, 2)}


def test_resume_must_without_checkpoint_is_an_error(tmp_path, data_dir):
    trainer = Trainer(tiny_sfd_config(data_dir, train={"resume": "must"}), tmp_path / "empty")
    with pytest.raises(CheckpointNotFoundError):
        trainer.maybe_resume()


def test_data_that_does_not_fit_the_model_is_named(tmp_path, data_dir):
    with pytest.raises(ValueError, match=r"latents.*\(6, 4, 4\).*model expects \(8, 4, 4\)"):
        Trainer(tiny_sfd_config(data_dir, model={"in_channels": 8}), tmp_path / "run")


def test_fit_can_end_without_a_final_checkpoint(tmp_path, data_dir):
    trainer = Trainer(tiny_sfd_config(data_dir, train={"ckpt_every": 0}), tmp_path / "run")
    trainer.fit(2, final_checkpoint=False)
    assert trainer.step == 2 and trainer.store.complete_steps() == []
    trainer.fit(3)
    assert trainer.store.complete_steps() == [3]


def test_data_read_mode_changes_nothing_but_how_shards_are_read(tmp_path, data_dir):
    runs = {}
    for mode in ("mmap", "pread"):
        trainer = Trainer(tiny_sfd_config(data_dir, data={"read_mode": mode}), tmp_path / mode)
        assert trainer.loader.dataset.read_mode.value == mode
        trainer.fit(3)
        runs[mode] = trainer
    _assert_same_state(runs["mmap"], runs["pread"])
    assert _losses(tmp_path / "mmap") == _losses(tmp_path / "pread")


@pytest.mark.parametrize("every, collected", [(3, [(3, 1), (6, 1)]), (0, [])])
def test_garbage_is_collected_on_the_loops_schedule(tmp_path, data_dir, monkeypatch, every, collected):
    import gc

    trainer = Trainer(tiny_sfd_config(data_dir, train={"gc_every": every, "ckpt_every": 0}), tmp_path / "run")
    automatic = []
    launch = trainer._launch

    def watched_launch():
        automatic.append(gc.isenabled())
        return launch()

    trainer._launch = watched_launch
    calls = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append((trainer.step, generation)))
    trainer.fit(6, final_checkpoint=False)
    assert automatic == [every == 0] * 6          # off inside the loop unless gc_every is 0
    assert calls == collected and gc.isenabled()  # young generations on schedule; back on after


def test_a_negative_gc_interval_is_refused_by_name(tmp_path, data_dir):
    with pytest.raises(ValueError, match=r"train.gc_every must be >= 0 .* got -1"):
        Trainer(tiny_sfd_config(data_dir, train={"gc_every": -1}), tmp_path / "run")
