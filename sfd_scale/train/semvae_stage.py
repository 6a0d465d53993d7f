"""The Semantic VAE stage on the engines: frozen DINOv2 features of an image folder -> SemVAE.

Each optimizer step trains on one global batch of `training.batch_size` images. Which images is
a function of the step alone (`GlobalBatchOrder`: consecutive blocks of a seeded permutation per
epoch), so resume needs no loader state and every world size reads the same batches.
Data-parallel rank r decodes only its contiguous block of the batch (the next step's block is
decoded in the background), runs the frozen DINOv2 on it (replicated on every rank; bf16
autocast on GPU) and trains on the features. The reparameterization noise of the whole global
batch is drawn from the loop's saved generator and each rank keeps its rows, so N ranks take
the single-process step (`stage_distributed` has the loop).
"""
from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from sfd_scale.config import OptimConfig, SemVAETrainConfig, SFDConfig, TrainConfig, to_dict
from sfd_scale.data.images import ImageFolderIndex, PilDecoder
from sfd_scale.models.dinov2 import DinoFeatureEncoder, load_dinov2
from sfd_scale.models.semantic_vae import SemanticVAE, semantic_vae_loss_terms
from sfd_scale.models.weights import save_weights
from sfd_scale.parallel import distributed
from sfd_scale.parallel.dims import ParallelDims, check_global_batch
from sfd_scale.parallel.factory import build_engine
from sfd_scale.train.stage_distributed import EngineStage
from sfd_scale.train.trainer import autocast_for, resolve_device

log = logging.getLogger(__name__)

STAGE_NAME = "semantic VAE"


