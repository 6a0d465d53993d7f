"""SFD training objective (SPEC section 3): weighted velocity MSE + cosine + REPA alignment.

Every term is returned separately so logs show what moves; `loss` is their sum, as the
reference trains on mse + cos + repa (each averaged over the batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sfd_scale.config import DiffusionConfig
from sfd_scale.diffusion.schedule import OffsetSchedule, build_offset_schedule, sample_train_t


@dataclass
class NoisedBatch:
    """Everything one training forward needs, drawn from (x1, generator)."""

    x_t: torch.Tensor         # (B, C, H, W) noised composite latent
    target: torch.Tensor      # (B, C, H, W) velocity x1 - x0
    t_sem: torch.Tensor       # (B,)
    t_tex: torch.Tensor       # (B,)


class SFDLoss:
    """Draws times and noise, noises each channel group at its own time, and scores the model."""

    def __init__(self, cfg: DiffusionConfig, semantic_channels: int) -> None:
        self.cfg = cfg
        self.semantic_channels = semantic_channels
        self.schedule: OffsetSchedule = build_offset_schedule(cfg.offset, cfg.delta_t)

    def noise(self, x1: torch.Tensor, generator: torch.Generator | None = None) -> NoisedBatch:
        """Draws t (logit-normal), x0 ~ N(0, I) and builds x_t per channel group.

        Random numbers come from a CPU generator so runs are reproducible across devices.
        """
        b = x1.shape[0]
        t = sample_train_t(b, self.cfg.time_sampling, generator, self.cfg.logit_mean,
                           self.cfg.logit_std).to(x1.device)
        x0 = torch.randn(x1.shape, generator=generator, dtype=torch.float32).to(x1.device, x1.dtype)
        t_sem, t_tex = self.schedule.train_times(t)
        s = self.semantic_channels
        # Per-channel time: texture channels at t_tex, the last `s` (semantic) at t_sem.
        t_map = torch.cat([t_tex[:, None].expand(b, x1.shape[1] - s), t_sem[:, None].expand(b, s)], dim=1)
        t_map = t_map[:, :, None, None].to(x1.dtype)
        x_t = t_map * x1 + (1 - t_map) * x0
        return NoisedBatch(x_t=x_t, target=x1 - x0, t_sem=t_sem, t_tex=t_tex)

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
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        batch = self.noise(x1, generator)
        use_repa = feats_dino is not None and self.cfg.repa_weight > 0
        out = model(batch.x_t, batch.t_tex, batch.t_sem, y, return_repa=use_repa, generator=generator)
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
