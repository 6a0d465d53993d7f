"""Python's garbage collector on the training loop's schedule (torchtitan's and Megatron's manual GC).

A training process holds millions of long-lived Python objects (modules, compiled graphs and
their caches), so an automatic collection of the older generations can stall the host for tens of
milliseconds at a moment of its choosing: the GPU runs out of queued work, and under data
parallelism every other rank waits for the one that stalled. Within `ScheduledGC`, automatic
collection is off and the young generations are collected every `every` steps instead, at the
same steps on every rank; nothing the loop computes changes.
"""
from __future__ import annotations

import gc


class ScheduledGC:
    """For a training loop: `start` turns automatic collection off (`every` > 0), `after_step`
    collects generations 0 and 1 after every `every`-th step, `stop` restores the previous
    setting. `every` = 0 leaves Python's collector alone."""

    def __init__(self, every: int) -> None:
        if every < 0:
            raise ValueError(f"train.gc_every must be >= 0 (0 leaves Python's collector on), got {every}")
        self.every = every
        self._was_enabled = gc.isenabled()

    def start(self) -> None:
        self._was_enabled = gc.isenabled()
        if self.every > 0:
            gc.disable()

    def after_step(self, step: int) -> None:
        if self.every > 0 and step % self.every == 0:
            gc.collect(1)

    def stop(self) -> None:
        if self._was_enabled:
            gc.enable()
