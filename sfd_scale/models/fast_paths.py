"""The one dispatch point for optional fast paths: the attention kernel, the Triton kernels, compile.

Every fast path has a plain-PyTorch twin that tests compare it against, is chosen once per process
and logged once, and leaves parameter names (state-dict keys) alone:

  * attention (`model.attention`): 'auto' takes the first that can run of FlashAttention 3
    (`flash_attn_interface`, Hopper), FlashAttention 2 (`flash_attn`, Ampere or newer), xformers,
    each on CUDA only, else PyTorch SDPA (flash/cuDNN/memory-efficient kernels on GPU, its own
    CPU kernels on the CPU). Every backend takes q, k, v as (B, heads, N, head_dim) after qk-norm
    and RoPE, and equals `layers.attention_math`.
  * Triton kernels (`apply_fused_kernels`): fill the `activation` slot of every SwiGLU and the
    `rotate` slot of every Rope2D. Off unless asked for; on the CPU they run only under Triton's
    interpreter (tests).
  * FP8 (`apply_fp8`): torchao's float8 training linears in place of the blocks' qkv, proj, w12
    and w3 (the ~12 large matmuls per block; AdaLN's (B, D) inputs are too small to gain). Off
    unless asked for; on the CPU torchao emulates it (tests).
  * compile (`apply_compile`): regional (every block) or whole-model `torch.compile`, in place.

The AdamW kernel (apex FusedAdam, torch fused, foreach) is chosen in `sfd_scale.train.optim`.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import logging
import re
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from sfd_scale.kernels import triton_installed, triton_interpreting
from sfd_scale.models.layers import ATTENTION_BACKENDS as PLAIN_ATTENTION
from sfd_scale.models.layers import RMSNorm, Rope2D, SwiGLU, attention_sdpa

log = logging.getLogger(__name__)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

FUSED_ATTENTION = ("flash3", "flash2", "xformers")
"""Optional CUDA backends, fastest first: the order 'auto' tries them in."""
SDPA_KERNELS = ("sdpa_flash", "sdpa_cudnn")
"""One of SDPA's own CUDA kernels by name ('sdpa' lets PyTorch choose): to compare them on a card."""
COMPILE_MODES = ("none", "blocks", "model")
_HALF = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
_KERNEL_SOURCES = {"flash3": ("flash_attn_interface", "flash_attn_func"),
                   "flash2": ("flash_attn", "flash_attn_func"),
                   "xformers": ("xformers.ops", "memory_efficient_attention")}


@functools.cache
def _kernel(backend: str):
    """The backend's function, or None when its package is missing or broken (a wheel built for
    another torch or CUDA fails at import with ImportError or OSError)."""
    module, name = _KERNEL_SOURCES[backend]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, OSError, AttributeError):
        return None


def _common_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.dtype:
    """The dtype a fused kernel computes in: the autocast dtype when autocast is on (q and k leave
    the fp32 qk-norm weights in fp32 while v is bf16; SDPA would be cast the same way), else the
    inputs' promoted dtype."""
    if torch.is_autocast_enabled(q.device.type):
        return torch.get_autocast_dtype(q.device.type)
    return torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)


@functools.cache
def _warn_fp32_fallback(backend: str) -> None:
    log.warning("attention %s needs fp16/bf16 inputs; float32 attention runs through SDPA", backend)


