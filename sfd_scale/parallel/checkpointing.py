"""Activation checkpointing applied to LightningDiT from outside (the model file knows nothing).

Modes (`parallel.activation_checkpointing`):
  * none: keep every activation;
  * full: recompute every block in the backward pass;
  * selective: recompute every `checkpoint_every`-th block (the k-th, 2k-th, ... counting from 1),
    or, with `checkpoint_attention_only`, the attention of every block;
  * ops: every block, selectively by operator (torchtitan's "selective op" policy): the outputs of
    matmuls and attention are kept, the cheap memory-bound ops between them (norms, AdaLN
    modulation, gates, SwiGLU's activation, RoPE) are recomputed. Less memory than `none`, much
    less recompute than `full`.

Wrapping uses torch's non-reentrant checkpoint wrapper, which composes with DDP, FSDP2 (wrap
before `fully_shard`), DeepSpeed and tensor parallelism, and whose state-dict hooks keep the
reference key names (`blocks.0.attn.qkv.weight`, not `..._checkpoint_wrapped_module...`).
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from sfd_scale.config import ParallelConfig

log = logging.getLogger(__name__)

WRAPPER_INFIX = "._checkpoint_wrapped_module"
"""What the wrapper inserts into parameter names (`named_parameters`); state dicts hide it."""


_KEPT_OPS = frozenset(op for op in (
    getattr(torch.ops.aten, name).default for name in (
        "mm", "addmm", "bmm", "convolution", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name)))
"""Operators whose outputs mode 'ops' keeps: the compute-bound ones (recomputing them would cost
as much as the forward); everything else in a block is recomputed."""


def ops_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Mode 'ops': keep what `_KEPT_OPS` computes, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op in _KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, cfg: ParallelConfig) -> int:
    """Wrap the blocks (or their attention) of `model.blocks` in place; returns how many modules."""
    mode = cfg.activation_checkpointing
    if mode == "none":
        return 0
    if mode not in ("full", "selective", "ops"):
        raise ValueError(f"parallel.activation_checkpointing: unknown mode {mode!r} (known: none, full, "
                         "selective, ops)")
    blocks = model.blocks
    wrapped = 0
    for index, block in enumerate(blocks, start=1):
        if mode == "selective" and cfg.checkpoint_attention_only:
            block.attn = _wrap(block.attn)
        elif mode == "ops":
            blocks[index - 1] = _wrap(block, context_fn=functools.partial(create_selective_checkpoint_contexts,
                                                                          ops_policy))
        elif mode == "full" or index % cfg.checkpoint_every == 0:
            blocks[index - 1] = _wrap(block)
        else:
            continue
        wrapped += 1
    what = ("attention modules" if mode == "selective" and cfg.checkpoint_attention_only
            else "blocks (matmul and attention outputs kept)" if mode == "ops" else "blocks")
    log.info("activation checkpointing (%s): %d of %d %s recomputed in backward", mode, wrapped,
             len(blocks), what)
    return wrapped


def _wrap(module: nn.Module, **checkpoint_kwargs) -> nn.Module:
    return checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                              preserve_rng_state=False, **checkpoint_kwargs)


def clean_name(name: str) -> str:
    """A parameter name as the reference state dict spells it (without the wrapper's infix)."""
    return name.replace(WRAPPER_INFIX, "")
