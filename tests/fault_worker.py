"""Fault-injection test worker: tests/dist_worker.py, plus a SIGKILL at a named point and/or a
poisoned batch, chosen by environment variables (so every rank of a launch gets the same plan).

    SFD_FAULT=<point>:<step>[:<ms>]     where to die; SFD_FAULT_RANKS=all | 0 | 1 | 0,1 (default all)
      after_step:K      right after optimizer step K (before its checkpoint, if any)
      in_write:K        while checkpoint K is written: this rank's files are in the temporary
                        folder, no manifest yet (rank 0 has not written the trainer entry either)
      after_manifest:K  (publishing rank) manifest written into the temporary folder, not renamed
      after_rename:K    (publishing rank) step folder renamed into place, `latest` not yet updated
      in_retention:K    (publishing rank) at step K or later, an old step folder moved to the
                        trash name but not yet deleted
      timer:K:MS        MS milliseconds after step K, wherever the process then is
    SFD_POISON=<nan|spike>:<step>,<step>...   the batch latents of those (1-based) steps become
                        NaN or are multiplied by 1e3; SFD_POISON_RANKS as above (default all)

A killed rank prints `FAULT: SIGKILL rank R at <point>` first; the other ranks then fail in their
next collective or are killed by `dist_worker.launch`, as a cluster scheduler would do.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import types
from pathlib import Path

from dist_worker import main as worker_main

RANK = int(os.environ.get("RANK", "0"))
_progress = {"step": 0}  # number of the step being taken (1-based), for the batch and trash hooks


def _selected(var: str) -> bool:
    ranks = os.environ.get(var, "all")
    return ranks == "all" or str(RANK) in ranks.split(",")


def _die(where: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"FAULT: SIGKILL rank {RANK} at {where}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _folder_step(folder: Path) -> int | None:
    """Step of a temporary checkpoint folder '.tmp-step-00000004-1a2b3c4d', else None."""
    parts = folder.name.split("-")
    if folder.name.startswith(".tmp-step-") and len(parts) >= 3 and parts[2].isdigit():
        return int(parts[2])
    return None


def install() -> None:
    """Wrap the trainer and checkpoint functions this process's SFD_FAULT / SFD_POISON need."""
    import sfd_scale.train.checkpoint as ckpt
    import sfd_scale.train.collective_checkpoint as collective
    import sfd_scale.train.trainer as trainer_mod

    point, _, rest = os.environ.get("SFD_FAULT", "").partition(":")
    kill_here = bool(point) and _selected("SFD_FAULT_RANKS")
    step_text, _, ms = rest.partition(":")
    at = int(step_text) if point else -1

    launch, finish = trainer_mod.Trainer._launch, trainer_mod.Trainer._finish

    def counted_launch(self):
        _progress["step"] = self.step + 1
        return launch(self)

    def guarded_finish(self, launched):  # step K is over once its numbers are read
        result = finish(self, launched)
        if kill_here and launched.number == at:
            if point == "after_step":
                _die(f"after_step:{at}")
            if point == "timer":
                threading.Timer(int(ms) / 1000, _die, args=(f"timer:{at}:{ms}",)).start()
        return result

    trainer_mod.Trainer._launch, trainer_mod.Trainer._finish = counted_launch, guarded_finish

    kind, _, steps = os.environ.get("SFD_POISON", "").partition(":")
    if kind and _selected("SFD_POISON_RANKS"):
        poison_steps = {int(s) for s in steps.split(",")}
        factor = {"nan": float("nan"), "spike": 1e3}[kind]
        endless = trainer_mod._endless

        def poisoned(loader):
            for x, y, feats in endless(loader):
                yield (x * factor if _progress["step"] in poison_steps else x), y, feats

        trainer_mod._endless = poisoned

    if not kill_here:
        return
    if point == "in_write":
        write_state = collective.write_state

        def write_then_die(folder, name, state):  # right after this rank's RNG entry is written
            write_state(folder, name, state)
            if folder.name == collective.RNG_DIR and _folder_step(folder.parent) == at:
                _die(f"in_write:{at}")

        collective.write_state = write_then_die
    elif point == "after_manifest":
        write_synced = ckpt._write_synced

        def manifest_then_die(path, text):
            write_synced(path, text)
            if path.name == ckpt.MANIFEST_NAME and _folder_step(path.parent) == at:
                _die(f"after_manifest:{at}")

        ckpt._write_synced = manifest_then_die
    elif point == "after_rename":
        replace_text = ckpt._replace_text

        def die_before_latest(path, text):
            if path.name == ckpt.LATEST_NAME and text.strip() == f"step-{at:08d}":
                _die(f"after_rename:{at}")
            replace_text(path, text)

        ckpt._replace_text = die_before_latest
    elif point == "in_retention":
        rmtree = ckpt.shutil.rmtree

        def die_in_trash(path, *args, **kwargs):
            if Path(path).name.startswith(".trash-step-") and _progress["step"] >= at:
                _die(f"in_retention:{at}")
            rmtree(path, *args, **kwargs)

        ckpt.shutil = types.SimpleNamespace(rmtree=die_in_trash)
    elif point not in ("after_step", "timer"):
        raise ValueError(f"SFD_FAULT={os.environ['SFD_FAULT']!r}: unknown point {point!r}")


# ----------------------------------------------------------------------------------------------
# Launch side, for tests/test_faults_kill*.py
# ----------------------------------------------------------------------------------------------
WORKER = Path(__file__)
"""Pass as `script` to `dist_worker.launch` (with SFD_FAULT / SFD_POISON in `env`)."""
CKPT_EVERY = 2
"""Checkpoint interval of the kill tests (their YAML sets train.ckpt_every to it)."""


