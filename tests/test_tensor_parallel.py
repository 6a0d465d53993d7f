"""Megatron-core tensor parallelism: layout conversion, and tp=2 / dp=2 runs against one process.

The engine-level checks run once, in one 2-process gloo job (`tp_run`, this file run as a script
by tests/dist_worker.launch) that records tensors; the tests below assert on them. The last tests
train through the real trainer and factory with tests/dist_worker.py.

Tolerances (fp32 on CPU): forward and gradients of one step agree with the dense model to
rtol 1e-5 / atol 1e-6; after several AdamW steps, losses to rtol 1e-5 and parameters to
atol 2e-6 (lr 1e-3: 0.2 % of one step's update); resume and layout round trips are bit-exact.
As in the trainer, every rank draws the global batch's times, noise and label dropout from one
seeded generator and keeps its rows (SFDLoss with BatchPart).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from dist_worker import launch, read_losses
from fixtures import TINY, tiny_sfd_config, write_latent_folder
from sfd_scale.config import ParallelConfig, to_dict
from sfd_scale.diffusion.loss import BatchPart, SFDLoss
from sfd_scale.models.lightningdit import build_model, load_lightningdit
from sfd_scale.parallel.engine import LocalEngine
from sfd_scale.parallel.tensor_parallel import (SHARD_DIR, TensorParallelEngine, gather_state_dict,
                                                shard_state_dict, split_of, validate_tensor_parallel)
from sfd_scale.train.checkpoint import save_model_export
from sfd_scale.train.trainer import Trainer

BATCH = 8
STEPS = 3          # steps before the checkpoint
MORE = 2           # steps after it
CPU = torch.device("cpu")


def _tp(size: int, checkpointing: str = "none", attention_only: bool = False) -> ParallelConfig:
    return ParallelConfig(engine="ddp", tensor_parallel=size, activation_checkpointing=checkpointing,
                          checkpoint_attention_only=attention_only)


def _config(root: Path):
    # hidden 48, 4 heads: head_dim 12 (RoPE needs a multiple of 4), SwiGLU hidden 128.
    return tiny_sfd_config(root, model=dict(hidden_size=48, num_heads=4),
                           optim=dict(lr=1e-3, warmup_steps=0, max_grad_norm=0.5))


# ----------------------------------------------------------------------------------------------
# Layout (single process)
# ----------------------------------------------------------------------------------------------
def test_split_rules_name_exactly_the_parallel_projections():
    assert split_of("blocks.3.attn.qkv.weight") == split_of("blocks.3.attn.qkv.bias")
    assert split_of("blocks.3.attn.qkv.weight").parts == 3
    assert split_of("blocks.0.mlp.w12.bias").parts == 2
    assert split_of("blocks.0.attn.proj.weight").dim == 1 and split_of("blocks.0.mlp.w3.weight").dim == 1
    for replicated in ("blocks.0.attn.proj.bias", "blocks.0.mlp.w3.bias", "blocks.0.attn.q_norm.weight",
                       "blocks.0.adaLN_modulation.1.weight", "final_layer.linear.weight", "pos_embed",
                       "repa_projector.0.weight", "module.blocks.0.attn.qkv.weight"):
        assert split_of(replicated) is None, replicated


def test_each_rank_gets_its_own_heads_of_q_k_v_and_its_slice_of_gate_and_value():
    # D = 8 (4 heads of 2), H = 6: rows are numbered so the expected pick can be written down.
    full = {"blocks.0.attn.qkv.weight": torch.arange(24.0)[:, None].repeat(1, 8),
            "blocks.0.attn.qkv.bias": torch.arange(24.0),
            "blocks.0.mlp.w12.bias": torch.arange(12.0),
            "blocks.0.attn.proj.weight": torch.arange(8.0)[None, :].repeat(8, 1),
            "blocks.0.attn.proj.bias": torch.arange(8.0)}
    rank1 = shard_state_dict(full, tp_rank=1, tp_size=2)
    assert rank1["blocks.0.attn.qkv.bias"].tolist() == [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]
    assert rank1["blocks.0.attn.qkv.weight"][:, 0].tolist() == rank1["blocks.0.attn.qkv.bias"].tolist()
    assert rank1["blocks.0.mlp.w12.bias"].tolist() == [3, 4, 5, 9, 10, 11]          # gate_1, value_1
    assert rank1["blocks.0.attn.proj.weight"][0].tolist() == [4, 5, 6, 7]           # heads 2, 3 in
    assert rank1["blocks.0.attn.proj.bias"] is full["blocks.0.attn.proj.bias"]      # replicated
    rank0 = shard_state_dict({"blocks.0.attn.qkv.bias": full["blocks.0.attn.qkv.bias"]}, 0, 4)
    assert rank0["blocks.0.attn.qkv.bias"].tolist() == [0, 1, 8, 9, 16, 17]


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_shard_then_gather_is_exact_for_a_real_model(tmp_path, tp_size):
    torch.manual_seed(0)
    full = build_model(_config(tmp_path).model).state_dict()
    parts = [shard_state_dict(full, r, tp_size) for r in range(tp_size)]
    for key, tensor in parts[0].items():
        split = split_of(key)
        if split is not None:
            want = list(full[key].shape)
            want[split.dim] //= tp_size
            assert list(tensor.shape) == want, key
    back = gather_state_dict(parts)
    assert list(back) == list(full)
    assert all(torch.equal(back[k], full[k]) for k in full)
    again = [shard_state_dict(back, r, tp_size) for r in range(tp_size)]
    assert all(torch.equal(a[k], p[k]) for a, p in zip(again, parts) for k in p)


def test_layout_errors_name_the_problem():
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.weight.*3 part"):
        shard_state_dict({"blocks.0.attn.qkv.weight": torch.zeros(9, 4)}, 0, 2)
    with pytest.raises(ValueError, match="rank 2"):
        shard_state_dict({}, 2, 2)
    with pytest.raises(ValueError, match="other keys"):
        gather_state_dict([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])


def test_sizes_that_do_not_fit_are_refused_with_the_setting_to_change(tmp_path):
    model = _config(tmp_path).model
    with pytest.raises(ValueError, match="num_heads 4 is not divisible by parallel.tensor_parallel=8"):
        validate_tensor_parallel(_tp(8), model, 8)
    with pytest.raises(ValueError, match="does not divide the world size 6"):
        validate_tensor_parallel(_tp(4), model, 6)
    with pytest.raises(ValueError, match="supported sizes"):
        validate_tensor_parallel(_tp(3), model, 3)
    with pytest.raises(ValueError, match="runs with parallel.engine=ddp.*not 'fsdp2'"):
        validate_tensor_parallel(ParallelConfig(engine="fsdp2", tensor_parallel=2), model, 2)
    validate_tensor_parallel(_tp(4), model, 8)


# ----------------------------------------------------------------------------------------------
# The 2-process job
# ----------------------------------------------------------------------------------------------
def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    c = TINY["c_tex"] + TINY["c_sem"]
    return [(torch.randn(BATCH, c, TINY["hw"], TINY["hw"], generator=g),
             torch.randint(0, TINY["num_classes"], (BATCH,), generator=g),
             torch.randn(BATCH, TINY["c_dino"], TINY["hw"], TINY["hw"], generator=g)) for _ in range(n)]


def _loss(model, loss_fn: SFDLoss, batch, gen: torch.Generator, part: slice):
    """SFD loss (as SFDLoss computes it, plus the prediction) of this rank's rows `part`."""
    x, y, feats = (t[part] for t in batch)
    noised = loss_fn.noise(x, gen, BatchPart(part.start or 0, BATCH))
    out, repa = model(noised.x_t, noised.t_tex, noised.t_sem, y, return_repa=True,
                      label_uniforms=noised.label_uniforms)
    return loss_fn.terms(out, noised.target, repa, feats)["loss"], out