def _kernel_inputs(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, half_only: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """q, k, v in the dtype the kernel computes in; None (after a warning) when it needs fp16/bf16
    and that dtype is fp32: the caller then runs SDPA."""
    dtype = _common_dtype(q, k, v)
    if half_only and dtype not in _HALF:
        _warn_fp32_fallback(backend)
        return None
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _tokens_major(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  half_only: bool) -> torch.Tensor:
    """Run a kernel that takes (B, N, heads, head_dim) on (B, heads, N, head_dim) inputs."""
    inputs = _kernel_inputs(backend, q, k, v, half_only)
    if inputs is None:
        return attention_sdpa(q, k, v)
    q, k, v = (t.transpose(1, 2) for t in inputs)
    out = _kernel(backend)(q, k, v)
    if isinstance(out, tuple):  # some FlashAttention 3 builds also return the log-sum-exp
        out = out[0]
    return out.transpose(1, 2)


def attention_flash3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _tokens_major("flash3", q, k, v, half_only=True)


def attention_flash2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _tokens_major("flash2", q, k, v, half_only=True)


def attention_xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _tokens_major("xformers", q, k, v, half_only=False)


def attention_sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA's FlashAttention 2 kernel (PyTorch's build), whatever SDPA would pick itself."""
    half = _kernel_inputs("sdpa_flash", q, k, v, half_only=True)
    if half is None:
        return attention_sdpa(q, k, v)
    return torch.ops.aten._scaled_dot_product_flash_attention(*half)[0]


def attention_sdpa_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA's cuDNN kernel (with the log-sum-exp its backward needs)."""
    half = _kernel_inputs("sdpa_cudnn", q, k, v, half_only=True)
    if half is None:
        return attention_sdpa(q, k, v)
    return torch.ops.aten._scaled_dot_product_cudnn_attention(*half, None, True)[0]


ATTENTION: dict[str, AttentionFn] = {"flash3": attention_flash3, "flash2": attention_flash2,
                                     "xformers": attention_xformers, "sdpa_flash": attention_sdpa_flash,
                                     "sdpa_cudnn": attention_sdpa_cudnn, **PLAIN_ATTENTION}
"""Every backend by name ('auto' picks one of them)."""
ATTENTION_NAMES = ("auto", *ATTENTION)

_CAPABILITIES = {"flash3": ((9, 0), (9, 9)), "flash2": ((8, 0), (99, 99)), "xformers": ((0, 0), (99, 99))}
"""CUDA compute capabilities each fused backend has kernels for: FlashAttention 3 is Hopper-only,
FlashAttention 2 needs Ampere or newer."""


def _cuda_capability() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


@functools.cache
def available_attention() -> tuple[str, ...]:
    """Backends that can run in this process, in the order 'auto' prefers them."""
    capability = _cuda_capability()
    fused = tuple(name for name in FUSED_ATTENTION
                  if capability is not None and _CAPABILITIES[name][0] <= capability <= _CAPABILITIES[name][1]
                  and _kernel(name) is not None)
    sdpa_kernels = SDPA_KERNELS if capability is not None and capability >= (8, 0) else ()
    return (*fused, *PLAIN_ATTENTION, *sdpa_kernels)


def choose_attention(available: Sequence[str]) -> str:
    """'auto': the first available fused backend, else SDPA."""
    return next((name for name in FUSED_ATTENTION if name in available), "sdpa")


@functools.cache
def auto_attention() -> str:
    available = available_attention()
    name = choose_attention(available)
    log.info("attention: %s (available here: %s)", name, ", ".join(available))
    return name


