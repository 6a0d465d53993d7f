"""DeepSpeed engine (ZeRO 1/2/3) on CPU with gloo: equivalence with one process (fp32, and bf16
within bf16 noise), cross-rank skip of a non-finite loss, exact resume, resume on another world
size (2 -> 1 and 1 -> 2 ranks, also with another stage) with weights, EMA and AdamW state, export
into a fresh single-process model, offline consolidation, partition sizes, configuration and
missing-package and bad-checkpoint errors.

The multi-process part is three launches of this file run as a script (through
tests/dist_worker.launch), each training and resuming several runs with the real Trainer and
dumping what the tests compare: 2 ranks train and resume every stage; then one process trains the
one-rank sources and resumes the 2-rank checkpoints; then 2 ranks resume the one-rank checkpoints.
DeepSpeed's start-up (~5 s per process) is paid once per launch instead of per test. The
worker skips DeepSpeed's CPU shared-memory op (see _worker_main), so nothing is JIT-built;
TORCH_EXTENSIONS_DIR still points at a per-machine cache under /tmp in case a build happens.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fixtures, dist_worker (also as a script)

from fixtures import tiny_sfd_config, write_latent_folder  # noqa: E402

STEPS = 4            # optimizer steps per run
CKPT_STEP = 2        # resumed runs start here
POISON_STEP = 1      # 0-based step whose loss is NaN on rank 1 only: every rank must skip it
# fp32 on CPU: 2 ranks x 2 micro-batches sum the same gradients in another order than one
# process, so values agree to float rounding (~1e-7 relative), not bit for bit.
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-6
EXTENSIONS_DIR = os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/sfd_torch_extensions")


# Runs of the 2-rank launch: name -> (ZeRO stage, train.precision). bf16 on CPU exercises the GPU
# recipe's mechanics (bf16 weights, fp32 master/EMA, DeepSpeed's bf16 overflow check).
RUNS = {"zero1": (1, "fp32"), "zero2": (2, "fp32"), "zero3": (3, "fp32"), "zero2_bf16": (2, "bf16")}
FP32_STAGES = [1, 2, 3]
# Resumes on another world size: name -> (ranks that saved, stage saved, ranks that resume, stage
# resumed). ZeRO-1 and ZeRO-2 share one code path (DeepSpeed's per-parameter fragment mapping of a
# flat partition), so stage 2 stands for both in the plain cases; the mixed ones bring stage 1 in
# (saved by one, resumed by the other) and change the partitioning scheme as well as the size.
CROSS = {
    "2to1_zero2": (2, 2, 1, 2), "2to1_zero3": (2, 3, 1, 3),
    "1to2_zero2": (1, 2, 2, 2), "1to2_zero3": (1, 3, 2, 3),
    "2to1_zero1to3": (2, 1, 1, 3), "1to2_zero3to1": (1, 3, 2, 1),
}
SINGLE_STAGES = sorted({saved for ranks, saved, _, _ in CROSS.values() if ranks == 1})  # one-rank sources


def stage_config(stage: int, data_dir: Path, work: Path, engine: str = "deepspeed", precision: str = "fp32"):
    """Tiny SFD run; ZeRO-3 reads a JSON file (persistence off, so every parameter is really
    partitioned and gathered) and recomputes every block (activation checkpointing)."""
    parallel = {"engine": engine, "zero_stage": stage, "grad_accum_steps": 2, "backend": "gloo"}
    if stage == 3:
        ds = json.loads((Path(__file__).resolve().parents[1] / "configs/deepspeed/zero3.json").read_text())
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        path = work / "zero3_test.json"
        # Every rank writes it: atomically, so no rank reads a half-written file.
        temp = path.with_name(f".{path.name}.{os.getpid()}")
        temp.write_text(json.dumps(ds))
        os.replace(temp, path)
        parallel.update(deepspeed_config=str(path), activation_checkpointing="full")
    return tiny_sfd_config(
        data_dir, parallel=parallel,
        train={"max_steps": STEPS, "ckpt_every": CKPT_STEP, "log_every": 1, "device": "cpu",
               "precision": precision},
        # Small enough that clipping by the global norm is active on most steps.
        optim={"max_grad_norm": 0.5})


def fixed_inputs(cfg):
    g = torch.Generator().manual_seed(5)
    m = cfg.model
    x = torch.randn(3, m.in_channels, m.input_size, m.input_size, generator=g)
    t_tex, t_sem = torch.rand(3, generator=g), torch.rand(3, generator=g)
    return x, t_tex, t_sem, torch.tensor([0, 3, m.num_classes])


def poison_rank1(trainer, rank: int) -> None:
    """Make rank 1's loss NaN at POISON_STEP while its gradients stay finite (a NaN constant is
    added), and rank 0's loss stays finite: only the cross-rank loss flag can skip the step."""
    real_terms = trainer.loss_fn.terms

    def terms(*args, **kwargs):
        out = real_terms(*args, **kwargs)
        if trainer.step == POISON_STEP and rank == 1:
            out["loss"] = out["loss"] + torch.tensor(float("nan"))
        return out

    trainer.loss_fn.terms = terms


