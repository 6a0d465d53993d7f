"""ParallelDims from each launcher's environment, SLURM host lists, and config fit checks (no processes)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from fixtures import tiny_sfd_config
from sfd_scale.parallel.dims import ParallelDims, check_config_fits, expand_hostlist

REPO = Path(__file__).resolve().parents[1]

TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "node-a", "MASTER_PORT": "29500"}
SRUN = {"SLURM_PROCID": "6", "SLURM_LOCALID": "2", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]"}


def test_torchrun_environment():
    dims = ParallelDims.from_env(tp=2, env=TORCHRUN)
    assert (dims.world_size, dims.rank, dims.local_rank, dims.launcher) == (8, 5, 1, "torchrun")
    assert (dims.master_addr, dims.master_port) == ("node-a", 29500)
    # tensor parallel innermost: ranks 4, 5 form a tp group on data slice 2
    assert (dims.dp, dims.dp_rank, dims.tp_rank, dims.is_main) == (4, 2, 1, False)


def test_deepspeed_launcher_passes_local_rank_as_an_argument():
    dims = ParallelDims.from_env(env=TORCHRUN, local_rank_arg=1)
    assert (dims.local_rank, dims.launcher) == (1, "deepspeed")
    without_env = {k: v for k, v in TORCHRUN.items() if k != "LOCAL_RANK"}
    assert ParallelDims.from_env(env=without_env, local_rank_arg=3).local_rank == 3
    with pytest.raises(ValueError, match="--local_rank=2 disagrees with LOCAL_RANK=1"):
        ParallelDims.from_env(env=TORCHRUN, local_rank_arg=2)


def test_train_launcher_accepts_the_deepspeed_local_rank_argument():
    spec = importlib.util.spec_from_file_location("train_launcher", REPO / "launchers" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--config", "c.yaml", "--local_rank=3", "--set", "a.b=1"])
    assert (args.local_rank, args.overrides) == (3, ["a.b=1"])
    assert module.parse_args(["--config", "c.yaml"]).local_rank is None


def test_srun_environment():
    dims = ParallelDims.from_env(tp=2, env=SRUN)
    assert (dims.world_size, dims.rank, dims.local_rank, dims.launcher) == (8, 6, 2, "slurm")
    assert dims.master_addr == "gpu07"
    assert dims.master_port == 15000 + 123456 % 20000 == 18456
    assert (dims.dp, dims.dp_rank, dims.tp_rank) == (4, 3, 0)


def test_srun_prefers_the_step_over_the_job_and_explicit_master_variables():
    env = dict(SRUN, SLURM_NTASKS="16", SLURM_STEP_NUM_TASKS="4", SLURM_PROCID="1",
               SLURM_JOB_NODELIST="n[1-4]", SLURM_STEP_NODELIST="n[3-4]")
    dims = ParallelDims.from_env(env=env)
    assert (dims.world_size, dims.master_addr) == (4, "n3")
    job_list_only = {k: v for k, v in env.items() if k != "SLURM_STEP_NODELIST"}
    assert ParallelDims.from_env(env=job_list_only).master_addr == "n1"
    dims = ParallelDims.from_env(env=dict(env, MASTER_ADDR="head", MASTER_PORT="4000"))
    assert (dims.master_addr, dims.master_port) == ("head", 4000)


def test_a_batch_script_without_srun_is_one_process_only_if_the_job_has_one_task():
    # measured with slurm 22.05: the batch step has SLURM_NTASKS and SLURM_PROCID, no SLURM_STEP_*
    batch = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n[1-2]"}
    assert ParallelDims.from_env(env=dict(batch, SLURM_NTASKS="1")).world_size == 1
    with pytest.raises(ValueError, match="SLURM_NTASKS=2 but the process was not started by srun"):
        ParallelDims.from_env(env=dict(batch, SLURM_NTASKS="2"))


def test_torchrun_inside_an_allocation_wins_over_slurm_variables():
    dims = ParallelDims.from_env(env={**SRUN, **TORCHRUN})
    assert (dims.launcher, dims.rank, dims.world_size) == ("torchrun", 5, 8)


def test_nothing_set_is_one_process():
    dims = ParallelDims.from_env(env={})
    assert (dims.world_size, dims.rank, dims.dp, dims.launcher, dims.master_port) == (1, 0, 1, "single", None)
    with pytest.raises(ValueError, match="--local_rank=1 was passed but RANK/WORLD_SIZE are not set"):
        ParallelDims.from_env(env={}, local_rank_arg=1)


def test_missing_or_malformed_variables_are_named():
    with pytest.raises(ValueError, match="lacks MASTER_PORT"):
        ParallelDims.from_env(env={k: v for k, v in TORCHRUN.items() if k != "MASTER_PORT"})
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        ParallelDims.from_env(env=dict(TORCHRUN, RANK="x"))
    with pytest.raises(ValueError, match="lacks SLURM_LOCALID"):
        ParallelDims.from_env(env={k: v for k, v in SRUN.items() if k != "SLURM_LOCALID"})
    with pytest.raises(ValueError, match="rank 8, local rank 1, world size 8"):
        ParallelDims.from_env(env=dict(TORCHRUN, RANK="8"))


def test_degrees_that_do_not_divide_print_every_degree():
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by parallel.tensor_parallel=4.*"
                                         r"world 6 = dp 1.5 x tp 4"):
        ParallelDims(world_size=6, rank=0, tp=4)
    with pytest.raises(ValueError, match=r"tensor_parallel=3 must be one of \(1, 2, 4, 8\)"):
        ParallelDims(world_size=6, rank=0, tp=3)


@pytest.mark.parametrize("text, hosts", [
    ("n[1-3,5]", ["n1", "n2", "n3", "n5"]),
    ("gpu-a[001-002],login", ["gpu-a001", "gpu-a002", "login"]),
    ("node7", ["node7"]),
    ("r[1-2]-n[08-09]", ["r1-n08", "r1-n09", "r2-n08", "r2-n09"]),
    ("a[9-10],b[2]", ["a9", "a10", "b2"]),
])
def test_hostlist_expansion(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("bad", ["n[1-", "n1-3]", "n[3-1]", "n[a-b]", ""])
def test_malformed_hostlists_are_rejected(bad):
    with pytest.raises(ValueError, match="host list"):
        expand_hostlist(bad)


def _cfg(**parallel):
    return tiny_sfd_config(Path("/nonexistent"), parallel=parallel)


def test_config_checks_name_the_setting_and_the_degrees():
    two = ParallelDims(world_size=2, rank=0, master_port=1)
    with pytest.raises(ValueError, match=r"engine=local runs one process.*started 2 \(world 2 = dp 2 x tp 1"):
        check_config_fits(_cfg(engine="local"), two)
    six = ParallelDims(world_size=6, rank=0, master_port=1)
    with pytest.raises(ValueError, match=r"global_batch_size=8 is not divisible by dp 6 x "
                                         r"parallel.grad_accum_steps 1 = 6"):
        check_config_fits(_cfg(engine="ddp"), six)
    with pytest.raises(ValueError, match=r"dp 2 x parallel.grad_accum_steps 8 = 16"):
        check_config_fits(_cfg(engine="fsdp2", grad_accum_steps=8), two)
    with pytest.raises(ValueError, match="checkpoint_attention_only needs parallel.activation_checkpointing"):
        check_config_fits(_cfg(engine="ddp", checkpoint_attention_only=True), two)
    with pytest.raises(ValueError, match=r"tensor_parallel=2 but the process layout was built with tp 1"):
        check_config_fits(_cfg(engine="ddp", tensor_parallel=2), two)
    check_config_fits(_cfg(engine="ddp", grad_accum_steps=2), two)  # 8 = 2 ranks x 2 micro x 2


def test_fast_paths_that_an_engine_cannot_run_are_refused_before_any_work():
    two = ParallelDims(world_size=2, rank=0, master_port=1)
    compiled = tiny_sfd_config(Path("/nonexistent"), parallel=dict(engine="deepspeed", zero_stage=3),
                               model=dict(compile="blocks"))
    with pytest.raises(ValueError, match=r"model.compile=blocks does not work with DeepSpeed ZeRO-3"):
        check_config_fits(compiled, two)
    compiled.parallel.zero_stage = 2           # ZeRO-1/2 keep whole parameters: compile runs
    check_config_fits(compiled, two)
    tp = ParallelDims(world_size=2, rank=0, master_port=1, tp=2)
    fused = tiny_sfd_config(Path("/nonexistent"), parallel=dict(engine="ddp", tensor_parallel=2),
                            model=dict(fused_kernels=True))
    with pytest.raises(ValueError, match=r"tensor_parallel=2 runs megatron-core's linear layers eagerly"):
        check_config_fits(fused, tp)
    fp8 = tiny_sfd_config(Path("/nonexistent"), parallel=dict(engine="deepspeed", zero_stage=3), model=dict(fp8="rowwise"))
    with pytest.raises(ValueError, match=r"model.fp8=rowwise does not work with DeepSpeed ZeRO-3"):
        check_config_fits(fp8, two)