def run_until_killed(nproc: int, args: list[str], log_dir: Path, fault: str, ranks: str = "all") -> str:
    """Launch this worker with SFD_FAULT; returns the failure report, which must show the SIGKILL."""
    from dist_worker import WorkerError, launch

    try:
        launch(nproc, args, log_dir, script=WORKER, env={"SFD_FAULT": fault, "SFD_FAULT_RANKS": ranks})
    except WorkerError as err:
        report = str(err)
        chosen = range(nproc) if ranks == "all" else [int(r) for r in ranks.split(",")]
        if not all(f"rank {r} (exit -9)" in report and f"FAULT: SIGKILL rank {r} at" in report for r in chosen):
            raise
        return report
    raise AssertionError(f"the run finished without reaching fault {fault} on ranks {ranks}")


def expected_newest(point: str, at: int, before: int) -> int | None:
    """Newest complete checkpoint step after a kill at `point:at` in a run resumed from `before`
    (0: none), if the point pins it down. Checkpoints are at multiples of CKPT_EVERY."""
    if point == "after_step":   # step `at` is done, its checkpoint (if any) not begun
        return max(before, CKPT_EVERY * ((at - 1) // CKPT_EVERY))
    if point in ("in_write", "after_manifest"):
        return max(before, at - CKPT_EVERY)
    if point == "after_rename":
        return at
    return None                 # timer, in_retention: wherever the kill landed


def check_after_kill(ckpt_root: Path, point: str, at: int, before: int) -> int:
    """Every complete-looking checkpoint verifies, the newest is the one the point implies, and the
    leftovers of the interrupted write are there; returns the newest complete step (0: none)."""
    from sfd_scale.train.checkpoint import CheckpointStore

    store = CheckpointStore(ckpt_root)
    steps = store.complete_steps()
    for step in steps:
        store.verify(step)  # a kill never leaves a torn folder that looks complete
    newest = steps[-1] if steps else 0
    want = expected_newest(point, at, before)
    if want is not None and newest != want:
        raise AssertionError(f"after a kill at {point}:{at} (resumed from {before}) the newest complete "
                             f"checkpoint is {newest}, expected {want}; complete: {steps}")
    names = [p.name for p in ckpt_root.iterdir()] if ckpt_root.is_dir() else []
    if point == "after_manifest" and not any(
            n.startswith(f".tmp-step-{at:08d}-") and (ckpt_root / n / "manifest.json").is_file() for n in names):
        raise AssertionError(f"expected a temporary folder of step {at} with its manifest: {names}")
    if point == "after_rename" and (ckpt_root / "latest").is_file() \
            and (ckpt_root / "latest").read_text().strip() == f"step-{at:08d}":
        raise AssertionError("the kill should have come before `latest` was updated")
    if point == "in_retention" and not any(n.startswith(".trash-step-") for n in names):
        raise AssertionError(f"expected a half-deleted (trash) step folder: {names}")
    return newest


def final_checkpoint_state(run_dir: Path, step: int) -> dict:
    """Everything the checkpoint of `step` holds, as plain nested tensors: model, EMA and optimizer
    (a DCP folder is converted into one state dict), trainer state and every rank's RNG."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from sfd_scale.train.checkpoint import CheckpointStore, read_state

    store = CheckpointStore(run_dir / "checkpoints")
    store.verify(step)
    folder = store.step_dir(step)
    # The trainer seeds torch only: Python's `random` and NumPy's global generator start from OS
    # entropy in every fresh process (resume restores them, but two fresh runs differ), and
    # training draws nothing from them; so the torch generator is the comparable part.
    if (folder / "dcp").is_dir():
        converted = run_dir / f"step{step}-dcp.pt"
        dcp_to_torch_save(folder / "dcp", converted)
        state = {"dcp": torch.load(converted, weights_only=True)}
    else:
        state = {name: read_state(folder, name) for name in ("model", "ema", "optimizer")}
    state["trainer"] = read_state(folder, "trainer")
    state["rng"] = {p.stem: read_state(folder / "rng", p.stem)["torch_cpu"]
                    for p in sorted((folder / "rng").glob("*.json"))}
    return state  # in this order, so a comparison meets the engine state first


def assert_identical(a, b, where: str = "<root>") -> None:
    """Same nested structure with bit-identical tensors."""
    import torch

    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)):
            raise AssertionError(f"{where}: tensors differ")
    elif isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            raise AssertionError(f"{where}: keys differ: {sorted(map(str, a))} vs {sorted(map(str, b))}")
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            raise AssertionError(f"{where}: {a!r} vs {b!r}")
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}.{i}")
    elif a != b:
        raise AssertionError(f"{where}: {a!r} vs {b!r}")


def assert_same_checkpoint(run_dir: Path, reference_dir: Path, step: int) -> None:
    """The checkpoints of `step` of two runs hold bit-identical state, generators checked last."""
    got, want = final_checkpoint_state(run_dir, step), final_checkpoint_state(reference_dir, step)
    got_rng, want_rng = got.pop("rng"), want.pop("rng")
    assert_identical(got, want, f"checkpoint {step}")
    assert_identical(got_rng, want_rng, f"checkpoint {step} torch generators (something drew from the global "
                                        "generator after resume restored it; see docs/reliability.md)")


if __name__ == "__main__":
    install()
    worker_main()