# ----------------------------------------------------------------------------------------------
# Worker (run as a script by dist_worker.launch)
# ----------------------------------------------------------------------------------------------
def _worker_run(name: str, data_dir: Path, work: Path, dims) -> None:
    import torch.distributed as dist

    from dist_worker import read_losses
    from sfd_scale.models.lightningdit import build_model
    from sfd_scale.parallel.deepspeed_engine import zero_partition_numel
    from sfd_scale.train.trainer import Trainer, autocast_for

    stage, precision = RUNS[name]
    cfg = stage_config(stage, data_dir, work, precision=precision)
    straight_dir, resumed_dir = work / name / "straight", work / name / "resumed"
    trainer = Trainer(cfg, straight_dir, dims=dims)
    poison_rank1(trainer, dims.rank)
    engine = trainer.engine
    if stage == 3:
        local = {"params": sum(p.ds_tensor.numel() for p in engine.unwrap().parameters()),
                 "optimizer": sum(t.numel() for t in engine._ds.optimizer.fp32_partitioned_groups_flat)}
    else:
        local = {"optimizer": sum(t.numel() for t in engine._ds.optimizer.single_partition_of_fp32_groups)}
    expected = zero_partition_numel(build_model(cfg.model), stage, dims.world_size, persistence_threshold=0)
    trainer.fit(STEPS)
    model, ema = engine.consolidated_state()
    x, t_tex, t_sem, y = fixed_inputs(cfg)
    engine.model.eval()  # DeepSpeed's eval() returns None, so not chained
    with torch.no_grad(), autocast_for(precision, torch.device("cpu")):
        outputs = engine.model(x, t_tex, t_sem, y).float()
    engine.model.train()
    skipped = trainer.skipped_steps
    if dims.is_main:
        torch.save({"losses": read_losses(straight_dir), "model": model, "ema": ema, "outputs": outputs,
                    "skipped": skipped, "local": local, "expected": expected}, work / name / "straight.pt")
    del trainer, engine

    # Resume from the step-CKPT_STEP folder in a fresh run folder. The fresh engine starts from the
    # step-0 weights and no optimizer state, so only a complete load can make the results equal.
    if dims.is_main:
        (resumed_dir / "checkpoints").mkdir(parents=True)
        shutil.copytree(straight_dir / "checkpoints" / f"step-{CKPT_STEP:08d}",
                        resumed_dir / "checkpoints" / f"step-{CKPT_STEP:08d}")
    dist.barrier()
    resumed = Trainer(cfg, resumed_dir, dims=dims)
    assert resumed.maybe_resume() and resumed.step == CKPT_STEP
    resumed.fit(STEPS)
    model, ema = resumed.engine.consolidated_state()
    if dims.is_main:
        torch.save({"losses": read_losses(resumed_dir), "model": model, "ema": ema,
                    "skipped": resumed.skipped_steps}, work / name / "resumed.pt")


