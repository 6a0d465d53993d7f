"""launchers/*.slurm on a real SLURM cluster: slurmctld and two slurmd "nodes" on this machine.

tests/slurm/start.sh starts the cluster in a fresh folder (free ports, its own state); every job
is the real batch script, submitted with sbatch in its CPU test mode (TEST_MODE=cpu: the demo's
tiny model, gloo) on both nodes, so master-address discovery and the per-node launchers run for
real. All jobs are submitted at once by the `jobs` fixture and checked by the tests below; the
cluster is stopped in any case, and the module fails if a process of it is left behind.

The cluster tests are skipped where SLURM is not installed or this is not root (`.ci/run`
installs Debian's slurm-wlm and sets SFD_REQUIRE_SLURM=1, so CI runs them); the two tests at
the end (rendezvous probe, logged throughput) need no cluster.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fixtures import write_latent_folder
from sfd_scale.bench import count_step_flops
from sfd_scale.config import SFDConfig, from_dict, to_dict
from sfd_scale.logging import MetricsLogger
from sfd_scale.models.dinov2 import DinoViT
from sfd_scale.models.semantic_vae import SemanticVAE
from sfd_scale.models.texture_vae import AutoencoderKL
from sfd_scale.models.weights import save_weights
from sfd_scale.parallel.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPTS = REPO / "tests" / "slurm"
STEPS = 80          # training steps of the reference and the preempted run
JOB_TIMEOUT = 150   # seconds any one wait may take

SBIN_PATH = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"  # where Debian puts the daemons


def _why_no_cluster() -> str | None:
    # CI (.ci/run) installs SLURM and sets SFD_REQUIRE_SLURM=1: there a missing SLURM is a failure.
    if os.environ.get("SFD_REQUIRE_SLURM") == "1":
        return None
    if not all(shutil.which(tool, path=SBIN_PATH) for tool in ("slurmctld", "slurmd", "sbatch")):
        return "SLURM is not installed here (apt-get install slurm-wlm; .ci/run does)"
    if os.geteuid() != 0:
        return "slurmd runs jobs as their user and must run as root"
    return None


needs_cluster = pytest.mark.skipif(_why_no_cluster() is not None, reason=str(_why_no_cluster()))


# ----------------------------------------------------------------------------------------------
# The cluster
# ----------------------------------------------------------------------------------------------
@dataclass
class Cluster:
    scratch: Path
    env: dict[str, str]

    def run(self, *cmd: str, check: bool = True) -> str:
        out = subprocess.run(cmd, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=30)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr}")
        return out.stdout

    def submit(self, script: str, name: str, variables: dict[str, str], *sbatch: str) -> str:
        env = {**self.env, "RUN_ROOT": str(self.scratch / "runs"), "TEST_MODE": "cpu", **variables}
        cmd = ["sbatch", "--parsable", f"--job-name={name}", "--nodes=2", "--gpus-per-node=0",
               "--oversubscribe", "--cpus-per-task=1", "--time=30",
               f"--output={self.scratch}/logs/%x-%j.out", *sbatch, f"launchers/{script}"]
        out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (finished jobs stay listed for MinJobAge = 600 s)."""
        line = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(item.split("=", 1) for item in line.split() if "=" in item)

    def wait(self, job_id: str, until, what: str) -> dict[str, str]:
        deadline = time.monotonic() + JOB_TIMEOUT
        while True:
            info = self.job(job_id)
            if until(info):
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not {what} after {JOB_TIMEOUT} s: {info.get('JobState')} "
                                     f"({info.get('Reason')})\n{self.log_of(job_id)[-3000:]}")
            time.sleep(0.2)

    def finished(self, job_id: str) -> dict[str, str]:
        def done(info):
            never = info.get("JobState") == "PENDING" and info.get("Reason") == "DependencyNeverSatisfied"
            return never or info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
        return self.wait(job_id, done, "finished")

    def log_of(self, job_id: str) -> str:
        logs = list((self.scratch / "logs").glob(f"*-{job_id}.out"))
        return logs[0].read_text() if logs else "<no log>"

    def run_dir(self, name: str) -> Path:
        return self.scratch / "runs" / name