def resolve_attention(name: str) -> tuple[str, AttentionFn]:
    """(backend name, function) for `model.attention`; 'auto' is decided once per process."""
    if name == "auto":
        name = auto_attention()
    if name not in ATTENTION:
        raise ValueError(f"model.attention: unknown backend {name!r} (known: {', '.join(ATTENTION_NAMES)})")
    if name in FUSED_ATTENTION and name not in available_attention():
        raise ValueError(f"model.attention={name!r} cannot run here (it needs CUDA"
                         f"{' on Hopper' if name == 'flash3' else ''} and its package installed); "
                         f"available: {', '.join(available_attention())}, or use auto")
    if name in SDPA_KERNELS and name not in available_attention():
        raise ValueError(f"model.attention={name!r} cannot run here (it needs CUDA on an Ampere or newer GPU); "
                         f"available: {', '.join(available_attention())}, or use auto")
    return name, ATTENTION[name]


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
def fused_kernels_unavailable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device`, or None when they can."""
    if not triton_installed():
        return "Triton is not installed (pip install triton)"
    if device.type != "cuda" and not triton_interpreting():
        return f"they need a CUDA device (got {device}; the CPU runs them only under TRITON_INTERPRET=1)"
    return None


def _autocast_out_dtype(x: torch.Tensor) -> torch.dtype | None:
    """Under autocast the rotated q/k are cast to the autocast dtype by attention anyway, so the
    kernel writes that dtype directly (half the bytes, same numbers)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def apply_fused_kernels(model: nn.Module, device: torch.device) -> int:
    """Put the Triton RMSNorm+modulate, SwiGLU and RoPE kernels into `model`'s slots in place; returns how many
    modules now use one. Raises ValueError when they cannot run on `device`."""
    reason = fused_kernels_unavailable(device)
    if reason is not None:
        raise ValueError(f"fused kernels were asked for but cannot run: {reason}")
    # Imported here, once Triton is known to be usable (and, on the CPU, to be interpreted).
    from sfd_scale.kernels.rmsnorm_modulate import rmsnorm_modulate
    from sfd_scale.kernels.rope import rope
    from sfd_scale.kernels.swiglu import swiglu

    def fused_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rope(x, cos, sin, out_dtype=_autocast_out_dtype(x))

    def fused_norm_modulate(x, weight, shift, scale, eps):
        return rmsnorm_modulate(x, weight, shift, scale, eps, out_dtype=_autocast_out_dtype(x))

    swapped = 0
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.modulate_fn = fused_norm_modulate
            swapped += 1
        elif isinstance(module, SwiGLU):
            module.activation = swiglu
            swapped += 1
        elif isinstance(module, Rope2D):
            module.rotate = fused_rope
            swapped += 1
    log.info("fused Triton kernels: RMSNorm+modulate, SwiGLU activation and 2-D RoPE in %d modules%s", swapped,
             " (Triton interpreter)" if device.type != "cuda" else "")
    return swapped


# ----------------------------------------------------------------------------------------------
# Residual stream precision
# ----------------------------------------------------------------------------------------------
RESIDUAL_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""`model.residual_precision`: the residual stream's dtype under autocast."""


def apply_residual_precision(model: nn.Module, precision: str) -> None:
    """Carry `model`'s residual stream in `precision` under autocast (training only: sampling and
    evaluation keep the reference's fp32 stream)."""
    if precision not in RESIDUAL_PRECISIONS:
        raise ValueError(f"model.residual_precision={precision!r} is unknown (known: {', '.join(RESIDUAL_PRECISIONS)})")
    model.residual_dtype = RESIDUAL_PRECISIONS[precision]
    if precision != "fp32":
        log.info("residual stream in %s under autocast (not the reference's numbers: compare loss curves)", precision)


# ----------------------------------------------------------------------------------------------
# FP8
# ----------------------------------------------------------------------------------------------
FP8_RECIPES = ("none", "tensorwise", "rowwise", "rowwise_with_gw_hp", "delayed")
"""`model.fp8`: torchao's float8 recipe names (scales per tensor, or per row: more accurate), or
'delayed': our FP8 linears whose scales come from previous steps' amaxes (models/fp8_delayed.py)."""
FP8_LINEARS = re.compile(r"^blocks\.\d+\.(.+\.)?(attn\.(qkv|proj)|mlp\.(w12|w3))$")
"""The linears FP8 replaces: every block's large matmuls (8192 x 1536 x 4096 at XXL batch 32),
also inside an activation-checkpointing wrapper."""
FP8_CASTS_ATTR = "fp8_casts"
"""The attribute `apply_fp8` leaves on the model: what casts its FP8 tensors ('torchao'; 'triton',
our kernels, with the tiles SFD_FP8_TILES changed; or 'pytorch (why)', their twins), so a figure or
a loss curve says which ran."""


def fp8_unavailable(device: torch.device, recipe: str = "tensorwise") -> str | None:
    """Why FP8 training with `recipe` cannot run on `device`, or None when it can (the CPU runs
    torchao's recipes emulated, and torch's FP8 matmul for 'delayed')."""
    if recipe != "delayed" and importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install -e '.[fp8]')"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return (f"FP8 matmuls need compute capability 8.9 or newer (Ada, Hopper); this GPU has "
                f"{torch.cuda.get_device_capability(device)}")
    return None


def apply_fp8(model: nn.Module, recipe: str, device: torch.device) -> int:
    """Swap the blocks' large linears for FP8 training linears in place (same parameters, same
    state-dict keys); returns how many. Raises ValueError when FP8 cannot run on `device`. The model
    then says what casts its FP8 tensors in `model.fp8_casts` (FP8_CASTS_ATTR): figures name it."""
    if recipe not in FP8_RECIPES:
        raise ValueError(f"model.fp8={recipe!r} is unknown (known: {', '.join(FP8_RECIPES)})")
    if recipe == "none":
        return 0
    reason = fp8_unavailable(device, recipe)
    if reason is not None:
        raise ValueError(f"model.fp8={recipe} was asked for but cannot run: {reason}")
    if recipe == "delayed":
        return _apply_delayed_fp8(model, device)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    emulated = device.type != "cuda"
    if emulated:
        config = dataclasses.replace(config, emulate=True)
    converted: set[str] = set()

    def wanted(module: nn.Module, name: str) -> bool:
        take = _fp8_eligible(module, name)
        if take:
            converted.add(name)
        return take

    convert_to_float8_training(model, module_filter_fn=wanted, config=config)
    setattr(model, FP8_CASTS_ATTR, "torchao")
    log.info("FP8 (torchao, %s recipe%s): %d linear layers", recipe, ", emulated on the CPU" if emulated else "",
             len(converted))
    return len(converted)


def _fp8_eligible(module: nn.Module, name: str) -> bool:
    """A block's large linear whose both dimensions are divisible by 16 (what FP8 matmuls need)."""
    return (isinstance(module, nn.Linear) and FP8_LINEARS.match(name) is not None
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def _apply_delayed_fp8(model: nn.Module, device: torch.device) -> int:
    from sfd_scale.kernels import reference
    from sfd_scale.models.fp8_delayed import Float8DelayedLinear, Float8DelayedSwiGLU, register_fold_hook

    # The weights' and output gradients' casts to both FP8 layouts, and a SwiGLU's activation and
    # its gradient with theirs: our Triton kernels where Triton runs (one read of a tensor instead
    # of several) and they match their twins on this device, else the same arithmetic in PyTorch.
    unavailable = fused_kernels_unavailable(device)
    kernels = unavailable is None
    tiles = _tiles_note() if kernels else ""  # a bad SFD_FP8_TILES fails here, by name, not as a kernel failure
    casts = "triton" + tiles if kernels else f"pytorch ({unavailable})"
    if kernels and (failures := fp8_kernel_failures(str(device), tiles)):
        log.warning("FP8 (delayed): our Triton cast kernels disagree with their PyTorch twins on %s, so the casts "
                    "run in PyTorch (correct, slower). Triton %s miscompiles them here (docs/benchmarks.md, "
                    "sessions 10 and 11): %s", _device_name(device), _triton_version(), " | ".join(failures))
        kernels, casts = False, f"pytorch (the start-up check failed: {failures[0]})"
    if kernels:
        from sfd_scale.kernels import fp8_cast as ops
        cast_transpose, swiglu_ops = ops.fp8_cast_transpose, (ops.fp8_swiglu_cast, ops.fp8_swiglu_backward_cast)
    else:
        cast_transpose = reference.fp8_cast_transpose_reference
        swiglu_ops = (reference.fp8_swiglu_cast_reference, reference.fp8_swiglu_backward_cast_reference)
    chosen = [name for name, module in model.named_modules() if _fp8_eligible(module, name)]
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = Float8DelayedLinear.from_linear(getattr(parent, child))
        layer.cast_transpose = cast_transpose
        setattr(parent, child, layer)
    fused = 0
    for name, module in list(model.named_modules()):
        if (isinstance(module, SwiGLU) and isinstance(module.w12, Float8DelayedLinear)
                and isinstance(module.w3, Float8DelayedLinear)):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, Float8DelayedSwiGLU(module.w12, module.w3, *swiglu_ops))
            fused += 1
    register_fold_hook(model)  # the histories and scales move on once a step, for all layers at once
    setattr(model, FP8_CASTS_ATTR, casts)
    log.info("FP8 (delayed scaling, ours): %d linear layers, %d SwiGLUs fused with their casts; casts by %s",
             len(chosen), fused, f"the Triton kernels{tiles} (they match their PyTorch twins here: "
             "start-up check)" if kernels else "PyTorch")
    return len(chosen)


@functools.cache
def fp8_kernel_failures(device: str, tiles: str) -> tuple[str, ...]:
    """How our FP8 cast kernels disagree with their PyTorch twins on `device` (empty: they agree),
    checked by `sfd_scale.kernels.fp8_check` once per process, device and `tiles` (`_tiles_note`,
    only a cache key here: the kernels read their tiles themselves)."""
    from sfd_scale.kernels.fp8_check import fp8_kernel_failures as check

    return tuple(check(torch.device(device)))


def _tiles_note() -> str:
    """' (SFD_FP8_TILES op=tile,...)' naming the cast kernels whose tiles that variable changed; ''
    where it changed none."""
    from sfd_scale.kernels.fp8_cast_kernel import DEFAULT_TILES, TILES_ENV, active_tiles, tile_name

    changed = [f"{op}={tile_name(tile)}" for op, tile in active_tiles().items() if tile != DEFAULT_TILES[op]]
    return f" ({TILES_ENV} {','.join(changed)})" if changed else ""


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device} (Triton's interpreter)"


def _triton_version() -> str:
    import triton

    return triton.__version__


# ----------------------------------------------------------------------------------------------
# Compile
# ----------------------------------------------------------------------------------------------
COMPILE_INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
"""Inductor modes; 'reduce-overhead' captures CUDA graphs (see `mark_step_begin`)."""


def inductor_options(inductor_mode: str, kernel_tuning: bool = False) -> dict[str, bool]:
    """Inductor's settings for `inductor_mode`, plus coordinate-descent tuning of the block sizes of
    the kernels it generates (norms, gates, SwiGLU, casts) when `kernel_tuning`: a longer first
    compile, kept in inductor's cache; the max-autotune modes include it."""
    from torch._inductor import list_mode_options

    options = dict(list_mode_options(inductor_mode))
    if kernel_tuning:
        options["coordinate_descent_tuning"] = True
    return options


def apply_compile(model: nn.Module, mode: str, backend: str = "inductor", inductor_mode: str = "default",
                  kernel_tuning: bool = False) -> int:
    """torch.compile in place: 'blocks' compiles each of `model.blocks` (regional: one graph reused
    by every block, short compile), 'model' the whole forward. Returns how many modules.
    `inductor_mode` and `kernel_tuning` set inductor's options (`inductor_options`).

    `nn.Module.compile` keeps the module and its parameter names, so state dicts are unchanged.
    """
    if inductor_mode not in COMPILE_INDUCTOR_MODES:
        raise ValueError(f"compile mode {inductor_mode!r} is unknown (known: {', '.join(COMPILE_INDUCTOR_MODES)})")
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is unknown (known: {', '.join(COMPILE_MODES)})")
    if mode == "none":
        return 0
    targets = list(model.blocks) if mode == "blocks" else [model]
    options = inductor_options(inductor_mode, kernel_tuning) if backend == "inductor" else {}
    for module in targets:
        module.compile(backend=backend, options=options or None)
    log.info("torch.compile (%s, backend %s, mode %s%s): %d module(s)", mode, backend, inductor_mode,
             ", kernel tuning" if kernel_tuning else "", len(targets))
    return len(targets)


def mark_step_begin(inductor_mode: str) -> None:
    """Call at the start of every training step: with CUDA graphs, the previous step's graph
    outputs may then be overwritten (a new forward/backward pair begins)."""
    if inductor_mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()
