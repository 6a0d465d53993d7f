"""The fused AdamW + clip scale + EMA kernel against torch.optim.AdamW followed by the EMA lerp."""
import copy
import os

import pytest
import torch

from sfd_scale.kernels import triton_installed
from fixtures import triton_interpreter_without_gpu  # noqa: F401  (autouse, module scope)

pytestmark = pytest.mark.skipif(not triton_installed(), reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    # A size that is not a multiple of the kernel's block, a matrix and a scalar-like vector.
    return [torch.randn(*shape, generator=g).to(DEVICE).requires_grad_() for shape in ((1500,), (33, 40), (1,))]


def set_grads(ps, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(DEVICE)


def test_fused_step_equals_adamw_then_ema_with_clip_scale_and_skips():
    from sfd_scale.kernels.adamw_ema import AdamWEMA

    ref, ours = params(), params()
    ref_ema = [p.detach().clone() for p in ref]
    ours_ema = [p.detach().clone() for p in ours]
    torch_opt = torch.optim.AdamW(ref, foreach=False, **HYPER)
    fused = AdamWEMA(ours, ours_ema, ema_decay=0.9, **HYPER)
    scales = [1.0, 0.25, 1.0, 0.5]
    skips = [0, 0, 1, 0]
    for step, (scale, skip) in enumerate(zip(scales, skips)):
        set_grads(ref, step)
        set_grads(ours, step)
        if not skip:
            with torch.no_grad():
                for p in ref:
                    p.grad.mul_(scale)
            torch_opt.step()
            torch._foreach_lerp_(ref_ema, [p.detach() for p in ref], 0.1)
        before = [p.detach().clone() for p in ours]
        fused.step(grad_scale=torch.tensor(scale, device=DEVICE), skip=torch.tensor(skip, device=DEVICE))
        if skip:  # nothing moved: weights, moments, counts, EMA
            assert all(torch.equal(b, p) for b, p in zip(before, ours))
        for a, b in zip(ref + ref_ema, ours + ours_ema):
            torch.testing.assert_close(b.detach(), a.detach(), rtol=2e-6, atol=2e-7)
    for a, b in zip(ref, ours):
        sa, sb = torch_opt.state[a], fused.state[b]
        assert float(sb["step"]) == float(sa["step"]) == 3.0
        torch.testing.assert_close(sb["exp_avg"], sa["exp_avg"], rtol=2e-6, atol=1e-8)
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], rtol=2e-6, atol=1e-10)


def test_frozen_tables_and_a_device_learning_rate_take_the_same_steps(monkeypatch):
    # What a replayed CUDA graph does: gradients rewritten in place, the learning rate read from a
    # device scalar, the address tables copied to the device once (frozen) and never again.
    from sfd_scale.kernels import adamw_ema

    ref, ours = params(), params()
    plain = adamw_ema.AdamWEMA(ref, [p.detach().clone() for p in ref], ema_decay=0.9, **HYPER)
    frozen = adamw_ema.AdamWEMA(ours, [p.detach().clone() for p in ours], ema_decay=0.9, **HYPER)
    set_grads(ours, 0)
    frozen.step()                  # the first step creates the state, as the graph's warm-up does
    set_grads(ref, 0)
    plain.step()
    frozen.freeze_tables()
    lr = torch.zeros((), device=DEVICE)

    def no_table_copies(*args, **kwargs):
        raise AssertionError("a frozen step copied a table from the host")

    for step, rate in enumerate((1e-2, 3e-3, 5e-4), start=1):
        set_grads(ref, step)
        for p, g in zip(ours, [r.grad for r in ref]):
            p.grad.copy_(g)
        plain.param_groups[0]["lr"] = rate
        plain.step()
        lr.fill_(rate)
        with monkeypatch.context() as patch:
            patch.setattr(adamw_ema, "to_device_async", no_table_copies)
            frozen.step(lr=lr)
    for a, b in zip(ref + plain.ema_params, ours + frozen.ema_params):
        assert torch.equal(a.detach(), b.detach())
    # A load replaces the moments and counts: the tables are dropped, and a captured step is stale.
    assert frozen.state_version == 0
    frozen.load_state_dict(plain.state_dict())
    assert frozen.state_version == 1 and not frozen._frozen_tables