def _our_processes(marker: str) -> list[str]:
    """Processes whose environment holds this cluster's SLURM_CONF (daemons, steps, job processes)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes().split(b"\0"):
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{proc.name} {command}")
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("slurm")
    (scratch / "logs").mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "WANDB_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                   "MASTER_ADDR", "MASTER_PORT")}
    env["SLURM_CONF"] = str(scratch / "cluster" / "slurm.conf")
    env["PATH"] = SBIN_PATH
    # The cluster scripts get no SLURM_CONF of ours: stop.sh counts any process that has it.
    started = subprocess.run(["bash", str(CLUSTER_SCRIPTS / "start.sh"), str(scratch / "cluster")],
                             capture_output=True, text=True, timeout=60, env=dict(os.environ, PATH=SBIN_PATH))
    try:
        assert started.returncode == 0, f"the test cluster did not start:\n{started.stdout}\n{started.stderr}"
        yield Cluster(scratch, env)
    finally:
        stopped = subprocess.run(["bash", str(CLUSTER_SCRIPTS / "stop.sh"), str(scratch / "cluster")],
                                 capture_output=True, text=True, timeout=120, env=dict(os.environ, PATH=SBIN_PATH))
        left = _our_processes(f"SLURM_CONF={env['SLURM_CONF']}")
        strays = [line for line in stopped.stdout.splitlines() if line.startswith("stray ")]
        assert not left and not strays, f"processes left behind by the cluster: {left or strays}"


# ----------------------------------------------------------------------------------------------
# Inputs shaped like the CPU demo (TEST_MODE=cpu uses configs/demo.yaml's sfd section)
# ----------------------------------------------------------------------------------------------
def _demo_config() -> SFDConfig:
    return from_dict(SFDConfig, yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["sfd"], "demo")


def _inputs(root: Path) -> dict[str, Path]:
    cfg = _demo_config()
    m = cfg.model
    torch.manual_seed(0)
    paths = {"data": write_latent_folder(root / "latents", n=64, shard_size=32,
                                         c_tex=m.in_channels - m.semantic_channels, c_sem=m.semantic_channels,
                                         c_dino=m.repa_feature_dim, hw=m.input_size, num_classes=m.num_classes)}
    for name, module in (("vae", AutoencoderKL(cfg.encoders.texture_vae)), ("dino", DinoViT(cfg.encoders.dino)),
                         ("semvae", SemanticVAE(cfg.encoders.semvae))):
        paths[name] = root / f"{name}.safetensors"
        save_weights(paths[name], module.state_dict())
    rng = np.random.default_rng(0)
    for k in range(20):  # 2 images for each of the 10 classes
        folder = root / "images" / f"class{k % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    paths["images"] = root / "images"
    return paths


@pytest.fixture(scope="module")
def jobs(cluster):
    """Every job of this module, submitted at once so that they run side by side."""
    inputs = _inputs(cluster.scratch / "inputs")
    data = str(inputs["data"])
    train = dict(DATA_DIR=data, MAX_STEPS=str(STEPS), CKPT_EVERY="30")
    ids = {
        # Uninterrupted reference, one task per rank (srun), no wandb.
        "ref": cluster.submit("xl.slurm", "ref", dict(train, LAUNCHER="srun", WANDB="disabled")),
        # To be preempted: torchrun on each node, wandb offline.
        "pre": cluster.submit("xl.slurm", "pre", dict(train, LAUNCHER="torchrun")),
        # To be cancelled (SIGTERM to every process): one srun task per rank, 2 per node.
        "term": cluster.submit("xl.slurm", "term", dict(train, LAUNCHER="srun", NPROC_PER_NODE="2",
                                                        WANDB="disabled"), "--cpus-per-task=2"),
        # The deepspeed launcher on each node, with sample grids from a (random) texture VAE.
        "ds": cluster.submit("xl.slurm", "ds", dict(DATA_DIR=data, LAUNCHER="deepspeed", MAX_STEPS="12",
                                                    SAMPLE_EVERY="6", VAE_CHECKPOINT=str(inputs["vae"]))),
        "extract": cluster.submit("extract.slurm", "extract", dict(
            IMAGES=str(inputs["images"]), DATA_DIR=str(cluster.scratch / "extracted"), SHARD_SIZE="8",
            BATCH_SIZE="8", VAE_CHECKPOINT=str(inputs["vae"]), DINO_CHECKPOINT=str(inputs["dino"]),
            SEMVAE_CHECKPOINT=str(inputs["semvae"]))),
        # Bad input: each must fail before launch, naming the wrong value.
        "no_data": cluster.submit("xl.slurm", "no_data", {"DATA_DIR": str(cluster.scratch / "nowhere")}),
        "no_host": cluster.submit("xl.slurm", "no_host", dict(DATA_DIR=data, MASTER_ADDR="no-such-host.invalid")),
        "batch": cluster.submit("xl.slurm", "batch", dict(DATA_DIR=data, GLOBAL_BATCH="7")),
        # This cluster has no GPUs: the job sees SLURM_GPUS_ON_NODE=2 as if SLURM had set it.
        "gpus": cluster.submit("xxl.slurm", "gpus", dict(DATA_DIR=data, TEST_MODE="", SLURM_GPUS_ON_NODE="2",
                                                         NPROC_PER_NODE="4")),
    }
    # Sampling starts when the reference run has finished well (a real SLURM dependency).
    ids["sample"] = cluster.submit("sample.slurm", "sample", dict(
        CHECKPOINT=str(cluster.run_dir("ref") / "checkpoints" / f"step-{STEPS:08d}"), DATA_DIR=data,
        VAE_CHECKPOINT=str(inputs["vae"])), f"--dependency=afterok:{ids['ref']}")
    return ids


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.fixture(scope="module")
def signalled(cluster, jobs):
    """SIGUSR1 to the batch script of `pre` and a plain cancel (SIGTERM to every process of the
    job, as a scheduler's preemption) of `term`, each as soon as it has logged 3 training steps."""
    commands = {"pre": ("scancel", "--signal=USR1", "--batch"), "term": ("scancel",)}
    deadline = time.monotonic() + JOB_TIMEOUT
    while commands:
        for name in list(commands):
            if len(_rows(cluster.run_dir(name))) >= 3:
                cluster.run(*commands.pop(name), jobs[name])
            else:
                log = cluster.log_of(jobs[name])[-3000:]
                assert time.monotonic() < deadline, f"{name}: no training steps logged:\n{log}"
                assert cluster.job(jobs[name])["JobState"] in ("PENDING", "RUNNING"), log
        time.sleep(0.05)


def _assert_completed(cluster: Cluster, job_id: str) -> dict[str, str]:
    info = cluster.finished(job_id)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), cluster.log_of(job_id)[-4000:]
    return info


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------
@needs_cluster
def test_usr1_checkpoints_requeues_and_resumes_the_same_run(cluster, jobs, signalled):
    job, run = jobs["pre"], cluster.run_dir("pre")
    # It checkpoints, requeues itself, and waits for SLURM's requeue delay, which we skip.
    cluster.wait(job, lambda i: i["JobState"] == "PENDING" and i["Restarts"] == "1", "requeued")
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    _assert_completed(cluster, job)
    _assert_completed(cluster, jobs["ref"])

    log = cluster.log_of(job)
    stops = [line for line in log.splitlines() if "[rank 0]" in line and "checkpointing step" in line]
    assert len(stops) == 1, log[-4000:]
    stop = int(stops[0].split("checkpointing step ")[1].split()[0])
    assert 3 <= stop < STEPS
    assert "got SIGUSR1" in log and f"checkpoint step {stop} -> " in log and "requeueing job" in log
    assert f"job {job} (pre), restart 1" in log and f"resumed from step {stop} " in log
    assert "another rank's stop signal" in log  # rank 1, on the other node, stopped with rank 0

    # Steps 1..STEPS exactly once, with the losses of the uninterrupted run: no batch was
    # repeated or skipped across the requeue (the other run used srun instead of torchrun).
    rows, ref = _rows(run), _rows(cluster.run_dir("ref"))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]

    # The requeued job continued the same (offline) wandb run.
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders)
    assert all((f / f"run-{run_id}.wandb").is_file() for f in folders)


