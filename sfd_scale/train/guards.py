"""Numerical guard: bad steps are skipped and counted; a run of them rolls the weights back.

A *bad step* is one whose loss or gradient norm was not finite on some rank (the engine already
skipped its optimizer and EMA update) or, with `guard.spike_factor` set, one whose loss averaged
over ranks jumps above `spike_factor` x the mean of the last `spike_window` good steps (a spike;
its update was applied). After `guard.rollback_after` consecutive bad steps the model, EMA and
optimizer are restored from the newest verified checkpoint that holds no update of the streak,
optionally with a lower learning rate, and training goes on from there.

What a rollback keeps moving forward: the step counter (it counts attempted steps, like skipped
ones), the data position and the random generators. So the batches that led to the blow-up are
not met again at the same point, and a run with the same faults is reproducible: the guard's
state is part of every checkpoint and a resume continues it exactly.

Every decision uses values that are identical on all ranks (the engine's global skip flag, the
loss averaged over ranks), so all ranks roll back together.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Protocol

from sfd_scale.config import GuardConfig, TrainConfig
from sfd_scale.parallel import distributed
from sfd_scale.parallel.engine import Engine
from sfd_scale.train.checkpoint import CheckpointStore, CorruptCheckpointError

log = logging.getLogger(__name__)


class GuardError(RuntimeError):
    """Training cannot go on safely (no checkpoint to roll back to, or too many rollbacks)."""


class GuardedTrainer(Protocol):
    """What the guard needs from the trainer."""

    step: int
    engine: Engine
    store: CheckpointStore


class NumericalGuard:
    """Watches every step's outcome; owns the consecutive-bad-step streak and the rollbacks."""

    def __init__(self, cfg: GuardConfig, train: TrainConfig) -> None:
        self.cfg = cfg
        if cfg.rollback_after > 0 and train.ckpt_every <= 0:
            raise ValueError(f"guard.rollback_after={cfg.rollback_after} needs periodic checkpoints to roll "
                             f"back to, but train.ckpt_every={train.ckpt_every}; set train.ckpt_every > 0 "
                             "or guard.rollback_after=0")
        if cfg.rollback_after > 0 and cfg.spike_factor > 0 and train.ckpt_every > 0:
            # Checkpoints saved during a streak of spikes hold spiked updates; the newest one from
            # before the streak must survive retention until the rollback.
            during = math.ceil((cfg.rollback_after - 1) / train.ckpt_every)
            if during > train.keep_last - 1:
                raise ValueError(
                    f"guard.rollback_after={cfg.rollback_after} with train.ckpt_every={train.ckpt_every} "
                    f"can save {during} checkpoint(s) during a streak of loss spikes, and "
                    f"train.keep_last={train.keep_last} would then delete the last good one; set "
                    f"train.keep_last >= {during + 1} or lower guard.rollback_after")
        self.reset()

    def reset(self) -> None:
        """The state of a fresh run."""
        self.consecutive_bad = 0
        self.streak_start: int | None = None
        """Step number of the first bad step of the current streak."""
        self.suspect_since: int | None = None
        """Step number of the first spike in the streak: checkpoints from it on hold its update."""
        self.spikes = 0
        self.rollbacks = 0
        self.rolled_back_steps = 0
        """Steps whose updates rollbacks discarded, in all."""
        self.lr_scale = 1.0
        self.recent_losses: list[float] = []

    # ------------------------------------------------------------------------------------------
    # State (identical on every rank; saved with the trainer's counters)
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"consecutive_bad": self.consecutive_bad, "streak_start": self.streak_start,
                "suspect_since": self.suspect_since, "spikes": self.spikes, "rollbacks": self.rollbacks,
                "rolled_back_steps": self.rolled_back_steps, "lr_scale": self.lr_scale,
                "recent_losses": list(self.recent_losses)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore `state_dict()`; None (a checkpoint from before the guard existed) resets."""
        self.reset()
        if state is None:
            return
        try:
            self.consecutive_bad = int(state["consecutive_bad"])
            self.streak_start = _optional_int(state["streak_start"])
            self.suspect_since = _optional_int(state["suspect_since"])
            self.spikes = int(state["spikes"])
            self.rollbacks = int(state["rollbacks"])
            self.rolled_back_steps = int(state["rolled_back_steps"])
            self.lr_scale = float(state["lr_scale"])
            self.recent_losses = [float(v) for v in state["recent_losses"]][-self.cfg.spike_window:]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"checkpoint guard state is malformed ({err!r}): {state!r}") from err

    # ------------------------------------------------------------------------------------------
    # The hook
    # ------------------------------------------------------------------------------------------
    @property
    def watches_spikes(self) -> bool:
        return self.cfg.spike_factor > 0

    def after_step(self, trainer: GuardedTrainer, step: int, skipped: bool, loss: float,
                   mean_loss: float | None = None) -> bool:
        """Called by every rank with the outcome of step `step` (1-based): the engine's global skip
        flag and this rank's loss. Returns True when the step was bad. Collective when it rolls
        back (a checkpoint load), and when spike detection is on unless the caller passes the
        loss averaged over ranks as `mean_loss` (then no collective).

        `trainer.step` may already be one ahead (a trainer reading its metrics a step late,
        `train.async_metrics`): a rollback then also discards the update of that later step."""
        spike = False
        if not skipped and self.watches_spikes:
            if mean_loss is None:
                mean_loss = distributed.mean_over_ranks({"loss": loss})["loss"]
            spike = self._check_spike(step, mean_loss)
            if not spike:
                self.recent_losses = (self.recent_losses + [mean_loss])[-self.cfg.spike_window:]
        if not (skipped or spike):
            self.consecutive_bad, self.streak_start, self.suspect_since = 0, None, None
            return False
        if self.consecutive_bad == 0:
            self.streak_start = step
        self.consecutive_bad += 1
        if spike and self.suspect_since is None:
            self.suspect_since = step
        if 0 < self.cfg.rollback_after <= self.consecutive_bad:
            self._rollback(trainer, step)
        return True

    def _check_spike(self, step: int, loss: float) -> bool:
        """True (counted and logged) when `loss` is a spike against the window of good losses."""
        if len(self.recent_losses) < self.cfg.spike_window:
            return False
        reference = math.fsum(self.recent_losses) / len(self.recent_losses)
        if not loss > self.cfg.spike_factor * reference:
            return False
        self.spikes += 1
        if distributed.rank() == 0:
            log.warning("step %d: loss spike %.4g > %g x %.4g (mean of the last %d good steps); %d spike(s) so far",
                        step, loss, self.cfg.spike_factor, reference, len(self.recent_losses), self.spikes)
        return True

    def _rollback(self, trainer: GuardedTrainer, step: int) -> None:
        if self.rollbacks >= self.cfg.max_rollbacks:
            raise GuardError(f"step {step}: {self.consecutive_bad} consecutive bad steps (non-finite or "
                             f"spiking loss) after {self.rollbacks} rollback(s), the most guard.max_rollbacks "
                             f"allows; the run needs a look (data, learning rate, precision) before it goes on")
        before = self.suspect_since
        target = distributed.run_on_main(lambda: newest_good_step(trainer.store, before, step))
        trainer.engine.load(trainer.store.step_dir(target))  # collective for sharded engines
        discarded = trainer.step - target  # every update since the checkpoint, steps run ahead included
        self.rollbacks += 1
        self.rolled_back_steps += discarded
        self.lr_scale *= self.cfg.rollback_lr_factor
        if distributed.rank() == 0:
            log.warning("step %d: %d consecutive bad steps since step %s; rolled model, EMA and optimizer back "
                        "to checkpoint step %d (updates of %d steps discarded); data and step counter go on; "
                        "learning rate now x%g (rollback %d of at most %d)", step, self.consecutive_bad,
                        self.streak_start, target, discarded, self.lr_scale, self.rollbacks,
                        self.cfg.max_rollbacks)
        self.consecutive_bad, self.streak_start, self.suspect_since = 0, None, None


def newest_good_step(store: CheckpointStore, before: int | None, now: int) -> int:
    """The newest complete checkpoint below step `before` (all when None) whose files verify;
    complete ones from step `before` on are set aside."""
    for candidate in reversed(store.complete_steps()):
        if before is not None and candidate >= before:
            # Out of resume's reach too: a crash before the next checkpoint must not resume from it.
            store.set_aside(candidate, f"it holds the update of the loss spike at step {before}, and step "
                                       f"{now} rolls back past it")
            continue
        try:
            store.verify(candidate)
        except CorruptCheckpointError as err:
            log.warning("not rolling back to checkpoint step %d: %s", candidate, err)
            continue
        return candidate
    limit = "" if before is None else f" from before step {before} (the first loss spike of the streak)"
    raise GuardError(f"step {now}: a rollback is due but no verified checkpoint{limit} exists under "
                     f"{store.root} (complete steps: {store.complete_steps()}); the run cannot go back to "
                     "good weights")


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)
