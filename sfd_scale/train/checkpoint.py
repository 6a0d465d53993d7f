"""Checkpoint storage: exact, pickle-free state files in atomic, checksummed step folders.

Two layers, kept apart so multi-GPU engines can reuse the first one with their own contents:

* Folder mechanics (`CheckpointStore`): a step is written into a temporary folder, every file is
  fsynced, `manifest.json` (size + sha256 of every file) is written LAST, and the folder is renamed
  into place. A step folder counts as complete only when its manifest is readable; resume takes the
  highest complete step whose files match the manifest, never the newest or largest folder.
* Contents (`flatten_state` / `unflatten_state`, `write_state` / `read_state`): any nested
  dict/list/tuple of tensors and plain Python scalars becomes one safetensors file (the tensors)
  plus one JSON file (the structure), and comes back exactly, without pickle.

Layout under `root` (one writer process per root)::

    step-00001000/
        model.safetensors  model.json     # one pair per entry passed to `save`
        meta.json                         # caller's plain-JSON metadata
        <engine sub-folders>              # anything a `save_files` writer adds
        manifest.json                     # written last: the completion marker
    latest                                # names the last saved folder, for people and tools
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from sfd_scale.atomic import atomic_path, fsync_dir

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
META_NAME = "meta.json"
LATEST_NAME = "latest"
_MANIFEST_FORMAT = "sfd-scale-checkpoint"
_STATE_FORMAT = "sfd-scale-state"
_FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_ENTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_RESERVED_ENTRIES = {"meta", "manifest"}
_TEMP_PREFIX = ".tmp-step-"
_TRASH_PREFIX = ".trash-"
_ABANDONED_PREFIX = "abandoned-"
_HASH_CHUNK = 8 << 20


class CorruptCheckpointError(RuntimeError):
    """A step folder whose files do not match its manifest (or cannot be decoded)."""


class CheckpointNotFoundError(FileNotFoundError):
    """A requested checkpoint (a step, or any usable one for resume) does not exist."""


class CheckpointWriteError(OSError):
    """Publishing a step folder failed (e.g. a full disk); the message names the folder."""


# ----------------------------------------------------------------------------------------------
# Contents: nested state <-> (flat tensors, JSON skeleton)
# ----------------------------------------------------------------------------------------------
# Skeleton encoding. None, bool, int, str and finite floats are stored as themselves and lists as
# JSON arrays; everything else is a one-key JSON object whose key says what it is:
#   {"tensor": name}   {"tuple": [...]}   {"float": "nan" | "inf" | "-inf"}
#   {"dict": {str_key: node}}             dicts whose keys are all strings
#   {"items": [[key_node, node], ...]}    other dicts (optimizer state is keyed by int)
# Because every dict is wrapped, a bare JSON object in the skeleton is always one of these tags.


def flatten_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split `state` into its tensors (named by their path, e.g. `state.0.exp_avg`) and a JSON skeleton.

    Supported: dict (any Mapping; comes back as a plain dict, key order kept) with str/int/float/
    bool/None keys, list, tuple, torch.Tensor, and exactly-typed None/bool/int/float/str. Tensors
    that are the same object in `state` come back as separate tensors. Anything else raises
    TypeError naming where it is.
    """
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, [], tensors)
    return tensors, skeleton


