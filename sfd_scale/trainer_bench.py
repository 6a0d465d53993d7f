"""Throughput of the real `Trainer` (loader, loss draws, engine step, metric reads) on synthetic shards.

`launchers/bench.py` times the training step of one device on a batch already on it; this times
what a run does, on any engine and any number of processes (torchrun, deepspeed, srun): batches
from reference-layout shards through `ShardLoader`, the configured engine's step, the trainer's
loop and its metric reads. Engines that have the fused AdamW + EMA kernel (local, ddp, fsdp2) run
it twice, reading the metrics synchronously and with train.async_metrics; the host
synchronisations per step (CUDA's sync debug mode, rank 0) say whether the host still waits for
the GPU inside a step. Other engines (DeepSpeed, tensor parallel) run the synchronous loop.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import itertools
import json
import time
from pathlib import Path

import torch

from sfd_scale.config import SFDConfig
from sfd_scale.data.bench import make_bench_shards
from sfd_scale.parallel import distributed
from sfd_scale.parallel.dims import ParallelDims, has_fused_optimizer
from sfd_scale.profile_step import count_host_syncs, format_profile, profile_training_step
from sfd_scale.train.trainer import Trainer, resolve_device


def bench_run_config(cfg: SFDConfig, data_dir: Path, rank_batch: int, dims: ParallelDims,
                     async_metrics: bool) -> SFDConfig:
    """`cfg` on `data_dir` with `rank_batch` samples per data-parallel rank, the fused optimizer
    where the engine has it, no checkpoints or previews, and one log row per `fit` call."""
    fused = has_fused_optimizer(cfg.parallel)
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, data_dir=str(data_dir)),
        optim=dataclasses.replace(cfg.optim, fused_ema=fused),
        train=dataclasses.replace(cfg.train, global_batch_size=rank_batch * dims.dp, async_metrics=async_metrics,
                                  ckpt_every=0, sample_every=0, log_every=10**9, resume="never"),
        logging=dataclasses.replace(cfg.logging, wandb="disabled", progress_bar=False))


def time_trainer(cfg: SFDConfig, run_dir: Path, dims: ParallelDims, warmup_steps: int, steps: int,
                 profile_steps: int = 0, resident_batch: bool = False) -> dict:
    """Images/s of `steps` trainer steps after `warmup_steps` (all ranks), rank 0's host syncs
    over two steps, and with `profile_steps` a profile of that many more steps in one stretch of
    the loop (`sfd_scale.profile_step`: where the time goes, and where the GPU sat idle). With
    `resident_batch` the loop trains on its first batch over and over, already on the device, as
    `launchers/bench.py` does: the difference to a run with the loader is the loader's cost."""
    trainer = Trainer(cfg, run_dir, dims=dims)
    device = trainer.device
    if resident_batch:
        trainer.batches = itertools.repeat(next(trainer.batches))
    _train_on(trainer, warmup_steps)
    syncs = count_host_syncs(functools.partial(_train_on, trainer, 2), device)
    _synchronize(device)
    distributed.barrier()
    start = time.perf_counter()
    _train_on(trainer, steps)
    _synchronize(device)
    seconds = float(distributed.all_reduce(torch.tensor([time.perf_counter() - start]), op="max")[0])
    # The loop's last log row holds the window's peak: logging resets the peak counter after reading it.
    peak = _logged_peak_gib(run_dir) if device.type == "cuda" and dims.is_main else None
    profile = (profile_training_step(functools.partial(_train_on, trainer, profile_steps), device, profile_steps,
                                     steps_per_call=profile_steps) if profile_steps else None)
    del trainer
    torch._dynamo.reset()  # the next mode compiles afresh; CUDA-graph pools of this one are freed
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return {"async_metrics": cfg.train.async_metrics, "steps": steps,
            "images_per_s": steps * cfg.train.global_batch_size / seconds, "step_s_mean": seconds / steps,
            "host_syncs_per_step": None if syncs is None else syncs["count"] / 2,
            "host_sync_sites": None if syncs is None else syncs["sites"], "peak_mem_gib": peak,
            **({"profile": profile} if profile is not None else {})}


LOOPS = ("both", "sync", "async")
"""Which loop modes to time: both (where the engine has async metrics), or one of them."""


