"""Safe reading of checkpoint files into plain state dicts, and strict loading into modules.

Every pretrained file the project consumes (texture VAE, DINOv2, LightningDiT) goes through
`read_state_dict` so that missing, corrupt and pickled-object files fail the same clear way, and
through `load_strict` so that no partial load ever passes silently.
"""
from __future__ import annotations

import contextlib
import logging
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

logger = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
# Prefixes that training wrappers put in front of every key: DDP/DataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
MAX_LISTED_KEYS = 10


def read_state_dict(
    path: str | Path,
    what: str,
    where_to_get: str,
    prefer: Sequence[str] = ("ema", "model", "state_dict"),
    allow_unsafe_pickle: bool = False,
) -> dict[str, torch.Tensor]:
    """Read a flat name -> tensor dict from a `.safetensors` or torch (`.pt/.pth/.ckpt/.bin`) file.

    `what` names the weights and `where_to_get` says where users download them; both go into the
    error raised when the file is missing. Training checkpoints often nest the weights: the first
    key of `prefer` that the file holds as a dict is unwrapped (order matters: EMA weights before
    raw ones by default). A prefix that every key shares because of DDP or torch.compile is removed.

    Torch files load with `weights_only=True` (plus the OmegaConf allow-list for reference
    checkpoints). A file that also pickles other Python objects is refused unless
    `allow_unsafe_pickle` is set: then it is unpickled in full, which runs code from the file, so
    set it only for files from a source you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} weights not found at '{path}'. Get them from {where_to_get} and pass that path."
        )
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        raw = _read_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
        raw = _read_torch(path, allow_unsafe_pickle)
    else:
        raise ValueError(
            f"'{path}': unsupported checkpoint extension '{path.suffix}'; expected "
            f"{SAFETENSORS_SUFFIX} or one of {', '.join(TORCH_SUFFIXES)}."
        )
    if not isinstance(raw, Mapping):
        raise ValueError(f"'{path}' holds a {type(raw).__name__}, not a dict of tensors.")
    state_dict = _unwrap(raw, prefer)
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"'{path}' has non-tensor entries {_head(not_tensors)}; expected a state dict, or one "
            f"nested under one of the keys {list(prefer)}."
        )
    return _strip_wrapper_prefixes(dict(state_dict))


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load `state_dict` into `module` requiring every key and shape to match.

    On mismatch raises ValueError listing (up to 10 of each) the missing keys, unexpected keys and
    shape mismatches, and naming `source` (the file the weights came from).
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        lines = [f"weights in '{source}' do not match {type(module).__name__}:"]
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", wrong_shape),
        ):
            if items:
                lines.append(f"  {len(items)} {label}: {_head(items)}")
        raise ValueError("\n".join(lines))
    module.load_state_dict(state_dict, strict=True)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"'{path}' is corrupt or not a safetensors file: {err}") from err


def reference_config_allowlist() -> list:
    """Classes a reference training checkpoint's `config` entry (an OmegaConf DictConfig) needs.

    These are data containers only; loading stays `weights_only=True` with exactly these added.
    Empty when omegaconf is not installed (such files then fail with the usual clear error).
    """
    try:
        import typing
        from collections import defaultdict

        from omegaconf import DictConfig, ListConfig, nodes
        from omegaconf.base import ContainerMetadata, Metadata
    except ImportError:
        return []
    return [DictConfig, ListConfig, ContainerMetadata, Metadata, nodes.AnyNode, nodes.StringNode,
            nodes.IntegerNode, nodes.FloatNode, nodes.BooleanNode, typing.Any, dict, list, int,
            float, str, bool, defaultdict]


@contextlib.contextmanager
def _exactly_these_globals(allowed: list):
    """weights_only's allow-list is exactly `allowed` inside: libraries add classes to it for the
    whole process when imported (megatron-core adds argparse.Namespace and others), which would
    otherwise widen what our loads accept depending on what else was imported."""
    previous = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(allowed)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(previous)


def _load_torch_checked(path: Path) -> object:
    """weights_only load; retried once with the OmegaConf allow-list for reference checkpoints."""
    try:
        with _exactly_these_globals([]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        allowlist = reference_config_allowlist()
        if "omegaconf" not in str(err) or not allowlist:
            raise
        with _exactly_these_globals(allowlist):
            raw = torch.load(path, map_location="cpu", weights_only=True)
        logger.info("'%s': loaded a reference checkpoint whose config is an OmegaConf object "
                    "(allow-listed data classes only)", path)
        return raw


def _read_torch(path: Path, allow_unsafe_pickle: bool = False) -> object:
    try:
        return _load_torch_checked(path)
    except pickle.UnpicklingError as err:
        # weights_only refuses pickled Python objects; random bytes land here too.
        if not allow_unsafe_pickle:
            raise ValueError(
                f"'{path}' is not a plain tensor checkpoint (torch.load with weights_only=True refused "
                f"it: {_first_line(err)}). It is corrupt or holds pickled Python objects, which must "
                "not be unpickled blindly; re-save the tensors alone (e.g. as safetensors), or, for a "
                "file you trust, pass allow_unsafe_pickle=True."
            ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(
            f"'{path}' is corrupt or unreadable as a torch checkpoint: {_first_line(err)}"
        ) from err
    return _load_torch_unsafe(path)


def _load_torch_unsafe(path: Path) -> object:
    """Full unpickling, only behind the caller's explicit `allow_unsafe_pickle`."""
    logger.warning("'%s' holds pickled Python objects; unpickling it in full because allow_unsafe_pickle "
                   "is set (this runs code from the file: use only files you trust)", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # unpickling can raise anything the file's code raises
        raise ValueError(
            f"'{path}' is corrupt or unreadable as a torch checkpoint: {_first_line(err)}"
        ) from err


def _unwrap(raw: Mapping[str, object], prefer: Sequence[str]) -> Mapping[str, object]:
    for key in prefer:
        nested = raw.get(key)
        if isinstance(nested, Mapping):
            logger.debug("using the weights nested under '%s'", key)
            return nested
    return raw


def _strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stripped = True
    while stripped and state_dict:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                stripped = True
    return state_dict


def _first_line(err: BaseException) -> str:
    # torch's messages run to a page of advice (some of it to disable weights_only): keep the gist.
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _head(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED_KEYS])
    more = len(items) - MAX_LISTED_KEYS
    return shown + (f", ... ({more} more)" if more > 0 else "")


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> Path:
    """Write a state dict as safetensors, atomically (weights we publish never need pickle)."""
    from safetensors.torch import save

    from sfd_scale.atomic import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path