def _train(engine, loss_fn, batches, gen, part: slice, dp_size: int = 1) -> list[list[float]]:
    """[global loss, grad norm] per step (the loss averaged over data-parallel ranks)."""
    history = []
    for batch in batches:
        engine.zero_grad()
        loss, _ = _loss(engine.model, loss_fn, batch, gen, part)
        engine.backward(loss)
        stats = engine.step(1e-3, loss.detach())
        assert not stats.skipped
        mean = loss.detach().clone()
        if dp_size > 1:
            dist.all_reduce(mean)
            mean /= dp_size
        history.append([float(mean), stats.grad_norm])
    return history


def _snapshot(engine) -> tuple[dict, dict]:
    """Copies of the consolidated state (a local engine returns its live tensors)."""
    return tuple({k: v.clone() for k, v in state.items()} for state in engine.consolidated_state())


def _perturb(model: torch.nn.Module) -> None:
    """Random weights everywhere, so the zero-initialised AdaLN branches and outputs carry signal."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _job(rank: int, out: Path) -> dict:
    from megatron.core import parallel_state

    cfg = _config(out)
    loss_fn = SFDLoss(cfg.diffusion, cfg.model.semantic_channels)
    res: dict = {}

    # A head count the group cannot divide fails before megatron state or any layer is built.
    bad_cfg = dataclasses.replace(cfg.model, hidden_size=36, num_heads=3)
    try:
        TensorParallelEngine(build_model(bad_cfg), _tp(2), cfg.optim, 0.9, CPU)
        res["bad_heads_error"] = ""
    except ValueError as err:
        res["bad_heads_error"] = str(err)
    res["megatron_initialised_after_error"] = parallel_state.model_parallel_is_initialized()

    # One forward/backward against the dense model with the same (random) weights.
    torch.manual_seed(0)
    dense = build_model(cfg.model).train()
    _perturb(dense)
    no_clip = dataclasses.replace(cfg.optim, max_grad_norm=0.0)
    tp = TensorParallelEngine(copy.deepcopy(dense), _tp(2), no_clip, 0.9, CPU)
    batch = _batches(1)[0]
    loss_d, out_d = _loss(dense, loss_fn, batch, torch.Generator().manual_seed(3), slice(None))
    loss_d.backward()
    loss_t, out_t = _loss(tp.model, loss_fn, batch, torch.Generator().manual_seed(3), slice(None))
    tp.backward(loss_t)
    stats = tp.step(0.0, loss_t.detach())           # lr 0: finishes the gradients, moves nothing
    res["parity"] = {
        "out": (out_d.detach(), out_t.detach()),
        "norm": (float(torch.nn.utils.clip_grad_norm_(dense.parameters(), float("inf"))), stats.grad_norm),
        "grads_dense": {n: p.grad for n, p in dense.named_parameters() if p.grad is not None},
        "grads_tp": tp.gather({n: p.grad for n, p in tp.unwrap().named_parameters() if p.grad is not None}),
    }

    # bf16 autocast on the CPU (megatron's linears fall back to fp32 there) runs and stays close.
    tp.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_bf16, out_bf16 = _loss(tp.model, loss_fn, batch, torch.Generator().manual_seed(3), slice(None))
    tp.backward(loss_bf16.float())
    res["bf16"] = {"out": out_bf16.detach().float(), "grad_finite": all(
        torch.isfinite(p.grad).all() for p in tp.unwrap().parameters() if p.grad is not None)}

    # STEPS steps: one process vs tp=2 (recomputing every block), same weights, batches and draws.
    batches = _batches(STEPS + MORE)
    torch.manual_seed(0)
    start = build_model(cfg.model).train()
    local = LocalEngine(copy.deepcopy(start), cfg.optim, 0.9, CPU)
    tp = TensorParallelEngine(copy.deepcopy(start), _tp(2, "full"), cfg.optim, 0.9, CPU)
    g_local, g_tp = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    res["local_hist"] = _train(local, loss_fn, batches[:STEPS], g_local, slice(None))
    res["tp_hist"] = _train(tp, loss_fn, batches[:STEPS], g_tp, slice(None))
    res["local_state"], res["tp_state"] = _snapshot(local), _snapshot(tp)

    # Checkpoint, continue; a fresh engine resumes from the checkpoint and must match bit for bit.
    ckpt = out / "ckpt_tp2"
    tp.save(ckpt)
    dist.barrier()
    res["ckpt_files"] = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    saved_gen = g_tp.get_state()
    res["local_more"] = _train(local, loss_fn, batches[STEPS:], g_local, slice(None))
    res["local_final"] = _snapshot(local)
    res["tp_more"] = _train(tp, loss_fn, batches[STEPS:], g_tp, slice(None))
    res["tp_final"] = tp.consolidated_state()
    torch.manual_seed(1)
    resumed = TensorParallelEngine(build_model(cfg.model).train(), _tp(2), cfg.optim, 0.9, CPU)
    resumed.load(ckpt)
    res["resumed_more"] = _train(resumed, loss_fn, batches[STEPS:], torch.Generator().set_state(saved_gen),
                                 slice(None))
    res["resumed_final"] = resumed.consolidated_state()

    # Export: reference layout, read back by the single-process loader in the test.
    x, y, _ = batches[0]
    t_tex, t_sem = torch.linspace(0, 0.7, BATCH), torch.linspace(0.3, 1, BATCH)
    with torch.no_grad():
        tp.unwrap().eval()
        res["export_out"] = {"model": tp.unwrap()(x, t_tex, t_sem, y),
                             "ema": tp.ema_model()(x, t_tex, t_sem, y)}     # ema_model gathers
    if rank == 0:
        save_model_export(out / "export.pt", *res["tp_final"], to_dict(cfg))

    # The tp=2 checkpoint on tp=1 x dp=2 (re-split 2 -> 1, DDP over megatron's data group,
    # attention recomputed in backward).
    parallel_state.destroy_model_parallel()
    torch.manual_seed(2)
    dp = TensorParallelEngine(build_model(cfg.model).train(), _tp(1, "selective", attention_only=True),
                              cfg.optim, 0.9, CPU)
    dp.load(ckpt)
    res["dp_loaded"] = dp.consolidated_state()
    half = BATCH // 2
    res["dp_more"] = _train(dp, loss_fn, batches[STEPS:], torch.Generator().set_state(saved_gen),
                            slice(rank * half, (rank + 1) * half), dp_size=2)
    res["dp_final"] = dp.consolidated_state()
    ckpt1 = out / "ckpt_tp1"
    dp.save(ckpt1)
    dist.barrier()
    res["ckpt1_files"] = sorted(p.relative_to(ckpt1).as_posix() for p in ckpt1.rglob("*") if p.is_file())

    # ... and back: the tp=1 checkpoint re-split 1 -> 2.
    parallel_state.destroy_model_parallel()
    torch.manual_seed(3)
    back = TensorParallelEngine(build_model(cfg.model).train(), _tp(2), cfg.optim, 0.9, CPU)
    back.load(ckpt1)
    res["back_loaded"] = back.consolidated_state()
    return res


def _rank_main(out: Path) -> None:
    """One rank of the job, started by dist_worker.launch with torchrun's environment."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    res = _job(dist.get_rank(), out)
    if dist.get_rank() == 0:
        torch.save(res, out / "results.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("tp_run")
    launch(2, [str(out)], out / "logs", script=Path(__file__))
    return torch.load(out / "results.pt", weights_only=True), out


def _assert_states_close(a, b, atol: float, exact: bool = False) -> None:
    for name, sa, sb in (("model", a[0], b[0]), ("ema", a[1], b[1])):
        assert list(sa) == list(sb), name
        for key in sa:
            if exact:
                assert torch.equal(sa[key], sb[key]), f"{name}.{key}"
            else:
                torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=atol, msg=f"{name}.{key}")


