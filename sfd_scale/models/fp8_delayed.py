"""FP8 linear layers with delayed scaling (`model.fp8: delayed`): the scale of a tensor comes from
the largest absolute values of the previous steps, not from the tensor itself.

Why: torchao's dynamic recipes must know a tensor's amax before they can cast it, so every cast is
a second pass over the tensor (rowwise cost 46 ms a step on an H100, more than FP8 saved on the
matmuls; docs/benchmarks.md). With the scale known in advance the cast is a pointwise operation on
the producer's output, which torch.compile fuses into the kernel that produces it (the norm and
modulate, the SwiGLU); this step's amax is a reduction beside it, recorded for the next steps.

The recipe, as Transformer Engine's default one:
- inputs and weights in e4m3 scaled by 448 / max(their amax history); output gradients in e5m2
  scaled by 57344 / max(gradient amax history); histories of `HISTORY` steps, newest first. The
  weights too: a scale from their own amax would be a pass over the weight before its cast (a
  weight moves by ~lr a step, so its history follows it closely);
- y = x W^T + b, dx = dy W and dW = dy^T x all as FP8 matmuls (`torch._scaled_mm`), accumulated in
  fp32; the bias added in the matmul's epilogue;
- the first training step of a layer has no history yet and scales by the current amaxes
  (`fp8_ready` False; compiled blocks therefore compile a second time, at the second step); its
  histories are training state, in the checkpoints, so a resumed run scales exactly as an
  uninterrupted one.
Without gradients (evaluation, the EMA's previews) the layer is a plain linear.

The bookkeeping is per step, not per layer: a layer only writes this step's amaxes into slot 0 of
its histories, from the kernels that compute them (the producer's for an input, our cast kernel's
for a weight or gradient). Before each training forward, one `fold_amax_histories` pass over all
the layers (a forward pre-hook on the model, `register_fold_hook`) shifts those amaxes into the
histories and computes every scale the step will use: about a dozen kernels a step. Done inside
each layer, the same work was ~50 tiny kernels a block, 1,200 a step on XXL
(`launchers/kernel_plan.py` lists them).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from sfd_scale.kernels.reference import fp8_cast_transpose_reference, swiglu_backward_reference, swiglu_reference

HISTORY = 16
"""Steps of amax history a delayed scale looks back over (torchao's former default). A history
buffer holds HISTORY + 1 values: slot 0 receives this step's amax, slots 1.. the previous steps',
newest first."""
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max
E5M2_MAX = torch.finfo(torch.float8_e5m2).max
_AMAX_FLOOR = 1e-12
"""An all-zero tensor still gets a finite scale."""
CastTranspose = Callable[[torch.Tensor, torch.Tensor, torch.dtype, torch.Tensor, "torch.dtype | None"],
                         tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""(matrix, scale, FP8 dtype, amax slot, column sums' dtype or None) -> (the matrix in FP8, the same
transposed, its column sums), its amax written into the slot: `fp8_cast_transpose_reference` or
our Triton kernels' op `sfd_scale.kernels.fp8_cast.fp8_cast_transpose`. Casts the weights and the
output gradients."""
SwiGLUBackwardCast = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype, torch.Tensor,
                               "torch.dtype | None"], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""(h, the SwiGLU output's gradient, scale, FP8 dtype, amax slot, column sums' dtype or None) -> like
`CastTranspose`, of h's gradient through the SwiGLU: `fp8_swiglu_backward_cast_reference` or the op
`sfd_scale.kernels.fp8_cast.fp8_swiglu_backward_cast`."""
HISTORY_BUFFERS = ("fp8_input_amax_history", "fp8_weight_amax_history", "fp8_grad_amax_history")
"""The layer's state beyond nn.Linear's: checkpointed, never exported (reference keys only)."""


def is_fp8_state(key: str) -> bool:
    """Whether a state-dict key is an FP8 layer's amax history (training state, not a weight)."""
    return key.rsplit(".", 1)[-1] in HISTORY_BUFFERS


def without_fp8_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the reference's keys only: the FP8 layers' amax histories left out."""
    return {key: value for key, value in state.items() if not is_fp8_state(key)}


def fp8_state_for(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without the amax histories `module` has no layer for: a run that trained with
    `model.fp8: delayed` resumes without it (a missing history is already allowed the other way)."""
    expected = module.state_dict().keys()
    return {key: value for key, value in state.items() if key in expected or not is_fp8_state(key)}


