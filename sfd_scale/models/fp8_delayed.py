"""FP8 linear layers with delayed scaling (`model.fp8: delayed`): the scale of a tensor comes from
the largest absolute values of the previous steps, not from the tensor itself.

Why: torchao's dynamic recipes must know a tensor's amax before they can cast it, so every cast is
a second pass over the tensor (rowwise cost 46 ms a step on an H100, more than FP8 saved on the
matmuls; docs/benchmarks.md). With the scale known in advance the cast is a pointwise operation on
the producer's output, which torch.compile fuses into the kernel that produces it (the norm and
modulate); this step's amax is a reduction beside it, recorded for the next steps.

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

A SwiGLU whose two linears are FP8 trains as one function (`Float8DelayedSwiGLU`): our kernels
compute its activation and cast it for w3 in both layouts, and compute its gradient and cast it for
w12, so neither is written in bf16 nor recomputed (docs/benchmarks.md).

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

from sfd_scale.kernels.fp8_cast import fp8_transpose
from sfd_scale.kernels.reference import fp8_cast_transpose_reference, swiglu_backward_reference, swiglu_reference
from sfd_scale.models.layers import SwiGLU, silu_gate

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
SwiGLUCast = Callable[[torch.Tensor, torch.Tensor, torch.dtype, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(h, scale, FP8 dtype, amax slot) -> (silu(gate) * value of h = [gate, value] in FP8, the same
transposed), its amax written into the slot: `fp8_swiglu_cast_reference` or the op
`sfd_scale.kernels.fp8_cast.fp8_swiglu_cast`."""
SwiGLUBackwardCast = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype, torch.Tensor,
                               "torch.dtype | None"], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""(h, the SwiGLU output's gradient, scale, FP8 dtype, amax slot, column sums' dtype or None) -> like
