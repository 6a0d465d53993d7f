"""Shared test settings: single-threaded torch keeps CPU timings stable on 2-core machines."""
import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))  # tests/fixtures.py

import torch  # noqa: E402

torch.set_num_threads(1)
