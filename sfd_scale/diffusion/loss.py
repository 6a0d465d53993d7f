"""SFD training objective (SPEC section 3): weighted velocity MSE + cosine + REPA alignment.

Every term is returned separately so logs show what moves; `loss` is their sum, as the
reference trains on mse + cos + repa (each averaged over the batch).

Random draws are defined for the whole global batch of an optimizer step, so that any split of
that batch over ranks and micro-batches sees exactly the numbers one process would: per step
the generator yields the global batch's times, a noise seed and a label-dropout seed; a sample's
noise comes from (noise seed, its row in the global batch), and its label-dropout uniform is
the row-th draw of the label-dropout generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sfd_scale.config import DiffusionConfig
from sfd_scale.diffusion.schedule import OffsetSchedule, build_offset_schedule, sample_train_t
from sfd_scale.host_copy import to_device_async

_SEED_HIGH = 2**62
_MASK64 = (1 << 64) - 1


def _row_seed(seed: int, row: int) -> int:
    """splitmix64 of (seed, row): well-spread generator seeds for neighbouring rows."""
    z = (seed + (row + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1  # 63 bits: manual_seed takes it


def row_noise(rows: range, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal noise (len(rows), *shape), float32 on the CPU; row r depends only on (seed, r)."""
    out = torch.empty((len(rows), *shape))
    generator = torch.Generator()
    for i, row in enumerate(rows):
        generator.manual_seed(_row_seed(seed, row))
        out[i].normal_(generator=generator)
    return out


@dataclass(frozen=True)
class BatchPart:
    """Where a micro-batch sits in its optimizer step's global batch: rows [start, start + B) of `total`."""

    start: int
    total: int


@dataclass
class StepDraws:
    """A micro-batch's random numbers, on its device: what `SFDLoss.draw` takes from the step's
    generator. Apart from these, the loss and the model draw nothing, so a step can be replayed
    (a CUDA graph) with new draws copied into the same tensors."""

    t: torch.Tensor               # (B,) logit-normal times, before the semantic offset
    x0: torch.Tensor              # (B, C, H, W) standard normal noise
    label_uniforms: torch.Tensor  # (B,) label dropout's uniforms: a label is dropped below its probability

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"t": self.t, "x0": self.x0, "label_uniforms": self.label_uniforms}


@dataclass
class NoisedBatch:
    """Everything one training forward needs, built from (x1, draws)."""

    x_t: torch.Tensor         # (B, C, H, W) noised composite latent
    target: torch.Tensor      # (B, C, H, W) velocity x1 - x0
    t_sem: torch.Tensor       # (B,)
    t_tex: torch.Tensor       # (B,)
    label_uniforms: torch.Tensor
    """(B,): this micro-batch's rows of the step's label-dropout draws, for the model."""


