"""model.fp8: delayed — FP8 linears scaled by the previous steps' amaxes (CPU: torch's FP8 matmul)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_worker import train_on_two_ranks
from fault_worker import assert_identical
from fixtures import tiny_sfd_config, write_latent_folder
from sfd_scale.kernels.reference import fp8_swiglu_backward_cast_reference, fp8_swiglu_cast_reference
from sfd_scale.models.fp8_delayed import (E4M3_MAX, E5M2_MAX, HISTORY, HISTORY_BUFFERS, SCALE_SLOT, Float8DelayedLinear,
                                          Float8DelayedSwiGLU, fold_amax_histories, is_fp8_state, register_fold_hook)
from sfd_scale.models.layers import SwiGLU
from sfd_scale.models.lightningdit import build_model
from sfd_scale.parallel.dims import ParallelDims, check_config_fits
from sfd_scale.train.trainer import Trainer
from torch.utils._python_dispatch import TorchDispatchMode


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def _pair(seed: int = 0) -> tuple[nn.Linear, Float8DelayedLinear]:
    torch.manual_seed(seed)
    plain = nn.Linear(64, 48)
    twin = nn.Linear(64, 48)
    twin.load_state_dict(plain.state_dict())
    fp8 = Float8DelayedLinear.from_linear(twin)
    register_fold_hook(fp8)  # as in a model: each training forward starts by folding the last step's amaxes
    return plain, fp8


def test_fp8_layer_is_close_to_the_linear_it_replaces_forward_and_backward():
    plain, fp8 = _pair()
    x = torch.randn(4, 32, 64)
    outputs = {}
    for name, layer in (("plain", plain), ("fp8", fp8)):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (y.float() * torch.linspace(-1, 1, 48)).sum().backward()
        outputs[name] = (y, xi.grad, layer.weight.grad, layer.bias.grad)
    for got, want in zip(outputs["fp8"], outputs["plain"]):
        assert _relative(got, want) < 0.08          # e4m3 / e5m2 rounding, not a wrong matmul
    assert outputs["fp8"][0].dtype == outputs["fp8"][1].dtype == torch.float32   # as F.linear's
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp8(x.requires_grad_()).dtype == torch.bfloat16
    xt = torch.randn(64, 128).t().requires_grad_()  # a transposed view: FP8 matmuls take row-major inputs
    (fp8(xt).float() ** 2).sum().backward()
    assert _relative(fp8(xt), plain(xt)) < 0.08 and xt.grad.shape == xt.shape
    with torch.no_grad():                           # evaluation (and the EMA's previews): a plain linear
        assert torch.equal(fp8(x), F.linear(x, fp8.weight, fp8.bias))


def test_scales_come_from_the_previous_steps_amaxes():
    plain, fp8 = _pair()
    x = torch.randn(128, 64)

    def step(inputs: torch.Tensor) -> float:
        inputs = inputs.clone().requires_grad_()
        y = fp8(inputs)
        y.float().sum().backward()
        return _relative(y, plain(inputs))

    assert step(x) < 0.08                           # first step: scaled by its own amax
    history = fp8.fp8_input_amax_history
    assert history.shape == (HISTORY + 1,) and history[0] == x.abs().amax() and not history[1:].any()
    assert fp8.fp8_grad_amax_history[0] == 1.0      # d(sum)/dy: the backward records its amax too
    assert fp8.fp8_weight_amax_history[0] == plain.weight.abs().amax()
    # Four times larger inputs are cast with the scale of the smaller ones: they saturate at
    # the old amax, the price of a cast that does not wait for its own tensor's amax.
    assert step(4 * x) > 0.3
    assert torch.equal(history[:2], torch.stack([4 * x.abs().amax(), x.abs().amax()]))
    assert step(4 * x) < 0.08                       # the history has caught up


def test_each_step_starts_by_folding_the_last_steps_amaxes_into_the_look_back_and_the_scales():
    _, fp8 = _pair()
    x = torch.randn(32, 64)
    steps = HISTORY + 3
    for i in range(steps):  # step i's inputs have amax (i + 1) * amax(x): every step's is distinct
        fp8(((i + 1) * x).requires_grad_()).float().sum().backward()
    amax = x.abs().amax()
    history = fp8.fp8_input_amax_history
    assert history[0] == steps * amax               # slot 0: the last step's, not yet folded
    fold_amax_histories([fp8])                      # what the next training forward starts with
    want = torch.stack([(steps - i) * amax for i in range(HISTORY)])  # the last HISTORY steps, newest first
    torch.testing.assert_close(history[1:], want, rtol=0, atol=0)
    maxes = torch.tensor([E4M3_MAX, E4M3_MAX, E5M2_MAX])
    lookback = torch.stack([getattr(fp8, name)[1:].amax() for name in HISTORY_BUFFERS])
    want = torch.stack([maxes / lookback, lookback / maxes])
    torch.testing.assert_close(fp8.fp8_scales, want.unsqueeze(-1).expand(-1, -1, SCALE_SLOT))
    assert fp8.fp8_weight_amax_history[1:].eq(fp8.weight.abs().amax()).all()


def test_histories_written_before_slot_0_load_into_the_same_scales():
    # Checkpoints from before slot 0 hold HISTORY folded values, newest first.
    _, fp8 = _pair()
    for i in range(HISTORY + 2):
        fp8((torch.randn(16, 64) * (i + 1)).requires_grad_()).sum().backward()
    state = fp8.state_dict()
    legacy = {k: (v[:HISTORY] if is_fp8_state(k) else v) for k, v in state.items()}
    old, new = (Float8DelayedLinear.from_linear(nn.Linear(64, 48)) for _ in range(2))
    old.load_state_dict(legacy)
    new.load_state_dict(state)
    for layer in (old, new, fp8):
        fold_amax_histories([layer])
    assert torch.equal(old.fp8_scales, fp8.fp8_scales) and torch.equal(new.fp8_scales, fp8.fp8_scales)
    for name in HISTORY_BUFFERS:
        assert torch.equal(getattr(old, name)[1:], getattr(fp8, name)[1:]), name


def test_a_non_finite_step_does_not_poison_the_scales():
    # The guard skips a step whose loss is not finite; had its NaN amax gone into the history,
    # every later scale (and so every later step) would be NaN too.
    plain, fp8 = _pair()
    x = torch.randn(32, 64)

    def step(inputs: torch.Tensor) -> torch.Tensor:
        inputs = inputs.clone().requires_grad_()
        y = fp8(inputs)
        (y.float() * torch.linspace(-1, 1, 48)).sum().backward()
        return y

    step(x)
    bad = x.clone()
    bad[0, 0] = float("nan")
    assert step(bad).isnan().any()
    for name in HISTORY_BUFFERS:
        assert getattr(fp8, name).isfinite().all(), name
    assert _relative(step(x), plain(x)) < 0.08       # the next step is an ordinary one


def test_an_fp8_swiglu_casts_its_activation_and_its_gradient_as_it_computes_them():
    # The same two FP8 linears as a plain SwiGLU (w12, the activation, w3: the activation written,
    # then cast by w3; its gradient written, then cast by w12) and fused (`Float8DelayedSwiGLU`).
    # In float32 the forward is the same arithmetic; the backward differs only where FP8 rounding
    # does (the fused one casts the float32 gradient of the activation's input).
    torch.manual_seed(0)
    plain = SwiGLU(64, 48)
    unfused = copy.deepcopy(plain)
    for mlp in (plain, unfused):
        mlp.w12, mlp.w3 = Float8DelayedLinear.from_linear(mlp.w12), Float8DelayedLinear.from_linear(mlp.w3)
    fused = Float8DelayedSwiGLU(plain.w12, plain.w3, fp8_swiglu_cast_reference, fp8_swiglu_backward_cast_reference)
    for mlp in (unfused, fused):
        register_fold_hook(mlp)
    x = torch.randn(2, 32, 64)
    weights = torch.linspace(-1, 1, 64)
    for _ in range(3):  # the first step scales dynamically, the later ones from the histories
        results = []
        for mlp in (unfused, fused):
            xi = x.clone().requires_grad_()
            mlp.zero_grad()
            out = mlp(xi)
            (out.float() * weights).sum().backward()
            results.append((out, xi.grad, *(p.grad for p in mlp.parameters())))
        (out, *grads), (fused_out, *fused_grads) = results
        assert torch.equal(fused_out, out)
        for got, want in zip(fused_grads, grads):
            assert _relative(got, want) < 0.02
    for layer in ("w12", "w3"):
        for name in HISTORY_BUFFERS:
            torch.testing.assert_close(getattr(getattr(fused, layer), name), getattr(getattr(unfused, layer), name),
                                       rtol=1e-5, atol=0)
    with torch.no_grad():                           # evaluation: the plain SwiGLU of the same weights
        assert torch.equal(fused(x), unfused(x))
    assert fused.state_dict().keys() == unfused.state_dict().keys()


class _ScaleAddresses(TorchDispatchMode):
    """Records the address of every scale handed to an FP8 matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.addresses: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._scaled_mm.default:
            self.addresses += [args[2].data_ptr(), args[3].data_ptr()]
        return func(*args, **(kwargs or {}))