def test_compute_copies_take_bf16_gradients_and_get_the_rounded_masters():
    """A parameter with a bf16 compute copy (optim.bf16_weights) takes the same steps as an fp32
    parameter given the same bf16-valued gradients, and the copy ends each step as the rounded
    master (round to nearest even, as autocast casts); a skipped step leaves the copy alone."""
    from sfd_scale.kernels.adamw_ema import AdamWEMA

    ref, masters = params(), params()
    copies = [m.detach().bfloat16().requires_grad_() for m in masters]
    masters = [m.detach() for m in masters]                  # masters get no gradients of their own
    fused_ref = AdamWEMA(ref, [p.detach().clone() for p in ref], ema_decay=0.9, **HYPER)
    ema = [m.clone() for m in masters]
    fused = AdamWEMA(masters, ema, ema_decay=0.9, **HYPER, compute_copies=[copies[0], None, copies[2]])
    for step, (scale, skip) in enumerate(zip([1.0, 0.5, 1.0], [0, 1, 0])):
        set_grads(ref, step)
        for r, m, c in zip(ref, masters, copies):
            r.grad = r.grad.bfloat16().float()                 # what autocast's bf16 matmuls produce
            c.grad = r.grad.bfloat16()
        masters[1].grad = ref[1].grad.clone()                  # no copy: its own fp32 gradient
        before = [c.clone() for c in copies]
        kwargs = dict(grad_scale=torch.tensor(scale, device=DEVICE), skip=torch.tensor(skip, device=DEVICE))
        fused_ref.step(**kwargs)
        fused.step(**kwargs)
        for r, m in zip(ref + fused_ref.ema_params, masters + ema):
            assert torch.equal(m, r.detach())
        assert torch.equal(copies[0], masters[0].bfloat16()) and torch.equal(copies[2], masters[2].bfloat16())
        assert torch.equal(copies[1], before[1])               # not a copy of anything: untouched
        if skip:
            assert all(torch.equal(b, c) for b, c in zip(before, copies))
    with pytest.raises(ValueError, match="compute copies must be contiguous bfloat16"):
        AdamWEMA(params(), [m.clone() for m in masters], ema_decay=0.9, compute_copies=[copies[0].float(), None, None])


def test_state_dict_moves_between_adamw_and_the_fused_optimizer():
    from sfd_scale.kernels.adamw_ema import AdamWEMA

    ref, ours = params(), params()
    torch_opt = torch.optim.AdamW(ref, foreach=False, **HYPER)
    for step in range(2):
        set_grads(ref, step)
        torch_opt.step()
    fused = AdamWEMA(ours, [p.detach().clone() for p in ours], ema_decay=0.9, **HYPER)
    with torch.no_grad():
        for a, b in zip(ref, ours):
            b.copy_(a)
    fused.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    set_grads(ref, 2)
    set_grads(ours, 2)
    torch_opt.step()
    fused.step()
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=2e-6, atol=2e-7)
    assert set(fused.state_dict()["state"][0]) == set(torch_opt.state_dict()["state"][0])


def test_bad_ema_tensors_are_refused():
    from sfd_scale.kernels.adamw_ema import AdamWEMA

    ps = params()
    with pytest.raises(ValueError, match="3 EMA tensors for 3 parameters, or shapes differ"):
        AdamWEMA(ps, [torch.zeros(2, device=DEVICE)] * 3, ema_decay=0.9)
    with pytest.raises(ValueError, match="ema_decay must lie in"):
        AdamWEMA(ps, [p.detach().clone() for p in ps], ema_decay=1.5)


def test_optimizer_benchmark_runs_both_variants():
    import subprocess
    import sys
    from pathlib import Path

    tiny = ["--set", "model.size=custom", "--set", "model.depth=2", "--set", "model.hidden_size=32",
            "--set", "model.num_heads=2", "--set", "model.repa_projector_dim=16", "--set", "model.repa_feature_dim=8",
            "--set", "train.device=cpu", "--steps", "1"]
    # The CPU runs the kernel in Triton's interpreter, also on a machine that has a GPU.
    done = subprocess.run([sys.executable, "launchers/bench_optimizer.py", *tiny], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| clip + AdamW + EMA lerp |" in done.stdout and "| fused kernel |" in done.stdout
    assert "| fused kernel, bf16 weight copies |" in done.stdout
    refused = subprocess.run([sys.executable, "launchers/bench_optimizer.py", *tiny], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1], timeout=300,
                             env={**os.environ, "TRITON_INTERPRET": "0"})
    assert refused.returncode != 0 and "the fused kernel cannot run: they need a CUDA device" in refused.stderr


