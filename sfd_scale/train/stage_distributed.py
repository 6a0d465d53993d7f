"""The engine loop of the auxiliary stages trained at scale (the Semantic VAE).

The SFD Trainer's step without its SFD parts (latent loader, diffusion loss, numerical guard,
previews): forward and backward per micro-batch -> clip -> AdamW -> EMA on any Engine (local,
ddp, fsdp2, deepspeed), metrics averaged over ranks and logged by rank 0, collective checkpoints
in a CheckpointStore, exact resume.

What the caller provides:
* the module the engine wraps returns its loss terms from `forward(*inputs)` (a dict with
  'loss', each term a mean over the rows it was given), so every engine sees one forward;
* `batches(step, generator)` returns this data-parallel rank's contiguous block of the step's
  global batch (rows first) and draws from `generator` the random numbers of the WHOLE global
  batch, keeping its rows. Every rank then leaves the generator in the same state and any number
  of ranks takes the single-process step. Which samples form a step's batch must be a function
  of the step: only the generator, the counters and the process RNGs are saved here.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from sfd_scale.config import StageRunConfig, StageTraining
from sfd_scale.logging import MetricsLogger
from sfd_scale.parallel import distributed
from sfd_scale.parallel.dims import ParallelDims
from sfd_scale.parallel.engine import Engine
from sfd_scale.train.checkpoint import CheckpointStore, write_state
from sfd_scale.train.collective_checkpoint import (check_same_manifest, latest_resumable_step, restore_rank_rng,
                                                   save_collective, save_rank_rng)
from sfd_scale.train.trainer import autocast_for

log = logging.getLogger(__name__)

RankBatchFn = Callable[[int, torch.Generator], tuple[torch.Tensor, ...]]
"""(step, generator) -> this rank's block of the step's global batch; see the module docstring."""

STATE_ENTRY = "stage"
"""Checkpoint entry with the loop's own state: the noise generator and the counters."""