def test_every_fp8_matmul_reads_its_scales_at_16_byte_aligned_addresses():
    # cuBLASLt refuses an FP8 matmul whose scale pointer is not 16-byte aligned
    # (CUBLAS_STATUS_NOT_SUPPORTED on the H200, 2026-11-27): scales come from slots of fp8_scales.
    torch.manual_seed(0)
    mlp = SwiGLU(64, 48)
    mlp.w12, mlp.w3 = Float8DelayedLinear.from_linear(mlp.w12), Float8DelayedLinear.from_linear(mlp.w3)
    fused = Float8DelayedSwiGLU(mlp.w12, mlp.w3, fp8_swiglu_cast_reference, fp8_swiglu_backward_cast_reference)
    _, linear = _pair()
    register_fold_hook(fused)
    recorder = _ScaleAddresses()
    for _ in range(3):  # the first step's scales are fresh tensors, the later ones slots of fp8_scales
        for module, width in ((fused, 64), (linear, 64)):
            with recorder:
                module(torch.randn(32, width, requires_grad=True)).float().sum().backward()
    assert len(recorder.addresses) == 3 * (2 + 1) * 3 * 2  # steps x FP8 linears x matmuls x scales
    assert [address % 16 for address in recorder.addresses] == [0] * len(recorder.addresses)


