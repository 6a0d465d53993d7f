"""DeepSpeed ZeRO stages 1, 2 and 3 behind the trainer's `Engine` interface.

What each stage keeps per rank (W data-parallel ranks, bf16 on GPU):

* ZeRO-1: full bf16 parameters and gradients, 1/W of the fp32 master weights and Adam moments.
* ZeRO-2: full bf16 parameters, 1/W of the gradients and optimizer state.
* ZeRO-3: 1/W of everything; parameters are gathered block by block in forward and backward.

The EMA is sharded like the optimizer's fp32 master weights and updated from them (one foreach
lerp over this rank's pieces, no communication): per parameter, its ZeRO-3 partition (laid out
like `ds_tensor`) or its ZeRO-1/2 fragment of the flat partition. Updating from the bf16 working
weights instead would round every EMA input to bf16. Only `ema_model()` (previews) and
`consolidated_state()` (export) gather, and both are collective: every rank must call them.

Checkpoints go through DeepSpeed's own `save_checkpoint`/`load_checkpoint` into the step folder
the trainer assembles, plus the EMA, a small JSON that records the stage and world size, and
`zero_fragments/`: one safetensors file per rank with that rank's pieces of every trainable
parameter's fp32 master weights and AdamW moments, each with its offset in the flattened
parameter, and the AdamW step count. The same stage on the same number of ranks resumes from
DeepSpeed's files. Any other number of ranks, or another stage, resumes from the fragments
(`load` picks the route from the JSON and logs it): every rank reads, from each saved file, only
the slices that overlap its own new pieces (safetensors reads slices lazily), writes them into
its master weights, AdamW state and EMA, and DeepSpeed then refreshes the working weights from the
master -- the run continues as if it had never stopped. Why this route: DeepSpeed's elastic
stage-1/2 layout asserts on torch's AdamW (whose step count lives per parameter) and its universal
checkpoints need the offline `ds_to_universal` conversion. Local pieces rather than whole
parameters gathered onto rank 0, because writing them needs no communication and no rank ever
holds more than its own share; and a piece of a flattened parameter is what both a ZeRO-1/2
fragment and a ZeRO-3 partition are, so one reader serves every stage in both directions. The
price is disk: the fragments repeat DeepSpeed's copy of the optimizer state (12 bytes per
trainable parameter). The EMA comes from the per-rank EMA entries, read whole, one at a time.
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open

from sfd_scale.config import OptimConfig, SFDConfig, bf16_compute
from sfd_scale.parallel.checkpointing import clean_name
from sfd_scale.parallel.dims import ParallelDims
from sfd_scale.parallel.distributed import resolve_backend
from sfd_scale.parallel.engine import Engine, PlainModel, StepStats, plain_model_factory
from sfd_scale.train.checkpoint import MANIFEST_NAME, read_state, write_state

log = logging.getLogger(__name__)

DEEPSPEED_PIN = "deepspeed==0.19.8"
CHECKPOINT_TAG = "deepspeed"
"""Sub-folder of a step folder that holds DeepSpeed's own files."""
META_FILE = "deepspeed_meta.json"
FRAGMENTS_DIR = "zero_fragments"
"""Sub-folder of a step folder with every rank's pieces of the fp32 master weights and AdamW state."""
_FRAGMENTS_FORMAT = "sfd-scale-zero-fragments"
_FRAGMENTS_VERSION = 1

# Bucket sizes in elements. One XXL block holds ~42 M parameters: a 5e7-element bucket (100 MB in
# bf16) is about one block, large enough to run NCCL at full bandwidth and small enough that the
# reduce of block k overlaps the backward of block k-1 with a bounded buffer (overlap_comm keeps
# two of them). DeepSpeed's default (5e8) would hold half of XXL before the first reduce starts.
BUCKET_ELEMENTS = 50_000_000
# ZeRO-3 keeps parameters below this many elements gathered for the whole run (norm weights,
# biases, adaLN biases: <= 9216 elements in XXL): all-gathering each of them per block would
# cost more latency than their memory (a few MB for XXL) is worth.
PERSISTENCE_THRESHOLD = 100_000
# Never lets DeepSpeed print its own progress lines; the trainer logs.
_NEVER = 2 ** 62

# Keys our YAML owns. A JSON file may leave them out (they are filled in) but must not disagree.
_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "gradient_clipping")
_FORBIDDEN_SECTIONS = {
    "optimizer": "the engine passes AdamW built from the `optim` section",
    "scheduler": "the trainer sets the learning rate every step (optim.lr, optim.warmup_steps)",
    "fp16": "SFD trains in bf16 or fp32; fp16 loss scaling is not supported",
}


def import_deepspeed() -> ModuleType:
    """The deepspeed module, or an ImportError that says which engine needs it and how to install it."""
    try:
        return importlib.import_module("deepspeed")
    except ImportError as err:
        raise ImportError(
            f"parallel.engine=deepspeed needs the deepspeed package, which cannot be imported ({err}). "
            f"Install it with `pip install {DEEPSPEED_PIN}`, or choose parallel.engine=ddp or fsdp2."
        ) from err


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
def resolve_precision(precision: str, device: torch.device) -> str:
    """'bf16' or 'fp32' for DeepSpeed's parameter dtype (train.precision 'auto': bf16 on GPU)."""
    return "bf16" if bf16_compute(precision, device.type) else "fp32"


