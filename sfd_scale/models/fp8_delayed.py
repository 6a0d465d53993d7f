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
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from sfd_scale.kernels.reference import fp8_cast_transpose_reference

HISTORY = 16
"""Steps of amax history a delayed scale looks back over (torchao's former default)."""
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max
E5M2_MAX = torch.finfo(torch.float8_e5m2).max
_AMAX_FLOOR = 1e-12
"""An all-zero tensor still gets a finite scale."""
CastTranspose = Callable[[torch.Tensor, torch.Tensor, torch.dtype, bool],
                         tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
"""(matrix, scale, FP8 dtype, column sums?) -> (the matrix in FP8, the same transposed, its amax,
its column sums): `fp8_cast_transpose_reference` or our Triton kernel's op
`sfd_scale.kernels.fp8_cast.fp8_cast_transpose`. Casts the weights and the output gradients."""
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


def _scale(amax: torch.Tensor, fp8_max: float) -> torch.Tensor:
    return fp8_max / amax.float().clamp(min=_AMAX_FLOOR)


def _cast(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, fp8_max: float) -> torch.Tensor:
    """x * scale in an FP8 dtype, saturated, row-major (what `torch._scaled_mm` takes first)."""
    return (x.float() * scale).clamp(-fp8_max, fp8_max).to(dtype).contiguous()


def _record(history: torch.Tensor, amax: torch.Tensor) -> None:
    """Shift `history` by one step and put `amax` first (one whole-tensor copy: a mutation that
    torch.compile keeps, in the backward too). A non-finite amax (a step the guard will skip) is
    recorded as 0: kept, it would make every later scale NaN, and the gradients with it, for good."""
    amax = amax.float().reshape(1)
    history.copy_(torch.cat([torch.where(amax.isfinite(), amax, 0.0), history[:-1]]))


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column by column: what `torch._scaled_mm` takes as its second operand."""
    return t.t().contiguous().t()


class _DelayedFloat8Matmul(torch.autograd.Function):
    """y = x2d @ weight^T + bias in FP8 (see the module docstring); histories updated in place."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                histories: tuple[torch.Tensor, torch.Tensor, torch.Tensor], dynamic: bool,
                out_dtype: torch.dtype, cast_transpose: CastTranspose) -> torch.Tensor:
        input_history, weight_history, grad_history = histories
        x_amax = x2d.detach().abs().amax()
        x_scale = _scale(x_amax if dynamic else input_history.amax(), E4M3_MAX)
        x8 = _cast(x2d, x_scale, torch.float8_e4m3fn, E4M3_MAX)
        _record(input_history, x_amax)
        # The weight in both layouts from one read: w8 for this matmul, w8_t (w8 transposed) kept
        # for the input gradient's, so the backward does not cast the weight again.
        w_scale = _scale(weight.abs().amax() if dynamic else weight_history.amax(), E4M3_MAX)
        w8, w8_t, w_amax, _ = cast_transpose(weight, w_scale, torch.float8_e4m3fn, False)
        _record(weight_history, w_amax)
        # The bias rides in the matmul's epilogue where the FP8 matmul takes one (a bf16/fp16
        # output): an add after it would be one more pass over the output.
        fused_bias = bias is not None and out_dtype in (torch.bfloat16, torch.float16)
        y = torch._scaled_mm(x8, w8.t(), scale_a=x_scale.reciprocal(), scale_b=w_scale.reciprocal(),
                             bias=bias.to(out_dtype) if fused_bias else None, out_dtype=out_dtype,
                             use_fast_accum=True)
        if bias is not None and not fused_bias:
            y = y + bias.to(out_dtype)
        ctx.save_for_backward(x8, w8_t.t(), x_scale, w_scale, grad_history)  # w8 column by column
        ctx.dynamic, ctx.has_bias, ctx.cast_transpose = dynamic, bias is not None, cast_transpose
        ctx.input_dtype, ctx.weight_dtype = x2d.dtype, weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x8, w8_columns, x_scale, w_scale, grad_history = ctx.saved_tensors
        dy = dy.contiguous()
        if ctx.dynamic:  # the first step: the scale needs this gradient's own amax first
            g_scale = _scale(dy.abs().amax(), E5M2_MAX)
        else:
            g_scale = _scale(grad_history.amax(), E5M2_MAX)
        # dy in FP8 row by row (input gradient) and column by column (weight gradient), its amax
        # and its column sums (the bias gradient), from one read of dy where the kernel runs.
        g8, g8_columns, g_amax, g_sums = ctx.cast_transpose(dy, g_scale, torch.float8_e5m2, ctx.has_bias)
        _record(grad_history, g_amax)
        g_inverse = g_scale.reciprocal()
        dx = torch._scaled_mm(g8, w8_columns, scale_a=g_inverse, scale_b=w_scale.reciprocal(),
                              out_dtype=ctx.input_dtype)
        dw = torch._scaled_mm(g8_columns, _column_major(x8), scale_a=g_inverse,
                              scale_b=x_scale.reciprocal(), out_dtype=ctx.weight_dtype)
        db = g_sums.to(ctx.bias_dtype) if ctx.has_bias else None
        return dx, dw, db, None, None, None, None


class Float8DelayedLinear(nn.Linear):
    """nn.Linear (same parameters and keys) whose training matmuls run in FP8 with delayed scaling;
    plain bf16/fp32 without gradients or when the token count is not a multiple of 16 (what FP8
    matmuls need)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        for name in HISTORY_BUFFERS:
            self.register_buffer(name, torch.zeros(HISTORY, dtype=torch.float32, device=device))
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
        for name in HISTORY_BUFFERS:
            setattr(layer, name, torch.zeros(HISTORY, dtype=torch.float32, device=linear.weight.device))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // x.shape[-1]
        if not torch.is_grad_enabled() or tokens % 16:
            return F.linear(x, self.weight, self.bias)
        dynamic, self.fp8_ready = not self.fp8_ready, True
        autocast = torch.is_autocast_enabled(x.device.type)
        # What F.linear would return: the autocast dtype under autocast, else the input's.
        out_dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        histories = tuple(getattr(self, name) for name in HISTORY_BUFFERS)
        y = _DelayedFloat8Matmul.apply(x.reshape(tokens, x.shape[-1]), self.weight, self.bias, histories, dynamic,
                                       out_dtype, self.cast_transpose)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        histories = [prefix + name for name in HISTORY_BUFFERS]
        if all(key in state_dict for key in histories):
            self.fp8_ready = True  # a checkpoint of an FP8 run: its next step scales from its history
        else:  # weights of a run without FP8 (or an export): the histories start empty
            for key in histories:
                if key in missing_keys:
                    missing_keys.remove(key)