def run_trainer_benchmark(cfg: SFDConfig, rank_batch: int, warmup_steps: int, steps: int, samples: int,
                          work_dir: Path, profile_steps: int = 0, loops: str = "both",
                          resident_batch: bool = False) -> dict:
    """The loop modes asked for that the configured engine has, on the same shards (`samples`
    samples of the model's shapes, written once under `work_dir` by rank 0); every rank calls
    this. The last mode timed is also profiled over `profile_steps` steps."""
    if loops not in LOOPS:
        raise ValueError(f"loops={loops!r}: choose one of {', '.join(LOOPS)}")
    dims = ParallelDims.from_env(tp=cfg.parallel.tensor_parallel)
    device = resolve_device(cfg.train.device, dims.local_rank)
    if dims.world_size > 1:
        distributed.init_process_group(dims, cfg.parallel.backend, device)
    # Rank 0 writes (or reuses) the shards; a failure there reaches every rank at once.
    shard_dir = distributed.run_on_main(functools.partial(
        make_bench_shards, work_dir / "shards", num_shards=2, per_shard=samples // 2,
        texture_channels=cfg.model.in_channels - cfg.model.semantic_channels,
        semantic_channels=cfg.model.semantic_channels, dino_channels=cfg.model.repa_feature_dim,
        latent_size=cfg.model.input_size, num_classes=cfg.model.num_classes))
    fused = has_fused_optimizer(cfg.parallel)
    if loops == "async" and not fused:
        raise ValueError(f"parallel.engine={cfg.parallel.engine!r} has no async metrics loop (it needs the fused "
                         "optimizer): time --loops sync or both")
    if cfg.train.cuda_graph and loops != "async":
        raise ValueError("train.cuda_graph captures the async-metrics step only: time it with --loops async")
    modes = {"both": (False, True) if fused else (False,), "sync": (False,), "async": (True,)}[loops]
    runs = [time_trainer(bench_run_config(cfg, shard_dir, rank_batch, dims, mode), work_dir / f"run-{mode}",
                         dims, warmup_steps, steps, profile_steps if mode == modes[-1] else 0, resident_batch)
            for mode in modes]
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "model": cfg.model.size, "compile": cfg.model.compile,
            "compile_mode": cfg.model.compile_mode, "engine": cfg.parallel.engine, "world_size": dims.world_size,
            "batch_per_rank": rank_batch, "global_batch": rank_batch * dims.dp, "warmup_steps": warmup_steps,
            "fused_ema": fused, "cuda_graph": cfg.train.cuda_graph, "resident_batch": resident_batch, "runs": runs,
            "async_speedup": runs[1]["images_per_s"] / runs[0]["images_per_s"] if len(runs) == 2 else None}


def format_trainer_report(report: dict) -> str:
    lines = [f"{report['device']}, torch {report['torch']}, {report['model']}, engine {report['engine']} x "
             f"{report['world_size']}, batch {report['batch_per_rank']} per rank ({report['global_batch']} global), "
             f"compile {report['compile']} ({report['compile_mode']}), fused AdamW+EMA {report['fused_ema']}"
             + (", step replayed as CUDA graphs" if report.get("cuda_graph") else "")
             + (", one batch resident on the device (no loader)" if report.get("resident_batch") else ""),
             "| loop | images/s (all ranks) | s/step | host syncs/step (rank 0) | peak GiB (rank 0) |", "|---|---|---|---|---|"]
    for run in report["runs"]:
        syncs = "-" if run["host_syncs_per_step"] is None else f"{run['host_syncs_per_step']:g}"
        peak = "-" if run["peak_mem_gib"] is None else f"{run['peak_mem_gib']:.1f}"
        lines.append(f"| {'async metrics' if run['async_metrics'] else 'synchronous'} | {run['images_per_s']:.4g} | "
                     f"{run['step_s_mean']:.4g} | {syncs} | {peak} |")
        if run["host_sync_sites"]:
            lines.append("  synchronising lines: " + ", ".join(run["host_sync_sites"][:5]))
    lines += [format_profile(run["profile"]) for run in report["runs"] if "profile" in run]
    if report["async_speedup"] is not None:
        lines.append(f"async / synchronous: {report['async_speedup']:.3f}x images/s")
    return "\n".join(lines)


def _logged_peak_gib(run_dir: Path) -> float | None:
    """Rank 0's device-memory peak of the last logged window (`logging.memory_metrics`)."""
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(rows[-1]).get("mem_device_peak_gib") if rows else None


def _train_on(trainer: Trainer, steps: int) -> None:
    trainer.fit(trainer.step + steps, final_checkpoint=False)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