class SemVAEObjective(SemanticVAE):
    """A SemanticVAE whose forward is its training loss, with the reparameterization noise passed
    in instead of drawn inside (as `semantic_vae_loss` does): engines wrap one forward, and each
    rank uses its rows of the global batch's noise. Same parameters and state-dict keys as
    SemanticVAE, so its weights load into one."""

    def forward(self, feats: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        posterior = self.encode(feats)
        z = posterior.mean + posterior.std * noise  # DiagonalGaussian.sample with this noise
        return semantic_vae_loss_terms(self.decode(z), feats, posterior, self.cfg.cos_weight, self.cfg.kl_weight)


class GlobalBatchOrder:
    """Dataset rows of each step's global batch: consecutive blocks of a seeded permutation per
    epoch, continuing into the next epoch's permutation (every image once per epoch). A pure
    function of the step."""

    def __init__(self, num_samples: int, batch_size: int, seed: int) -> None:
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"need at least one sample and a positive batch, got {num_samples} and {batch_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self._cached: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cached:
            if len(self._cached) >= 2:  # a batch spans at most two epochs' permutations at a time
                self._cached.pop(min(self._cached))
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            self._cached[epoch] = torch.randperm(self.num_samples, generator=generator)
        return self._cached[epoch]

    def rows(self, step: int) -> torch.Tensor:
        """(batch_size,) int64 dataset rows of step `step` (0-based)."""
        parts, position, left = [], step * self.batch_size, self.batch_size
        while left:
            epoch, offset = divmod(position, self.num_samples)
            take = min(left, self.num_samples - offset)
            parts.append(self._permutation(epoch)[offset:offset + take])
            position, left = position + take, left - take
        return torch.cat(parts)


class RankImages:
    """This rank's images of each step's global batch, (rank_batch, 3, S, S) in [-1, 1] decoded
    with PIL; step s + 1 is decoded in the background while step s trains."""

    def __init__(self, index: ImageFolderIndex, order: GlobalBatchOrder, image_size: int,
                 dp_rank: int, dp: int, workers: int) -> None:
        if order.batch_size % dp:
            raise ValueError(f"training.batch_size={order.batch_size} is not divisible by {dp} data-parallel ranks")
        self.index = index
        self.order = order
        self.per_rank = order.batch_size // dp
        self.start = dp_rank * self.per_rank
        self.decoder = PilDecoder(image_size, workers)
        self._ahead = ThreadPoolExecutor(1, "semvae-prefetch")
        self._pending: tuple[int, Future] | None = None

    def paths(self, step: int) -> list[Path]:
        rows = self.order.rows(step)[self.start:self.start + self.per_rank]
        return [self.index.samples[int(i)][0] for i in rows]

    def _decode(self, step: int) -> torch.Tensor:
        paths = self.paths(step)
        batch = self.decoder.decode(paths)
        if batch.failures:
            bad = "; ".join(f"{paths[i]}: {why}" for i, why in sorted(batch.failures.items())[:3])
            raise ValueError(f"step {step}: {len(batch.failures)} image(s) cannot be decoded ({bad}); "
                             "remove or replace them in image_dir")
        return batch.images

    def __call__(self, step: int) -> torch.Tensor:
        if self._pending is not None and self._pending[0] == step:
            current = self._pending[1]
        else:
            current = self._ahead.submit(self._decode, step)
        self._pending = (step + 1, self._ahead.submit(self._decode, step + 1))
        return current.result()

    def close(self) -> None:
        self._ahead.shutdown(cancel_futures=True)
        self.decoder.close()


def _refuse_tensor_parallel(cfg: SemVAETrainConfig) -> None:
    if cfg.parallel.tensor_parallel != 1:
        raise ValueError(f"parallel.tensor_parallel={cfg.parallel.tensor_parallel}: the Semantic VAE is small and "
                         "trains with data parallelism only; set parallel.tensor_parallel=1 and choose "
                         "parallel.engine=ddp, fsdp2 or deepspeed")


def process_layout(cfg: SemVAETrainConfig, local_rank_arg: int | None = None) -> ParallelDims:
    """This process's place in the run, from torchrun / deepspeed / srun or none (one process);
    tensor parallelism is refused first."""
    _refuse_tensor_parallel(cfg)
    return ParallelDims.from_env(tp=1, local_rank_arg=local_rank_arg)


def check_stage_fits(cfg: SemVAETrainConfig, dims: ParallelDims) -> None:
    """Raise ValueError, naming this config's keys, when the parallel settings do not fit `dims`."""
    _refuse_tensor_parallel(cfg)
    p = cfg.parallel
    if p.activation_checkpointing != "none":
        raise ValueError(f"parallel.activation_checkpointing={p.activation_checkpointing!r}: recomputation is "
                         "built for LightningDiT's blocks; the Semantic VAE trains without it (set 'none')")
    check_global_batch("training.batch_size", cfg.training.batch_size, p.grad_accum_steps, dims)
    if p.backend == "nccl" and resolve_device(cfg.run.device).type != "cuda":
        raise ValueError("parallel.backend=nccl needs GPUs, but this run uses the CPU; set parallel.backend=gloo "
                         "or auto")


def engine_sections(cfg: SemVAETrainConfig) -> SFDConfig:
    """The sections the engine factory reads (`parallel`, `optim`, `train`), filled from this
    stage's config; the rest keeps its defaults and is not read. AdamW without weight decay
    takes Adam's step."""
    return SFDConfig(
        optim=OptimConfig(lr=cfg.training.lr, max_grad_norm=cfg.run.max_grad_norm),
        train=TrainConfig(global_batch_size=cfg.training.batch_size, seed=cfg.training.seed,
                          ema_decay=cfg.run.ema_decay, precision=cfg.run.precision, device=cfg.run.device),
        parallel=cfg.parallel)


def _check_same_images(index: ImageFolderIndex) -> None:
    """Collective: every rank must list the same images, or the global batches would differ."""
    digest = hashlib.sha256()
    for path, label in index.samples:
        digest.update(f"{path}\0{label}\n".encode())
    views = distributed.all_gather_object((len(index), digest.hexdigest()))
    if any(view != views[0] for view in views):
        raise RuntimeError(f"ranks list different images under {index.root} (counts {[v[0] for v in views]}); "
                           "image_dir must be the same, unchanging folder on every node")


def train_semvae(cfg: SemVAETrainConfig, dims: ParallelDims) -> Path:
    """Train (resuming from `run_dir` per run.resume) and write the EMA weights to `cfg.output`
    (rank 0, atomically); collective. Returns the output path."""
    check_stage_fits(cfg, dims)
    device = resolve_device(cfg.run.device, dims.local_rank)
    enc = cfg.encoders
    # Missing weights or images fail here, before any process group is joined.
    dino = DinoFeatureEncoder(load_dinov2(enc.dino_checkpoint, enc.dino), enc.dino.input_size).to(device)
    if (dino.feat_dim, dino.grid) != (enc.semvae.feat_dim, enc.semvae.grid):
        raise ValueError(f"DINOv2 gives {dino.feat_dim} x {dino.grid} x {dino.grid} features but the Semantic VAE "
                         f"expects {enc.semvae.feat_dim} x {enc.semvae.grid} x {enc.semvae.grid} "
                         "(encoders.semvae.feat_dim / grid vs encoders.dino)")
    index = ImageFolderIndex.scan(cfg.image_dir)
    torch.manual_seed(cfg.training.seed)  # same on every rank: replicated engines start equal
    engine = build_engine(engine_sections(cfg), dims, device,
                          build=lambda: SemVAEObjective(enc.semvae).train(),
                          plain_model=lambda: SemanticVAE(enc.semvae))
    _check_same_images(index)
    order = GlobalBatchOrder(len(index), cfg.training.batch_size, cfg.training.seed)
    images = RankImages(index, order, cfg.image_size, dims.dp_rank, dims.dp, cfg.run.decode_workers)
    noise_shape = (enc.semvae.latent_channels, enc.semvae.grid, enc.semvae.grid)
    rows = slice(images.start, images.start + images.per_rank)

    def rank_batch(step: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn((cfg.training.batch_size, *noise_shape), generator=generator)[rows]
        with torch.no_grad(), autocast_for(cfg.run.precision, device):
            feats = dino(images(step).to(device, non_blocking=True)).float()  # (rank batch, D, g, g)
        return feats, noise

    log.info("%s: %d images in %s, global batch %d (%d per rank, %d micro-batch(es)), engine %s, %s",
             STAGE_NAME, len(index), cfg.image_dir, cfg.training.batch_size, images.per_rank,
             cfg.parallel.grad_accum_steps, cfg.parallel.engine, dims.describe())
    stage = EngineStage(STAGE_NAME, engine, dims, device, rank_batch, cfg.training, cfg.run, Path(cfg.run_dir),
                        cfg.parallel.grad_accum_steps, to_dict(cfg), {"semvae": to_dict(enc.semvae)})
    try:
        stage.maybe_resume()
        stage.fit()
    finally:
        images.close()
    _, ema = engine.consolidated_state()  # collective for sharded engines
    if dims.is_main:
        save_weights(cfg.output, ema, metadata={"semvae": json.dumps(to_dict(enc.semvae)), "step": str(stage.step)})
        log.info("%s: wrote %s (step %d)", STAGE_NAME, cfg.output, stage.step)
    distributed.barrier()
    return Path(cfg.output)