def amax_histories(module: nn.Module) -> list[torch.Tensor]:
    """Every FP8 layer's amax histories in `module` (none without `model.fp8: delayed`)."""
    return [getattr(layer, name) for layer in module.modules() if isinstance(layer, Float8DelayedLinear)
            for name in HISTORY_BUFFERS]


def share_newest_amaxes(histories: list[torch.Tensor]) -> None:
    """Under data parallelism, make the newest entry of each of `histories` (`amax_histories`) the
    largest over the ranks, in one all-reduce for all layers: every rank then scales alike, and a
    checkpoint's histories (rank 0's) are every rank's, so resume stays exact. Call after each
    backward; nothing without histories or ranks."""
    from sfd_scale.parallel import distributed

    if not histories or distributed.world_size() == 1:
        return
    newest = [history[:1] for history in histories]
    torch._foreach_copy_(newest, list(distributed.all_reduce(torch.cat(newest), op="max").split(1)))


def fold_amax_histories(layers: list[Float8DelayedLinear]) -> None:
    """Start a step of `layers`: shift each history by one, so that the amax the last step wrote
    into slot 0 becomes the newest of the look-back, and set each layer's `fp8_scales` from its
    look-back. One pass for all layers; slot 0 keeps a copy until this step's forward and backward
    overwrite it."""
    if not layers:
        return
    histories = [getattr(layer, name) for layer in layers for name in HISTORY_BUFFERS]
    stacked = torch.stack(histories)
    folded = torch.cat([stacked[:, :1], stacked[:, :-1]], dim=1)
    torch._foreach_copy_(histories, list(folded.unbind(0)))
    lookback = folded[:, 1:].amax(dim=1).clamp(min=_AMAX_FLOOR).view(len(layers), len(HISTORY_BUFFERS))
    # Python numbers, not a tensor of the maxima: no host-to-device copy inside a captured CUDA graph.
    scales = torch.cat([E4M3_MAX / lookback[:, :2], E5M2_MAX / lookback[:, 2:]], dim=1)
    per_layer = torch.stack([scales, scales.reciprocal()], dim=1)  # (layers, 2, 3)
    torch._foreach_copy_([layer.fp8_scales for layer in layers], list(per_layer.unbind(0)))


class FoldBeforeTrainingForward:
    """A forward pre-hook running `fold_amax_histories` over the FP8 layers of the module it is
    registered on, before every forward that records gradients (`register_fold_hook`). An object
    rather than a closure, so that a deep copy of the module (the EMA's) folds its own layers."""

    def __init__(self, layers: list[Float8DelayedLinear]) -> None:
        self.layers = layers

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled():
            fold_amax_histories(self.layers)


def register_fold_hook(root: nn.Module) -> int:
    """Make every training forward of `root` start by folding its FP8 layers' amaxes into their
    histories and scales (`fold_amax_histories`); returns how many layers. Call once, after the
    layers are in place (`sfd_scale.models.fast_paths` does)."""
    layers = [layer for layer in root.modules() if isinstance(layer, Float8DelayedLinear)]
    if layers:
        root.register_forward_pre_hook(FoldBeforeTrainingForward(layers))
    return len(layers)


def _scale(amax: torch.Tensor, fp8_max: float) -> torch.Tensor:
    return fp8_max / amax.float().clamp(min=_AMAX_FLOOR)


def _cast(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, fp8_max: float) -> torch.Tensor:
    """x * scale in an FP8 dtype, saturated, row-major (what `torch._scaled_mm` takes first)."""
    return (x.float() * scale).clamp(-fp8_max, fp8_max).to(dtype).contiguous()