def _check_stage(stage: int, offload_params: bool) -> None:
    if stage not in (1, 2, 3):
        raise ValueError(f"parallel.zero_stage must be 1, 2 or 3, got {stage}")
    if offload_params and stage != 3:
        raise ValueError(f"parallel.offload_params needs parallel.zero_stage=3 (got {stage}): only ZeRO-3 "
                         "partitions the parameters it could offload")


def zero_section(stage: int, offload_optimizer: bool = False, offload_params: bool = False) -> dict[str, Any]:
    """The `zero_optimization` block this project uses for `stage` (configs/deepspeed/zero*.json hold the same)."""
    _check_stage(stage, offload_params)
    section: dict[str, Any] = {
        "stage": stage,
        # The trainer owns the accumulation boundary (see managed_gradient_accumulation below):
        # ZeRO-2/3 reduce during each backward, which overlap_comm hides; ZeRO-1 reduces inside
        # step(), after the last backward, where there is nothing to overlap (and DeepSpeed
        # refuses overlap_comm for it in this mode).
        "overlap_comm": stage >= 2,
        "contiguous_gradients": True,
        "reduce_bucket_size": BUCKET_ELEMENTS,
        "allgather_bucket_size": BUCKET_ELEMENTS,
    }
    if stage == 3:
        section.update(stage3_prefetch_bucket_size=BUCKET_ELEMENTS,
                       stage3_param_persistence_threshold=PERSISTENCE_THRESHOLD)
    if offload_optimizer:
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_params:
        section["offload_param"] = {"device": "cpu", "pin_memory": True}
    return section


def deepspeed_config(cfg: SFDConfig, dp_size: int, device: torch.device) -> dict[str, Any]:
    """DeepSpeed's config dict: `parallel.deepspeed_config` (a JSON file) or generated from the YAML.

    Batch sizes, accumulation, clipping and precision always come from the YAML; a JSON file
    that sets them differently, or that brings its own optimizer/scheduler/fp16, is an error.
    """
    par = cfg.parallel
    _check_stage(par.zero_stage, par.offload_params)
    accum = par.grad_accum_steps
    if accum < 1:
        raise ValueError(f"parallel.grad_accum_steps must be >= 1, got {accum}")
    micro, rest = divmod(cfg.train.global_batch_size, dp_size * accum)
    if rest or micro == 0:
        raise ValueError(f"train.global_batch_size={cfg.train.global_batch_size} must be a positive multiple of "
                         f"data-parallel size ({dp_size}) x parallel.grad_accum_steps ({accum})")
    precision = resolve_precision(cfg.train.precision, device)
    owned = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.max_grad_norm,
    }
    if par.deepspeed_config:
        ds = _read_json(Path(par.deepspeed_config))
        source = par.deepspeed_config
        _check_json_agrees(ds, owned, par.zero_stage, par.offload_optimizer, par.offload_params, source)
        bf16 = ds.get("bf16", {}).get("enabled", "auto")
        if bf16 not in ("auto", precision == "bf16"):
            raise ValueError(f"{source}: bf16.enabled={bf16} disagrees with train.precision={cfg.train.precision!r} "
                             f"on {device.type} ({precision}); leave it out of the JSON or set it to \"auto\"")
        zero = ds.setdefault("zero_optimization", {})
        if par.offload_optimizer:
            zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": True})
        if par.offload_params:
            zero.setdefault("offload_param", {"device": "cpu", "pin_memory": True})
    else:
        ds = {"zero_optimization": zero_section(par.zero_stage, par.offload_optimizer, par.offload_params)}
    ds.update(owned)
    # bf16 mode: bf16 weights and gradients, fp32 master weights and Adam moments in the optimizer.
    # check_grad_overflow makes stages 1/2 skip a step whose global gradient norm is not finite
    # (fp32 and ZeRO-3 always do); the engine relies on that for its skip rule.
    ds["bf16"] = {"enabled": precision == "bf16", "check_grad_overflow": True}
    # The trainer owns the accumulation boundary: backward() per micro-batch, step() once.
    ds["managed_gradient_accumulation"] = False
    ds["zero_allow_untested_optimizer"] = True  # torch AdamW is a client optimizer to DeepSpeed
    if device.type != "cuda":
        ds["zero_force_ds_cpu_optimizer"] = False  # CPU runs keep torch AdamW (no cpu_adam build)
    ds["steps_per_print"] = _NEVER
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"parallel.deepspeed_config: {path} does not exist (the repository ships "
                                "configs/deepspeed/zero1.json, zero2.json, zero3.json, zero3_offload.json)")
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"parallel.deepspeed_config: {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"parallel.deepspeed_config: {path} must hold a JSON object")
    return data