@pytest.mark.distributed
def test_a_head_count_the_group_cannot_divide_fails_first(tp_run):
    res, _ = tp_run
    assert "num_heads 3 is not divisible by parallel.tensor_parallel=2" in res["bad_heads_error"]
    assert res["megatron_initialised_after_error"] is False


@pytest.mark.distributed
def test_tp2_forward_and_gradients_equal_the_dense_model(tp_run):
    p = tp_run[0]["parity"]
    torch.testing.assert_close(p["out"][1], p["out"][0], rtol=1e-5, atol=1e-6)
    assert p["out"][0].abs().max() > 0.1                       # the weights really were random
    assert set(p["grads_tp"]) == set(p["grads_dense"])
    for key, grad in p["grads_dense"].items():
        torch.testing.assert_close(p["grads_tp"][key], grad, rtol=1e-5, atol=1e-6, msg=key)
    # The qk-norm weights sit inside the split region: their gradient is summed over ranks.
    assert p["grads_dense"]["blocks.0.attn.q_norm.weight"].abs().max() > 1e-4
    # The global norm counts shards once and replicated tensors once.
    assert p["norm"][1] == pytest.approx(p["norm"][0], rel=1e-6)


@pytest.mark.distributed
def test_tp2_runs_under_cpu_bf16_autocast(tp_run):
    res = tp_run[0]
    assert res["bf16"]["grad_finite"]
    reference = res["parity"]["out"][0]
    torch.testing.assert_close(res["bf16"]["out"], reference, rtol=0,
                               atol=0.05 * float(reference.abs().max()))