@needs_cluster
def test_sigterm_checkpoints_the_step_boundary_without_requeue(cluster, jobs, signalled):
    job, run = jobs["term"], cluster.run_dir("term")
    info = cluster.finished(job)
    log = cluster.log_of(job)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), log[-4000:]
    assert "srun launcher, engine ddp, world 4 = 2 node(s) x 2" in log
    # Every rank stops at one agreed step; a rank whose own SIGTERM lands after the agreement
    # reports "another rank's stop signal" instead.
    stops = [line for line in log.splitlines() if "stop requested (" in line]
    assert len(stops) == 4 and any("stop requested (SIGTERM)" in line for line in stops), log[-4000:]
    stop = int(stops[0].split("checkpointing step ")[1].split()[0])
    assert all(f"checkpointing step {stop} on every rank" in line for line in stops)
    assert (run / "checkpoints" / f"step-{stop:08d}" / "manifest.json").is_file()
    assert [r["step"] for r in _rows(run)] == list(range(1, stop + 1))
    assert "got SIGTERM" in log and "requeueing" not in log


@needs_cluster
def test_two_node_training_checkpoints_and_exits_cleanly(cluster, jobs):
    info = _assert_completed(cluster, jobs["ref"])
    assert info["NodeList"] == "n[1-2]" and info["Restarts"] == "0"
    run, log = cluster.run_dir("ref"), cluster.log_of(jobs["ref"])
    assert "rendezvous MASTER_ADDR=127.0.0.1" in log                 # n1's NodeAddr
    assert "srun launcher, engine ddp, world 2 = 2 node(s) x 1" in log
    assert "process group: gloo backend, world 2" in log
    assert (run / "checkpoints" / f"step-{STEPS:08d}" / "manifest.json").is_file()
    assert [r["step"] for r in _rows(run)] == list(range(1, STEPS + 1))
    assert "training step ended with exit status 0" in log