def _check_json_agrees(ds: dict[str, Any], owned: dict[str, Any], stage: int, offload_optimizer: bool,
                       offload_params: bool, source: str) -> None:
    for key, why in _FORBIDDEN_SECTIONS.items():
        if key in ds and (key != "fp16" or ds[key].get("enabled", False)):
            raise ValueError(f"{source}: remove the '{key}' section: {why}")
    for key in _OWNED_KEYS:
        if key in ds and ds[key] != "auto" and ds[key] != owned[key]:
            raise ValueError(f"{source}: {key}={ds[key]!r} disagrees with the YAML ({owned[key]!r}); "
                             "leave it out of the JSON or set it to \"auto\"")
        ds.pop(key, None)
    zero = ds.get("zero_optimization", {})
    if zero.get("stage", stage) != stage:
        raise ValueError(f"{source} sets zero_optimization.stage={zero['stage']} but parallel.zero_stage={stage}; "
                         "make them agree")
    for flag, key in ((offload_optimizer, "offload_optimizer"), (offload_params, "offload_param")):
        device = zero.get(key, {}).get("device", "none")
        if device != "none" and not flag:
            raise ValueError(f"{source} sets zero_optimization.{key} but parallel.{key.replace('param', 'params')} "
                             "is false; set it to true or remove the block")


