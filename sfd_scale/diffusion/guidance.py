"""Guidance for SFD sampling: classifier-free guidance and AutoGuidance, per channel group.

A conditional velocity model `model(x, t_tex, t_sem, y) -> v` is wrapped into a velocity function
with the same signature. The "unconditional" branch is either the same model with the null label
(CFG, batched with the conditional pass into one forward of size 2B) or a second, weaker model
with the same labels (AutoGuidance). Texture and semantic channels are guided with their own
scales, and a group is left unguided while its own time is below `interval_start` (the
reference's interval mode 'both').
"""
from __future__ import annotations

from typing import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _guide_group(cond: torch.Tensor, uncond: torch.Tensor, t: torch.Tensor, scale: float,
                 interval_start: float) -> torch.Tensor:
    if scale == 1.0:
        return cond  # exact: unc + 1 * (cond - unc) would round
    guided = uncond + scale * (cond - uncond)
    active = (t >= interval_start).view(-1, *([1] * (cond.dim() - 1)))  # (B, 1, 1, 1)
    return torch.where(active, guided, cond)


def combine_guidance(cond: torch.Tensor, uncond: torch.Tensor, t_tex: torch.Tensor,
                     t_sem: torch.Tensor, *, scale_tex: float, scale_sem: float,
                     interval_start: float, semantic_channels: int) -> torch.Tensor:
    """Guided velocity unc + s * (cond - unc), with s and the interval applied per channel group.

    cond, uncond: (B, C, H, W), texture channels first, the last `semantic_channels` semantic.
    t_tex, t_sem: (B,). Where a group's t < interval_start that group keeps the conditional output.
    """
    split = cond.shape[1] - semantic_channels
    tex = _guide_group(cond[:, :split], uncond[:, :split], t_tex, scale_tex, interval_start)
    sem = _guide_group(cond[:, split:], uncond[:, split:], t_sem, scale_sem, interval_start)
    return torch.cat([tex, sem], dim=1)


class GuidedVelocity:
    """A velocity function `(x, t_tex, t_sem, y) -> v` with CFG or AutoGuidance built in.

    With both scales 1 it is the conditional model itself (one forward). With `guide_model` set it
    is AutoGuidance: the guide sees the same labels and its output is the unconditional branch.
    Otherwise it is CFG: conditional and null-label passes share one forward of size 2B.
    """

    def __init__(self, model: VelocityFn, *, semantic_channels: int, null_label: int,
                 scale_tex: float = 1.0, scale_sem: float = 1.0, interval_start: float = 0.0,
                 guide_model: VelocityFn | None = None) -> None:
        if semantic_channels < 0:
            raise ValueError(f"model.semantic_channels must be >= 0, got {semantic_channels}")
        self.model = model
        self.guide_model = guide_model
        self.semantic_channels = semantic_channels
        self.null_label = null_label
        self.scale_tex = float(scale_tex)
        self.scale_sem = float(scale_sem)
        self.interval_start = float(interval_start)

    def _needs_uncond(self, t_tex: torch.Tensor, t_sem: torch.Tensor) -> bool:
        # Skip the unconditional pass when no sample of any guided group is inside the interval;
        # the result is then the conditional output either way.
        def group(scale: float, t: torch.Tensor) -> bool:
            return scale != 1.0 and bool((t >= self.interval_start).any())
        return group(self.scale_tex, t_tex) or group(self.scale_sem, t_sem)

    def __call__(self, x: torch.Tensor, t_tex: torch.Tensor, t_sem: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
        if not self._needs_uncond(t_tex, t_sem):
            return self.model(x, t_tex, t_sem, y)
        if self.guide_model is not None:
            cond = self.model(x, t_tex, t_sem, y)
            uncond = self.guide_model(x, t_tex, t_sem, y)
        else:
            null = torch.full_like(y, self.null_label)
            both = self.model(torch.cat([x, x]), torch.cat([t_tex, t_tex]),
                              torch.cat([t_sem, t_sem]), torch.cat([y, null]))  # (2B, C, H, W)
            cond, uncond = both.chunk(2, dim=0)
        return combine_guidance(cond, uncond, t_tex, t_sem, scale_tex=self.scale_tex,
                                scale_sem=self.scale_sem, interval_start=self.interval_start,
                                semantic_channels=self.semantic_channels)