@pytest.mark.distributed
def test_tp2_training_steps_equal_one_process(tp_run):
    res, _ = tp_run
    local = torch.tensor(res["local_hist"] + res["local_more"])       # [loss, grad norm] per step
    tp = torch.tensor(res["tp_hist"] + res["tp_more"])
    torch.testing.assert_close(tp, local, rtol=1e-5, atol=0)
    assert (local[:, 1] > 0.5).any()                           # clipping at 0.5 was active
    _assert_states_close(res["tp_state"], res["local_state"], atol=2e-6)
    _assert_states_close(res["tp_final"], res["local_final"], atol=2e-6)
    assert not torch.equal(res["tp_final"][0]["blocks.0.attn.qkv.weight"],
                           res["tp_state"][0]["blocks.0.attn.qkv.weight"])


@pytest.mark.distributed
def test_tp2_resume_is_exact_and_checkpoints_are_per_rank_shards(tp_run):
    res, _ = tp_run
    assert res["resumed_more"] == res["tp_more"]
    _assert_states_close(res["resumed_final"], res["tp_final"], atol=0, exact=True)
    assert res["ckpt_files"] == [f"{SHARD_DIR}/tp-{r:02d}-of-02/{e}.{s}" for r in range(2)
                                 for e in ("ema", "model", "optimizer") for s in ("json", "safetensors")]


