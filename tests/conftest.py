"""Shared test settings: single-threaded torch keeps CPU timings stable on 2-core machines."""
import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
