"""Single-process SFD trainer: loss -> backward -> clip -> AdamW -> EMA -> log -> checkpoint.

Resume is exact: a checkpoint holds the model, EMA, optimizer, LR schedule, step, the loader's
position and every random generator, so k steps + resume + (n - k) steps equals n straight steps.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from sfd_scale.config import SFDConfig, to_dict
from sfd_scale.data.loader import LatentShardDataset, ShardLoader
from sfd_scale.diffusion.loss import SFDLoss
from sfd_scale.logging import MetricsLogger
from sfd_scale.models.lightningdit import LightningDiT, build_model, count_parameters
from sfd_scale.parallel.engine import Engine, LocalEngine
from sfd_scale.train.checkpoint import CheckpointStore, write_state
from sfd_scale.train.optim import lr_at
from sfd_scale.train.rng import capture_rng, restore_rng

log = logging.getLogger(__name__)

PreviewFn = Callable[[LightningDiT, int], Path]
"""Called with the EMA model and the step; writes a sample grid and returns its path."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast on GPU (SPEC recipe); fp32 on CPU unless bf16 is asked for explicitly."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@dataclass
class StepResult:
    metrics: dict[str, float]
    skipped: bool


class Trainer:
    """Owns the model, EMA, optimizer, data position and RNG for one run directory."""

    def __init__(self, cfg: SFDConfig, run_dir: Path, preview: PreviewFn | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.device = resolve_device(cfg.train.device)
        self.preview = preview
        torch.manual_seed(cfg.train.seed)
        self.engine: Engine = LocalEngine(build_model(cfg.model).train(), cfg.optim,
                                          cfg.train.ema_decay, self.device)
        self.loss_fn = SFDLoss(cfg.diffusion, cfg.model.semantic_channels)
        # Noise, times and label dropout come from this generator, saved in every checkpoint.
        self.generator = torch.Generator().manual_seed(cfg.train.seed + 1)
        dataset = LatentShardDataset(cfg.data.data_dir, latent_norm=cfg.data.latent_norm,
                                     latent_sv_norm=cfg.data.latent_sv_norm,
                                     latent_multiplier=cfg.data.latent_multiplier)
        self._check_data_matches_model(dataset)
        self.loader = ShardLoader(dataset, batch_size=cfg.train.global_batch_size, seed=cfg.train.seed,
                                  random_flip=cfg.data.random_flip)
        self.batches = _endless(self.loader)
        self.store = CheckpointStore(self.run_dir / "checkpoints", keep_last=cfg.train.keep_last)
        self.step = 0
        self.skipped_steps = 0
        log.info("model LightningDiT-%s: %.2f M parameters, attention %s, device %s",
                 cfg.model.size, count_parameters(self.engine.unwrap()) / 1e6,
                 self.engine.unwrap().attention_backend,
                 self.device)

    def _check_data_matches_model(self, dataset: LatentShardDataset) -> None:
        shape = (dataset.texture_channels + dataset.semantic_channels, *dataset.latent_hw)
        want = (self.cfg.model.in_channels, self.cfg.model.input_size, self.cfg.model.input_size)
        if shape != want:
            raise ValueError(f"{self.cfg.data.data_dir}: composite latents are {shape} but the model "
                             f"expects {want} (model.in_channels, model.input_size)")

    # ------------------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        """What the loop owns besides the engine: data position, random generators, counters."""
        return {
            "loader": self.loader.state_dict(),
            "rng": {"loss": self.generator.get_state(), "global": capture_rng()},
            "counters": {"step": self.step, "skipped_steps": self.skipped_steps},
        }

    def load_trainer_state(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        self.batches = _endless(self.loader)
        self.generator.set_state(state["rng"]["loss"])
        restore_rng(state["rng"]["global"])
        self.step = int(state["counters"]["step"])
        self.skipped_steps = int(state["counters"]["skipped_steps"])

    def save_checkpoint(self) -> Path:
        meta = {"step": self.step, "config": to_dict(self.cfg)}
        state = self.trainer_state()

        def write(folder: Path) -> None:
            self.engine.save(folder)
            write_state(folder, "trainer", state)

        path = self.store.save_files(self.step, write, meta, entries=["trainer"])
        log.info("checkpoint step %d -> %s", self.step, path)
        return path

    def maybe_resume(self) -> bool:
        """Resume from the highest complete, verified checkpoint according to train.resume."""
        mode = self.cfg.train.resume
        if mode == "never":
            return False
        found = self.store.load_latest_valid(required=(mode == "must"))
        if found is None:
            return False
        step, entries, meta = found
        self._check_architecture(meta)
        self.engine.load(self.store.step_dir(step))
        self.load_trainer_state(entries["trainer"])
        log.info("resumed from step %d", step)
        return True

    def _check_architecture(self, meta: dict) -> None:
        saved = meta.get("config", {}).get("model")
        if saved is not None and saved != to_dict(self.cfg)["model"]:
            diff = {k: (saved.get(k), v) for k, v in to_dict(self.cfg)["model"].items() if saved.get(k) != v}
            raise ValueError(f"checkpoint in {self.store.root} was made for another model; "
                             f"differences (saved, configured): {diff}")

    # ------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------
    def next_batch(self):
        x, y, feats = next(self.batches)
        return (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                feats.to(self.device, non_blocking=True))

    def train_step(self) -> StepResult:
        x, y, feats = self.next_batch()
        with autocast_for(self.cfg.train.precision, self.device):
            terms = self.loss_fn(self.engine.model, x, y,
                                 feats if self.cfg.model.repa_depth > 0 else None,
                                 generator=self.generator)
        self.engine.zero_grad()
        self.engine.backward(terms["loss"])
        lr = lr_at(self.step, self.cfg.optim)
        stats = self.engine.step(lr, terms["loss"].detach())
        metrics = {k: v.item() for k, v in terms.items()}
        metrics.update(grad_norm=stats.grad_norm, lr=lr)
        if stats.skipped:
            self.skipped_steps += 1
            log.warning("step %d: non-finite loss %.4g or grad norm %.4g, update skipped (%d so far)",
                        self.step + 1, metrics["loss"], stats.grad_norm, self.skipped_steps)
        self.step += 1
        return StepResult(metrics, stats.skipped)

    def fit(self, max_steps: int | None = None) -> None:
        """Train until max_steps (default train.max_steps), checkpointing and logging on the way."""
        cfg = self.cfg.train
        end = cfg.max_steps if max_steps is None else max_steps
        logger = MetricsLogger(self.run_dir, to_dict(self.cfg), wandb_mode=self.cfg.logging.wandb,
                               project=self.cfg.logging.project)
        progress = _progress(self.step, end, self.cfg.logging.progress_bar)
        window: dict[str, float] = {}
        t0, images = time.perf_counter(), 0
        try:
            while self.step < end:
                result = self.train_step()
                images += cfg.global_batch_size
                for k, v in result.metrics.items():
                    window[k] = window.get(k, 0.0) + v
                progress.update(1)
                if self.step % cfg.log_every == 0 or self.step == end:
                    n = cfg.log_every if self.step % cfg.log_every == 0 else self.step % cfg.log_every
                    row = {k: v / n for k, v in window.items()}
                    row["images_per_s"] = images / (time.perf_counter() - t0)
                    row["skipped_steps"] = self.skipped_steps
                    logger.log(self.step, row)
                    progress.set_postfix(loss=f"{row['loss']:.4f}")
                    window, t0, images = {}, time.perf_counter(), 0
                if cfg.ckpt_every > 0 and self.step % cfg.ckpt_every == 0:
                    self.save_checkpoint()
                if self.preview is not None and cfg.sample_every > 0 and self.step % cfg.sample_every == 0:
                    logger.log_image(self.step, "samples", self.preview(self.engine.ema_model(), self.step))
            if self.store.latest_step() != self.step:
                self.save_checkpoint()
            if self.preview is not None:
                logger.log_image(self.step, "samples", self.preview(self.engine.ema_model(), self.step))
        finally:
            progress.close()
            logger.close()


def _endless(loader: ShardLoader):
    """Epoch after epoch; the loader's own state says where each one resumes."""
    while True:
        yield from loader


def _progress(start: int, end: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=end, initial=start, disable=not enabled, desc="train", dynamic_ncols=True)