def _worker_main(argv: list[str]) -> None:
    import deepspeed.ops

    from sfd_scale.parallel.dims import ParallelDims

    # On CPU, DeepSpeed's init_distributed JIT-builds a shared-memory all-reduce (20 s to minutes
    # on a busy 2-core machine, and it needs a C++ compiler). Only DeepSpeed's inference path uses
    # it; training collectives go through torch.distributed. Marking it unavailable skips the build.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    data_dir, work, phase = Path(argv[0]), Path(argv[1]), argv[2]
    torch.set_num_threads(1)
    # The engine logs which route a resume takes; the tests look for that line in the output.
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("sfd_scale.parallel.deepspeed_engine").setLevel(logging.INFO)
    dims = ParallelDims.from_env()
    if phase == "train":
        for name in RUNS:
            _worker_run(name, data_dir, work, dims)
        return
    if phase == "single":
        for stage in SINGLE_STAGES:
            _worker_single_source(stage, data_dir, work, dims)
    for name, (_, _, ranks, _) in CROSS.items():
        if ranks == dims.world_size:
            _worker_resume_elsewhere(name, data_dir, work, dims)


def _worker_single_source(stage: int, data_dir: Path, work: Path, dims) -> None:
    """One process trains ZeRO-`stage` to the checkpoint step, skipping the step that rank 1's NaN
    skips in the 2-rank runs (so its AdamW step count lags the trainer's, as there)."""
    from dist_worker import read_losses
    from sfd_scale.train.trainer import Trainer

    run_dir = work / f"single_zero{stage}"
    trainer = Trainer(stage_config(stage, data_dir, work), run_dir, dims=dims)
    poison_rank1(trainer, rank=1)  # one process holds rank 1's rows too
    trainer.fit(CKPT_STEP)
    torch.save({"losses": read_losses(run_dir), "skipped": trainer.skipped_steps}, run_dir / "source.pt")


def _worker_resume_elsewhere(name: str, data_dir: Path, work: Path, dims) -> None:
    """Resume a run folder holding only another world size's step-CKPT_STEP checkpoint (the
    fixture copied it there) and train on to STEPS."""
    from dist_worker import read_losses
    from sfd_scale.train.trainer import Trainer

    run_dir = work / "cross" / name
    trainer = Trainer(stage_config(CROSS[name][3], data_dir, work), run_dir, dims=dims)
    assert trainer.maybe_resume() and trainer.step == CKPT_STEP
    engine = trainer.engine
    optimizer = engine._ds.optimizer.optimizer
    adam_steps = [float(optimizer.state[flat]["step"]) for flat in engine._flat_partitions()]
    trainer.fit(STEPS)
    model, ema = engine.consolidated_state()
    if dims.is_main:
        torch.save({"losses": read_losses(run_dir), "model": model, "ema": ema, "skipped": trainer.skipped_steps,
                    "adam_steps": adam_steps}, work / "cross" / f"{name}.pt")