def _record(history: torch.Tensor, amax: torch.Tensor) -> None:
    """Write this step's `amax` into slot 0 of `history` (a mutation torch.compile keeps, in the
    backward too); the next step's `fold_amax_histories` shifts it into the look-back. A
    non-finite amax (a step the guard will skip) is recorded as 0: kept, it would make every later
    scale NaN, and the gradients with it, for good (and ranks would share it unequally)."""
    amax = amax.float().reshape(1)
    history[:1].copy_(torch.where(amax.isfinite(), amax, 0.0))


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column by column: what `torch._scaled_mm` takes as its second operand."""
    return t.t().contiguous().t()


class _DelayedFloat8Matmul(torch.autograd.Function):
    """y = x2d @ weight^T + bias in FP8 (see the module docstring); histories updated in place."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                histories: tuple[torch.Tensor, torch.Tensor, torch.Tensor], scales: torch.Tensor, dynamic: bool,
                out_dtype: torch.dtype, cast_transpose: CastTranspose,
                swiglu_backward_cast: SwiGLUBackwardCast | None) -> torch.Tensor:
        input_history, weight_history, grad_history = histories
        x_amax = x2d.detach().abs().amax()
        if dynamic:  # the first step: no history yet, each tensor is scaled by its own amax
            x_scale, w_scale = _scale(x_amax, E4M3_MAX), _scale(weight.abs().amax(), E4M3_MAX)
            x_inverse, w_inverse = x_scale.reciprocal(), w_scale.reciprocal()
        else:  # this step's scales, set by `fold_amax_histories`: no kernel of their own. One-element
            # slices, not 0-d ones: inductor's FP8 matmul lowering fails on a 0-d view at an offset.
            x_scale, w_scale, x_inverse, w_inverse = scales[0, 0:1], scales[0, 1:2], scales[1, 0:1], scales[1, 1:2]
        x8 = _cast(x2d, x_scale, torch.float8_e4m3fn, E4M3_MAX)
        _record(input_history, x_amax)
        # The weight in both layouts from one read: w8 for this matmul, w8_t (w8 transposed) kept
        # for the input gradient's, so the backward does not cast the weight again.
        w8, w8_t, _ = cast_transpose(weight, w_scale, torch.float8_e4m3fn, weight_history[:1], None)
        # The bias rides in the matmul's epilogue where the FP8 matmul takes one (a bf16/fp16
        # output): an add after it would be one more pass over the output.
        fused_bias = bias is not None and out_dtype in (torch.bfloat16, torch.float16)
        y = torch._scaled_mm(x8, w8.t(), scale_a=x_inverse, scale_b=w_inverse,
                             bias=bias.to(out_dtype) if fused_bias else None, out_dtype=out_dtype,
                             use_fast_accum=True)
        if bias is not None and not fused_bias:
            y = y + bias.to(out_dtype)
        saved = [x8, w8_t.t(), x_inverse, w_inverse, grad_history, scales]  # w8 column by column
        ctx.dynamic, ctx.cast_transpose, ctx.swiglu_backward_cast = dynamic, cast_transpose, swiglu_backward_cast
        ctx.input_dtype, ctx.weight_dtype = x2d.dtype, weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if swiglu_backward_cast is not None:  # w12: its output goes through the SwiGLU right here
            saved.append(y)
            y = swiglu_reference(y)
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x8, w8_columns, x_inverse, w_inverse, grad_history, scales, *swiglu_input = ctx.saved_tensors
        # dy in FP8 row by row (input gradient) and column by column (weight gradient), its amax
        # (into the history's slot) and its column sums (the bias gradient), from one read of dy
        # where the kernel runs. For w12, dy is the SwiGLU's input gradient: computed from its
        # output gradient `grad` in the same pass, and never written in bf16.
        slot, e5m2 = grad_history[:1], torch.float8_e5m2
        if ctx.dynamic:  # the first step: the scale needs this gradient's own amax first
            dy = grad.contiguous() if not swiglu_input else swiglu_backward_reference(swiglu_input[0], grad)
            g_scale = _scale(dy.abs().amax(), E5M2_MAX)
            g_inverse = g_scale.reciprocal()
            g8, g8_columns, db = ctx.cast_transpose(dy, g_scale, e5m2, slot, ctx.bias_dtype)
        else:
            g_scale, g_inverse = scales[0, 2:3], scales[1, 2:3]
            if swiglu_input:
                g8, g8_columns, db = ctx.swiglu_backward_cast(swiglu_input[0], grad.contiguous(), g_scale, e5m2, slot,
                                                              ctx.bias_dtype)
            else:
                g8, g8_columns, db = ctx.cast_transpose(grad.contiguous(), g_scale, e5m2, slot, ctx.bias_dtype)
        dx = torch._scaled_mm(g8, w8_columns, scale_a=g_inverse, scale_b=w_inverse, out_dtype=ctx.input_dtype)
        dw = torch._scaled_mm(g8_columns, _column_major(x8), scale_a=g_inverse, scale_b=x_inverse,
                              out_dtype=ctx.weight_dtype)
        return dx, dw, db if ctx.bias_dtype is not None else None, None, None, None, None, None, None


