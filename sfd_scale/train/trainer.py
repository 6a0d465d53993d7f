"""SFD trainer: loss -> backward -> clip -> AdamW -> EMA -> log -> checkpoint, on any engine.

The loop is the same for one process and for many: the engine (built by
`sfd_scale.parallel.factory.build_engine`) hides how the model is replicated or sharded. Each
optimizer step consumes one global batch; data-parallel rank r reads its contiguous block of it
and splits that into `parallel.grad_accum_steps` micro-batches, and every random draw is tied to
a sample's row in the global batch, so any world size computes the single-process step.

Resume is exact: a checkpoint holds the model, EMA, optimizer, step (the learning rate is a
function of it), the loader's position and every random generator, so k steps + resume +
(n - k) steps equals n straight steps.
The loader position, the loss generator and the counters are global (identical on every rank,
written once); the process-wide generators are per rank (one file each).

A step is queued (`_launch`) and then read (`_finish`: losses, gradient norm, skip flag, the
guard's verdict). With train.async_metrics the loop reads step k only after queueing step k + 1,
so the host never waits for the GPU inside a step; steps that log, checkpoint or preview are read
at once, so those always see every step up to their own.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from sfd_scale.config import SFDConfig, bf16_compute, model_differences, to_dict
from sfd_scale.data.loader import LatentShardDataset, ShardLoader
from sfd_scale.diffusion.loss import BatchPart, SFDLoss, StepDraws
from sfd_scale.host_copy import to_host_async
from sfd_scale.logging import MetricsLogger
from sfd_scale.models.fast_paths import mark_step_begin
from sfd_scale.models.lightningdit import LightningDiT, count_parameters
from sfd_scale.parallel import distributed
from sfd_scale.parallel.dims import ParallelDims, check_config_fits
from sfd_scale.parallel.engine import Engine
from sfd_scale.parallel.factory import build_engine
from sfd_scale.train.checkpoint import CheckpointStore, write_state
from sfd_scale.train.collective_checkpoint import (check_same_manifest, latest_resumable_step, restore_rank_rng,
                                                   save_collective, save_rank_rng)
from sfd_scale.train.gc_schedule import ScheduledGC
from sfd_scale.train.guards import NumericalGuard
from sfd_scale.train.optim import lr_at
from sfd_scale.train.step_graph import DDP_WARMUP_STEPS, WARMUP_STEPS, GraphedStep, capture_stream

log = logging.getLogger(__name__)

PreviewFn = Callable[[LightningDiT, int], Path]
"""Called with the EMA model and the step; writes a sample grid and returns its path."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto: this process's GPU (cuda:local_rank) when CUDA exists, else the CPU; a bare 'cuda'
    also means this process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast on GPU (SPEC recipe); fp32 on CPU unless bf16 is asked for explicitly."""
    if not bf16_compute(precision, device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@dataclass
class StepResult:
    metrics: dict[str, float]
    skipped: bool


@dataclass
class _LaunchedStep:
    """A queued optimizer step whose numbers have not been read yet."""

    number: int
    """1-based step number."""
    lr: float
    names: list[str]
    """Loss terms, in the order of `values`."""
    values: torch.Tensor
    """The loss terms, then the gradient norm and the skip flag (0/1), then with async metrics and
    spike detection the loss averaged over ranks; host memory."""
    ready: Any
    """CUDA event: `values` may be read once it has fired (None: readable now)."""
    rollbacks: int
    """The guard's rollback count at launch: a later rollback discarded this step's update."""


class Trainer:
    """Owns the model, EMA, optimizer, data position and RNG for one run directory."""

    def __init__(self, cfg: SFDConfig, run_dir: Path, preview: PreviewFn | None = None,
                 dims: ParallelDims | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dims = ParallelDims.from_env(tp=cfg.parallel.tensor_parallel) if dims is None else dims
        check_config_fits(cfg, self.dims)  # before any process group, model or data
        self.collector = ScheduledGC(cfg.train.gc_every)  # Python's GC between steps, on a schedule
        self.device = resolve_device(cfg.train.device, self.dims.local_rank)
        self.preview = preview
        self.accum_steps = cfg.parallel.grad_accum_steps
        self.rank_batch = cfg.train.global_batch_size // self.dims.dp
        self.micro_batch = self.rank_batch // self.accum_steps
        torch.manual_seed(cfg.train.seed)  # same on every rank: replicated engines start equal
        # A step captured as CUDA graphs (train.cuda_graph) needs DDP built on its capture stream.
        with capture_stream(self.device, cfg.train.cuda_graph) as stream:
            self.engine: Engine = build_engine(cfg, self.dims, self.device)
        self.loss_fn = SFDLoss(cfg.diffusion, cfg.model.semantic_channels)
        # Noise, times and label dropout come from this generator, saved in every checkpoint.
        # Every rank draws the whole global batch's numbers from it and keeps its rows.
        self.generator = torch.Generator().manual_seed(cfg.train.seed + 1)
        dataset = LatentShardDataset.from_config(cfg.data)
        self._check_data_matches_model(dataset)
        self.loader = ShardLoader(dataset, batch_size=self.rank_batch, seed=cfg.train.seed,
                                  rank=self.dims.dp_rank, world_size=self.dims.dp,
                                  random_flip=cfg.data.random_flip, device=self.device)
        self.batches = _endless(self.loader)
        self.store = CheckpointStore(self.run_dir / "checkpoints", keep_last=cfg.train.keep_last)
        self.step = 0
        self.skipped_steps = 0
        self.guard = NumericalGuard(cfg.guard, cfg.train)  # bad-step streaks, rollback (train/guards.py)
        self._saved_step: int | None = None
        self.graphed_step: GraphedStep | None = None
        if cfg.train.cuda_graph:
            self.graphed_step, self._term_names = build_graphed_step(
                self.engine, self.loss_fn, cfg.train.precision, self.device, stream=stream,
                warmup_steps=DDP_WARMUP_STEPS if cfg.parallel.engine == "ddp" else WARMUP_STEPS)
            log.info("step: CUDA graphs, replayed after %d eager warm-up steps" if self.graphed_step.capture else
                     "step: train.cuda_graph without CUDA runs eagerly on fixed input tensors (%d warm-up steps "
                     "would precede a capture)", self.graphed_step.warmup_steps)
        log.info("model LightningDiT-%s: %.2f M parameters, attention %s, device %s, engine %s (%s), "
                 "%d micro-batch(es) of %d per rank and step",
                 cfg.model.size, count_parameters(self.engine.unwrap()) / 1e6,
                 self.engine.unwrap().attention_backend, self.device, cfg.parallel.engine,
                 self.dims.describe(), self.accum_steps, self.micro_batch)

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
        """What the loop owns besides the engine, identical on every rank: data position, the
        loss generator, counters."""
        return {
            "loader": self.loader.state_dict(),
            "rng": {"loss": self.generator.get_state()},
            "counters": {"step": self.step, "skipped_steps": self.skipped_steps},
            "guard": self.guard.state_dict(),
        }

    def load_trainer_state(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        self.batches = _endless(self.loader)
        self.generator.set_state(state["rng"]["loss"])
        self.step = int(state["counters"]["step"])
        self.skipped_steps = int(state["counters"]["skipped_steps"])
        self.guard.load_state_dict(state.get("guard"))  # absent in checkpoints older than the guard

    def save_checkpoint(self) -> Path:
        """Collective: every rank writes its part into one temporary folder; rank 0 publishes it."""
        meta = {"step": self.step, "config": to_dict(self.cfg), "engine": self.cfg.parallel.engine,
                "layout": self.engine.layout, "world_size": self.dims.world_size,
                "dp": self.dims.dp, "tp": self.dims.tp}
        state = self.trainer_state()

        def write(folder: Path) -> None:
            self.engine.save(folder)
            save_rank_rng(folder, self.dims.rank)
            if self.dims.is_main:
                write_state(folder, "trainer", state)

        path = save_collective(self.store, self.step, write, meta, entries=["trainer"])
        self._saved_step = self.step
        log.info("checkpoint step %d -> %s", self.step, path)
        return path

    def maybe_resume(self) -> bool:
        """Resume from the highest complete, verified checkpoint according to train.resume.

        Rank 0 chooses (and checksums) the step; every rank then loads that same step, after
        checking that it sees the same manifest (a folder not shared by all nodes is an error).
        """
        step = latest_resumable_step(self.store, self.cfg.train.resume)
        if step is None:
            return False
        folder = self.store.step_dir(step)
        check_same_manifest(folder)
        entries, meta = self.store.load(step, verify=False)
        self._check_architecture(meta)
        layout = meta.get("layout", "replicated")
        if layout != self.engine.layout:
            raise ValueError(f"checkpoint {folder} was written by engine {meta.get('engine', 'local')!r} "
                             f"({layout} layout); parallel.engine={self.cfg.parallel.engine!r} reads "
                             f"the {self.engine.layout} layout. Resume with the engine that wrote it, "
                             "or export it (launchers/export.py) and start from the weights")
        self.engine.load(folder)
        self.load_trainer_state(entries["trainer"])
        restore_rank_rng(folder, self.dims.rank, meta)
        self._saved_step = step
        log.info("resumed from step %d (saved by %s rank(s), now %d)", step, meta.get("world_size", 1),
                 self.dims.world_size)
        return True

    def _check_architecture(self, meta: dict) -> None:
        saved = meta.get("config", {}).get("model")
        diff = model_differences(saved, self.cfg.model) if saved is not None else {}
        if diff:
            raise ValueError(f"checkpoint in {self.store.root} was made for another model; "
                             f"differences (saved, configured): {diff}")

    # ------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------
    def train_step(self) -> StepResult:
        """One optimizer step over this rank's block of the global batch, in micro-batches."""
        return self._finish(self._launch())

    def _launch(self) -> _LaunchedStep:
        """Queue step `self.step + 1`: forward, backward, clip, AdamW, EMA. With
        train.async_metrics nothing here waits for the device; the step's numbers are read by
        `_finish`, which the loop calls after queueing the next step."""
        x, y, feats = next(self.batches)
        use_feats = self.cfg.model.repa_depth > 0
        lr = lr_at(self.step, self.cfg.optim) * self.guard.lr_scale  # lowered by rollbacks
        if self.graphed_step is not None:
            return self._launch_graphed(x, y, feats if use_feats else None, lr)
        step_draws = self.generator.get_state()
        mark_step_begin(self.cfg.model.compile_mode)
        self.engine.zero_grad()
        sums: dict[str, torch.Tensor] = {}
        for k in range(self.accum_steps):
            rows = slice(k * self.micro_batch, (k + 1) * self.micro_batch)
            # Every micro-batch reads the step's draws from the start and keeps its own rows.
            self.generator.set_state(step_draws)
            with self.engine.micro_step(last=k == self.accum_steps - 1):
                with autocast_for(self.cfg.train.precision, self.device):
                    terms = self.loss_fn(self.engine.model, self._to_device(x[rows]), self._to_device(y[rows]),
                                         self._to_device(feats[rows]) if use_feats else None,
                                         generator=self.generator, part=self._part(rows.start))
                self.engine.backward(terms["loss"] / self.accum_steps)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() / self.accum_steps
        losses = torch.stack(list(sums.values()))
        if self.cfg.train.async_metrics:
            norm, skipped = self.engine.step_on_device(lr, sums["loss"])  # skip decided on the device
            values, ready = to_host_async(self._step_numbers(losses, sums["loss"], norm, skipped))
        else:
            stats = self.engine.step(lr, sums["loss"])  # the engine decided the skip for all ranks together
            values = torch.tensor(losses.tolist() + [stats.grad_norm, float(stats.skipped)], dtype=torch.float64)
            ready = None
        self.step += 1
        return _LaunchedStep(self.step, lr, list(sums), values, ready, self.guard.rollbacks)

    def _launch_graphed(self, x: torch.Tensor, y: torch.Tensor, feats: torch.Tensor | None,
                        lr: float) -> _LaunchedStep:
        """`_launch` through the CUDA-graph step (train.cuda_graph): one micro-batch, numbers on the device."""
        x = self._to_device(x)
        inputs = step_inputs(self.loss_fn, x, self._to_device(y), None if feats is None else self._to_device(feats),
                             self.generator, self._part(0))
        out, n = self.graphed_step(inputs, lr), len(self._term_names)  # loss terms, grad norm, skipped
        loss = out[self._term_names.index("loss")]
        values, ready = to_host_async(self._step_numbers(out[:n], loss, out[n], out[n + 1]))
        self.step += 1
        return _LaunchedStep(self.step, lr, list(self._term_names), values, ready, self.guard.rollbacks)

    def _part(self, start: int) -> BatchPart:
        """Where rows from `start` of this rank's block sit in the step's global batch."""
        return BatchPart(self.dims.dp_rank * self.rank_batch + start, self.cfg.train.global_batch_size)

    def _step_numbers(self, losses: torch.Tensor, loss: torch.Tensor, norm: torch.Tensor,
                      skipped: torch.Tensor) -> torch.Tensor:
        """A device-side step's numbers in `_LaunchedStep.values` order."""
        numbers = [losses.double(), norm.double().reshape(1), skipped.double().reshape(1)]
        if self.guard.watches_spikes:  # the guard's rank average, reduced on the device too
            numbers.append(distributed.all_reduce(loss.double().reshape(1)) / self.dims.world_size)
        return torch.cat(numbers)

    def _finish(self, launched: _LaunchedStep) -> StepResult:
        """Read a launched step's numbers (waiting for them if need be), count a skip and let the
        guard judge the step, unless a rollback since its launch already discarded its update."""
        if launched.ready is not None:
            launched.ready.synchronize()
        numbers = launched.values.tolist()
        mean_loss = numbers.pop() if self.cfg.train.async_metrics and self.guard.watches_spikes else None
        *losses, grad_norm, skipped_flag = numbers
        metrics = dict(zip(launched.names, losses))
        metrics.update(grad_norm=grad_norm, lr=launched.lr)
        skipped = skipped_flag > 0
        if skipped:
            self.skipped_steps += 1
            if self.dims.is_main:
                log.warning("step %d: non-finite loss %.4g or grad norm %.4g, update skipped (%d so far)",
                            launched.number, metrics["loss"], grad_norm, self.skipped_steps)
        if self.guard.rollbacks == launched.rollbacks:
            self.guard.after_step(self, launched.number, skipped, metrics["loss"], mean_loss)  # may roll back
        return StepResult(metrics, skipped)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    def fit(self, max_steps: int | None = None, should_stop: Callable[[int], bool] | None = None,
            final_checkpoint: bool = True) -> None:
        """Train until max_steps (default train.max_steps), checkpointing and logging on the way.

        Metrics are averaged over ranks and written by rank 0 only. `should_stop(step)` (e.g.
        `PreemptionWatcher.should_stop`, a collective) is asked after every step; when it says
        yes, training ends at that step boundary and that step is checkpointed. The last step is
        checkpointed unless `final_checkpoint` is False (benchmarks).
        """
        cfg = self.cfg.train
        end = cfg.max_steps if max_steps is None else max_steps
        main = self.dims.is_main
        logger = MetricsLogger(self.run_dir, to_dict(self.cfg), wandb_mode=self.cfg.logging.wandb,
                               project=self.cfg.logging.project) if main else None
        progress = _progress(self.step, end, self.cfg.logging.progress_bar and main)
        window: dict[str, float] = {}
        t0, window_steps = time.perf_counter(), 0
        stopped = False
        pending: _LaunchedStep | None = None
        try:
            self.collector.start()
            while self.step < end:
                launched = self._launch()
                finished = [self._finish(pending)] if pending is not None else []
                pending = launched
                if not self.cfg.train.async_metrics or self._reads_metrics_at(self.step, end):
                    finished.append(self._finish(pending))
                    pending = None
                for result in finished:
                    window_steps += 1
                    for k, v in result.metrics.items():
                        window[k] = window.get(k, 0.0) + v
                self.collector.after_step(self.step)
                progress.update(1)
                if self.step % cfg.log_every == 0 or self.step == end:
                    # Averages over the steps this window really holds (fewer after a resume
                    # between two log steps).
                    row = {k: v / window_steps for k, v in distributed.mean_over_ranks(window).items()}
                    row["images_per_s"] = window_steps * cfg.global_batch_size / (time.perf_counter() - t0)
                    row["skipped_steps"] = self.skipped_steps
                    if logger is not None:
                        logger.log(self.step, row)
                    progress.set_postfix(loss=f"{row['loss']:.4f}")
                    window, t0, window_steps = {}, time.perf_counter(), 0
                if cfg.ckpt_every > 0 and self.step % cfg.ckpt_every == 0:
                    self.save_checkpoint()
                if self.preview is not None and cfg.sample_every > 0 and self.step % cfg.sample_every == 0:
                    self._preview(logger)
                # Preemption hook (train/preemption.py): stop here; the step is checkpointed below.
                if should_stop is not None and should_stop(self.step):
                    stopped = True
                    break
            if pending is not None:  # stopped between two reads: the checkpoint holds its outcome
                self._finish(pending)
            if final_checkpoint and self._saved_step != self.step:
                self.save_checkpoint()
            if self.preview is not None and not stopped:
                self._preview(logger)
        finally:
            self.collector.stop()
            progress.close()
            if logger is not None:
                logger.close()

    def _reads_metrics_at(self, step: int, end: int) -> bool:
        """Steps after which a trainer with train.async_metrics waits for the step's numbers:
        those that log, checkpoint or preview, so every log row and checkpoint holds all steps
        up to its own."""
        cfg = self.cfg.train
        return (step == end or step % cfg.log_every == 0 or (cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0)
                or (self.preview is not None and cfg.sample_every > 0 and step % cfg.sample_every == 0))

    def _preview(self, logger: MetricsLogger | None) -> None:
        ema = self.engine.ema_model()  # collective for sharded engines
        if logger is not None:
            logger.log_image(self.step, "samples", self.preview(ema, self.step))