@pytest.mark.distributed
def test_export_loads_into_a_single_process_model_with_the_same_outputs(tp_run):
    res, out = tp_run
    cfg = _config(out)
    x, y, _ = _batches(1)[0]
    t_tex, t_sem = torch.linspace(0, 0.7, BATCH), torch.linspace(0.3, 1, BATCH)
    for which in ("model", "ema"):
        model = load_lightningdit(out / "export.pt", cfg.model, prefer=(which,)).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x, t_tex, t_sem, y), res["export_out"][which],
                                       rtol=1e-5, atol=1e-6, msg=which)


@pytest.mark.distributed
def test_checkpoints_resplit_between_tp2_and_tp1_with_data_parallel(tp_run):
    res, _ = tp_run
    _assert_states_close(res["dp_loaded"], res["tp_state"], atol=0, exact=True)      # 2 -> 1
    # tp=1 x dp=2 on half batches continues like tp=2 (optimizer moments were re-split too).
    torch.testing.assert_close(torch.tensor(res["dp_more"]), torch.tensor(res["tp_more"]),
                               rtol=1e-5, atol=0)
    _assert_states_close(res["dp_final"], res["tp_final"], atol=2e-6)
    assert res["ckpt1_files"] == [f"{SHARD_DIR}/tp-00-of-01/{e}.{s}"                  # dp rank 0 only
                                  for e in ("ema", "model", "optimizer") for s in ("json", "safetensors")]
    _assert_states_close(res["back_loaded"], res["dp_final"], atol=0, exact=True)    # 1 -> 2