@needs_cluster
def test_deepspeed_launcher_logs_throughput_memory_and_sample_grids(cluster, jobs):
    _assert_completed(cluster, jobs["ds"])
    _assert_completed(cluster, jobs["ref"])
    run = cluster.run_dir("ds")
    log = cluster.log_of(jobs["ds"])
    assert "deepspeed launcher, engine ddp, world 2" in log and "launcher deepspeed" in log
    rows = _rows(run)
    steps = [r for r in rows if "loss" in r]
    # Same world size and data as the reference: the same losses, whichever launcher.
    assert [r["loss"] for r in steps] == [r["loss"] for r in _rows(cluster.run_dir("ref"))[:12]]
    flops_per_image = count_step_flops(_demo_config().model, 1, with_repa=True)
    for r in steps:
        assert {"mse", "cos", "repa", "grad_norm", "lr"} <= r.keys()
        assert r["tflops_per_s"] == pytest.approx(r["images_per_s"] * flops_per_image / 1e12)
        assert r["tflops_per_s_per_device"] == pytest.approx(r["tflops_per_s"] / 2)   # 2 ranks
        assert 0 < r["mem_host_peak_gib"] < 64
    grids = [r for r in rows if "samples" in r]
    assert [r["step"] for r in grids][:2] == [6, 12] and all(Path(r["samples"]).is_file() for r in grids)


@needs_cluster
def test_extraction_on_two_nodes(cluster, jobs):
    _assert_completed(cluster, jobs["extract"])
    out = cluster.scratch / "extracted"
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) == 3, shards   # 20 images in shards of 8, shared out over the 2 ranks
    assert (out / "latents_stats.pt").is_file() and (out / "latents_sv_stats.pt").is_file()
    assert "world 2 = 2 node(s) x 1" in cluster.log_of(jobs["extract"])