`CastTranspose`, of h's gradient through the SwiGLU: `fp8_swiglu_backward_cast_reference` or the op
`sfd_scale.kernels.fp8_cast.fp8_swiglu_backward_cast`."""
HISTORY_BUFFERS = ("fp8_input_amax_history", "fp8_weight_amax_history", "fp8_grad_amax_history")
"""The layer's state beyond nn.Linear's: checkpointed, never exported (reference keys only)."""
SCALE_SLOT = 4
"""Floats per scale in a layer's `fp8_scales`: each scale starts 16 bytes after the last. cuBLASLt
reads an FP8 matmul's scales only from 16-byte aligned addresses: packed side by side, a scale at
offset 3 failed the matmul with CUBLAS_STATUS_NOT_SUPPORTED (H200, CUDA 13, 2026-11-27; as
pytorch/pytorch#159957 found for sliced row-wise scales)."""


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
    # Contiguous: CUDA's one-launch foreach copy takes dense sources only (a copy per layer else).
    slots = per_layer.unsqueeze(-1).expand(-1, -1, -1, SCALE_SLOT).contiguous()
    torch._foreach_copy_([layer.fp8_scales for layer in layers], list(slots.unbind(0)))


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


def _scale_slots(device: torch.device | None) -> torch.Tensor:
    """A layer's `fp8_scales` before its first fold: (2, len(HISTORY_BUFFERS), SCALE_SLOT) ones."""
    return torch.ones(2, len(HISTORY_BUFFERS), SCALE_SLOT, device=device)


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    """What F.linear would return for `x`: the autocast dtype under autocast, else x's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


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


def _column_major(x8: torch.Tensor) -> torch.Tensor:
    """The same FP8 matrix stored column by column: what `torch._scaled_mm` takes as its second
    operand. By our transpose op (its kernel where the cast kernels run): compile fused this copy
    into an unrelated reduction kernel, which then ran 3x slower (`fp8_transpose`)."""
    return fp8_transpose(x8).t()


def _scales(amax: torch.Tensor | None, fp8_max: float, scales: torch.Tensor, index: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, inverse) of a tensor: from its own `amax` on a layer's first step (no history yet),
    else this step's, slot `index` of the layer's `fp8_scales` (set by `fold_amax_histories`: no
    kernel of their own). One-element views at 16-byte aligned addresses (`SCALE_SLOT`), not 0-d
    ones: inductor's FP8 matmul lowering fails on a 0-d view at an offset."""
    if amax is not None:
        scale = _scale(amax, fp8_max)
        return scale, scale.reciprocal()
    return scales[0, index, :1], scales[1, index, :1]


def _cast_input(x2d: torch.Tensor, input_history: torch.Tensor, scales: torch.Tensor, dynamic: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in e4m3, the inverse of its scale); records x's amax. Pointwise, so inductor fuses it into
    the kernel that produces x."""
    x_amax = x2d.detach().abs().amax()
    x_scale, x_inverse = _scales(x_amax if dynamic else None, E4M3_MAX, scales, 0)
    x8 = _cast(x2d, x_scale, torch.float8_e4m3fn, E4M3_MAX)
    _record(input_history, x_amax)
    return x8, x_inverse


def _matmul_forward(x8: torch.Tensor, x_inverse: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    weight_history: torch.Tensor, scales: torch.Tensor, dynamic: bool, out_dtype: torch.dtype,
                    cast_transpose: CastTranspose) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x8 @ weight^T + bias in `out_dtype`, the FP8 weight stored column by column for the input
    gradient's matmul, the inverse of its scale)."""
    w_scale, w_inverse = _scales(weight.abs().amax() if dynamic else None, E4M3_MAX, scales, 1)
    # The weight in both layouts from one read: w8 for this matmul, w8_t (w8 transposed) kept for
    # the input gradient's, so the backward does not cast the weight again.
    w8, w8_t, _ = cast_transpose(weight, w_scale, torch.float8_e4m3fn, weight_history[:1], None)
    # The bias rides in the matmul's epilogue where the FP8 matmul takes one (a bf16/fp16 output):
    # an add after it would be one more pass over the output.
    fused_bias = bias is not None and out_dtype in (torch.bfloat16, torch.float16)
    y = torch._scaled_mm(x8, w8.t(), scale_a=x_inverse, scale_b=w_inverse,
                         bias=bias.to(out_dtype) if fused_bias else None, out_dtype=out_dtype, use_fast_accum=True)
    if bias is not None and not fused_bias:
        y = y + bias.to(out_dtype)
    return y, w8_t.t(), w_inverse


def _matmul_backward(g8: torch.Tensor, g8_columns: torch.Tensor, g_inverse: torch.Tensor, w8_columns: torch.Tensor,
                     w_inverse: torch.Tensor, x_columns: torch.Tensor, x_inverse: torch.Tensor,
                     input_dtype: torch.dtype, weight_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dW) of y = x W^T from the output gradient in FP8 row by row (`g8`) and column by column
    (`g8_columns`, transposed), the weight and the input stored column by column."""
    dx = torch._scaled_mm(g8, w8_columns, scale_a=g_inverse, scale_b=w_inverse, out_dtype=input_dtype)
    dw = torch._scaled_mm(g8_columns, x_columns, scale_a=g_inverse, scale_b=x_inverse, out_dtype=weight_dtype)
    return dx, dw


class _DelayedFloat8Matmul(torch.autograd.Function):
    """y = x2d @ weight^T + bias in FP8 (see the module docstring); histories updated in place."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                histories: tuple[torch.Tensor, torch.Tensor, torch.Tensor], scales: torch.Tensor, dynamic: bool,
                out_dtype: torch.dtype, cast_transpose: CastTranspose) -> torch.Tensor:
        input_history, weight_history, grad_history = histories
        x8, x_inverse = _cast_input(x2d, input_history, scales, dynamic)
        y, w8_columns, w_inverse = _matmul_forward(x8, x_inverse, weight, bias, weight_history, scales, dynamic,
                                                   out_dtype, cast_transpose)
        ctx.save_for_backward(x8, w8_columns, x_inverse, w_inverse, grad_history, scales)
        ctx.dynamic, ctx.cast_transpose = dynamic, cast_transpose
        ctx.input_dtype, ctx.weight_dtype = x2d.dtype, weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x8, w8_columns, x_inverse, w_inverse, grad_history, scales = ctx.saved_tensors
        dy = dy.contiguous()
        g_scale, g_inverse = _scales(dy.abs().amax() if ctx.dynamic else None, E5M2_MAX, scales, 2)
        # dy in FP8 row by row (input gradient) and column by column (weight gradient), its amax
        # (into the history's slot) and its column sums (the bias gradient), from one read of dy
        # where the kernel runs.
        g8, g8_columns, db = ctx.cast_transpose(dy, g_scale, torch.float8_e5m2, grad_history[:1], ctx.bias_dtype)
        dx, dw = _matmul_backward(g8, g8_columns, g_inverse, w8_columns, w_inverse, _column_major(x8), x_inverse,
                                  ctx.input_dtype, ctx.weight_dtype)
        return dx, dw, db if ctx.bias_dtype is not None else None, None, None, None, None, None