# ----------------------------------------------------------------------------------------------
# Engine
# ----------------------------------------------------------------------------------------------
class DeepSpeedEngine(Engine):
    """ZeRO-1/2/3 over the data-parallel ranks (all ranks: tensor parallelism is not combined here)."""

    layout = "deepspeed"  # type: ignore[assignment]

    def __init__(self, build: Callable[[], nn.Module], cfg: SFDConfig, dims: ParallelDims,
                 device: torch.device, plain_model: PlainModel | None = None) -> None:
        """`build` returns the module to train (fp32, on the CPU: the LightningDiT, or e.g. the
        Semantic VAE); every rank calls this with the same seed. `plain_model` describes its plain
        twin for `ema_model` (default: the LightningDiT of `cfg.model`). DeepSpeed joins the
        existing process group (the factory creates it)."""
        ds = import_deepspeed()
        if dims.tp != 1:
            raise ValueError(f"the deepspeed engine shards over data parallelism only; got {dims.describe()}")
        # DeepSpeed reads LOCAL_RANK, which only launchers set: a plain single process has none.
        os.environ.setdefault("LOCAL_RANK", str(dims.local_rank))
        ds.init_distributed(dist_backend=resolve_backend(cfg.parallel.backend, device))
        if not 0.0 <= cfg.train.ema_decay <= 1.0:
            raise ValueError(f"train.ema_decay must lie in [0, 1], got {cfg.train.ema_decay}")
        self._plain_model = plain_model_factory(cfg.model if plain_model is None else plain_model)
        self.stage = cfg.parallel.zero_stage
        self.dims = dims
        self.device = device
        self.ema_decay = cfg.train.ema_decay
        self.ds_config = deepspeed_config(cfg, dims.dp, device)
        dtype = torch.bfloat16 if self.ds_config["bf16"]["enabled"] else torch.float32

        module = build()
        if self.stage == 3:
            _partition_at_start(ds, module, dtype, self.ds_config)
        optimizer = _build_optimizer(module, cfg.optim, device, offload=cfg.parallel.offload_optimizer)
        self._ds, *_ = ds.initialize(model=module, optimizer=optimizer, config=self.ds_config)
        self.model = self._ds
        named = [(clean_name(n), p) for n, p in self.unwrap().named_parameters()]
        self._frozen = [(n, p) for n, p in named if not p.requires_grad]
        self._trained = [(n, p) for n, p in named if p.requires_grad]
        # The EMA follows the optimizer's fp32 master weights, piece for piece: a bf16 working copy
        # would cap its precision at bf16's, far coarser than a 0.9999 EMA step.
        self._ema = [piece.detach().clone() for piece, _ in self._master_pieces()]
        log.info("DeepSpeed ZeRO-%d, %s, %s, optimizer %s", self.stage, dims.describe(),
                 "bf16" if dtype == torch.bfloat16 else "fp32", type(optimizer).__name__)

    # -- model access ----------------------------------------------------------------------------
    def unwrap(self) -> nn.Module:
        return self._ds.module

    def _master_pieces(self) -> list[tuple[torch.Tensor, int]]:
        """(fp32 master elements this rank owns, their offset in the flattened parameter) for every
        trainable parameter: its ZeRO-3 partition, or its ZeRO-1/2 fragment (possibly empty)."""
        ds = import_deepspeed()
        pieces = []
        for _, p in self._trained:
            if self.stage == 3:
                pieces.append((ds.utils.safe_get_local_fp32_param(p), self.dims.dp_rank * p.partition_numel()))
            elif p._hp_mapping is None:  # none of this parameter falls in this rank's partition
                pieces.append((torch.empty(0, device=self.device), 0))
            else:
                pieces.append((p._hp_mapping.get_hp_fragment(), p._hp_mapping.lp_fragment_address.start))
        return pieces

    def ema_model(self) -> nn.Module:
        """The plain model holding the EMA weights (collective: it gathers)."""
        module = self._plain_model().to(self.device).eval().requires_grad_(False)
        # _reference_order keeps the state-dict keys: non-persistent buffers are rebuilt, not loaded.
        module.load_state_dict(_reference_order(self._full_ema(), module), strict=True)
        return module

    # -- training --------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        self._ds.zero_grad()

    def backward(self, loss: torch.Tensor) -> None:
        # A non-finite loss must skip the step everywhere even when its gradients happen to be
        # finite: scaling by NaN makes them non-finite, and DeepSpeed's step-time check (a
        # max-reduce of the flag, or of the global norm, over all ranks) then skips on every rank.
        poison = torch.where(torch.isfinite(loss.detach()), 1.0, math.nan).to(loss.dtype)
        # The trainer has already divided the loss by the number of micro-batches.
        self._ds.backward(loss * poison, scale_wrt_gas=False)

    def step(self, lr: float, loss: torch.Tensor) -> StepStats:
        for group in self._ds.optimizer.param_groups:
            group["lr"] = lr
        # Reduces the gradients (ZeRO-1), takes the global norm over all partitions, then clips
        # and steps -- or, when that norm is not finite, leaves weights and AdamW state untouched.
        # The decision is the same on every rank.
        self._ds.step()
        skipped = not self._ds.was_step_applied()
        grad_norm = self._ds.get_global_grad_norm()
        grad_norm = math.inf if grad_norm is None else float(grad_norm)
        if not skipped:
            with torch.no_grad():
                masters = [piece for piece, _ in self._master_pieces()]
                torch._foreach_lerp_(self._ema, masters, 1.0 - self.ema_decay)
        return StepStats(grad_norm, skipped=skipped)

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Collective: every rank calls it with the same (shared) folder."""
        folder = Path(folder)
        self._ds.save_checkpoint(str(folder), tag=CHECKPOINT_TAG, save_latest=False)
        offsets = [offset for _, offset in self._master_pieces()]
        names = [n for n, _ in self._trained]
        write_state(folder, _ema_rank_entry(self.dims.rank), {
            "pieces": dict(zip(names, self._ema)), "offsets": dict(zip(names, offsets))})
        self._save_fragments(folder)
        frozen = self._frozen_params()
        if self.dims.rank == 0:
            write_state(folder, "frozen", frozen)
            meta = {"zero_stage": self.stage, "world_size": self.dims.dp,
                    "bf16": self.ds_config["bf16"]["enabled"], "fragments": _FRAGMENTS_VERSION}
            (folder / META_FILE).write_text(json.dumps(meta))
        dist.barrier()

    def load(self, folder: Path) -> None:
        """Collective. `folder` is a published step folder whose manifest the caller has verified."""
        folder = Path(folder)
        meta = _read_meta(folder)  # a folder without a manifest is refused here
        same_layout = check_resumable(meta, folder, self.stage, self.dims.dp, self.ds_config["bf16"]["enabled"])
        # Names and shapes first: a folder of another model fails here, before any work.
        shapes = {name: _full_shape(p) for name, p in self._trained}
        headers = check_fragments(folder, shapes, every_rank=not same_layout) if meta.get("fragments") else []
        if not same_layout:
            log.info("%s was saved by ZeRO-%d on %d data-parallel ranks; this run is ZeRO-%d on %d: resuming "
                     "from its world-size-free %s/", folder, meta["zero_stage"], meta["world_size"], self.stage,
                     self.dims.dp, FRAGMENTS_DIR)
            self._load_fragments(folder, headers)
            return
        # DeepSpeed reads its files with torch.load(weights_only=False), i.e. it unpickles them.
        # That is acceptable only for our own step folders after their checksums were verified
        # (the trainer verifies before it calls load).
        path, _ = self._ds.load_checkpoint(str(folder), tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                           load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint under {folder / CHECKPOINT_TAG}")
        pieces = read_state(folder, _ema_rank_entry(self.dims.rank))["pieces"]
        if list(pieces) != [n for n, _ in self._trained]:
            raise ValueError(f"{folder}: the saved EMA holds other parameters than this model")
        for ema, saved in zip(self._ema, pieces.values()):
            ema.copy_(saved)

    # -- world-size-free checkpoints -------------------------------------------------------------
    def _flat_partitions(self) -> list[torch.Tensor]:
        """The fp32 tensors the AdamW inside DeepSpeed steps (its state is keyed by them): one flat
        partition per parameter group under ZeRO-1/2, one per sub-group under ZeRO-3."""
        zero = self._ds.optimizer
        if self.stage == 3:
            return list(zero.fp32_partitioned_groups_flat)
        # DeepSpeedZeroOptimizer, or BF16_Optimizer (ZeRO-1, bf16, data_types.grad_accum_dtype fp32)
        return list(getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_groups_flat_partition)

    def _local_state(self, p: nn.Parameter, key: str) -> torch.Tensor:
        """This rank's piece of AdamW state `key` (exp_avg, ...) of `p`, laid out like its master piece."""
        if self.stage == 3:
            return import_deepspeed().utils.safe_get_local_optimizer_state(p, key)
        return torch.empty(0) if p._hp_mapping is None else p._hp_mapping.get_hp_fragment(key)

    def _set_local(self, p: nn.Parameter, kind: str, value: torch.Tensor) -> None:
        """Overwrite this rank's piece of the fp32 master (`kind` 'fp32') or of AdamW state `kind`."""
        utils = import_deepspeed().utils
        if self.stage == 3:
            if kind == "fp32":
                utils.safe_set_local_fp32_param(p, value)
            else:
                utils.safe_set_local_optimizer_state(p, value, kind)
        elif p._hp_mapping is not None:
            p._hp_mapping.get_hp_fragment(None if kind == "fp32" else kind).copy_(value)

    def _save_fragments(self, folder: Path) -> None:
        """Write this rank's pieces of the fp32 master weights and AdamW state (no communication)."""
        optimizer = self._ds.optimizer.optimizer
        stepped = [flat for flat in self._flat_partitions() if optimizer.state.get(flat)]
        steps = {int(optimizer.state[flat]["step"]) for flat in stepped}  # empty before the first step
        if len(steps) > 1:
            raise RuntimeError(f"the AdamW step counts of rank {self.dims.rank}'s partitions differ: {sorted(steps)}")
        keys = [] if not stepped else [k for k, v in optimizer.state[stepped[0]].items()
                                       if torch.is_tensor(v) and v.shape == stepped[0].shape]
        tensors, offsets = {}, {}
        for (name, p), (master, offset) in zip(self._trained, self._master_pieces()):
            if master.numel() == 0:  # ZeRO-1/2: none of this parameter lies in this rank's partition
                continue
            offsets[name] = offset
            tensors[f"fp32/{name}"] = master
            for key in keys:
                tensors[f"{key}/{name}"] = self._local_state(p, key)
        counters = {"global_steps": self._ds.global_steps, "global_samples": self._ds.global_samples,
                    "skipped_steps": self._ds.skipped_steps}
        header = {"format": _FRAGMENTS_FORMAT, "version": _FRAGMENTS_VERSION, "rank": self.dims.rank,
                  "world_size": self.dims.dp, "zero_stage": self.stage, "step": steps.pop() if steps else 0,
                  "keys": keys, "shapes": {name: list(_full_shape(p)) for name, p in self._trained},
                  "offsets": offsets, "counters": counters}
        path = _fragment_file(folder, self.dims.rank)
        path.parent.mkdir(exist_ok=True)
        # Copies: safetensors refuses tensors that share a storage, and the pieces view flat partitions.
        safetensors.torch.save_file({k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}, str(path),
                                    metadata={_FRAGMENTS_FORMAT: json.dumps(header)})

    def _load_fragments(self, folder: Path, headers: list[dict[str, Any]]) -> None:
        """Resume from the fragments of a step folder saved on any number of ranks, at any stage."""
        zero, optimizer = self._ds.optimizer, self._ds.optimizer.optimizer
        pieces = self._master_pieces()
        starts = [offset for _, offset in pieces]
        numels = [math.prod(_full_shape(p)) for _, p in self._trained]
        kinds = ["fp32", *headers[0]["keys"]]
        # Read everything into fresh CPU buffers first: a bad folder fails before the engine changes.
        new = {kind: [torch.zeros(piece.numel()) for piece, _ in pieces] for kind in kinds}
        covered = [0] * len(pieces)
        for rank, header in enumerate(headers):
            with safe_open(str(_fragment_file(folder, rank)), framework="pt", device="cpu") as saved:
                for i, (name, _) in enumerate(self._trained):
                    if name not in header["offsets"]:
                        continue
                    for kind in kinds:  # every kind has the same pieces, so any kind's count will do
                        source = saved.get_slice(f"{kind}/{name}")
                        copied = _copy_overlap(new[kind][i], starts[i], numels[i], source, header["offsets"][name],
                                               source.get_shape()[0])
                    covered[i] += copied
        ema = [torch.zeros(piece.numel()) for piece, _ in pieces]
        for rank in range(len(headers)):
            saved_ema = read_state(folder, _ema_rank_entry(rank))
            for i, (name, _) in enumerate(self._trained):
                piece = saved_ema["pieces"][name]
                _copy_overlap(ema[i], starts[i], numels[i], piece, saved_ema["offsets"][name], piece.numel())
        for i, (name, _) in enumerate(self._trained):
            wanted = max(0, min(starts[i] + pieces[i][0].numel(), numels[i]) - starts[i])
            if covered[i] != wanted:
                raise ValueError(f"{folder}/{FRAGMENTS_DIR}: the saved pieces hold {covered[i]} of the {wanted} "
                                 f"elements of {name} that rank {self.dims.rank} needs")
        frozen = read_state(folder, "frozen")

        if self.stage == 3:
            zero.checkpoint_event_prologue()  # everything partitioned: only ds_tensor holds weights
        step = headers[0]["step"]
        if step > 0:  # AdamW state exists only after its first step
            for flat in self._flat_partitions():
                optimizer.state[flat] = {"step": _adam_step(optimizer, step, flat.device),
                                         **{key: torch.zeros_like(flat) for key in headers[0]["keys"]}}
            if self.stage != 3:  # point every parameter's state fragments at the new tensors
                zero._hp_optimizer_states_linked = False
                zero._lazy_init_hp_params_optimizer_state()
        with torch.no_grad():
            for i, (_, p) in enumerate(self._trained):
                for kind in kinds:
                    self._set_local(p, kind, new[kind][i])
                self._ema[i].copy_(ema[i])
                if self.stage == 3:  # the working partition follows the master (cast to bf16 if so)
                    p.ds_tensor.copy_(new["fp32"][i])
            for name, p in self._frozen:
                if self.stage == 3:
                    _copy_overlap(p.ds_tensor, self.dims.dp_rank * p.partition_numel(), p.ds_numel,
                                  frozen[name].flatten(), 0, p.ds_numel)
                else:
                    p.copy_(frozen[name].view_as(p))
        if self.stage == 3:
            zero.checkpoint_event_epilogue()  # re-gathers the parameters ZeRO-3 keeps whole
        else:
            zero.update_lp_params()  # working weights from the new master, all-gathered
        for key, value in headers[0]["counters"].items():
            setattr(self._ds, key, value)

    # -- export ----------------------------------------------------------------------------------
    def _frozen_params(self) -> dict[str, torch.Tensor]:
        """Whole frozen parameters (pos_embed) in fp32 on the CPU; collective under ZeRO-3.

        They have no fp32 master copy, and DeepSpeed's offline reader skips them for ZeRO-1, so
        the engine stores them itself. Being constant, they are their own EMA."""
        gathered = import_deepspeed().zero.GatheredParameters
        out = {}
        for name, p in self._frozen:
            with gathered([p], enabled=self.stage == 3):
                out[name] = p.detach().float().cpu().clone()
        return out

    def _buffers(self) -> dict[str, torch.Tensor]:
        return {clean_name(n): b.detach().cpu().clone() for n, b in self.unwrap().named_buffers()}

    def _full_ema(self) -> dict[str, torch.Tensor]:
        """The EMA as a whole state dict on the CPU (collective)."""
        state = self._frozen_params()
        for (name, p), ema, (_, offset) in zip(self._trained, self._ema, self._master_pieces()):
            full = torch.zeros(p.ds_numel if self.stage == 3 else p.numel(), device=self.device)
            _place(full, ema.to(self.device), offset)
            dist.all_reduce(full)  # every element is owned by exactly one rank
            state[name] = full.view(p.ds_shape if self.stage == 3 else p.shape).cpu()
        state.update(self._buffers())
        return state

    def consolidated_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Whole fp32 (model, EMA) state dicts on the CPU; collective, every rank gets them."""
        full_fp32 = import_deepspeed().utils.safe_get_full_fp32_param
        model = self._frozen_params()
        for name, p in self._trained:
            model[name] = full_fp32(p).detach().cpu().clone()  # the master copy, not the bf16 weights
        model.update(self._buffers())
        return _reference_order(model, self.unwrap()), _reference_order(self._full_ema(), self.unwrap())


def _place(full: torch.Tensor, piece: torch.Tensor, offset: int) -> None:
    """Copy `piece` into flat `full` at `offset`, dropping ZeRO-3's padding past the end."""
    n = min(piece.numel(), full.numel() - offset)
    if n > 0:
        full[offset:offset + n] = piece[:n]


