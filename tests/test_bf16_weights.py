"""optim.bf16_weights: the local engine computes with bf16 linear weights and the fused optimizer
keeps their fp32 masters. Under bf16 autocast that is the same training as fp32 weights (autocast
casts them to exactly those bf16 values every step), so runs must agree bit for bit; checkpoints,
exports and resumes hold the fp32 masters. Runs the fused kernel (Triton's interpreter on the CPU).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from dist_worker import launch, read_losses
from fault_worker import assert_identical
from fixtures import tiny_sfd_config, triton_interpreter_without_gpu, write_latent_folder  # noqa: F401
from sfd_scale.config import to_dict
from sfd_scale.parallel.dims import ParallelDims, check_config_fits
from sfd_scale.train.checkpoint import read_state
from sfd_scale.train.trainer import Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_latent_folder(tmp_path_factory.mktemp("bf16w") / "latents")


def _config(data_dir, bf16_weights: bool, recompute: str = "none", **train):
    return tiny_sfd_config(data_dir, optim={"lr": 1e-3, "warmup_steps": 2, "fused_ema": True,
                                            "bf16_weights": bf16_weights},
                           parallel={"activation_checkpointing": recompute},
                           train={"precision": "bf16", "log_every": 1, "ckpt_every": 3, **train})


def _numbers(trainer: Trainer) -> dict:
    model, ema = trainer.engine.consolidated_state()
    return {"model": model, "ema": ema, "optimizer": trainer.engine.optimizer.state_dict()["state"]}


# Activation checkpointing wraps blocks: parameter names gain an infix the state dict does not have.
RECOMPUTE = ["none", "full"]


@pytest.mark.parametrize("recompute", RECOMPUTE)
def test_bf16_weights_train_like_autocast_over_fp32_weights(tmp_path, data_dir, recompute):
    runs = {}
    for bf16_weights in (False, True):
        trainer = Trainer(_config(data_dir, bf16_weights, recompute), tmp_path / str(bf16_weights))
        trainer.fit(6)
        runs[bf16_weights] = trainer
    plain, copies = runs[False], runs[True]
    engine = copies.engine
    w12 = engine.unwrap().get_submodule("blocks.0").get_submodule(
        "_checkpoint_wrapped_module.mlp.w12" if recompute == "full" else "mlp.w12")
    assert w12.weight.dtype == w12.bias.dtype == torch.bfloat16                  # what the module computes with
    assert engine.unwrap().x_embedder.proj.weight.dtype == torch.float32          # not a linear layer: untouched
    master = engine.masters["blocks.0.mlp.w12.weight"]
    assert master.dtype == torch.float32 and torch.equal(w12.weight, master.bfloat16())
    assert not torch.equal(master, master.bfloat16().float())                    # the master keeps fp32 bits
    assert_identical(_numbers(copies), _numbers(plain))                           # losses follow: same weights
    saved = read_state(copies.store.step_dir(6), "model")
    assert_identical(saved, read_state(plain.store.step_dir(6), "model"))        # checkpoints hold the masters


@pytest.mark.parametrize("recompute", RECOMPUTE)
def test_bf16_weights_resume_exactly(tmp_path, data_dir, recompute):
    whole = Trainer(_config(data_dir, True, recompute), tmp_path / "whole")
    whole.fit(6)
    first = Trainer(_config(data_dir, True, recompute, max_steps=3), tmp_path / "resumed")
    first.fit(3)
    resumed = Trainer(_config(data_dir, True, recompute), tmp_path / "resumed")
    resumed.maybe_resume()
    assert resumed.step == 3
    w12 = resumed.engine.unwrap().get_parameter(
        "blocks.0._checkpoint_wrapped_module.mlp.w12.weight" if recompute == "full" else "blocks.0.mlp.w12.weight")
    assert torch.equal(w12, resumed.engine.masters["blocks.0.mlp.w12.weight"].bfloat16())  # copies rebuilt
    resumed.fit(6)
    assert_identical(_numbers(resumed), _numbers(whole))


def _two_ddp_ranks(tmp_path, cfg, run: str, max_steps: int) -> dict:
    """Train `cfg` on 2 DDP ranks (resuming `run` if it has a checkpoint); the worker's dump."""
    (tmp_path / f"{run}.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    dump = tmp_path / f"{run}-{max_steps}.pt"
    launch(2, ["--config", str(tmp_path / f"{run}.yaml"), "--run-dir", str(tmp_path / run), "--max-steps",
               str(max_steps), "--set", "parallel.engine=ddp", "--dump", str(dump)], tmp_path / f"{run}-logs",
           env={"TRITON_INTERPRET": "1"}, timeout=300)
    return torch.load(dump, weights_only=True)


@pytest.mark.distributed
def test_ddp_averages_bf16_gradients_in_fp32_like_fp32_weights(tmp_path, data_dir):
    """DDP's buckets hold the bf16 gradients; the hook averages them in fp32 for the optimizer, so
    two ranks with bf16 copies take the steps two ranks with fp32 weights take, and resume exactly."""
    plain = _two_ddp_ranks(tmp_path, _config(data_dir, False), "plain", 4)
    copies = _two_ddp_ranks(tmp_path, _config(data_dir, True), "copies", 4)
    assert read_losses(tmp_path / "copies") == read_losses(tmp_path / "plain")
    assert_identical(copies["model"], plain["model"])
    assert_identical(copies["ema"], plain["ema"])
    resumed = _two_ddp_ranks(tmp_path, _config(data_dir, True, max_steps=3), "resumed", 3)
    resumed = _two_ddp_ranks(tmp_path, _config(data_dir, True), "resumed", 4)   # from step 3
    assert_identical(resumed["model"], plain["model"])


@pytest.mark.parametrize("change,message", [
    (dict(optim={"fused_ema": False}), "needs optim.fused_ema=true"),
    (dict(parallel={"engine": "fsdp2"}), "runs with parallel.engine local or ddp"),
    (dict(parallel={"grad_accum_steps": 2}), "needs parallel.grad_accum_steps=1"),
    (dict(train={"precision": "fp32"}), "needs bf16 compute"),
])
def test_bf16_weights_settings_that_do_not_fit_are_named(data_dir, change, message):
    cfg = _config(data_dir, True)
    for section, values in change.items():
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})
    with pytest.raises(ValueError, match=message):
        check_config_fits(cfg, ParallelDims(world_size=2 if cfg.parallel.engine == "ddp" else 1, rank=0,
                                            local_rank=0, tp=1))


def test_bf16_weights_need_bf16_compute_on_the_device_the_run_uses(tmp_path, data_dir):
    with pytest.raises(ValueError, match="train.precision=auto on cpu"):
        Trainer(_config(data_dir, True, precision="auto", device="cpu"), tmp_path / "run")


def test_gradient_norms_of_mixed_dtypes_are_fp32_and_in_order():
    from sfd_scale.parallel.distributed import _fp32_norms

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(300, generator=g).bfloat16(), torch.randn(7, 5, generator=g),
             torch.randn(64, generator=g).bfloat16(), torch.zeros(0)]
    norms = _fp32_norms(grads)
    assert [n.dtype for n in norms] == [torch.float32] * 4
    assert all(torch.equal(n, torch.linalg.vector_norm(t.float())) for n, t in zip(norms, grads))