class EngineStage:
    """Trains the module behind `engine` for `training.steps` optimizer steps of
    `training.batch_size` samples (the global batch), checkpointing into `run_dir/checkpoints`."""

    def __init__(self, name: str, engine: Engine, dims: ParallelDims, device: torch.device,
                 batches: RankBatchFn, training: StageTraining, run: StageRunConfig, run_dir: Path,
                 accum_steps: int, config: dict[str, Any], architecture: dict[str, Any]) -> None:
        """`config` (plain data) goes into checkpoints and the metrics log; `architecture` is
        the part of it a resumed run must agree with."""
        if training.steps <= 0:
            raise ValueError(f"{name}: training.steps must be positive, got {training.steps}")
        self.name = name
        self.engine = engine
        self.dims = dims
        self.device = device
        self.batches = batches
        self.training = training
        self.run = run
        self.run_dir = Path(run_dir)
        self.accum_steps = accum_steps
        self.config = config
        self.architecture = architecture
        self.store = CheckpointStore(self.run_dir / "checkpoints", keep_last=run.keep_last)
        # Every rank draws the whole global batch's random numbers from this generator.
        self.generator = torch.Generator().manual_seed(training.seed + 1)
        self.step = 0
        self.skipped_steps = 0
        self._saved_step: int | None = None

    # ------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimizer step over this rank's block of the global batch, in micro-batches."""
        inputs = self.batches(self.step, self.generator)
        rows = inputs[0].shape[0]
        if rows % self.accum_steps:
            raise ValueError(f"{self.name}: {rows} rows per rank do not split into "
                             f"parallel.grad_accum_steps={self.accum_steps} micro-batches")
        micro = rows // self.accum_steps
        self.engine.zero_grad()
        sums: dict[str, torch.Tensor] = {}
        for k in range(self.accum_steps):
            part = [t[k * micro:(k + 1) * micro].to(self.device, non_blocking=True) for t in inputs]
            with self.engine.micro_step(last=k == self.accum_steps - 1):
                with autocast_for(self.run.precision, self.device):
                    terms = self.engine.model(*part)
                self.engine.backward(terms["loss"] / self.accum_steps)
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float() / self.accum_steps
        stats = self.engine.step(self.training.lr, sums["loss"])
        metrics = dict(zip(sums, torch.stack(list(sums.values())).tolist()))  # one device sync
        metrics.update(grad_norm=stats.grad_norm, lr=self.training.lr)
        if stats.skipped:  # the engine decided for all ranks together
            self.skipped_steps += 1
            if self.dims.is_main:
                log.warning("%s step %d: non-finite loss %.4g or grad norm %.4g, update skipped (%d so far)",
                            self.name, self.step + 1, metrics["loss"], stats.grad_norm, self.skipped_steps)
        self.step += 1
        return metrics

    def fit(self) -> None:
        """Train to `training.steps`, logging every `run.log_every` steps (averaged over ranks,
        written by rank 0) and checkpointing every `run.ckpt_every` steps and at the end."""
        end, run = self.training.steps, self.run
        logger = (MetricsLogger(self.run_dir, self.config, wandb_mode=run.wandb, project=run.project)
                  if self.dims.is_main else None)
        window: dict[str, float] = {}
        steps_in_window, t0 = 0, time.perf_counter()
        try:
            while self.step < end:
                for key, value in self.train_step().items():
                    window[key] = window.get(key, 0.0) + value
                steps_in_window += 1
                if self.step % run.log_every == 0 or self.step == end:
                    row = {k: v / steps_in_window for k, v in distributed.mean_over_ranks(window).items()}
                    row["images_per_s"] = steps_in_window * self.training.batch_size / (time.perf_counter() - t0)
                    row["skipped_steps"] = self.skipped_steps
                    if logger is not None:
                        logger.log(self.step, row)
                    log.info("%s step %d/%d: %s", self.name, self.step, end,
                             ", ".join(f"{k} {row[k]:.4g}" for k in sorted(row, key=lambda k: k != "loss")))
                    window, steps_in_window, t0 = {}, 0, time.perf_counter()
                if run.ckpt_every > 0 and self.step % run.ckpt_every == 0:
                    self.save_checkpoint()
            if self._saved_step != self.step:
                self.save_checkpoint()
        finally:
            if logger is not None:
                logger.close()

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The loop's own state, identical on every rank."""
        return {"rng": {"noise": self.generator.get_state()},
                "counters": {"step": self.step, "skipped_steps": self.skipped_steps}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["rng"]["noise"])
        self.step = int(state["counters"]["step"])
        self.skipped_steps = int(state["counters"]["skipped_steps"])

    def save_checkpoint(self) -> Path:
        """Collective: engine shards, every rank's process RNG, and (rank 0) the loop state."""
        meta = {"step": self.step, "stage": self.name, "config": self.config,
                "architecture": self.architecture, "engine": type(self.engine).__name__,
                "layout": self.engine.layout, "world_size": self.dims.world_size, "dp": self.dims.dp}
        state = self.state_dict()

        def write(folder: Path) -> None:
            self.engine.save(folder)
            save_rank_rng(folder, self.dims.rank)
            if self.dims.is_main:
                write_state(folder, STATE_ENTRY, state)

        path = save_collective(self.store, self.step, write, meta, [STATE_ENTRY])
        self._saved_step = self.step
        log.info("%s checkpoint step %d -> %s", self.name, self.step, path)
        return path

    def maybe_resume(self) -> bool:
        """Resume from the highest complete, verified checkpoint according to run.resume; every
        rank loads the step rank 0 chose and verified."""
        step = latest_resumable_step(self.store, self.run.resume)
        if step is None:
            return False
        folder = self.store.step_dir(step)
        check_same_manifest(folder)
        entries, meta = self.store.load(step, verify=False)
        self._check_resumable(meta, folder)
        self.engine.load(folder)
        self.load_state_dict(entries[STATE_ENTRY])
        restore_rank_rng(folder, self.dims.rank, meta)
        self._saved_step = step
        log.info("%s resumed from step %d (saved by %s rank(s), now %d)", self.name, step,
                 meta.get("world_size"), self.dims.world_size)
        return True

    def _check_resumable(self, meta: dict[str, Any], folder: Path) -> None:
        if meta.get("stage") != self.name:
            raise ValueError(f"checkpoint {folder} belongs to stage {meta.get('stage')!r}, not {self.name!r}; "
                             "use another run_dir")
        if meta.get("architecture") != self.architecture:
            raise ValueError(f"checkpoint {folder} was made for another architecture: saved "
                             f"{meta.get('architecture')}, configured {self.architecture}")
        if meta.get("layout") != self.engine.layout:
            raise ValueError(f"checkpoint {folder} was written by {meta.get('engine')} ({meta.get('layout')} "
                             f"layout); this run's engine reads the {self.engine.layout} layout. Resume with "
                             "the engine that wrote it")