class SFDLoss:
    """Draws times and noise, noises each channel group at its own time, and scores the model."""

    def __init__(self, cfg: DiffusionConfig, semantic_channels: int) -> None:
        self.cfg = cfg
        self.semantic_channels = semantic_channels
        self.schedule: OffsetSchedule = build_offset_schedule(cfg.offset, cfg.delta_t)

    def draw(self, x1: torch.Tensor, generator: torch.Generator | None = None,
             part: BatchPart | None = None) -> StepDraws:
        """Draws t (logit-normal), x0 ~ N(0, I) and the label-dropout uniforms of micro-batch `x1`.

        `x1` holds rows `part` of the step's global batch (default: all of it). Random numbers
        come from CPU generators so runs are reproducible across devices and world sizes.
        """
        b = x1.shape[0]
        part = BatchPart(0, b) if part is None else part
        if part.start < 0 or part.start + b > part.total:
            raise ValueError(f"micro-batch of {b} rows at {part.start} does not fit a global batch of {part.total}")
        rows = slice(part.start, part.start + b)
        t = to_device_async(sample_train_t(part.total, self.cfg.time_sampling, generator, self.cfg.logit_mean,
                                           self.cfg.logit_std)[rows], x1.device)
        noise_seed, label_seed = torch.randint(0, _SEED_HIGH, (2,), generator=generator).tolist()
        x0 = to_device_async(row_noise(range(rows.start, rows.stop), tuple(x1.shape[1:]), noise_seed),
                             x1.device, x1.dtype)
        label_generator = torch.Generator().manual_seed(label_seed)
        torch.rand(part.start, generator=label_generator)  # skip the draws of earlier rows
        label_uniforms = to_device_async(torch.rand(b, generator=label_generator), x1.device)
        return StepDraws(t=t, x0=x0, label_uniforms=label_uniforms)

    def noise(self, x1: torch.Tensor, generator: torch.Generator | None = None,
              part: BatchPart | None = None) -> NoisedBatch:
        """`draw`, then x_t per channel group (see `noise_with`)."""
        return self.noise_with(x1, self.draw(x1, generator, part))

    def noise_with(self, x1: torch.Tensor, draws: StepDraws) -> NoisedBatch:
        """x_t with texture channels at t_tex and the last `semantic_channels` at t_sem."""
        b = x1.shape[0]
        t_sem, t_tex = self.schedule.train_times(draws.t)
        s = self.semantic_channels
        t_map = torch.cat([t_tex[:, None].expand(b, x1.shape[1] - s), t_sem[:, None].expand(b, s)], dim=1)
        t_map = t_map[:, :, None, None].to(x1.dtype)
        x_t = t_map * x1 + (1 - t_map) * draws.x0
        return NoisedBatch(x_t=x_t, target=x1 - draws.x0, t_sem=t_sem, t_tex=t_tex,
                           label_uniforms=draws.label_uniforms)

    def terms(self, pred: torch.Tensor, target: torch.Tensor, repa_pred: torch.Tensor | None,
              repa_target: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Scalar loss terms (batch means). repa_target is (B, C, H, W) DINO features."""
        pred, target = pred.float(), target.float()
        sq = (pred - target) ** 2                                   # (B, C, H, W)
        weights = torch.ones(pred.shape[1], device=pred.device)
        weights[-self.semantic_channels:] = self.cfg.semantic_weight
        mse = (sq * weights[None, :, None, None]).mean()
        out = {"mse": mse}
        total = mse
        if self.cfg.cosine_weight > 0:
            cos = (1 - F.cosine_similarity(pred, target, dim=1)).mean()  # along channels, mean over H, W
            out["cos"] = cos
            total = total + self.cfg.cosine_weight * cos
        if repa_pred is not None:
            if repa_target is None:
                raise ValueError("the model returned a REPA projection but the batch has no DINO features")
            feats = repa_target.float().flatten(2).transpose(1, 2)   # (B, N, C_dino)
            repa = repa_loss(repa_pred.float(), feats, self.cfg.repa_mode)
            out["repa"] = repa
            total = total + self.cfg.repa_weight * repa
        out["loss"] = total
        return out

    def __call__(self, model, x1: torch.Tensor, y: torch.Tensor, feats_dino: torch.Tensor | None,
                 generator: torch.Generator | None = None, part: BatchPart | None = None
                 ) -> dict[str, torch.Tensor]:
        """Loss terms of micro-batch `x1` (rows `part` of the step's global batch): `draw`, then
        `compute`."""
        return self.compute(model, x1, y, feats_dino, self.draw(x1, generator, part))

    def compute(self, model, x1: torch.Tensor, y: torch.Tensor, feats_dino: torch.Tensor | None,
                draws: StepDraws) -> dict[str, torch.Tensor]:
        """Loss terms of micro-batch `x1` with its random numbers already drawn: device work only."""
        batch = self.noise_with(x1, draws)
        use_repa = feats_dino is not None and self.cfg.repa_weight > 0
        out = model(batch.x_t, batch.t_tex, batch.t_sem, y, return_repa=use_repa,
                    label_uniforms=batch.label_uniforms)
        pred, repa_pred = out if use_repa else (out, None)
        return self.terms(pred, batch.target, repa_pred, feats_dino if use_repa else None)


def repa_loss(pred: torch.Tensor, target: torch.Tensor, mode: str) -> torch.Tensor:
    """Token alignment between projected hidden states and DINO features, both (B, N, C)."""
    cos = (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
    if mode == "cos":
        return cos
    mse = ((pred - target) ** 2).mean()
    if mode == "mse":
        return mse
    if mode == "cos_mse":
        return (cos + mse) / 2
    raise ValueError(f"diffusion.repa_mode: unknown mode {mode!r} (known: cos, mse, cos_mse)")
