"""Asynchronous time schedule of SFD: semantic channels run ahead of texture channels.

Convention (SPEC section 3): t = 0 is noise, t = 1 is data; x_t = t * x1 + (1 - t) * x0.
Training draws one time t in [0, 1] per sample and maps it to (t_sem, t_tex); sampling walks a
global clock tau from 0 to 1 + max offset and maps it to (t_sem, t_tex) too. The offset is a
pluggable object so a time-dependent offset (the paper's future work) is one subclass away.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class OffsetSchedule:
    """Maps a global time to the pair (t_sem, t_tex) for training and sampling."""

    max_offset: float

    def train_times(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: t ~ p(t) on [0, 1] -> (t_sem, t_tex), both in [0, 1]."""
        raise NotImplementedError

    def sample_times(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampling: global clock tau in [0, 1 + max_offset] -> (t_sem, t_tex)."""
        raise NotImplementedError

    @property
    def t_end(self) -> float:
        """Where the sampling clock stops: both groups have reached t = 1 there."""
        return 1.0 + self.max_offset


@dataclass(frozen=True)
class ConstantOffset(OffsetSchedule):
    """The paper's schedule: semantics lead texture by a fixed delta_t (0.3 in SFD)."""

    delta_t: float = 0.3

    def __post_init__(self) -> None:
        if not 0.0 <= self.delta_t < 1.0:
            raise ValueError(f"diffusion.delta_t must lie in [0, 1), got {self.delta_t}")

    @property
    def max_offset(self) -> float:  # type: ignore[override]
        return self.delta_t

    def train_times(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Stretch t over [0, 1 + dt] so both groups see their whole [0, 1] range.
        t_sem_raw = t * (1.0 + self.delta_t)
        t_sem = t_sem_raw.clamp(max=1.0)
        t_tex = (t_sem_raw - self.delta_t).clamp(0.0, 1.0)
        return t_sem, t_tex

    def sample_times(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tau.clamp(max=1.0), (tau - self.delta_t).clamp(min=0.0)


def build_offset_schedule(kind: str, delta_t: float) -> OffsetSchedule:
    """Factory used by the config boundary (`diffusion.offset`)."""
    if kind == "constant":
        return ConstantOffset(delta_t)
    raise ValueError(f"diffusion.offset: unknown offset schedule {kind!r} (known: 'constant')")


def sample_train_t(batch: int, kind: str, generator: torch.Generator | None = None,
                   mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Per-sample training time in [0, 1]: logit-normal(mean, std) or uniform (float32, CPU)."""
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(batch, generator=generator) * std + mean)
    if kind == "uniform":
        return torch.rand(batch, generator=generator)
    raise ValueError(f"diffusion.time_sampling: unknown kind {kind!r} (known: logit_normal, uniform)")


def shift_time(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Timestep shift t' = s t / (1 + (s - 1) t); shift <= 0 or == 1 means no shift."""
    if shift <= 0 or shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def sampling_grid(num_steps: int, schedule: OffsetSchedule, shift: float = 0.0) -> torch.Tensor:
    """The sampling clock: num_steps points from 0 to t_end (float64 for exact phase edges).

    The shift is applied on tau / t_end and rescaled, as SPEC section 4 says.
    """
    if num_steps < 2:
        raise ValueError(f"sample.num_steps must be at least 2, got {num_steps}")
    u = torch.linspace(0.0, 1.0, num_steps, dtype=torch.float64)
    u = shift_time(u, shift)
    return u * schedule.t_end


def logit_normal_pdf(t: float, mean: float = 0.0, std: float = 1.0) -> float:
    """Density of the logit-normal at t (used by tests that check the time sampler)."""
    z = (math.log(t / (1 - t)) - mean) / std
    return math.exp(-0.5 * z * z) / (std * math.sqrt(2 * math.pi) * t * (1 - t))
