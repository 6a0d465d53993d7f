"""Run logging: import safety of sfd_scale.logging, the rank-aware console logger, JSON lines and wandb."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sfd_scale.logging import PACKAGE_LOGGER, MetricsLogger, get_logger

REPO = Path(__file__).resolve().parents[1]
WANDB_VARS = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")


def test_import_gives_the_stdlib_logging_inside_and_a_clear_error_when_shadowing():
    check = ("import logging, sfd_scale.logging as L; "
             "assert L.logging is logging and L is not logging and hasattr(logging, 'getLogger')")
    subprocess.run([sys.executable, "-c", check], cwd=REPO, check=True)
    # From inside the package folder the file shadows the standard library: say so instead of a cryptic failure.
    shadowed = subprocess.run([sys.executable, "-c", "import logging"], cwd=REPO / "sfd_scale",
                              capture_output=True, text=True)
    assert shadowed.returncode != 0 and "imported as the top-level module 'logging'" in shadowed.stderr


@pytest.fixture
def package_logger():
    logger = logging.getLogger(PACKAGE_LOGGER)
    level, handlers = logger.level, list(logger.handlers)
    yield logger
    logger.setLevel(level)
    logger.handlers[:] = handlers


def test_rank_zero_prints_info_other_ranks_only_warnings(package_logger, monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    logger = get_logger()
    assert get_logger() is logger and logger.level == logging.INFO
    assert sum(getattr(h, "_sfd_scale_console", False) for h in logger.handlers) == 1  # not one per call
    logging.getLogger(f"{PACKAGE_LOGGER}.train.demo").info("saved step %d", 7)
    assert "[rank 0] INFO sfd_scale.train.demo: saved step 7" in capsys.readouterr().err

    logger.handlers[:] = [h for h in logger.handlers if not getattr(h, "_sfd_scale_console", False)]
    monkeypatch.setenv("RANK", "3")
    get_logger()
    logging.getLogger(f"{PACKAGE_LOGGER}.x").info("hidden")
    logging.getLogger(f"{PACKAGE_LOGGER}.x").warning("non-finite loss")
    err = capsys.readouterr().err
    assert "hidden" not in err and "[rank 3] WARNING sfd_scale.x: non-finite loss" in err

    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(ValueError, match="RANK='zero'"):
        get_logger()


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_are_appended_as_json_lines_and_flushed(tmp_path):
    logger = MetricsLogger(tmp_path, {"lr": 1e-4}, wandb_mode="disabled", project="test")
    logger.log(1, {"loss": torch.tensor(0.5), "grad_norm": np.float32(2.0), "lr": 1e-4, "skipped": 0})
    logger.log(2, {"loss": float("nan"), "phase": "warmup"})
    records = _records(tmp_path / "metrics.jsonl")  # readable before close: each write is flushed
    assert [r["step"] for r in records] == [1, 2]
    assert {k: records[0][k] for k in ("loss", "grad_norm", "lr", "skipped")} == {
        "loss": 0.5, "grad_norm": 2.0, "lr": 1e-4, "skipped": 0}
    assert math.isnan(records[1]["loss"]) and records[1]["phase"] == "warmup"

    image = tmp_path / "samples.png"
    image.write_bytes(b"png")
    logger.log_image(3, "samples", image)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        logger.log_image(3, "samples", tmp_path / "missing.png")
    with pytest.raises(TypeError, match="'hist'"):
        logger.log(4, {"hist": torch.ones(3)})
    logger.close()

    with MetricsLogger(tmp_path, {}, wandb_mode="disabled", project="test") as again:  # resume appends
        again.log(5, {"loss": 0.25})
    assert [r["step"] for r in _records(tmp_path / "metrics.jsonl")] == [1, 2, 3, 5]
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_run_id.txt").exists()


def test_bad_mode_and_missing_wandb_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="logging.wandb='offlne'"):
        MetricsLogger(tmp_path, {}, wandb_mode="offlne", project="test")
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(ImportError, match="install it.*or set logging.wandb=disabled"):
        MetricsLogger(tmp_path, {}, wandb_mode="offline", project="test")


def test_wandb_offline_stays_in_run_dir_and_resumes_the_same_run(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in WANDB_VARS:  # MetricsLogger sets them; registering them here restores them afterwards
        monkeypatch.setenv(var, str(home / "should-not-be-used"))
    run_dir = tmp_path / "run"

    first = MetricsLogger(run_dir, {"model": "B"}, wandb_mode="offline", project="test")
    first.log(1, {"loss": 1.0})
    run_id = first.wandb_run_id
    first.close()
    second = MetricsLogger(run_dir, {"model": "B"}, wandb_mode="offline", project="test")
    second.log(2, {"loss": 0.5})
    second.close()

    assert second.wandb_run_id == run_id
    assert (run_dir / "wandb_run_id.txt").read_text().strip() == run_id
    run_folders = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(run_folders) == 2 and all(f"-{run_id}" in name for name in run_folders)
    assert all((run_dir / "wandb" / name / f"run-{run_id}.wandb").is_file() for name in run_folders)
    assert list(home.rglob("*")) == []
    with pytest.raises(ValueError, match="differs from the id"):
        MetricsLogger(run_dir, {}, wandb_mode="offline", project="test", run_id="other123")
