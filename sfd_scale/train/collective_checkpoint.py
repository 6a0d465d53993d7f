"""The collective parts of a multi-rank checkpoint, shared by the SFD trainer and `EngineStage`.

Every rank writes its part into one temporary step folder that rank 0 created and publishes once
all succeeded (a failure anywhere abandons it on every rank); a resume checks that all ranks read
the same manifest and restores each rank's process RNGs from its own entry.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Callable

from sfd_scale.parallel import distributed
from sfd_scale.train.checkpoint import MANIFEST_NAME, CheckpointStore, read_state, write_state
from sfd_scale.train.rng import capture_rng, restore_rng

log = logging.getLogger(__name__)

RNG_DIR = "rng"
"""Sub-folder of a step folder with one process-RNG entry per rank."""


def rank_entry(rank: int) -> str:
    return f"rank{rank:05d}"


def save_collective(store: CheckpointStore, step: int, write: Callable[[Path], None],
                    meta: dict[str, Any], entries: list[str]) -> Path:
    """`CheckpointStore.save_files` for many ranks: rank 0 creates the temporary folder, every
    rank's `write` fills its part, and rank 0 publishes the folder once all succeeded; a failure
    on any rank abandons it and raises on every rank (none waits forever)."""
    temp = distributed.run_on_main(lambda: store.begin(step))
    error = None
    try:
        write(temp)
    except Exception as err:  # reported collectively below
        error = err
    try:
        distributed.raise_if_any_failed(error, f"writing checkpoint step {step} into {temp}")
    except RuntimeError:
        if distributed.rank() == 0:
            store.abandon(temp)
        raise
    return distributed.run_on_main(lambda: store.publish(step, temp, meta, entries=entries))


def latest_resumable_step(store: CheckpointStore, mode: str) -> int | None:
    """Collective: the highest complete step whose files match their manifest (checked by rank
    0), or None for a fresh start; mode 'must' raises when there is none, 'never' ignores them."""
    if mode == "never":
        return None

    def find() -> int | None:
        found = store.load_latest_valid(required=mode == "must")
        return None if found is None else found[0]

    return distributed.run_on_main(find)


def check_same_manifest(folder: Path) -> None:
    """Collective: raise unless every rank reads the same manifest (a folder all nodes share)."""
    try:
        digest = hashlib.sha256((folder / MANIFEST_NAME).read_bytes()).hexdigest()
    except OSError as err:
        digest = f"unreadable: {err}"
    views = distributed.all_gather_object(digest)
    differ = [r for r, d in enumerate(views) if d != views[0]]
    if differ:
        raise RuntimeError(f"ranks disagree about checkpoint {folder}: ranks {differ} see another manifest "
                           f"than rank 0; checkpoints must be on a file system every node shares")


def restore_rank_rng(folder: Path, rank: int, meta: dict[str, Any]) -> None:
    """Restore this rank's process RNGs; a rank the saving run did not have keeps its seeded state."""
    name = rank_entry(rank)
    if (folder / RNG_DIR / f"{name}.safetensors").is_file():
        restore_rng(read_state(folder / RNG_DIR, name))
    else:
        log.warning("checkpoint (saved by %s rank(s)) has no process RNG state for rank %d; it keeps its "
                    "seeded state", meta.get("world_size", 1), rank)


def save_rank_rng(folder: Path, rank: int) -> None:
    """This rank's process RNGs into the step folder being written."""
    (folder / RNG_DIR).mkdir(exist_ok=True)
    write_state(folder / RNG_DIR, rank_entry(rank), capture_rng())
