"""Exponential moving average of the weights, updated with one fused foreach call per step."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    """Holds a frozen copy of the model; ema <- decay * ema + (1 - decay) * model.

    Starts as an exact copy of the model (SPEC: EMA initialized from the model). Frozen
    parameters (pos_embed) are tracked too, so the EMA state dict has the reference keys.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"train.ema_decay must lie in [0, 1], got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._ema_params = list(self.model.parameters())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach() for p in model.parameters()]
        if len(params) != len(self._ema_params):
            raise ValueError("EMA and model have different parameter lists")
        torch._foreach_lerp_(self._ema_params, params, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)