def _reference_order(state: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """`state` in the module's own state-dict order (reference checkpoints list keys that way)."""
    return {clean_name(k): state[clean_name(k)] for k in module.state_dict()}


def check_resumable(meta: dict[str, Any], folder: Path, stage: int, dp: int, bf16: bool) -> bool:
    """Whether a step folder with `meta` resumes a run of ZeRO-`stage` on `dp` ranks through
    DeepSpeed's own files (True: same stage and number of ranks) or through the world-size-free
    fragments (False); ValueError when it cannot resume it at all."""
    if meta["bf16"] != bf16:
        raise ValueError(f"{folder} was saved with bf16={meta['bf16']}, this run has bf16={bf16} "
                         "(train.precision and the device decide)")
    if meta["zero_stage"] == stage and meta["world_size"] == dp:
        return True
    if not meta.get("fragments"):
        raise ValueError(
            f"{folder} is a ZeRO-{meta['zero_stage']} checkpoint from {meta['world_size']} data-parallel ranks "
            f"without {FRAGMENTS_DIR}/ (saved by an older version), and this run is ZeRO-{stage} on {dp}. "
            f"Resume it with ZeRO-{meta['zero_stage']} on {meta['world_size']} ranks, or export the step "
            "(launchers/export.py) and start a new run from the consolidated weights (the optimizer state "
            "starts afresh).")
    return False


def check_fragments(folder: Path, shapes: dict[str, tuple[int, ...]], every_rank: bool = True
                    ) -> list[dict[str, Any]]:
    """The fragment headers of every rank that saved `folder` (of rank 0 alone if not `every_rank`:
    enough to compare the model), after checking that the files are there and agree, and that they
    hold exactly the trainable parameters named in `shapes` with those shapes; FileNotFoundError or
    ValueError naming the folder and the difference otherwise."""
    world = _read_meta(folder)["world_size"]
    headers = []
    for rank in range(world if every_rank else 1):
        path = _fragment_file(folder, rank)
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: {path.relative_to(folder)} is missing (a step folder saved by "
                                    f"{world} ranks holds one fragment file per rank)")
        with safe_open(str(path), framework="pt", device="cpu") as saved:
            header = json.loads((saved.metadata() or {}).get(_FRAGMENTS_FORMAT, "null"))
            names = set(saved.keys())
        if not isinstance(header, dict) or header.get("version") != _FRAGMENTS_VERSION:
            raise ValueError(f"{path} is not a fragment file of format {_FRAGMENTS_FORMAT!r} version "
                             f"{_FRAGMENTS_VERSION}")
        listed = {f"{kind}/{name}" for kind in ("fp32", *header["keys"]) for name in header["offsets"]}
        if header["rank"] != rank or header["world_size"] != world or names != listed:
            raise ValueError(f"{path} does not hold what its header lists for rank {rank} of {world}")
        for key in ("step", "keys", "shapes", "zero_stage", "counters"):
            if header[key] != (headers[0] if headers else header)[key]:
                raise ValueError(f"{folder}: ranks 0 and {rank} saved different {key!r}")
        headers.append(header)
    saved_shapes = {name: tuple(shape) for name, shape in headers[0]["shapes"].items()}
    shapes = {name: tuple(shape) for name, shape in shapes.items()}
    if saved_shapes != shapes:
        missing, unexpected = sorted(set(shapes) - set(saved_shapes)), sorted(set(saved_shapes) - set(shapes))
        reshaped = [f"{name} {saved_shapes[name]} -> {shape}" for name, shape in shapes.items()
                    if saved_shapes.get(name, shape) != shape]
        raise ValueError(f"{folder} holds another model's parameters: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, other shapes (saved -> this model) {reshaped[:5]}")
    return headers


def _fragment_file(folder: Path, rank: int) -> Path:
    return folder / FRAGMENTS_DIR / f"rank{rank:05d}.safetensors"


def _full_shape(p: nn.Parameter) -> tuple[int, ...]:
    """A parameter's whole shape (ZeRO-3 parameters are empty placeholders outside forward)."""
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def _copy_overlap(target: torch.Tensor, start: int, numel: int, source: Any, source_start: int,
                  source_len: int) -> int:
    """Copy into `target`, elements start.. of a flattened parameter of `numel` elements, those that a
    saved piece `source` (elements source_start.., source_len long; a tensor or a lazy safetensors
    slice) holds; returns how many. Elements past `numel` are ZeRO-3 padding and never copied."""
    lo, hi = max(start, source_start), min(start + target.numel(), source_start + source_len, numel)
    if lo >= hi:
        return 0
    target[lo - start:hi - start] = source[lo - source_start:hi - source_start]
    return hi - lo


def _adam_step(optimizer: torch.optim.Optimizer, step: int, device: torch.device) -> Any:
    """`step` in the form `optimizer` keeps it: torch's Adam and AdamW hold a float32 tensor (on the
    parameters' device when fused or capturable), DeepSpeedCPUAdam a Python int."""
    if isinstance(optimizer, torch.optim.Adam):  # AdamW derives from Adam
        on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
        return torch.tensor(float(step), dtype=torch.float32, device=device if on_device else "cpu")
    return step


def _ema_rank_entry(rank: int) -> str:
    return f"ema-rank{rank:05d}"


def _read_meta(folder: Path) -> dict[str, Any]:
    if not (folder / MANIFEST_NAME).is_file() or not (folder / META_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a complete DeepSpeed step folder (it needs {MANIFEST_NAME} "
                                f"and {META_FILE})")
    return json.loads((folder / META_FILE).read_text())


def read_consolidated(folder: Path, plain_model: PlainModel) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Whole fp32 (model, EMA) state dicts from a step folder written by DeepSpeedEngine, in this
    process alone (no process group), for export. `plain_model` describes the model the run
    trained (a LightningDiT config, or a function building it). Call only after the folder's
    manifest was verified: DeepSpeed's reader unpickles its files."""
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = Path(folder)
    meta = _read_meta(folder)
    plain = plain_model_factory(plain_model)()
    reference = plain.state_dict()  # key set and order of the reference checkpoints
    model = {clean_name(k): v for k, v in get_fp32_state_dict_from_zero_checkpoint(
        str(folder), tag=CHECKPOINT_TAG).items()}
    frozen = read_state(folder, "frozen")
    model.update(frozen)
    if set(model) != set(reference):
        raise ValueError(f"{folder}: the DeepSpeed checkpoint's keys do not match {type(plain).__name__}: "
                         f"missing {sorted(set(reference) - set(model))[:5]}, "
                         f"unexpected {sorted(set(model) - set(reference))[:5]}")
    ema = {**frozen, **{n: model[n] for n, _ in plain.named_buffers() if n in reference}}  # persistent ones
    ranks = [read_state(folder, _ema_rank_entry(r)) for r in range(meta["world_size"])]
    for name in ranks[0]["pieces"]:
        full = torch.zeros(reference[name].numel())
        for state in ranks:
            _place(full, state["pieces"][name], state["offsets"][name])
        ema[name] = full.view(reference[name].shape)
    return {k: model[k] for k in reference}, {k: ema[k] for k in reference}


def _partition_at_start(ds, module: nn.Module, dtype: torch.dtype, ds_config: dict[str, Any]) -> None:
    """Partition a freshly built model with zero.Init before DeepSpeed wraps it.

    The model is built whole on the host and handed to zero.Init(module=...), which moves and
    partitions one parameter at a time, so the GPU never holds the whole model (the host holds
    it once per rank, 4 GB in fp32 for XXL, until partitioning frees it). It is not built inside
    the zero.Init context because LightningDiT initialises its weights once, at the end of
    __init__, across all submodules; inside the context every submodule is partitioned by then
    (its tensors are empty) and that initialisation fails. A per-module init (through
    Module.apply, which zero.Init gathers one module at a time) would allow the context.
    `dtype=` is not passed to zero.Init: DeepSpeed 0.19.8 ignores it on CPU (an operator
    precedence bug gives bf16); the dtype comes from the config instead.
    """
    for p in module.parameters():
        p.data = p.data.to(dtype)  # zero.Init(module=...) keeps the dtype it is given
    ds.zero.Init(module=module, config_dict_or_path=ds_config)


def _build_optimizer(module: nn.Module, cfg: OptimConfig, device: torch.device,
                     offload: bool) -> torch.optim.Optimizer:
    """AdamW with the `optim` hyper-parameters, handed to DeepSpeed as a client optimizer.

    CPU runs and GPU runs without offload use torch's AdamW (fused kernel on GPU: no JIT build,
    same multi-tensor speed as DeepSpeed's FusedAdam, which would need a ~30 s build per machine).
    Optimizer offload on GPU uses DeepSpeedCPUAdam: torch's CPU AdamW is several times slower on
    the offloaded fp32 partitions (it JIT-builds cpu_adam once into TORCH_EXTENSIONS_DIR).
    """
    params = [p for p in module.parameters() if p.requires_grad]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if offload and device.type == "cuda":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    kernel = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(params, **kwargs, **kernel)


# ----------------------------------------------------------------------------------------------
# Memory per rank from the real partitioning
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZeroStateBytes:
    """Bytes one rank holds for model states (activations, buckets and temporaries excluded)."""

    params: int
    """bf16 working parameters (full, or the ZeRO-3 partition plus persistent small parameters)."""
    grads: int
    """bf16 gradients (full under ZeRO-1, the partition under ZeRO-2/3)."""
    optimizer: int
    """fp32 master weights + Adam exp_avg + exp_avg_sq of this rank's partition."""


def zero_partition_numel(model: nn.Module, stage: int, world_size: int,
                         persistence_threshold: int = PERSISTENCE_THRESHOLD) -> dict[str, int]:
    """Per-rank element counts under DeepSpeed's partitioning rules, from the model's real parameters.

    Works on a meta-device model. Stages 1/2 flatten the trainable parameters into one group
    padded to a multiple of 2 x world size (DeepSpeed's 4-byte NCCL alignment of 2-byte
    elements), then split it evenly. ZeRO-3 splits every parameter on its own, padded to a
    multiple of the world size; parameters of at most `persistence_threshold` elements are also
    kept whole. Returns the 'params', 'grads' and 'optimizer' element counts of one rank.
    """
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    if stage in (1, 2):
        flat = math.ceil(sum(p.numel() for p in trainable) / (2 * world_size)) * 2 * world_size
        part = flat // world_size
        full = sum(p.numel() for p in params)
        return {"params": full, "grads": sum(p.numel() for p in trainable) if stage == 1 else part,
                "optimizer": part}
    if stage != 3:
        raise ValueError(f"zero stage must be 1, 2 or 3, got {stage}")

    def part_of(p: torch.Tensor) -> int:
        return math.ceil(p.numel() / world_size)

    persistent = sum(p.numel() for p in params if p.numel() <= persistence_threshold)
    return {"params": sum(part_of(p) for p in params) + persistent,
            "grads": sum(part_of(p) for p in trainable),
            "optimizer": sum(part_of(p) for p in trainable)}


def zero_state_bytes(model: nn.Module, stage: int, world_size: int) -> ZeroStateBytes:
    """Per-rank bytes of bf16 parameters and gradients and fp32 AdamW state (master + 2 moments)."""
    n = zero_partition_numel(model, stage, world_size)
    return ZeroStateBytes(params=2 * n["params"], grads=2 * n["grads"], optimizer=12 * n["optimizer"])