class _DelayedFloat8SwiGLU(torch.autograd.Function):
    """w3(silu(gate) * value of w12(x)) with both linears in FP8 (`Float8DelayedSwiGLU`): the
    activation is computed and cast for w3 in both layouts by one op in the forward, and its
    gradient computed and cast for w12 by one op in the backward. Each linear's histories and
    scales as `_DelayedFloat8Matmul` takes them."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, w12: torch.Tensor, b12: torch.Tensor | None, w3: torch.Tensor,
                b3: torch.Tensor | None, histories12: tuple[torch.Tensor, ...], histories3: tuple[torch.Tensor, ...],
                scales12: torch.Tensor, scales3: torch.Tensor, dynamic: bool, out_dtype: torch.dtype,
                ops: tuple[CastTranspose, SwiGLUCast, SwiGLUBackwardCast]) -> torch.Tensor:
        cast_transpose, swiglu_cast, _ = ops
        x8, x_inverse = _cast_input(x2d, histories12[0], scales12, dynamic)
        h, w12_columns, w12_inverse = _matmul_forward(x8, x_inverse, w12, b12, histories12[1], scales12, dynamic,
                                                      out_dtype, cast_transpose)
        if dynamic:  # the activation's scale needs its own amax first: computed, then cast
            a = swiglu_reference(h.float())
            a_scale, a_inverse = _scales(a.abs().amax(), E4M3_MAX, scales3, 0)
            a8, a8_t, _ = cast_transpose(a, a_scale, torch.float8_e4m3fn, histories3[0][:1], None)
        else:
            a_scale, a_inverse = _scales(None, E4M3_MAX, scales3, 0)
            a8, a8_t = swiglu_cast(h, a_scale, torch.float8_e4m3fn, histories3[0][:1])
        y, w3_columns, w3_inverse = _matmul_forward(a8, a_inverse, w3, b3, histories3[1], scales3, dynamic, out_dtype,
                                                    cast_transpose)
        ctx.save_for_backward(x8, w12_columns, x_inverse, w12_inverse, h, a8_t.t(), a_inverse, w3_columns, w3_inverse,
                              histories12[2], histories3[2], scales12, scales3)
        ctx.dynamic, ctx.ops = dynamic, ops
        ctx.dtypes = (x2d.dtype, w12.dtype, w3.dtype, h.dtype)
        ctx.bias_dtypes = tuple(b.dtype if b is not None else None for b in (b12, b3))
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (x8, w12_columns, x_inverse, w12_inverse, h, a_columns, a_inverse, w3_columns, w3_inverse, grad_history12,
         grad_history3, scales12, scales3) = ctx.saved_tensors
        input_dtype, w12_dtype, w3_dtype, h_dtype = ctx.dtypes
        bias12_dtype, bias3_dtype = ctx.bias_dtypes
        cast_transpose, _, swiglu_backward_cast = ctx.ops
        e5m2 = torch.float8_e5m2
        dy = dy.contiguous()
        g_scale, g_inverse = _scales(dy.abs().amax() if ctx.dynamic else None, E5M2_MAX, scales3, 2)
        g8, g8_columns, db3 = cast_transpose(dy, g_scale, e5m2, grad_history3[:1], bias3_dtype)
        da, dw3 = _matmul_backward(g8, g8_columns, g_inverse, w3_columns, w3_inverse, a_columns, a_inverse, h_dtype,
                                   w3_dtype)
        if ctx.dynamic:
            dh = swiglu_backward_reference(h, da)
            h_scale, h_inverse = _scales(dh.abs().amax(), E5M2_MAX, scales12, 2)
            dh8, dh8_columns, db12 = cast_transpose(dh, h_scale, e5m2, grad_history12[:1], bias12_dtype)
        else:
            h_scale, h_inverse = _scales(None, E5M2_MAX, scales12, 2)
            dh8, dh8_columns, db12 = swiglu_backward_cast(h, da, h_scale, e5m2, grad_history12[:1], bias12_dtype)
        dx, dw12 = _matmul_backward(dh8, dh8_columns, h_inverse, w12_columns, w12_inverse, _column_major(x8),
                                    x_inverse, input_dtype, w12_dtype)
        return (dx, dw12, db12 if bias12_dtype is not None else None, dw3, db3 if bias3_dtype is not None else None,
                None, None, None, None, None, None, None)


class Float8DelayedLinear(nn.Linear):
    """nn.Linear (same parameters and keys) whose training matmuls run in FP8 with delayed scaling;
    plain bf16/fp32 without gradients or when the token count is not a multiple of 16 (what FP8
    matmuls need)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        for name in HISTORY_BUFFERS:
            self.register_buffer(name, torch.zeros(HISTORY + 1, dtype=torch.float32, device=device))
        self.register_buffer("fp8_scales", _scale_slots(device), persistent=False)
        """This step's scales (row 0) and their inverses (row 1), in HISTORY_BUFFERS' order, each in
        a slot of SCALE_SLOT floats: derived from the histories by `fold_amax_histories`, so not
        checkpointed."""
        self.fp8_ready = False
        """True once the histories hold a step: until then scales come from the current amaxes."""
        self.cast_transpose: CastTranspose = fp8_cast_transpose_reference
        """How the weight and the output gradient are cast to both FP8 layouts: our Triton kernel
        where it can run (`sfd_scale.models.fast_paths`, which logs the choice). A plain attribute,
        not state."""

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
        layer.fp8_scales = _scale_slots(device)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // x.shape[-1]
        if not torch.is_grad_enabled() or tokens % 16:
            return F.linear(x, self.weight, self.bias)
        dynamic, self.fp8_ready = not self.fp8_ready, True
        histories = tuple(getattr(self, name) for name in HISTORY_BUFFERS)
        y = _DelayedFloat8Matmul.apply(x.reshape(tokens, x.shape[-1]), self.weight, self.bias, histories,
                                       self.fp8_scales, dynamic, _output_dtype(x), self.cast_transpose)
        return y.reshape(*x.shape[:-1], self.out_features)

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


