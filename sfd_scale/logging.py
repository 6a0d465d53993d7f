"""Run logging: one console logger for the package, and metrics to JSON lines plus (optionally) wandb.

This module shares its name with the standard library's `logging`; it is only ever imported as
`sfd_scale.logging`, where `import logging` below is the absolute standard-library import.
"""

from __future__ import annotations

if __name__ == "logging":
    # The sfd_scale folder itself is on sys.path (a script run from inside it), so this file is
    # shadowing the standard library and `import logging` below would import this file again.
    raise ImportError("sfd_scale/logging.py was imported as the top-level module 'logging'; run Python "
                      "from the repository root (not from inside sfd_scale/) and import sfd_scale.logging")

import json
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGE_LOGGER = "sfd_scale"
WANDB_MODES = ("disabled", "offline", "online")
_RUN_ID_FILE = "wandb_run_id.txt"


def get_rank() -> int:
    """This process's global rank: RANK (torchrun, deepspeed), else SLURM_PROCID (srun), else 0."""
    raw = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable RANK={raw!r} is not an integer") from None


def get_logger() -> logging.Logger:
    """The package logger ('sfd_scale', parent of every module logger): INFO on rank 0, WARNING elsewhere.

    Safe to call repeatedly; the console handler is added once.
    """
    rank = get_rank()
    logger = logging.getLogger(PACKAGE_LOGGER)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not any(getattr(h, "_sfd_scale_console", False) for h in logger.handlers):
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
        handler._sfd_scale_console = True  # marks our handler so repeated calls do not stack handlers
        logger.addHandler(handler)
    return logger


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record, not the stream it was created
    with (which a test harness or a notebook may since have closed or replaced)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class MetricsLogger:
    """Appends one JSON object per `log` call to `run_dir/metrics.jsonl`; mirrors to wandb unless disabled.

    Create it on rank 0 only. wandb keeps all its files under `run_dir` (nothing in ~/.cache; this
    sets WANDB_DIR, WANDB_CACHE_DIR, WANDB_CONFIG_DIR and WANDB_DATA_DIR for the process), and
    the wandb run id is stored in `run_dir/wandb_run_id.txt`, so a resumed run in the same
    `run_dir` continues the same wandb run.

    Rows that carry `images_per_s` also get the derived throughput (see `Throughput`: TFLOP/s,
    MFU) when `config` is a whole run configuration, and every row gets this process's memory
    peaks since the previous row (`memory_metrics`).
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], wandb_mode: str = "offline",
                 project: str = "sfd-scale", run_id: str | None = None) -> None:
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"logging.wandb={wandb_mode!r}; choose one of {', '.join(WANDB_MODES)}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._wandb_run = None
        if wandb_mode != "disabled":
            self._wandb_run = self._start_wandb(config, wandb_mode, project, run_id)
        self.wandb_run_id: str | None = None if self._wandb_run is None else self._wandb_run.id
        self.throughput = Throughput.from_config(config)
        self._file = open(self.metrics_path, "a", encoding="utf-8")

    def _start_wandb(self, config: dict[str, Any], mode: str, project: str, run_id: str | None) -> Any:
        try:
            import wandb  # imported here: runs with logging.wandb=disabled must not need it
        except ImportError:
            raise ImportError(f"logging.wandb={mode} needs the wandb package: install it (pip install wandb) "
                              "or set logging.wandb=disabled") from None
        wandb_home = self.run_dir / "wandb_home"
        for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data")):
            (wandb_home / sub).mkdir(parents=True, exist_ok=True)
            os.environ[var] = str(wandb_home / sub)
        os.environ["WANDB_DIR"] = str(self.run_dir)  # wandb adds its own wandb/ sub-folder
        return wandb.init(project=project, id=self._run_id(run_id), resume="allow", mode=mode,
                          config=config, dir=str(self.run_dir))

    def _run_id(self, requested: str | None) -> str:
        path = self.run_dir / _RUN_ID_FILE
        if path.is_file():
            stored = path.read_text().strip()
            if requested is not None and requested != stored:
                raise ValueError(f"run_id={requested!r} differs from the id {stored!r} stored in {path}; "
                                 "use a new run_dir for a new wandb run")
            return stored
        run_id = requested or secrets.token_hex(4)
        temp = path.with_name(f".{path.name}.tmp")
        temp.write_text(run_id + "\n")
        os.replace(temp, path)
        return run_id

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record scalar metrics (numbers, bools, strings, 0-d tensors or NumPy scalars) at `step`."""
        values = {key: _scalar(key, value) for key, value in metrics.items()}
        if self.throughput is not None and "images_per_s" in values:
            values.update(self.throughput.rates(float(values["images_per_s"])))
        values.update(memory_metrics())
        self._write({"step": step, "time": time.time(), **values})
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

    def log_image(self, step: int, key: str, path: Path) -> None:
        """Record an image file (e.g. a sample grid): its path in the JSON lines, the image in wandb."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"image to log under '{key}' not found: {path}")
        self._write({"step": step, "time": time.time(), key: str(path)})
        if self._wandb_run is not None:
            import wandb
            self._wandb_run.log({key: wandb.Image(str(path))}, step=step)

    def _write(self, record: dict[str, Any]) -> None:
        # NaN/inf are written as NaN/Infinity (Python's json reads them back): a diverging loss must be visible.
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Throughput:
    """Turns images/s into model TFLOP/s and MFU.

    FLOPs are model FLOPs of a training forward + backward per image, counted the way
    `sfd_scale.bench` counts them (SPEC section 6: 34.99 TFLOP per XXL step at batch 32);
    recomputation by activation checkpointing is not counted. MFU is relative to the dense
    datasheet peak of the card times the number of ranks, and is only reported when that peak
    is known: a bf16 run on a card listed in `sfd_scale.bench`, or SFD_PEAK_TFLOPS (per device,
    in TFLOP/s) set in the environment.
    """

    flops_per_image: float
    devices: int
    peak_tflops_per_device: float | None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Throughput | None:
        """From a whole run configuration (`to_dict(SFDConfig)`); None for anything else."""
        model = config.get("model")
        if not isinstance(model, dict) or "train" not in config:
            return None
        import torch.distributed as dist

        # Imported here: these modules import this one.
        from sfd_scale.bench import compute_dtype, count_step_flops, datasheet_peak_tflops, device_name
        from sfd_scale.config import ModelConfig, from_dict
        from sfd_scale.train.trainer import resolve_device

        model_cfg = from_dict(ModelConfig, model, "run config")
        flops = count_step_flops(model_cfg, 1, with_repa=model_cfg.repa_depth > 0)
        devices = dist.get_world_size() if dist.is_initialized() else 1
        peak = os.environ.get("SFD_PEAK_TFLOPS")
        if peak:
            try:
                peak_tflops: float | None = float(peak)
            except ValueError:
                raise ValueError(f"environment variable SFD_PEAK_TFLOPS={peak!r} is not a number") from None
        else:
            device = resolve_device(config["train"].get("device", "auto"))
            dtype = compute_dtype(config["train"].get("precision", "auto"), device)
            peak_tflops = datasheet_peak_tflops(device_name(device), dtype)
        return cls(float(flops), devices, peak_tflops)

    def rates(self, images_per_s: float) -> dict[str, float]:
        tflops = images_per_s * self.flops_per_image / 1e12
        out = {"tflops_per_s": tflops, "tflops_per_s_per_device": tflops / self.devices}
        if self.peak_tflops_per_device:
            out["mfu"] = tflops / (self.devices * self.peak_tflops_per_device)
        return out


def memory_metrics() -> dict[str, float]:
    """This process's memory in GiB: the peak resident set so far, and on CUDA the peak
    allocated since the previous call (the peak counter is reset) and what is reserved now."""
    import resource

    import torch

    # ru_maxrss is in KiB on Linux.
    out = {"mem_host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["mem_device_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["mem_device_reserved_gib"] = torch.cuda.memory_reserved() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return out


def _scalar(key: str, value: Any) -> bool | int | float | str:
    if isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # 0-d torch tensor or NumPy scalar
        return value.item()
    raise TypeError(f"metric '{key}' has type {type(value).__name__}; log numbers, strings or 0-d tensors")

