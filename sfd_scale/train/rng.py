"""Capture and restore every random number generator a training step draws from.

The captured state holds only tensors and plain Python values, so it is stored with
`sfd_scale.train.checkpoint.flatten_state` like any other entry (no pickle). CUDA state is taken
for the current device only: each rank owns one GPU, and touching the others would create a CUDA
context on every GPU of the node.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

_REQUIRED_KEYS = ("python", "numpy", "torch_cpu")


def capture_rng() -> dict[str, Any]:
    """Snapshot of Python `random`, the NumPy global generator, torch CPU and (if present) the current CUDA device."""
    py_version, py_internal, py_gauss_next = random.getstate()
    np_name, np_key, np_pos, np_has_gauss, np_cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": py_version,
            # 625 uint32 words: stored as a tensor to keep the JSON skeleton small.
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss_next,
        },
        "numpy": {
            "bit_generator": np_name,
            "key": torch.from_numpy(np_key.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached_gaussian),
        },
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set every generator back to a `capture_rng` snapshot (one that went through a checkpoint is fine)."""
    missing = [key for key in _REQUIRED_KEYS if key not in state]
    if missing:
        raise ValueError(f"RNG state lacks {missing}; expected the dict made by capture_rng()")
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["bit_generator"], npy["key"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch_cpu"])

    has_cuda = torch.cuda.is_available()
    if "torch_cuda" in state and has_cuda:
        torch.cuda.set_rng_state(state["torch_cuda"])
    elif "torch_cuda" in state:
        # Resuming a GPU run on a CPU-only machine (debugging): draws cannot match the GPU ones anyway.
        logger.warning("checkpoint has a CUDA RNG state but CUDA is not available; it is not restored")
    elif has_cuda:
        logger.warning("checkpoint has no CUDA RNG state (saved without CUDA); the CUDA generator keeps its "
                       "current state")