class Float8DelayedSwiGLU(SwiGLU):
    """A SwiGLU whose w12 and w3 are `Float8DelayedLinear`s (same parameters, buffers and keys),
    trained as one FP8 function (`_DelayedFloat8SwiGLU`): the activation is cast for w3 in both
    layouts as it is computed, so the backward need not recompute it from h for w3's weight
    gradient, and its gradient is cast for w12 as it is computed, never written in bf16. Without
    gradients, or off the FP8 matmuls' shapes, it is the plain SwiGLU of its two layers."""

    def __init__(self, w12: Float8DelayedLinear, w3: Float8DelayedLinear, swiglu_cast: SwiGLUCast,
                 swiglu_backward_cast: SwiGLUBackwardCast) -> None:
        nn.Module.__init__(self)
        self.w12, self.w3 = w12, w3
        self.activation = silu_gate
        self.swiglu_cast, self.swiglu_backward_cast = swiglu_cast, swiglu_backward_cast
        """The activation's ops: our Triton kernels where they run, else their PyTorch twins."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // x.shape[-1]
        if not torch.is_grad_enabled() or tokens % 16:
            return super().forward(x)
        w12, w3 = self.w12, self.w3
        dynamic = not (w12.fp8_ready and w3.fp8_ready)
        w12.fp8_ready = w3.fp8_ready = True
        y = _DelayedFloat8SwiGLU.apply(x.reshape(tokens, x.shape[-1]), w12.weight, w12.bias, w3.weight, w3.bias,
                                       tuple(getattr(w12, name) for name in HISTORY_BUFFERS),
                                       tuple(getattr(w3, name) for name in HISTORY_BUFFERS), w12.fp8_scales,
                                       w3.fp8_scales, dynamic, _output_dtype(x),
                                       (w12.cast_transpose, self.swiglu_cast, self.swiglu_backward_cast))
        return y.reshape(*x.shape[:-1], w3.out_features)
