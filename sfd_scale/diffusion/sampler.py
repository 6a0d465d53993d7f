"""SFD sampling: integrate the probability-flow ODE on the global clock tau from noise to data.

tau runs from 0 to schedule.t_end (1 + delta_t) and maps to (t_sem, t_tex). The drift is masked
per channel group, as in the reference: texture channels move only where tau >= delta_t, semantic
channels only where tau <= 1. So phase I (tau < delta_t) moves semantics alone, phase II both,
phase III (tau > 1) texture alone.

Fixed-grid solvers ('euler', 'heun') are ours and reproduce torchdiffeq's 'euler' and 'heun2' on
the same grid operation for operation; 'dopri5' is torchdiffeq's adaptive solver.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torchdiffeq import odeint

from sfd_scale.diffusion.guidance import VelocityFn
from sfd_scale.diffusion.schedule import OffsetSchedule, sampling_grid

Drift = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Solver(str, enum.Enum):
    EULER = "euler"
    HEUN = "heun"
    DOPRI5 = "dopri5"


@dataclass(frozen=True)
class SamplerSettings:
    """ODE solver settings (config section `sample`)."""

    solver: Solver = Solver.DOPRI5
    """'euler' or 'heun' on a fixed grid, or adaptive 'dopri5'."""
    num_steps: int = 250
    """Grid points for euler/heun (num_steps - 1 steps); unused by dopri5."""
    atol: float = 1e-6
    """dopri5 absolute tolerance."""
    rtol: float = 1e-3
    """dopri5 relative tolerance."""
    timestep_shift: float = 0.0
    """Grid shift s (t' = s t / (1 + (s - 1) t)); <= 0 or 1 means none."""

    def __post_init__(self) -> None:
        try:
            solver = Solver(self.solver)
        except ValueError:
            known = ", ".join(repr(s.value) for s in Solver)
            raise ValueError(f"sample.solver: unknown solver {self.solver!r} "
                             f"(known: {known})") from None
        object.__setattr__(self, "solver", solver)
        if solver is not Solver.DOPRI5 and self.num_steps < 2:
            raise ValueError(f"sample.num_steps must be at least 2 for {solver.value}, "
                             f"got {self.num_steps}")
        if self.atol <= 0 or self.rtol <= 0:
            raise ValueError(f"sample.atol and sample.rtol must be positive, got "
                             f"{self.atol} and {self.rtol}")


def sfd_drift(velocity_fn: VelocityFn, labels: torch.Tensor, schedule: OffsetSchedule,
              semantic_channels: int) -> Drift:
    """The masked SFD drift `(tau, x) -> dx/dtau`, tau a 0-d tensor (torchdiffeq's signature)."""
    # The texture clock starts where the offset has been used up; for ConstantOffset that is
    # delta_t, the reference's rule.
    texture_start = schedule.max_offset

    def drift(tau: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        split = x.shape[1] - semantic_channels
        tau_b = tau.to(x.dtype).repeat(x.shape[0])  # (B,)
        t_sem, t_tex = schedule.sample_times(tau_b)
        v = velocity_fn(x, t_tex, t_sem, labels)  # (B, C, H, W)
        shape = (-1,) + (1,) * (x.dim() - 1)
        tex_on = (tau_b >= texture_start).view(shape)
        sem_on = (tau_b <= 1.0).view(shape)
        return torch.cat([v[:, :split] * tex_on, v[:, split:] * sem_on], dim=1)

    return drift


def integrate_fixed(drift: Drift, x: torch.Tensor, grid: torch.Tensor,
                    solver: Solver) -> torch.Tensor:
    """Euler or Heun over the points of `grid`; returns the state at grid[-1].

    Times stay in the grid's dtype and are cast to the state's dtype only for the drift, as
    torchdiffeq does, so results match its 'euler' / 'heun2' bit for bit.
    """
    grid = grid.to(x.device)
    for t0, t1 in zip(grid[:-1], grid[1:]):
        dt = t1 - t0
        k1 = drift(t0, x)
        if solver is Solver.EULER:
            x = x + dt * k1
        elif solver is Solver.HEUN:
            k2 = drift(t0 + dt, x + dt * k1)
            x = x + dt * (k1 * 0.5 + k2 * 0.5)
        else:
            raise ValueError(f"sample.solver: {solver.value!r} is not a fixed-grid solver")
    return x


@torch.no_grad()
def sample(velocity_fn: VelocityFn, noise: torch.Tensor, labels: torch.Tensor,
           schedule: OffsetSchedule, settings: SamplerSettings,
           semantic_channels: int) -> torch.Tensor:
    """Integrate from noise at tau = 0 to tau = schedule.t_end; returns the final composite latent.

    noise: (B, C, H, W) with the last `semantic_channels` channels semantic; labels: (B,) long.
    """
    if not 0 <= semantic_channels <= noise.shape[1]:
        raise ValueError(f"model.semantic_channels = {semantic_channels} does not fit a latent "
                         f"with {noise.shape[1]} channels")
    if labels.shape != noise.shape[:1]:
        raise ValueError(f"labels must have shape ({noise.shape[0]},), got {tuple(labels.shape)}")
    drift = sfd_drift(velocity_fn, labels, schedule, semantic_channels)
    if settings.solver is Solver.DOPRI5:
        # Adaptive steps do not depend on the output times, so the endpoints are enough.
        span = torch.tensor([0.0, schedule.t_end], dtype=torch.float64, device=noise.device)
        path = odeint(drift, noise, span, method="dopri5", atol=settings.atol, rtol=settings.rtol)
        return path[-1]
    grid = sampling_grid(settings.num_steps, schedule, settings.timestep_shift)
    return integrate_fixed(drift, noise, grid, settings.solver)


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """Class labels for sample indices 0..n-1 with every class equally often (reference rule).

    Index i gets class i // (n // num_classes); the n % num_classes leftover indices get classes
    0, 1, 2, ... (50 k samples over 1000 classes: 50 each). Callers index this by global index.
    """
    if n < 1 or num_classes < 1:
        raise ValueError(f"sample.num_images and model.num_classes must be positive, got {n} "
                         f"and {num_classes}")
    per_class = n // num_classes
    full = per_class * num_classes
    index = torch.arange(n)
    return torch.where(index < full, index // max(per_class, 1), index - full)


def _index_seed(seed: int, index: int) -> int:
    # SeedSequence hashes (seed, index) so nearby pairs get unrelated generator states.
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])


def per_index_noise(indices: torch.Tensor | list[int], shape: tuple[int, ...], seed: int,
                    dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal noise (len(indices), *shape); row i from a generator seeded by (seed, index).

    A sample's noise depends only on its global index and the seed, never on batch size or rank.
    """
    indices = [int(i) for i in indices]
    if seed < 0 or any(i < 0 for i in indices):
        raise ValueError(f"sample.seed and sample indices must be non-negative, got seed {seed}")
    out = torch.empty((len(indices), *shape), dtype=torch.float32)
    for row, index in enumerate(indices):
        generator = torch.Generator().manual_seed(_index_seed(seed, index))
        out[row] = torch.randn(shape, generator=generator)
    return out.to(device=device, dtype=dtype)