def _main() -> None:
    from dist_worker import run_and_exit

    run_and_exit(lambda: _worker_main(sys.argv[1:]))


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Train (and resume) every stage on 2 ranks; returns (data_dir, work)."""
    pytest.importorskip("deepspeed")
    from dist_worker import launch

    work = tmp_path_factory.mktemp("deepspeed")
    data_dir = write_latent_folder(work / "latents")
    env = {"TORCH_EXTENSIONS_DIR": EXTENSIONS_DIR, "WANDB_MODE": "disabled"}
    launch(2, [str(data_dir), str(work), "train"], work / "logs", timeout=240, script=Path(__file__), env=env)
    return data_dir, work


@pytest.fixture(scope="module")
def crossed(runs):
    """Every CROSS resume: one process (after training the one-rank sources), then 2 ranks; each
    run folder starts with nothing but the source's step-CKPT_STEP folder. Returns all ranks' output."""
    from dist_worker import launch

    data_dir, work = runs
    env = {"TORCH_EXTENSIONS_DIR": EXTENSIONS_DIR, "WANDB_MODE": "disabled"}
    step_dir = f"step-{CKPT_STEP:08d}"
    outputs = []
    for ranks, phase in ((1, "single"), (2, "double")):
        for name, (saved_ranks, saved_stage, resume_ranks, _) in CROSS.items():
            if resume_ranks == ranks:
                source = work / (f"single_zero{saved_stage}" if saved_ranks == 1 else f"zero{saved_stage}/straight")
                shutil.copytree(source / "checkpoints" / step_dir, work / "cross" / name / "checkpoints" / step_dir)
        # DeepSpeed's initialize asserts that LOCAL_RANK is set, even for one process without a launcher.
        outputs += launch(ranks, [str(data_dir), str(work), phase], work / f"logs_{phase}", timeout=240,
                          script=Path(__file__), env={**env, "LOCAL_RANK": "0"} if ranks == 1 else env)
    return "\n".join(outputs)


@pytest.fixture(scope="module")
def reference(runs, tmp_path_factory):
    """The fp32 runs on one process with the local engine: {stage: (losses, model, ema, skipped)}."""
    from dist_worker import read_losses
    from sfd_scale.parallel.dims import ParallelDims
    from sfd_scale.train.trainer import Trainer

    data_dir, _ = runs
    out = {}
    for stage in FP32_STAGES:
        run = tmp_path_factory.mktemp(f"local{stage}")
        trainer = Trainer(stage_config(stage, data_dir, run, engine="local"), run, dims=ParallelDims())
        poison_rank1(trainer, rank=1)  # one process holds rank 1's rows too: its loss is NaN
        trainer.fit(STEPS)
        model, ema = trainer.engine.consolidated_state()
        out[stage] = (read_losses(run), model, ema, trainer.skipped_steps)
    return out


def _load(work: Path, name: str, which: str = "straight") -> dict:
    return torch.load(work / name / f"{which}.pt", weights_only=True)


def _assert_close(a: dict, b: dict, atol: float, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=atol, msg=f"{what} {k}")


@pytest.mark.distributed
@pytest.mark.parametrize("stage", FP32_STAGES)
def test_steps_match_one_process_on_the_same_global_batch(runs, reference, stage):
    ds = _load(runs[1], f"zero{stage}")
    losses, model, ema, skipped = reference[stage]
    assert ds["skipped"] == skipped == 1  # rank 1's NaN loss made both ranks skip the step
    assert set(ds["losses"]) == set(losses) == set(range(1, STEPS + 1))
    for step, loss in losses.items():
        if step == POISON_STEP + 1:
            assert math.isnan(ds["losses"][step]) and math.isnan(loss)
        else:
            assert ds["losses"][step] == pytest.approx(loss, rel=LOSS_RTOL), f"step {step}"
    _assert_close(ds["model"], model, PARAM_ATOL, "model")
    _assert_close(ds["ema"], ema, PARAM_ATOL, "ema")
    # The zero-initialised output layer moved, so the comparison above is not vacuous.
    assert ds["model"]["final_layer.linear.weight"].abs().max() > 1e-3


@pytest.mark.distributed
def test_bf16_run_skips_like_fp32_and_keeps_fp32_master_and_ema(runs, reference):
    from sfd_scale.models.lightningdit import build_model

    data_dir, work = runs
    ds = _load(work, "zero2_bf16")
    _, model, ema, _ = reference[2]
    assert ds["skipped"] == 1  # DeepSpeed's bf16 overflow check saw the poisoned gradients
    assert all(v.dtype == torch.float32 for v in (*ds["model"].values(), *ds["ema"].values()))
    # Updates from the (bf16-rounded) start agree with fp32's to bf16 noise: measured 2.4 % (model)
    # and 2.9 % (EMA) relative; a run that never stepped, or stepped twice as far, is off by 100 %,
    # and an EMA fed the bf16 working weights instead of the fp32 master was off by 23 %.
    cfg = stage_config(2, data_dir, work)
    torch.manual_seed(cfg.train.seed)  # the trainer's initialisation
    start = {k: v for k, v in build_model(cfg.model).named_parameters() if v.requires_grad}
    for what, got, want in (("model", ds["model"], model), ("ema", ds["ema"], ema)):
        err = size = 0.0
        for k, v in start.items():
            v = v.detach()
            err += (got[k] - v.bfloat16().float() - (want[k] - v)).pow(2).sum()
            size += (want[k] - v).pow(2).sum()
        assert (err / size).sqrt() < 0.1, what


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(RUNS))
def test_resume_is_exact(runs, name):
    straight, resumed = _load(runs[1], name), _load(runs[1], name, "resumed")
    assert resumed["skipped"] == straight["skipped"] == 1
    for step in range(CKPT_STEP + 1, STEPS + 1):
        assert resumed["losses"][step] == straight["losses"][step]
    for entry in ("model", "ema"):
        assert resumed[entry].keys() == straight[entry].keys()
        for k in straight[entry]:
            assert torch.equal(resumed[entry][k], straight[entry][k]), f"{entry}.{k}"


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(CROSS))
def test_resume_on_another_world_size_continues_the_uninterrupted_run(runs, crossed, name):
    saved_ranks, saved_stage, _, stage = CROSS[name]
    got = torch.load(runs[1] / "cross" / f"{name}.pt", weights_only=True)
    want = _load(runs[1], f"zero{stage}")  # 2 ranks, no break (equal to one process, tested above)
    assert (f"cross/{name}/checkpoints/step-{CKPT_STEP:08d} was saved by ZeRO-{saved_stage} on {saved_ranks} "
            "data-parallel ranks") in crossed  # the route is logged
    # AdamW's own step count came back: the trainer is at CKPT_STEP, one of those steps was skipped.
    assert got["adam_steps"] and set(got["adam_steps"]) == {CKPT_STEP - 1}
    assert got["skipped"] == want["skipped"] == 1
    assert set(got["losses"]) == set(range(CKPT_STEP + 1, STEPS + 1))
    for step, loss in got["losses"].items():
        assert loss == pytest.approx(want["losses"][step], rel=LOSS_RTOL), f"step {step}"
    # Restarting AdamW's moments instead moved the weights by 2.6e-3 in two steps (measured), 2600x PARAM_ATOL.
    _assert_close(got["model"], want["model"], PARAM_ATOL, "model")
    _assert_close(got["ema"], want["ema"], PARAM_ATOL, "ema")


@pytest.mark.distributed
@pytest.mark.parametrize("stage", SINGLE_STAGES)
def test_one_rank_sources_train_like_two_ranks(runs, crossed, stage):
    source = torch.load(runs[1] / f"single_zero{stage}" / "source.pt", weights_only=True)
    want = _load(runs[1], f"zero{stage}")
    assert source["skipped"] == 1 and set(source["losses"]) == set(range(1, CKPT_STEP + 1))
    for step, loss in source["losses"].items():
        if step == POISON_STEP + 1:
            assert math.isnan(loss) and math.isnan(want["losses"][step])
        else:
            assert loss == pytest.approx(want["losses"][step], rel=LOSS_RTOL), f"step {step}"


@pytest.mark.distributed
def test_fragments_of_another_model_or_a_missing_rank_are_named(runs, tmp_path):
    from sfd_scale.models.lightningdit import build_model
    from sfd_scale.parallel.deepspeed_engine import check_fragments

    data_dir, work = runs
    folder = work / "zero2/straight/checkpoints" / f"step-{CKPT_STEP:08d}"
    model = build_model(stage_config(2, data_dir, work).model)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    headers = check_fragments(folder, shapes)
    assert [h["rank"] for h in headers] == [0, 1]
    assert headers[0]["step"] == CKPT_STEP - 1 and headers[0]["keys"] == ["exp_avg", "exp_avg_sq"]

    first, second, *_ = shapes
    other = {**shapes, first: (1, 2), "extra.weight": (3,)}
    del other[second]
    with pytest.raises(ValueError, match=re.escape(f"{folder} holds another model's parameters: missing "
                                                   f"['extra.weight'], unexpected ['{second}'], other shapes "
                                                   f"(saved -> this model) ['{first} {shapes[first]} -> (1, 2)']")):
        check_fragments(folder, other)
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    (copy / "zero_fragments/rank00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"{copy}: zero_fragments/rank00001.safetensors is missing"):
        check_fragments(copy, shapes)
    assert len(check_fragments(copy, shapes, every_rank=False)) == 1  # the same-size route reads rank 0's only


@pytest.mark.distributed
@pytest.mark.parametrize("stage", FP32_STAGES)
def test_export_loads_into_a_fresh_model_with_the_same_outputs(runs, stage, tmp_path):
    from sfd_scale.config import to_dict
    from sfd_scale.models.lightningdit import load_lightningdit
    from sfd_scale.train.checkpoint import save_model_export

    data_dir, work = runs
    cfg = stage_config(stage, data_dir, tmp_path)
    ds = _load(work, f"zero{stage}")
    path, _ = save_model_export(tmp_path / "export.pt", ds["model"], ds["ema"], to_dict(cfg))
    model = load_lightningdit(path, cfg.model, prefer=("model",)).eval()
    with torch.no_grad():
        outputs = model(*fixed_inputs(cfg))
    torch.testing.assert_close(outputs, ds["outputs"], rtol=0, atol=1e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(RUNS))
def test_step_folder_consolidates_offline_like_the_engine(runs, name):
    from sfd_scale.parallel.deepspeed_engine import read_consolidated

    data_dir, work = runs
    cfg = stage_config(RUNS[name][0], data_dir, work)
    model, ema = read_consolidated(work / name / "straight/checkpoints" / f"step-{STEPS:08d}", cfg.model)
    ds = _load(work, name)
    for entry, got, want in (("model", model, ds["model"]), ("ema", ema, ds["ema"])):
        assert got.keys() == want.keys(), entry
        for k in want:
            assert torch.equal(got[k], want[k]), f"{entry}.{k}"


@pytest.mark.distributed
@pytest.mark.parametrize("stage", FP32_STAGES)
def test_partition_arithmetic_matches_deepspeed(runs, stage):
    ds = _load(runs[1], f"zero{stage}")
    for key, numel in ds["local"].items():
        assert numel == ds["expected"][key], key


# -- in-process: arithmetic, configuration, errors ----------------------------------------------
def test_partition_arithmetic_by_hand():
    from sfd_scale.parallel.deepspeed_engine import zero_partition_numel, zero_state_bytes

    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 1))  # 15 + 5 + 5 + 1 = 26
    model[1].bias.requires_grad_(False)                                        # 25 trainable
    # ZeRO-1/2, 4 ranks: 25 -> padded to a multiple of 8 = 32 -> 8 per rank.
    assert zero_partition_numel(model, 1, 4) == {"params": 26, "grads": 25, "optimizer": 8}
    assert zero_partition_numel(model, 2, 4) == {"params": 26, "grads": 8, "optimizer": 8}
    # ZeRO-3, 4 ranks: ceil(15/4) + ceil(5/4) + ceil(5/4) + ceil(1/4) = 4 + 2 + 2 + 1 = 9 elements,
    # trainable 8; with persistence threshold 5, the 5- and 1-element tensors stay whole too (+11).
    assert zero_partition_numel(model, 3, 4, persistence_threshold=0) == {"params": 9, "grads": 8, "optimizer": 8}
    assert zero_partition_numel(model, 3, 4, persistence_threshold=5)["params"] == 9 + 11
    assert zero_state_bytes(model, 2, 4).optimizer == 12 * 8


def test_generated_config_follows_the_yaml(tmp_path):
    from sfd_scale.parallel.deepspeed_engine import deepspeed_config

    cfg = tiny_sfd_config(tmp_path, parallel={"engine": "deepspeed", "zero_stage": 2, "grad_accum_steps": 2,
                                              "offload_optimizer": True},
                          optim={"max_grad_norm": 0.25}, train={"global_batch_size": 16})
    ds = deepspeed_config(cfg, dp_size=4, device=torch.device("cpu"))
    batch = (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
    assert batch == (16, 2, 2)
    assert ds["gradient_clipping"] == 0.25
    assert ds["bf16"]["enabled"] is False  # CPU: fp32
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["managed_gradient_accumulation"] is False
    assert deepspeed_config(cfg, 4, torch.device("cuda", 0))["bf16"]["enabled"] is True
    with pytest.raises(ValueError, match=r"global_batch_size=16 must be a positive multiple of data-parallel "
                                         r"size \(3\)"):
        deepspeed_config(cfg, dp_size=3, device=torch.device("cpu"))


@pytest.mark.parametrize("name,args", [("zero1", (1,)), ("zero2", (2,)), ("zero3", (3,)),
                                       ("zero3_offload", (3, True, True))])
def test_shipped_json_files_match_the_generated_sections(name, args):
    from sfd_scale.parallel.deepspeed_engine import zero_section

    path = Path(__file__).resolve().parents[1] / "configs/deepspeed" / f"{name}.json"
    assert json.loads(path.read_text()) == {"zero_optimization": zero_section(*args)}


@pytest.mark.parametrize("content,match", [
    ({"zero_optimization": {"stage": 1}}, r"zero_optimization.stage=1 but parallel.zero_stage=3"),
    ({"train_batch_size": 64}, r"train_batch_size=64 disagrees with the YAML \(8\)"),
    ({"optimizer": {"type": "Adam"}}, r"remove the 'optimizer' section"),
    ({"bf16": {"enabled": True}}, r"bf16.enabled=True disagrees with train.precision='auto' on cpu \(fp32\)"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}},
     r"offload_param but parallel.offload_params is false"),
])
def test_json_that_disagrees_with_the_yaml_is_named(tmp_path, content, match):
    from sfd_scale.parallel.deepspeed_engine import deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    cfg = tiny_sfd_config(tmp_path, parallel={"engine": "deepspeed", "deepspeed_config": str(path)})
    with pytest.raises(ValueError, match=match):
        deepspeed_config(cfg, dp_size=1, device=torch.device("cpu"))


def test_json_with_auto_values_is_completed(tmp_path):
    from sfd_scale.parallel.deepspeed_engine import deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto",
                                "zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}}))
    cfg = tiny_sfd_config(tmp_path, parallel={"engine": "deepspeed", "deepspeed_config": str(path)})
    ds = deepspeed_config(cfg, dp_size=2, device=torch.device("cpu"))
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000}


def test_resume_route_follows_stage_world_size_and_precision(tmp_path):
    from sfd_scale.parallel.deepspeed_engine import check_resumable

    meta = {"zero_stage": 3, "world_size": 2, "bf16": False, "fragments": 1}
    assert check_resumable(meta, tmp_path, stage=3, dp=2, bf16=False) is True  # DeepSpeed's own files
    assert check_resumable(meta, tmp_path, stage=3, dp=1, bf16=False) is False  # the fragments
    assert check_resumable(meta, tmp_path, stage=2, dp=2, bf16=False) is False
    with pytest.raises(ValueError, match=r"saved with bf16=False, this run has bf16=True"):
        check_resumable(meta, tmp_path, stage=3, dp=2, bf16=True)
    older = {k: v for k, v in meta.items() if k != "fragments"}
    assert check_resumable(older, tmp_path, stage=3, dp=2, bf16=False) is True
    with pytest.raises(ValueError, match=r"ZeRO-3 checkpoint from 2 data-parallel ranks without zero_fragments/ "
                                         r"\(saved by an older version\), and this run is ZeRO-2 on 1.*export "):
        check_resumable(older, tmp_path, stage=2, dp=1, bf16=False)


def test_missing_deepspeed_is_named_before_any_work(tmp_path, monkeypatch):
    from sfd_scale.parallel.deepspeed_engine import DeepSpeedEngine
    from sfd_scale.parallel.dims import ParallelDims

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    built = []
    cfg = tiny_sfd_config(tmp_path, parallel={"engine": "deepspeed"})
    with pytest.raises(ImportError, match=r"parallel.engine=deepspeed needs the deepspeed package.*"
                                          r"pip install deepspeed=="):
        DeepSpeedEngine(lambda: built.append(1), cfg, ParallelDims(), torch.device("cpu"))
    assert built == []  # failed before building the model


if __name__ == "__main__":
    _main()