def test_local_engine_with_the_fused_kernel_takes_the_same_steps():
    from sfd_scale.config import ModelConfig, OptimConfig
    from sfd_scale.models.lightningdit import build_model
    from sfd_scale.parallel.engine import LocalEngine

    cfg = ModelConfig(size="custom", depth=1, hidden_size=32, num_heads=2, input_size=4, in_channels=6,
                      semantic_channels=2, num_classes=5, repa_depth=1, repa_projector_dim=16, repa_feature_dim=8)
    device = torch.device(DEVICE)
    engines = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg).eval()      # eval: no label dropout, both engines see the same forward
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)   # leave AdaLN-Zero: every parameter gets a gradient
        # max_grad_norm 0.05: every step is clipped.
        optim = OptimConfig(lr=1e-2, weight_decay=0.01, max_grad_norm=0.05, fused_ema=fused)
        engines.append(LocalEngine(model, optim, ema_decay=0.8, device=device))
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x, t = torch.randn(2, 6, 4, 4, generator=g).to(device), torch.rand(2, generator=g).to(device)
        stats = []
        for engine in engines:
            engine.zero_grad()
            out, repa = engine.model(x, t, t, torch.tensor([1, 3], device=device), return_repa=True)
            loss = out.square().mean() + repa.square().mean()
            engine.backward(loss)
            stats.append(engine.step(1e-2, loss.detach()))
        assert stats[0].grad_norm == pytest.approx(stats[1].grad_norm, rel=1e-4) and stats[0].grad_norm > 0.05
    plain, fused = engines
    # The first step agrees to 1 ulp; Adam's division by tiny second moments then grows rounding
    # differences to ~6e-6 after 3 steps of size ~1e-2 (1/1600 of a step): atol 2e-5.
    for name, a in plain.module.state_dict().items():
        torch.testing.assert_close(fused.module.state_dict()[name], a, rtol=1e-4, atol=2e-5, msg=name)
    for name, a in plain.ema.state_dict().items():
        torch.testing.assert_close(fused.ema.state_dict()[name], a, rtol=1e-4, atol=2e-5, msg=name)
    assert not torch.equal(fused.ema.state_dict()["blocks.0.mlp.w12.weight"],
                           fused.module.state_dict()["blocks.0.mlp.w12.weight"])   # the EMA lags


def test_fused_ema_refuses_a_device_it_cannot_run_on(monkeypatch):
    from sfd_scale.config import ModelConfig, OptimConfig
    from sfd_scale.models.lightningdit import build_model
    from sfd_scale.parallel.engine import LocalEngine

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    cfg = ModelConfig(size="custom", depth=1, hidden_size=32, num_heads=2, input_size=4, in_channels=6,
                      semantic_channels=2, num_classes=5, repa_depth=0)
    with pytest.raises(ValueError, match="optim.fused_ema cannot run: they need a CUDA device"):
        LocalEngine(build_model(cfg), OptimConfig(fused_ema=True), 0.9, torch.device("cpu"))


def test_step_on_device_skips_a_non_finite_loss_inside_the_kernel():
    from sfd_scale.config import ModelConfig, OptimConfig
    from sfd_scale.models.lightningdit import build_model
    from sfd_scale.parallel.engine import LocalEngine

    cfg = ModelConfig(size="custom", depth=1, hidden_size=32, num_heads=2, input_size=4, in_channels=6,
                      semantic_channels=2, num_classes=5, repa_depth=0)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)   # leave AdaLN-Zero: the loss has gradients
    engine = LocalEngine(model, OptimConfig(lr=1e-2, fused_ema=True), 0.9, torch.device(DEVICE))
    x, t = torch.randn(2, 6, 4, 4, device=DEVICE), torch.rand(2, device=DEVICE)
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    for loss_scale, expect_skip in ((float("nan"), True), (1.0, False)):
        engine.zero_grad()
        loss = engine.model(x, t, t, torch.tensor([1, 3], device=DEVICE)).square().mean() * loss_scale
        engine.backward(loss)
        norm, skipped = engine.step_on_device(1e-2, loss.detach())
        assert norm.device.type == DEVICE and bool(skipped) == expect_skip
        changed = any(not torch.equal(before[k], v) for k, v in engine.module.state_dict().items())
        assert changed == (not expect_skip)
    with pytest.raises(ValueError, match="needs optim.fused_ema=true"):
        LocalEngine(build_model(cfg), OptimConfig(), 0.9, torch.device(DEVICE)).step_on_device(1e-2, loss)


