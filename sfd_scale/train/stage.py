"""A small Adam loop for the auxiliary stages (Semantic VAE, and the demo's toy encoders)."""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn as nn

from sfd_scale.config import StageTraining

log = logging.getLogger(__name__)

BatchFn = Callable[[torch.Generator], tuple]
LossFn = Callable[..., dict[str, torch.Tensor]]


def random_batches(*tensors: torch.Tensor, batch_size: int) -> BatchFn:
    """Batches drawn uniformly (with a seeded generator) from in-memory tensors of equal length."""
    n = tensors[0].shape[0]
    if any(t.shape[0] != n for t in tensors):
        raise ValueError("all tensors must have the same number of rows")

    def draw(generator: torch.Generator) -> tuple:
        index = torch.randint(0, n, (min(batch_size, n),), generator=generator)
        return tuple(t[index] for t in tensors)

    return draw


def fit(module: nn.Module, next_batch: BatchFn, loss_fn: LossFn, stage: StageTraining,
        name: str, log_every: int = 100) -> dict[str, float]:
    """Adam on `loss_fn(*batch)['loss']` for `stage.steps`; returns the last step's terms."""
    if stage.steps <= 0:
        raise ValueError(f"{name}: steps must be positive, got {stage.steps}")
    generator = torch.Generator().manual_seed(stage.seed)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=stage.lr)
    module.train()
    terms: dict[str, float] = {}
    for step in range(1, stage.steps + 1):
        out = loss_fn(*next_batch(generator))
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        if step % log_every == 0 or step == stage.steps:
            terms = {k: float(v.detach()) for k, v in out.items()}
            log.info("%s step %d/%d: %s", name, step, stage.steps,
                     ", ".join(f"{k} {v:.4f}" for k, v in terms.items()))
    module.eval()
    return terms
