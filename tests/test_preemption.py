"""Preemption: signal or request file -> agreed stop step -> checkpoint at that step boundary -> exact resume.

Single process with the real Trainer in this process, and two gloo processes of the real
launchers/train.py, where only rank 1 gets the signal and both ranks must stop at the same step.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dist_worker import launch
from fixtures import tiny_sfd_config, write_latent_folder
from sfd_scale.config import to_dict
from sfd_scale.parallel.distributed import free_port
from sfd_scale.train.preemption import DONE_FILE, REQUEST_FILE, PreemptionWatcher
from sfd_scale.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def data_dir(tmp_path):
    return write_latent_folder(tmp_path / "latents")


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_signal_sets_the_flag_and_the_previous_handler_comes_back(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionWatcher(tmp_path, is_main=True, check_every=2) as watcher:
        assert not watcher.should_stop(2)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watcher.signal_name == "SIGUSR1"
        assert not watcher.should_stop(3)      # not a check step: the flag waits for step 4
        assert watcher.stop_step is None
        assert watcher.should_stop(4) and watcher.stop_step == 4 and watcher.reason == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_request_file_is_read_by_rank_0_only_and_consumed_when_stopped(tmp_path):
    (tmp_path / REQUEST_FILE).write_text("SIGUSR1 0\n")
    with PreemptionWatcher(tmp_path, is_main=False) as other:
        assert not other.should_stop(1)
    with PreemptionWatcher(tmp_path, is_main=True) as main:
        assert main.should_stop(1)
        assert "request file" in main.reason
        main.mark_stopped(1)
    assert json.loads((tmp_path / DONE_FILE).read_text())["step"] == 1
    assert not (tmp_path / REQUEST_FILE).exists()


def test_bad_check_interval_is_refused(tmp_path):
    with pytest.raises(ValueError, match="check_every must be at least 1, got 0"):
        PreemptionWatcher(tmp_path, is_main=True, check_every=0)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=lambda s: s.name)
def test_single_process_stops_at_the_step_boundary_and_resumes_exactly(tmp_path, data_dir, sig):
    cfg = tiny_sfd_config(data_dir, train={"log_every": 1, "ckpt_every": 0})
    straight = Trainer(cfg, tmp_path / "straight")
    straight.fit(6)

    run = tmp_path / "preempted"
    first = Trainer(cfg, run)
    with PreemptionWatcher(run, is_main=True) as watcher:
        def should_stop(step: int) -> bool:
            if step == 3:  # the signal lands while step 3 is being finished
                os.kill(os.getpid(), sig)
            return watcher.should_stop(step)

        first.fit(6, should_stop=should_stop)
        watcher.mark_stopped(first.step)
    assert first.step == 3 and first.store.complete_steps() == [3]  # checkpointed at the stop
    assert json.loads((run / DONE_FILE).read_text())["reason"] == sig.name

    second = Trainer(cfg, run)
    assert second.maybe_resume() and second.step == 3
    second.fit(6)
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4, 5, 6]   # nothing repeated or skipped
    assert [r["loss"] for r in _rows(run)] == [r["loss"] for r in _rows(tmp_path / "straight")]
    for k, v in straight.engine.unwrap().state_dict().items():
        assert torch.equal(v, second.engine.unwrap().state_dict()[k]), k


def _config_file(tmp_path: Path, data_dir: Path, run_root: Path, max_steps: int) -> Path:
    cfg = to_dict(tiny_sfd_config(data_dir, train={"log_every": 1, "ckpt_every": 0, "max_steps": max_steps}))
    cfg["train"].update(output_dir=str(run_root), exp_name="run")
    cfg["parallel"].update(engine="ddp", backend="gloo")
    path = tmp_path / f"{run_root.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_two_processes_agree_on_the_stop_step_when_only_rank_1_is_signalled(tmp_path, data_dir):
    steps = 200  # far more than the run lasts before the signal: it must stop early
    run = tmp_path / "preempted" / "run"
    config = _config_file(tmp_path, data_dir, run.parent, steps)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    logs = [open(tmp_path / f"rank{r}.log", "w+") for r in range(2)]
    procs = [subprocess.Popen([sys.executable, "launchers/train.py", "--config", str(config)], cwd=REPO,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=log, stderr=subprocess.STDOUT)
             for r, log in enumerate(logs)]
    try:
        deadline = time.monotonic() + 60
        while not ((run / "metrics.jsonl").is_file() and len(_rows(run)) >= 2):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "training did not start"
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGUSR1)  # rank 1 only: rank 0 learns of it in the all-reduce
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    assert codes == [0, 0], outputs

    stop = json.loads((run / DONE_FILE).read_text())["step"]
    assert 2 <= stop < steps
    assert all(f"checkpointing step {stop} on every rank" in out for out in outputs)
    assert "stop requested (SIGUSR1)" in outputs[1] and "another rank's stop signal" in outputs[0]
    assert (run / "checkpoints" / f"step-{stop:08d}" / "manifest.json").is_file()
    assert [r["step"] for r in _rows(run)] == list(range(1, stop + 1))

    # The rerun resumes at the stop step; compare with an uninterrupted two-process run.
    total = stop + 3
    launch(2, ["--config", str(config), "--set", f"train.max_steps={total}"], tmp_path / "resume",
           script=REPO / "launchers" / "train.py")
    straight = tmp_path / "straight" / "run"
    launch(2, ["--config", str(_config_file(tmp_path, data_dir, straight.parent, total))],
           tmp_path / "straight_logs", script=REPO / "launchers" / "train.py")
    assert [r["step"] for r in _rows(run)] == list(range(1, total + 1))
    assert [r["loss"] for r in _rows(run)] == [r["loss"] for r in _rows(straight)]