def test_step_on_device_reads_no_value_back_to_the_host():
    # On CUDA a value read on the host (.item(), a 0-d tensor taken as a Python scalar) makes the
    # host wait for the GPU every step; on the CPU it shows as aten._local_scalar_dense. The Python
    # arg parser once turned the step-count increment into one (H100 profile, 2026-11-27).
    from fixtures import HostReads
    from sfd_scale.config import ModelConfig, OptimConfig
    from sfd_scale.models.lightningdit import build_model
    from sfd_scale.parallel.engine import LocalEngine

    cfg = ModelConfig(size="custom", depth=1, hidden_size=32, num_heads=2, input_size=4, in_channels=6,
                      semantic_channels=2, num_classes=5, repa_depth=0)
    engine = LocalEngine(build_model(cfg).eval(), OptimConfig(lr=1e-2, fused_ema=True), 0.9, torch.device(DEVICE))
    x, t = torch.randn(2, 6, 4, 4, device=DEVICE), torch.rand(2, device=DEVICE)
    for _ in range(2):  # the first step also creates the optimizer state
        engine.zero_grad()
        loss = engine.model(x, t, t, torch.tensor([1, 3], device=DEVICE)).square().mean()
        engine.backward(loss)
        with HostReads() as mode:
            engine.step_on_device(1e-2, loss.detach())
    assert mode.reads == 0


def test_one_launch_updates_every_tensor_of_a_group_block_by_block(monkeypatch):
    from sfd_scale.kernels import adamw_ema

    tensor, first = adamw_ema.block_table((1500, 1, 2048), torch.device("cpu"))
    assert tensor.tolist() == [0, 0, 1, 2, 2] and first.tolist() == [0, 1024, 0, 0, 1024]
    assert [t.numel() for t in adamw_ema.block_table((), torch.device("cpu"))] == [0, 0]

    kernel, grids = adamw_ema._adamw_ema_kernel, []

    launches = []

    class Counted:
        def __getitem__(self, grid):
            grids.append(grid)

            def launch(*args, **kwargs):
                launches.append(kwargs["ALIGNED"])
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(adamw_ema, "_adamw_ema_kernel", Counted())
    ref, ours = params(), params()
    groups = [{"params": ours[:2]}, {"params": ours[2:], "lr": 1e-3}]  # two groups: two launches
    fused = adamw_ema.AdamWEMA(groups, [p.detach().clone() for p in ours], ema_decay=0.9, **HYPER)
    torch_opt = torch.optim.AdamW([{"params": ref[:2]}, {"params": ref[2:], "lr": 1e-3}], foreach=False, **HYPER)
    for step in range(2):
        set_grads(ref, step)
        set_grads(ours, step)
        torch_opt.step()
        fused.step()
    # 1500 and 33 x 40 elements: two blocks each, 16-byte aligned; then the 1-element one, which is
    # not a multiple of 4 floats and goes to the kernel without 128-bit accesses.
    assert grids == [(2 + 2,), (1,)] * 2
    assert launches == [True, False] * 2
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=2e-6, atol=2e-7)


@pytest.mark.skipif(torch.cuda.is_available(), reason="PTX inspection is the CPU machines' check; a GPU runs the kernel")
def test_aligned_tensors_get_128_bit_loads_and_stores(monkeypatch):
    from fixtures import hopper_ptx
    from sfd_scale.kernels import adamw_ema

    signature = {"table_ptr": "*i64", "block_tensor_ptr": "*i32", "block_start_ptr": "*i64", "scale_ptr": "*fp32",
                 "skip_ptr": "*fp32", "lr_ptr": "*fp32", **{name: "fp32" for name in ("beta1", "beta2", "eps", "weight_decay",
                                                                  "ema_weight", "log_beta1", "log_beta2")},
                 "FIELDS": "constexpr", "BLOCK": "constexpr", "ALIGNED": "constexpr", "COPY": "constexpr",
                 "GRAD_BF16": "constexpr"}

    def ptx(aligned: bool, copy: bool) -> str:
        return hopper_ptx(monkeypatch, adamw_ema, "_adamw_ema_kernel", signature,
                          {"FIELDS": adamw_ema._FIELDS, "BLOCK": adamw_ema._BLOCK, "ALIGNED": aligned, "COPY": copy,
                           "GRAD_BF16": copy},
                          helpers=("_bf16_bits",))

    aligned, unaligned, with_copy = ptx(True, False), ptx(False, False), ptx(True, True)
    assert aligned.count("ld.global.v4.b32") >= 5 and aligned.count("st.global.v4.b32") >= 4  # g p m v e; p m v e
    assert "ld.global.v4" not in unaligned and "st.global.v4" not in unaligned
    # p m v e in 128 bits; the bf16 gradient in and the bf16 copy out 4 at a time (64 bits)
    assert with_copy.count("ld.global.v4.b32") >= 4 and with_copy.count("st.global.v4.b32") >= 4
    assert "ld.global.v2.b32" in with_copy and "st.global.v2.b32" in with_copy
