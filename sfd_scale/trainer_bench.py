"""Throughput of the real `Trainer` (loader, loss draws, engine step, metric reads) on synthetic shards.

`launchers/bench.py` times the training step on a batch already on the device; this times what a
run does: batches from reference-layout shards through `ShardLoader`, the trainer's loop and its
metric reads, with train.async_metrics off and on, in one process. The difference to the step
benchmark is what the loop costs; the host synchronisations per step (CUDA's sync debug mode)
say whether the host still waits for the GPU inside a step.
"""
from __future__ import annotations

import dataclasses
import gc
import tempfile
import time
from pathlib import Path

import torch

from sfd_scale.config import SFDConfig
from sfd_scale.data.bench import make_bench_shards
from sfd_scale.profile_step import count_host_syncs
from sfd_scale.train.trainer import Trainer, resolve_device


def bench_run_config(cfg: SFDConfig, data_dir: Path, batch_size: int, async_metrics: bool) -> SFDConfig:
    """`cfg` on `data_dir`, one process, batch `batch_size`, the fused optimizer, no checkpoints
    or previews, and one log row per `fit` call."""
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, data_dir=str(data_dir)),
        optim=dataclasses.replace(cfg.optim, fused_ema=True),
        parallel=dataclasses.replace(cfg.parallel, engine="local", grad_accum_steps=1),
        train=dataclasses.replace(cfg.train, global_batch_size=batch_size, async_metrics=async_metrics,
                                  ckpt_every=0, sample_every=0, log_every=10**9, resume="never"),
        logging=dataclasses.replace(cfg.logging, wandb="disabled", progress_bar=False))


def time_trainer(cfg: SFDConfig, run_dir: Path, warmup_steps: int, steps: int) -> dict:
    """Images/s of `steps` trainer steps after `warmup_steps`, and the host syncs of two steps."""
    trainer = Trainer(cfg, run_dir)
    device = trainer.device
    trainer.fit(warmup_steps, final_checkpoint=False)
    syncs = count_host_syncs(lambda: trainer.fit(trainer.step + 2, final_checkpoint=False), device)
    _synchronize(device)
    start = time.perf_counter()
    trainer.fit(trainer.step + steps, final_checkpoint=False)
    _synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return {"async_metrics": cfg.train.async_metrics, "steps": steps,
            "images_per_s": steps * cfg.train.global_batch_size / seconds, "step_s_mean": seconds / steps,
            "host_syncs_per_step": None if syncs is None else syncs["count"] / 2,
            "host_sync_sites": None if syncs is None else syncs["sites"], "peak_mem_gib": peak}


def run_trainer_benchmark(cfg: SFDConfig, batch_size: int, warmup_steps: int, steps: int,
                          samples: int, shard_dir: Path | None = None) -> dict:
    """Both loop modes on the same shards (made once: `samples` samples of the model's shapes)."""
    device = resolve_device(cfg.train.device)
    with tempfile.TemporaryDirectory(prefix="sfd-trainer-bench-") as tmp:
        data_dir = make_bench_shards(
            shard_dir or Path(tmp) / "shards", num_shards=2, per_shard=samples // 2,
            texture_channels=cfg.model.in_channels - cfg.model.semantic_channels,
            semantic_channels=cfg.model.semantic_channels, dino_channels=cfg.model.repa_feature_dim,
            latent_size=cfg.model.input_size, num_classes=cfg.model.num_classes)
        runs = [time_trainer(bench_run_config(cfg, data_dir, batch_size, mode), Path(tmp) / f"run-{mode}",
                             warmup_steps, steps) for mode in (False, True)]
    sync, lagged = runs
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "model": cfg.model.size, "compile": cfg.model.compile,
            "compile_mode": cfg.model.compile_mode, "batch_size": batch_size, "warmup_steps": warmup_steps,
            "runs": runs, "async_speedup": lagged["images_per_s"] / sync["images_per_s"]}


def format_trainer_report(report: dict) -> str:
    lines = [f"{report['device']}, torch {report['torch']}, {report['model']}, batch {report['batch_size']}, "
             f"compile {report['compile']} ({report['compile_mode']})",
             "| loop | images/s | s/step | host syncs/step | peak GiB |", "|---|---|---|---|---|"]
    for run in report["runs"]:
        syncs = "-" if run["host_syncs_per_step"] is None else f"{run['host_syncs_per_step']:g}"
        peak = "-" if run["peak_mem_gib"] is None else f"{run['peak_mem_gib']:.1f}"
        lines.append(f"| {'async metrics' if run['async_metrics'] else 'synchronous'} | {run['images_per_s']:.4g} | "
                     f"{run['step_s_mean']:.4g} | {syncs} | {peak} |")
        if run["host_sync_sites"]:
            lines.append("  synchronising lines: " + ", ".join(run["host_sync_sites"][:5]))
    lines.append(f"async / synchronous: {report['async_speedup']:.3f}x images/s")
    return "\n".join(lines)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