def test_histories_are_checkpointed_and_optional_when_loading():
    _, fp8 = _pair()
    fp8(torch.randn(16, 64, requires_grad=True)).sum().backward()
    state = fp8.state_dict()
    assert sorted(k for k in state if is_fp8_state(k)) == ["fp8_grad_amax_history", "fp8_input_amax_history",
                                                           "fp8_weight_amax_history"]
    resumed = Float8DelayedLinear.from_linear(nn.Linear(64, 48))
    resumed.load_state_dict(state)                  # strict: a checkpoint of an FP8 run
    assert resumed.fp8_ready and torch.equal(resumed.fp8_input_amax_history, fp8.fp8_input_amax_history)
    fresh = Float8DelayedLinear.from_linear(nn.Linear(64, 48))
    fresh.load_state_dict(nn.Linear(64, 48).state_dict())  # strict: weights of a run without FP8
    assert not fresh.fp8_ready and not fresh.fp8_input_amax_history.any()


def test_compiled_layer_records_the_same_histories_as_eager():
    # The histories are written in place in the forward and in the backward: torch.compile must
    # keep both mutations (and recompile once, when the first step's dynamic scaling ends).
    torch._dynamo.reset()
    eager, compiled = _pair()[1], _pair()[1]
    run = torch.compile(compiled)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(8, 16, 64, generator=g)
        outs = []
        for layer in (eager, run):
            xi = x.clone().requires_grad_()
            y = layer(xi)
            (y.float() ** 2).sum().backward()
            outs.append(y)
        assert _relative(outs[1], outs[0]) < 1e-2
    for name in HISTORY_BUFFERS:
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), rtol=1e-2, atol=0)
        assert getattr(compiled, name)[:3].all()


FP8_MODEL = {"fp8": "delayed", "mlp_ratio": 3.0}
"""The tiny model with an MLP of width 64: its w12 and w3 are FP8 too (sizes divisible by 16)."""


@pytest.fixture()
def data_dir(tmp_path):
    return write_latent_folder(tmp_path / "latents")


def test_delayed_fp8_training_resumes_exactly_and_exports_reference_keys(tmp_path, data_dir):
    cfg = tiny_sfd_config(data_dir, model=FP8_MODEL)
    straight = Trainer(cfg, tmp_path / "straight")
    straight.fit(6)
    modules = list(straight.engine.unwrap().modules())
    assert sum(isinstance(m, Float8DelayedLinear) for m in modules) == 8           # qkv, proj, w12, w3
    assert sum(isinstance(m, Float8DelayedSwiGLU) for m in modules) == 2
    first = Trainer(cfg, tmp_path / "resumed")
    first.fit(3)
    del first
    second = Trainer(cfg, tmp_path / "resumed")
    assert second.maybe_resume()
    second.fit(6)
    for name in ("unwrap", "ema_model"):
        a, b = (getattr(t.engine, name)().state_dict() for t in (straight, second))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    model, ema = straight.engine.consolidated_state()
    reference = build_model(cfg.model).state_dict().keys()
    assert model.keys() == reference and ema.keys() == reference
    # The same checkpoint resumes without FP8 (its histories are left behind).
    plain = Trainer(tiny_sfd_config(data_dir, model={"mlp_ratio": 3.0}), tmp_path / "straight")
    assert plain.maybe_resume() and plain.step == 6


@pytest.mark.distributed
def test_two_ddp_ranks_share_their_amaxes_and_resume_exactly(tmp_path, data_dir):
    # Each rank sees half the batch, so its own amaxes differ; shared after every backward, the
    # histories are every rank's, and a checkpoint (rank 0's) resumes both ranks exactly.
    cfg = tiny_sfd_config(data_dir, model=FP8_MODEL, train={"log_every": 2, "ckpt_every": 2})
    straight = train_on_two_ranks(tmp_path, cfg, "ddp", "straight", 4)
    train_on_two_ranks(tmp_path, cfg, "ddp", "resumed", 2)
    resumed = train_on_two_ranks(tmp_path, cfg, "ddp", "resumed", 4)
    assert resumed["step"] == straight["step"] == 4
    assert_identical(resumed["model"], straight["model"])
    assert_identical(resumed["ema"], straight["ema"])


@pytest.mark.parametrize("parallel", [{"engine": "fsdp2"}, {"activation_checkpointing": "full"}])
def test_delayed_fp8_refuses_sharded_weights_and_recomputed_forwards(data_dir, parallel):
    cfg = tiny_sfd_config(data_dir, model={"fp8": "delayed"}, parallel=parallel)
    with pytest.raises(ValueError, match="model.fp8=delayed runs with parallel.engine local or ddp and no"):
        check_config_fits(cfg, ParallelDims(world_size=1, rank=0, local_rank=0, tp=1))