# ----------------------------------------------------------------------------------------------
# Through the real trainer and factory (tests/dist_worker.py): parallel.engine=ddp, tp=2
# ----------------------------------------------------------------------------------------------
TRAIN_STEPS = 4     # checkpoints at 2 and 4


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory) -> dict:
    """A single-process run and a 2-rank tp=2 run of the same config (label dropout on)."""
    root = tmp_path_factory.mktemp("tp_trainer")
    cfg = tiny_sfd_config(write_latent_folder(root / "latents"), model=dict(hidden_size=48, num_heads=4),
                          train=dict(max_steps=TRAIN_STEPS, ckpt_every=2, log_every=1))
    (root / "cfg.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    single = Trainer(cfg, root / "single")
    single.fit(TRAIN_STEPS)
    model, ema = single.engine.consolidated_state()
    tp = _trainer_worker(root, root / "tp2", TRAIN_STEPS)
    return {"root": root, "single": {"losses": read_losses(root / "single"), "model": model, "ema": ema},
            "tp": tp}


def _trainer_worker(root: Path, run_dir: Path, steps: int) -> dict:
    dump = run_dir.with_suffix(".pt")
    launch(2, ["--config", str(root / "cfg.yaml"), "--run-dir", str(run_dir), "--max-steps", str(steps),
               "--dump", str(dump), "--set", "parallel.engine=ddp", "--set", "parallel.tensor_parallel=2"],
           run_dir.parent / f"{run_dir.name}-logs")
    return torch.load(dump, weights_only=True)


@pytest.mark.distributed
def test_trainer_with_tp2_equals_one_process(trainer_runs):
    single, tp = trainer_runs["single"], trainer_runs["tp"]
    assert tp["world_size"] == 2 and tp["step"] == TRAIN_STEPS
    for step in range(1, TRAIN_STEPS + 1):
        assert tp["losses"][step] == pytest.approx(single["losses"][step], rel=1e-5), step
    _assert_states_close((tp["model"], tp["ema"]), (single["model"], single["ema"]), atol=2e-6)
    shards = trainer_runs["root"] / "tp2" / "checkpoints" / f"step-{TRAIN_STEPS:08d}" / SHARD_DIR
    assert sorted(p.name for p in shards.iterdir()) == ["tp-00-of-02", "tp-01-of-02"]


@pytest.mark.distributed
def test_trainer_with_tp2_resumes_bit_identically(trainer_runs, tmp_path):
    root, straight = trainer_runs["root"], trainer_runs["tp"]
    resumed = tmp_path / "resumed"
    shutil.copytree(root / "tp2", resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step-{TRAIN_STEPS:08d}")
    (resumed / "metrics.jsonl").unlink()
    dump = _trainer_worker(root, resumed, TRAIN_STEPS)
    assert sorted(dump["losses"]) == [3, 4]
    assert all(dump["losses"][s] == straight["losses"][s] for s in (3, 4))
    _assert_states_close((dump["model"], dump["ema"]), (straight["model"], straight["ema"]),
                         atol=0, exact=True)


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown after the process group is gone