def step_inputs(loss_fn: SFDLoss, x: torch.Tensor, y: torch.Tensor, feats: torch.Tensor | None,
                generator: torch.Generator, part: BatchPart) -> dict[str, torch.Tensor]:
    """A micro-batch on the device and its random draws: the inputs of `build_graphed_step`'s step."""
    inputs = {"x": x, "y": y, **loss_fn.draw(x, generator, part).as_dict()}
    if feats is not None:
        inputs["feats"] = feats
    return inputs


def build_graphed_step(engine: Engine, loss_fn: SFDLoss, precision: str, device: torch.device,
                       stream: torch.cuda.Stream | None = None, warmup_steps: int = WARMUP_STEPS
                       ) -> tuple[GraphedStep, list[str]]:
    """The whole sync-free SFD step of a local or DDP engine as a `GraphedStep` (on `stream`, after
    `warmup_steps` eager steps) taking `step_inputs` and returning one float tensor: the loss terms,
    the gradient norm and the skip flag (0/1). The list names the loss terms in that order; it is
    filled by the first call."""
    names: list[str] = []

    def gradients(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        engine.zero_grad()
        draws = StepDraws(inputs["t"], inputs["x0"], inputs["label_uniforms"])
        with autocast_for(precision, device):
            terms = loss_fn.compute(engine.model, inputs["x"], inputs["y"], inputs.get("feats"), draws)
        engine.backward(terms["loss"])
        names[:] = list(terms)
        return torch.stack([value.detach().float() for value in terms.values()])

    def update(losses: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        norm, skipped = engine.step_on_device(lr, losses[names.index("loss")])  # skip decided on the device
        return torch.cat([losses, norm.float().reshape(1), skipped.float().reshape(1)])

    return GraphedStep(gradients, update, engine.optimizer, device, warmup_steps, stream), names


def _endless(loader: ShardLoader):
    """Epoch after epoch; the loader's own state says where each one resumes."""
    while True:
        yield from loader


def _progress(start: int, end: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=end, initial=start, disable=not enabled, desc="train", dynamic_ncols=True)