def unflatten_state(tensors: Mapping[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of `flatten_state`; raises ValueError if the skeleton and tensors disagree."""
    used: set[str] = set()
    state = _decode(skeleton, tensors, used, "<root>")
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"tensors not referenced by the skeleton: {unused[:5]} ({len(unused)} in all)")
    return state


def _encode(obj: Any, path: list[str], tensors: dict[str, torch.Tensor]) -> Any:
    if obj is None or type(obj) in (bool, int, str):
        return obj
    if type(obj) is float:
        return obj if math.isfinite(obj) else {"float": repr(obj)}
    if isinstance(obj, torch.Tensor):
        name = ".".join(path) or "<root>"
        if name in tensors:  # keys like "a.b" next to nested a -> b; keep names unique
            suffix = 1
            while f"{name}#{suffix}" in tensors:
                suffix += 1
            name = f"{name}#{suffix}"
        tensors[name] = obj
        return {"tensor": name}
    if type(obj) is list:
        return [_encode(v, path + [str(i)], tensors) for i, v in enumerate(obj)]
    if type(obj) is tuple:
        return {"tuple": [_encode(v, path + [str(i)], tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, Mapping):
        if all(type(k) is str for k in obj):
            return {"dict": {k: _encode(v, path + [k], tensors) for k, v in obj.items()}}
        items = []
        for k, v in obj.items():
            if not (k is None or type(k) in (bool, int, float, str)):
                raise TypeError(f"state key {k!r} at '{'.'.join(path) or '<root>'}' has type "
                                f"{type(k).__name__}; keys must be str, int, float, bool or None")
            items.append([_encode(k, path, tensors), _encode(v, path + [str(k)], tensors)])
        return {"items": items}
    raise TypeError(f"state value at '{'.'.join(path) or '<root>'}' has type {type(obj).__name__}; "
                    "checkpoints hold tensors, dict/list/tuple and plain None/bool/int/float/str "
                    "(convert numpy values with .item() or torch.from_numpy)")


def _decode(node: Any, tensors: Mapping[str, torch.Tensor], used: set[str], where: str) -> Any:
    if node is None or type(node) in (bool, int, float, str):
        return node
    if type(node) is list:
        return [_decode(v, tensors, used, f"{where}.{i}") for i, v in enumerate(node)]
    if type(node) is dict and len(node) == 1:
        (tag, body), = node.items()
        if tag == "tensor":
            if body not in tensors:
                raise ValueError(f"skeleton refers to tensor '{body}' (at {where}), which is missing")
            used.add(body)
            return tensors[body]
        if tag == "float" and body in ("nan", "inf", "-inf"):
            return float(body)
        if tag == "tuple":
            return tuple(_decode(v, tensors, used, f"{where}.{i}") for i, v in enumerate(body))
        if tag == "dict":
            return {k: _decode(v, tensors, used, f"{where}.{k}") for k, v in body.items()}
        if tag == "items":
            out = {}
            for key_node, value_node in body:
                key = _decode(key_node, tensors, used, where)
                out[key] = _decode(value_node, tensors, used, f"{where}.{key}")
            return out
    raise ValueError(f"unrecognised skeleton node at {where}: {json.dumps(node)[:200]}")


def write_state(folder: Path, name: str, state: Any) -> None:
    """Write `state` as `<name>.safetensors` + `<name>.json` in `folder` (no fsync; the store does that)."""
    _check_entry_name(name)
    tensors, skeleton = flatten_state(state)
    safetensors.torch.save_file(_safetensors_ready(tensors), str(folder / f"{name}.safetensors"),
                                metadata={"format": "pt"})
    doc = {"format": _STATE_FORMAT, "version": _FORMAT_VERSION, "skeleton": skeleton}
    (folder / f"{name}.json").write_text(json.dumps(doc, allow_nan=False))


def read_state(folder: Path, name: str) -> Any:
    """Read an entry written by `write_state` onto the CPU; undecodable files raise CorruptCheckpointError."""
    tensor_path, skeleton_path = folder / f"{name}.safetensors", folder / f"{name}.json"
    try:
        doc = json.loads(skeleton_path.read_text())
        if doc.get("format") != _STATE_FORMAT or doc.get("version") != _FORMAT_VERSION:
            raise ValueError(f"format {doc.get('format')!r} version {doc.get('version')!r}, "
                             f"expected {_STATE_FORMAT!r} version {_FORMAT_VERSION}")
        tensors = safetensors.torch.load_file(str(tensor_path), device="cpu")
        return unflatten_state(tensors, doc["skeleton"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError, safetensors.SafetensorError) as err:
        raise CorruptCheckpointError(f"cannot read entry '{name}' in {folder}: {err}") from err


def _safetensors_ready(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached tensors, each with its own storage (safetensors refuses shared memory)."""
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in tensors.items():
        if tensor.layout != torch.strided:
            raise TypeError(f"tensor '{name}' has layout {tensor.layout}; only dense tensors can be saved")
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_storages and t.numel() > 0:
            t = t.clone()
        seen_storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _check_entry_name(name: str) -> None:
    if not _ENTRY_NAME.match(name) or name in _RESERVED_ENTRIES:
        raise ValueError(f"checkpoint entry name {name!r} must match {_ENTRY_NAME.pattern} and not be "
                         f"one of {sorted(_RESERVED_ENTRIES)}")


# ----------------------------------------------------------------------------------------------
# Folder mechanics
# ----------------------------------------------------------------------------------------------


class CheckpointStore:
    """Step folders under `root`, written atomically with a checksum manifest; keeps the newest `keep_last`.

    One process writes to a root (on multi-GPU runs, the rank that publishes the manifest).
    """

    def __init__(self, root: Path, keep_last: int = 2) -> None:
        if type(keep_last) is not int or keep_last < 2:
            raise ValueError(f"keep_last={keep_last!r}: keep at least 2 checkpoints, so resume can fall "
                             "back to the previous one when the newest turns out corrupt")
        self.root = Path(root)
        self.keep_last = keep_last

    # -- writing ---------------------------------------------------------------------------------

    def save(self, step: int, entries: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
        """Save each entry (a nested state, e.g. 'model', 'ema', 'optimizer', 'rng') at `step`."""

        def write_entries(folder: Path) -> None:
            for name, state in entries.items():
                write_state(folder, name, state)

        return self.save_files(step, write_entries, meta, entries=list(entries))

    def save_files(self, step: int, writer: Callable[[Path], None], meta: Mapping[str, Any],
                   entries: Sequence[str] = ()) -> Path:
        """Let `writer` fill a temporary folder, then checksum, fsync and publish it as the folder for `step`.

        `entries` names the `write_state` pairs the writer made that `load` should return; anything
        else the writer adds (engine shard folders) is covered by the manifest and read by the caller
        from `step_dir(step)` after `verify(step)`. Returns the published folder.
        """
        _plain_json(meta)  # fail before writing anything
        temp = self.begin(step)
        try:
            writer(temp)
        except BaseException:
            self.abandon(temp)
            raise
        return self.publish(step, temp, meta, entries)

    # Multi-process runs split `save_files` in three: rank 0 calls `begin` and shares the folder,
    # every rank writes its part into it, then (after a barrier) rank 0 calls `publish`.

    def begin(self, step: int) -> Path:
        """Create the temporary folder that the writers of `step` fill."""
        if type(step) is not int or step < 0:
            raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        temp = self.root / f"{_TEMP_PREFIX}{step:08d}-{uuid.uuid4().hex[:8]}"
        temp.mkdir()
        return temp

    def abandon(self, temp: Path) -> None:
        """Remove a temporary folder whose writing failed."""
        shutil.rmtree(temp, ignore_errors=True)

    def publish(self, step: int, temp: Path, meta: Mapping[str, Any], entries: Sequence[str] = ()) -> Path:
        """Checksum, fsync and rename a filled temporary folder into place as step `step`."""
        final = self.step_dir(step)
        try:
            meta_text = _plain_json(meta)
            for name in entries:
                _check_entry_name(name)
                for suffix in (".safetensors", ".json"):
                    if not (temp / f"{name}{suffix}").is_file():
                        raise FileNotFoundError(f"checkpoint writer declared entry '{name}' but did not "
                                                f"write {name}{suffix}")
            (temp / META_NAME).write_text(meta_text)
            if (temp / MANIFEST_NAME).exists():
                raise ValueError(f"checkpoint writer must not write {MANIFEST_NAME}; the store writes it last")
            files = {rel: _fsync_and_describe(temp / rel) for rel in _relative_files(temp)}
            manifest = {"format": _MANIFEST_FORMAT, "version": _FORMAT_VERSION, "step": step,
                        "entries": list(entries), "files": files}
            _write_synced(temp / MANIFEST_NAME, json.dumps(manifest, indent=1))
            for folder in sorted((p for p in temp.rglob("*") if p.is_dir()), reverse=True):
                fsync_dir(folder)
            fsync_dir(temp)

            self._set_aside_newer_than(step)
            if final.exists():
                logger.warning("replacing existing checkpoint folder %s", final)
                self._discard(final)
            os.rename(temp, final)
            fsync_dir(self.root)
        except OSError as err:
            self.abandon(temp)
            previous = self.latest_step()
            raise CheckpointWriteError(
                err.errno, f"cannot write checkpoint step {step} into {temp} (for {final}): {err}; the "
                f"temporary folder was removed, and the newest complete checkpoint is "
                f"{'none' if previous is None else self.step_dir(previous)}") from err
        except BaseException:
            self.abandon(temp)
            raise

        _replace_text(self.root / LATEST_NAME, final.name + "\n")
        self._apply_retention()
        logger.info("saved checkpoint %s", final)
        return final

    def _set_aside_newer_than(self, step: int) -> None:
        # Complete folders above `step` come from a timeline this run abandoned by resuming from an
        # earlier step; left in place they would win "highest complete step" at the next resume.
        for newer in (s for s in self.complete_steps() if s > step):
            self.set_aside(newer, f"it is newer than the step being saved ({step}), so it belongs to a run "
                                  "that resumed from an earlier step")

    def set_aside(self, step: int, why: str) -> Path:
        """Move a complete step folder out of resume's reach, to `abandoned-step-...` (kept for a look)."""
        target = self.root / f"{_ABANDONED_PREFIX}{self.step_dir(step).name}"
        if target.exists():
            self._discard(target)
        os.rename(self.step_dir(step), target)
        fsync_dir(self.root)
        logger.warning("moved checkpoint step %d to %s: %s", step, target, why)
        return target

    def _apply_retention(self) -> None:
        for old in self.complete_steps()[:-self.keep_last]:
            self._discard(self.step_dir(old))
            logger.info("removed old checkpoint step %d (keeping the newest %d)", old, self.keep_last)

    def _discard(self, folder: Path) -> None:
        # Rename first so a crash mid-delete never leaves a half-deleted folder that looks like a step.
        trash = self.root / f"{_TRASH_PREFIX}{folder.name}-{uuid.uuid4().hex[:8]}"
        os.rename(folder, trash)
        shutil.rmtree(trash)

    def _remove_leftovers(self) -> None:
        # Temp and trash folders left by a crashed writer; safe because one process writes per root.
        for path in self.root.iterdir():
            if path.is_dir() and path.name.startswith((_TEMP_PREFIX, _TRASH_PREFIX)):
                logger.warning("removing leftover folder %s from an interrupted checkpoint write", path)
                shutil.rmtree(path, ignore_errors=True)

    # -- finding ---------------------------------------------------------------------------------

    def step_dir(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def complete_steps(self) -> list[int]:
        """Ascending steps whose folder holds a readable manifest for that step (contents not yet verified)."""
        return self._scan()[0]

    def _scan(self) -> tuple[list[int], dict[int, str]]:
        """(complete steps ascending, {step: why not complete} for step folders without a valid manifest)."""
        complete, incomplete = [], {}
        if self.root.is_dir():
            for path in self.root.iterdir():
                match = _STEP_DIR.match(path.name)
                if not (match and path.is_dir()):
                    continue
                step = int(match.group(1))
                try:
                    _read_manifest(path, step)
                except CorruptCheckpointError as err:
                    incomplete[step] = str(err)
                    continue
                complete.append(step)
        return sorted(complete), incomplete

    def latest_step(self) -> int | None:
        """The highest complete step, or None when there is none."""
        steps = self.complete_steps()
        return steps[-1] if steps else None

    # -- reading ---------------------------------------------------------------------------------

    def verify(self, step: int) -> dict[str, Any]:
        """Check every file of `step` against its manifest; returns the manifest or raises CorruptCheckpointError."""
        folder = self._existing_step_dir(step)
        manifest = _read_manifest(folder, step)
        for rel, expected in manifest["files"].items():
            path = folder / rel
            if not path.is_file():
                raise CorruptCheckpointError(f"checkpoint {folder}: {rel} is listed in the manifest but missing")
            size = path.stat().st_size
            if size != expected["size"]:
                raise CorruptCheckpointError(f"checkpoint {folder}: {rel} has {size} bytes but the manifest "
                                             f"says {expected['size']} (truncated or overwritten)")
            digest = _sha256(path)
            if digest != expected["sha256"]:
                raise CorruptCheckpointError(f"checkpoint {folder}: {rel} has sha256 {digest} but the "
                                             f"manifest says {expected['sha256']}")
        return manifest

    def load(self, step: int | None = None, verify: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
        """Return (entries, meta) of `step` (default: the highest complete step), tensors on the CPU."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointNotFoundError(f"no complete checkpoint under {self.root}")
        folder = self._existing_step_dir(step)
        manifest = self.verify(step) if verify else _read_manifest(folder, step)
        entries = {name: read_state(folder, name) for name in manifest["entries"]}
        try:
            meta = json.loads((folder / META_NAME).read_text())
        except (OSError, ValueError) as err:
            raise CorruptCheckpointError(f"cannot read {folder / META_NAME}: {err}") from err
        return entries, meta

    def load_latest_valid(self, required: bool = True) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
        """Load the highest step that verifies, warning about each newer one skipped; (step, entries, meta).

        With no usable checkpoint: raises CheckpointNotFoundError if `required` (resume was asked
        for) or if step folders exist but none is usable (a fresh start would silently discard
        them), else returns None (a fresh start).
        """
        complete, incomplete = self._scan()
        skipped = []
        for step, reason in sorted(incomplete.items(), reverse=True):
            if not complete or step > complete[-1]:
                logger.warning("skipping step folder %d (no valid manifest, an interrupted or damaged write): %s",
                               step, reason)
                skipped.append(f"step {step}: {reason}")
        for step in reversed(complete):
            try:
                entries, meta = self.load(step)
            except CorruptCheckpointError as err:
                logger.warning("skipping checkpoint step %d: %s", step, err)
                skipped.append(f"step {step}: {err}")
                continue
            if skipped:
                logger.warning("resuming from step %d; %d newer step folder(s) were unusable", step, len(skipped))
            return step, entries, meta
        if required or skipped:
            detail = "; ".join(skipped) if skipped else "no complete step folder (with manifest.json) exists"
            why = "resume was requested but" if required else "step folders exist but"
            raise CheckpointNotFoundError(f"{why} no usable checkpoint is under {self.root}: "
                                          f"{detail}. To start a new run instead, turn resume off or use "
                                          "another checkpoint directory.")
        return None

    def _existing_step_dir(self, step: int) -> Path:
        folder = self.step_dir(step)
        if not (folder / MANIFEST_NAME).is_file():
            raise CheckpointNotFoundError(f"no complete checkpoint for step {step} at {folder}; complete "
                                          f"steps under {self.root}: {self.complete_steps()}")
        return folder


def _read_manifest(folder: Path, step: int) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CorruptCheckpointError(f"cannot read {path}: {err}") from err
    problem = None
    if not isinstance(manifest, dict) or manifest.get("format") != _MANIFEST_FORMAT:
        problem = f"not a {_MANIFEST_FORMAT} manifest"
    elif manifest.get("version") != _FORMAT_VERSION:
        problem = f"version {manifest.get('version')!r}, this code reads version {_FORMAT_VERSION}"
    elif manifest.get("step") != step:
        problem = f"manifest is for step {manifest.get('step')!r}, folder is for step {step}"
    elif not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("entries"), list):
        problem = "manifest lacks 'files' or 'entries'"
    else:
        for rel, info in manifest["files"].items():
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                problem = f"manifest lists a path outside the folder: {rel!r}"
            elif not (isinstance(info, dict) and type(info.get("size")) is int
                      and isinstance(info.get("sha256"), str)):
                problem = f"manifest entry for {rel!r} lacks size or sha256"
    if problem:
        raise CorruptCheckpointError(f"{path}: {problem}")
    return manifest


def _relative_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_and_describe(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _replace_text(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    _write_synced(temp, text)
    os.replace(temp, path)
    fsync_dir(path.parent)


def _plain_json(meta: Mapping[str, Any]) -> str:
    """Serialise meta, refusing values JSON would change (tuples, int keys, NaN): meta must read back equal."""
    try:
        text = json.dumps(meta, indent=1, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint meta must be plain JSON: {err}") from err
    if json.loads(text) != meta:
        raise ValueError("checkpoint meta must be plain JSON (str keys, lists not tuples) so it reads back "
                         "equal; put anything else in an entry")
    return text


# ----------------------------------------------------------------------------------------------
# Export for the reference inference code
# ----------------------------------------------------------------------------------------------


def save_model_export(path: Path, model_state: Mapping[str, torch.Tensor],
                      ema_state: Mapping[str, torch.Tensor], config_dict: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write `path` (.pt, reference layout {'model', 'ema', 'config'}) and `path` with suffix .safetensors (EMA).

    The .pt holds only tensors and plain types, so `torch.load(path, weights_only=True)` reads it;
    the safetensors file carries the config as JSON in its metadata under 'config'.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        raise ValueError(f"export path {path} should be the .pt file; the .safetensors twin is derived from it")
    _require_plain(config_dict, "config")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": {k: v.detach().cpu() for k, v in model_state.items()},
        "ema": {k: v.detach().cpu() for k, v in ema_state.items()},
        "config": config_dict,
    }
    with atomic_path(path) as temp:
        torch.save(payload, temp)
    st_path = path.with_suffix(".safetensors")
    with atomic_path(st_path) as st_temp:
        safetensors.torch.save_file(_safetensors_ready(payload["ema"]), str(st_temp),
                                    metadata={"format": "pt", "config": json.dumps(config_dict)})
    logger.info("exported %s and %s", path, st_path)
    return path, st_path


def _require_plain(obj: Any, where: str) -> None:
    """Configs in exports must load with weights_only=True: only dict/list/tuple and plain scalars."""
    if obj is None or type(obj) in (bool, int, float, str):
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _require_plain(v, f"{where}[{i}]")
        return
    if type(obj) is dict:
        for k, v in obj.items():
            _require_plain(k, f"{where} key")
            _require_plain(v, f"{where}.{k}")
        return
    raise TypeError(f"{where} has type {type(obj).__name__}; export configs hold only dict/list/tuple and "
                    "None/bool/int/float/str (convert dataclasses with dataclasses.asdict)")