class Float8DelayedLinear(nn.Linear):
    """nn.Linear (same parameters and keys) whose training matmuls run in FP8 with delayed scaling;
    plain bf16/fp32 without gradients or when the token count is not a multiple of 16 (what FP8
    matmuls need)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        for name in HISTORY_BUFFERS:
            self.register_buffer(name, torch.zeros(HISTORY + 1, dtype=torch.float32, device=device))
        self.register_buffer("fp8_scales", torch.ones(2, len(HISTORY_BUFFERS), device=device), persistent=False)
        """This step's scales (row 0) and their inverses (row 1), in HISTORY_BUFFERS' order: derived
        from the histories by `fold_amax_histories`, so not checkpointed."""
        self.fp8_ready = False
        """True once the histories hold a step: until then scales come from the current amaxes."""
        self.cast_transpose: CastTranspose = fp8_cast_transpose_reference
        """How the weight and the output gradient are cast to both FP8 layouts: our Triton kernel
        where it can run (`sfd_scale.models.fast_paths`, which logs the choice). A plain attribute,
        not state."""
        self.swiglu_backward_cast: SwiGLUBackwardCast | None = None
        """Set on a SwiGLU's w12 (`fuse_swiglu`): the layer then returns silu(gate) * value of its
        output, and casts the output gradient in the same pass that computes it from the SwiGLU's."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Float8DelayedLinear:
        """A layer computing with `linear`'s own parameters (the same tensors, not copies). Built on
        the meta device first: no initialisation draws from the global generator."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=torch.device("meta"))
        layer.weight, layer.bias = linear.weight, linear.bias
        device = linear.weight.device
        for name in HISTORY_BUFFERS:
            setattr(layer, name, torch.zeros(HISTORY + 1, dtype=torch.float32, device=device))
        layer.fp8_scales = torch.ones(2, len(HISTORY_BUFFERS), device=device)
        return layer

    def fuse_swiglu(self, swiglu_backward_cast: SwiGLUBackwardCast) -> None:
        """Make this layer a SwiGLU's w12 followed by the activation (its output is then half as
        wide); the owning SwiGLU must skip its own activation (`SwiGLU.activation_in_w12`)."""
        if self.out_features % 2:
            raise ValueError(f"a SwiGLU's w12 has an even output width, got {self.out_features}")
        self.swiglu_backward_cast = swiglu_backward_cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // x.shape[-1]
        if not torch.is_grad_enabled() or tokens % 16:
            y = F.linear(x, self.weight, self.bias)
            return y if self.swiglu_backward_cast is None else swiglu_reference(y)
        dynamic, self.fp8_ready = not self.fp8_ready, True
        autocast = torch.is_autocast_enabled(x.device.type)
        # What F.linear would return: the autocast dtype under autocast, else the input's.
        out_dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        histories = tuple(getattr(self, name) for name in HISTORY_BUFFERS)
        y = _DelayedFloat8Matmul.apply(x.reshape(tokens, x.shape[-1]), self.weight, self.bias, histories,
                                       self.fp8_scales, dynamic, out_dtype, self.cast_transpose,
                                       self.swiglu_backward_cast)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        histories = [prefix + name for name in HISTORY_BUFFERS]
        for key in histories:
            old = state_dict.get(key)
            if old is not None and old.shape == (HISTORY,):
                # Written before slot 0 (2026-11-27): all folded already. A zero after them makes the
                # next fold's look-back exactly their HISTORY values.
                state_dict[key] = torch.cat([old, old.new_zeros(1)])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if all(key in state_dict for key in histories):
            self.fp8_ready = True  # a checkpoint of an FP8 run: its next step scales from its history
        else:  # weights of a run without FP8 (or an export): the histories start empty
            for key in histories:
                if key in missing_keys:
                    missing_keys.remove(key)