@needs_cluster
def test_sampling_after_training(cluster, jobs):
    _assert_completed(cluster, jobs["sample"])
    npz = np.load(cluster.run_dir("sample") / "samples.npz")
    size = _demo_config().encoders.texture_vae.resolution
    assert npz["arr_0"].shape == (20, size, size, 3) and npz["arr_0"].dtype == np.uint8
    assert sorted(np.bincount(npz["labels"]).tolist()) == [2] * 10   # balanced over 10 classes


@needs_cluster
@pytest.mark.parametrize("name, message", [
    ("no_data", "ERROR: DATA_DIR={scratch}/nowhere is not a folder"),
    ("no_host", "ERROR: rendezvous check failed: MASTER_ADDR=no-such-host.invalid does not resolve on node n1"),
    ("batch", "ERROR: the configuration does not fit 2 process(es) (2 node(s) x NPROC_PER_NODE=1): ValueError: "
              "train.global_batch_size=7 is not divisible by dp 2"),
    ("gpus", "ERROR: NPROC_PER_NODE=4 processes per node but only 2 GPU(s) are allocated on node n1"),
], ids=["missing_data", "unresolvable_master", "batch_does_not_fit", "more_ranks_than_gpus"])
def test_bad_input_fails_before_launch_naming_the_value(cluster, jobs, name, message):
    info = cluster.finished(jobs[name])
    log = cluster.log_of(jobs[name])
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), log
    assert message.format(scratch=cluster.scratch) in log
    assert "launch:" not in log and not cluster.run_dir(name).joinpath("metrics.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# The rendezvous probe on its own (no cluster needed)
# ----------------------------------------------------------------------------------------------
def _probe(addr: str, port: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, MASTER_ADDR=addr, MASTER_PORT=str(port), SLURMD_NODENAME="n7")
    return subprocess.run(["bash", "-c", "source launchers/slurm_common.sh && sfd_probe_master"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=30)


def test_probe_accepts_a_reachable_free_port_and_names_a_busy_or_unknown_master():
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        busy = listening.getsockname()[1]
        out = _probe("127.0.0.1", busy)
        assert out.returncode == 1
        assert out.stdout.strip() == (f"MASTER_PORT={busy} is already in use on MASTER_ADDR=127.0.0.1 (seen from "
                                      "node n7): set MASTER_PORT to a free port")
    assert _probe("127.0.0.1", free_port()).returncode == 0   # refused: the host answered, the port is free
    out = _probe("no-such-host.invalid", 15000)
    assert (out.returncode, out.stdout.strip()) == (1, "MASTER_ADDR=no-such-host.invalid does not resolve on node n7")


# ----------------------------------------------------------------------------------------------
# What every logged row carries besides the loss (no cluster needed)
# ----------------------------------------------------------------------------------------------
def test_metrics_rows_get_tflops_mfu_and_memory(tmp_path, monkeypatch):
    cfg = _demo_config()
    monkeypatch.setenv("SFD_PEAK_TFLOPS", "0.5")   # per device; CPUs have no datasheet figure
    with MetricsLogger(tmp_path, to_dict(cfg), wandb_mode="disabled") as logger:
        logger.log(1, {"loss": 1.0, "images_per_s": 100.0})
        logger.log(2, {"loss": 1.0})
    with_rate, without = _rows(tmp_path)
    tflops = 100.0 * count_step_flops(cfg.model, 1, with_repa=True) / 1e12
    assert with_rate["tflops_per_s"] == pytest.approx(tflops)
    assert with_rate["tflops_per_s_per_device"] == pytest.approx(tflops)     # one process
    assert with_rate["mfu"] == pytest.approx(tflops / 0.5)
    assert "tflops_per_s" not in without and without["mem_host_peak_gib"] >= with_rate["mem_host_peak_gib"] > 0
