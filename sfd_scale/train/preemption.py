"""Preemption: every rank stops at the same step boundary, the trainer checkpoints, the job requeues.

A stop is requested in either of two ways:
  * a signal to a training process (SIGUSR1 or SIGTERM by default: SLURM sends SIGTERM to
    every process of a job it preempts or cancels, and torchrun passes SIGTERM on to its ranks);
  * the request file `<run_dir>/preempt.request`, which a batch script writes when *it* gets
    the signal (`#SBATCH --signal=B:USR1@300` reaches the batch shell only). The file reaches
    the ranks through the shared run folder without relying on any launcher to forward
    signals; only rank 0 looks at it, so a big job costs the file system one stat per step.

`should_stop(step)` is a collective: every `check_every` steps all ranks all-reduce their flag,
so all of them see the request at the same step and checkpoint that same step. After the
checkpoint, `mark_stopped` (rank 0) writes `<run_dir>/preempt.done` (JSON: step, reason), which
tells the batch script that the run stopped on request (launchers/slurm_common.sh then requeues
the job after a SIGUSR1); the next run resumes from that checkpoint, with the same data position
and step counter.
"""
from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from types import FrameType

import torch

from sfd_scale.atomic import atomic_write_bytes
from sfd_scale.parallel import distributed

log = logging.getLogger(__name__)

REQUEST_FILE = "preempt.request"
"""Written (by the batch script, or anyone) to ask the run to checkpoint and stop."""
DONE_FILE = "preempt.done"
"""Written by rank 0 after the stop checkpoint; the batch script requeues when it exists."""
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionWatcher:
    """Turns stop signals and the request file into one agreed stop step for all ranks.

    Use as a context manager around training (it installs the signal handlers on entry and
    puts the previous ones back on exit), and pass `should_stop` to the trainer.
    """

    def __init__(self, run_dir: Path, is_main: bool, check_every: int = 1,
                 signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        if check_every < 1:
            raise ValueError(f"preemption check_every must be at least 1, got {check_every}")
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.check_every = check_every
        self.signals = signals
        self.signal_name: str | None = None
        """The last stop signal this process received (None: none yet)."""
        self.stop_step: int | None = None
        """The step at which all ranks agreed to stop (None: not stopped)."""
        self.reason: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    @property
    def request_path(self) -> Path:
        return self.run_dir / REQUEST_FILE

    @property
    def done_path(self) -> Path:
        return self.run_dir / DONE_FILE

    def __enter__(self) -> PreemptionWatcher:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs between two bytecodes of the main thread: only note it; the loop acts on it.
        self.signal_name = signal.Signals(signum).name

    def _local_reason(self) -> str | None:
        if self.signal_name is not None:
            return self.signal_name
        if self.is_main and self.request_path.exists():
            return f"request file {self.request_path}"
        return None

    def should_stop(self, step: int) -> bool:
        """Collective on check steps (step % check_every == 0): True on every rank when any rank
        got a stop signal or rank 0 sees the request file."""
        if step % self.check_every:
            return False
        local = self._local_reason()
        flags = torch.tensor([0.0 if local is None else 1.0])
        if distributed.all_reduce(flags, op="max")[0].item() == 0:
            return False
        self.stop_step = step
        self.reason = local or "another rank's stop signal"
        log.warning("stop requested (%s): checkpointing step %d on every rank, then exiting", self.reason, step)
        return True

    def mark_stopped(self, step: int) -> None:
        """After the stop checkpoint of `step` is published: rank 0 records it in DONE_FILE and
        consumes the request file (so a rerun does not stop at once)."""
        if not self.is_main or self.stop_step is None:
            return
        record = {"step": step, "reason": self.reason, "time": time.time()}
        atomic_write_bytes(self.done_path, (json.dumps(record) + "\n").encode())
        self.request_path.unlink(missing_ok=True)
        log.info("stopped at step %d on request; %s written", step, self.done_path)
