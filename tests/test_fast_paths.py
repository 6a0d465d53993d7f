"""Fast-path dispatch: attention backends, the Triton kernels in the model, compile, and the AdamW
kernel. Every fast path must give the numbers of its plain-PyTorch twin and keep state-dict keys."""
import copy
import dataclasses
import logging
import sys
import types

import pytest
import torch

from sfd_scale.config import ModelConfig, OptimConfig, SFDConfig
from sfd_scale.kernels import triton_installed
from sfd_scale.models import fast_paths
from sfd_scale.models.layers import attention_math, resolve_attention
from sfd_scale.models.lightningdit import build_model
from sfd_scale.parallel.factory import build_training_model
from sfd_scale.train import optim
from fixtures import triton_interpreter_without_gpu  # noqa: F401  (autouse, module scope)


def tiny(**kw) -> ModelConfig:
    base = dict(size="custom", depth=2, hidden_size=32, num_heads=2, input_size=4, in_channels=6,
                semantic_channels=2, num_classes=5, repa_depth=1, repa_projector_dim=16, repa_feature_dim=8)
    base.update(kw)
    return ModelConfig(**base)


def _qkv(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 10, 16, generator=g).to(dtype).requires_grad_() for _ in range(3)]


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", fast_paths.available_attention())
def test_every_available_backend_equals_math_attention(name):
    device = "cuda" if name in fast_paths.FUSED_ATTENTION + fast_paths.SDPA_KERNELS else "cpu"
    dtype = torch.bfloat16 if name in ("flash3", "flash2", *fast_paths.SDPA_KERNELS) else torch.float32
    q, k, v = (t.detach().to(device).requires_grad_() for t in _qkv(dtype))
    _, attend = resolve_attention(name)
    out, want = attend(q, k, v), attention_math(q, k, v)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, want, **tol)
    grad = torch.randn_like(out)
    got, exp = torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, **tol)


def test_the_config_accepts_every_attention_backend_and_only_those():
    import typing

    from sfd_scale.config import ModelConfig

    accepted = typing.get_args(typing.get_type_hints(ModelConfig)["attention"])
    assert sorted(accepted) == sorted(fast_paths.ATTENTION_NAMES)


def test_auto_prefers_flash3_then_flash2_then_xformers_then_sdpa():
    choose = fast_paths.choose_attention
    assert choose(("flash3", "flash2", "xformers", "sdpa", "math")) == "flash3"
    assert choose(("flash2", "xformers", "sdpa", "math")) == "flash2"
    assert choose(("xformers", "sdpa", "math")) == "xformers"
    assert choose(("sdpa", "math")) == "sdpa"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only choice")
def test_cpu_has_only_the_plain_backends_and_refuses_fused_names():
    assert fast_paths.available_attention() == ("sdpa", "math")
    assert resolve_attention("auto")[0] == "sdpa"
    with pytest.raises(ValueError, match=r"model.attention='flash2' cannot run here"):
        resolve_attention("flash2")
    with pytest.raises(ValueError, match=r"model.attention='sdpa_flash' cannot run here \(it needs CUDA on an Ampere"):
        resolve_attention("sdpa_flash")
    with pytest.raises(ValueError, match=r"unknown backend 'flash4'.*flash3, flash2, xformers, sdpa_flash, sdpa_cudnn"):
        resolve_attention("flash4")


def test_auto_is_chosen_and_logged_once_per_process(caplog):
    fast_paths.auto_attention.cache_clear()
    with caplog.at_level(logging.INFO, logger="sfd_scale.models.fast_paths"):
        build_model(tiny())           # two blocks, each resolving 'auto'
        build_model(tiny())
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention:")] == \
        [f"attention: {fast_paths.auto_attention()} (available here: {', '.join(fast_paths.available_attention())})"]


def _fake_tokens_major_kernel(calls):
    """A stand-in for flash_attn_func / memory_efficient_attention: (B, N, heads, head_dim) in and out."""
    def kernel(q, k, v):
        calls.append((q.shape, q.dtype, k.dtype, v.dtype))
        return attention_math(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return kernel


def test_flash_wrapper_transposes_and_casts_under_autocast(monkeypatch):
    calls = []
    monkeypatch.setattr(fast_paths, "_kernel", lambda name: _fake_tokens_major_kernel(calls))
    q, k, v = _qkv()
    v = v.detach().bfloat16()          # under autocast q, k leave qk-norm in fp32 and v is bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast_paths.attention_flash2(q, k, v)
    assert calls == [((2, 10, 3, 16), torch.bfloat16, torch.bfloat16, torch.bfloat16)]
    assert out.shape == (2, 3, 10, 16) and out.dtype == torch.bfloat16
    want = attention_math(q.bfloat16(), k.bfloat16(), v)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_flash_wrapper_sends_float32_to_sdpa_and_xformers_keeps_it(monkeypatch):
    calls = []
    monkeypatch.setattr(fast_paths, "_kernel", lambda name: _fake_tokens_major_kernel(calls))
    q, k, v = _qkv()
    want = attention_math(q, k, v)
    torch.testing.assert_close(fast_paths.attention_flash3(q, k, v), want, rtol=1e-5, atol=1e-5)
    assert calls == []                 # FlashAttention has no float32 kernel
    torch.testing.assert_close(fast_paths.attention_xformers(q, k, v), want, rtol=1e-6, atol=1e-6)
    assert calls == [((2, 10, 3, 16), torch.float32, torch.float32, torch.float32)]


# ---------------------------------------------------------------------------------------------
# Triton kernels in the model, compile
# ---------------------------------------------------------------------------------------------
def _train_step_outputs(model, seed=0):
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(2, 6, 4, 4, generator=g).to(device), torch.rand(2, generator=g).to(device)
    y = torch.tensor([1, 3], device=device)
    out, repa = model(x, t, t.flip(0), y, return_repa=True)
    (out.square().mean() + repa.square().mean()).backward()
    return [out.detach(), repa.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _model_with_weights(device="cpu"):
    torch.manual_seed(0)
    model = build_model(tiny()).eval()     # eval: no label dropout, same forward every call
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)   # leave AdaLN-Zero so every branch is active
    return model.to(device)


@pytest.mark.skipif(not triton_installed(), reason="Triton is not installed")
def test_fused_kernels_give_the_model_numbers_and_keep_state_dict_keys():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plain = _model_with_weights(device)
    fused = copy.deepcopy(plain)
    depth = len(fused.blocks)
    # per block: SwiGLU + 4 RMSNorms (norm1, norm2, q/k norms); plus the final norm and the RoPE
    assert fast_paths.apply_fused_kernels(fused, device) == 5 * depth + 2
    assert list(fused.state_dict()) == list(plain.state_dict())
    for got, want in zip(_train_step_outputs(fused), _train_step_outputs(plain)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Under bf16 autocast (the GPU default) the RoPE kernel writes bf16 for attention directly.
    for model in (plain, fused):
        model.zero_grad()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got, want = _train_step_outputs(fused), _train_step_outputs(plain)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fused_kernels_refuse_the_cpu_outside_the_interpreter_or_without_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = fast_paths.fused_kernels_unavailable(torch.device("cpu"))
    assert reason is not None and ("CUDA" if triton_installed() else "Triton is not installed") in reason
    with pytest.raises(ValueError, match="fused kernels were asked for but cannot run"):
        fast_paths.apply_fused_kernels(build_model(tiny()), torch.device("cpu"))


@pytest.mark.parametrize("mode,count", [("blocks", 2), ("model", 1)])
def test_compile_keeps_state_dict_keys_and_numbers(mode, count):
    plain = _model_with_weights()
    compiled = copy.deepcopy(plain)
    assert fast_paths.apply_compile(compiled, mode, backend="eager") == count
    assert list(compiled.state_dict()) == list(plain.state_dict())
    for got, want in zip(_train_step_outputs(compiled), _train_step_outputs(plain)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="compile mode 'all' is unknown"):
        fast_paths.apply_compile(compiled, "all")
    with pytest.raises(ValueError, match="compile mode 'max' is unknown"):
        fast_paths.apply_compile(compiled, "blocks", inductor_mode="max")


@pytest.mark.parametrize("mode,tuning,want", [
    ("default", False, None),
    ("default", True, {"coordinate_descent_tuning": True}),
    ("reduce-overhead", True, {"triton.cudagraphs": True, "coordinate_descent_tuning": True}),
    ("max-autotune-no-cudagraphs", False, {"max_autotune": True, "coordinate_descent_tuning": True}),
])
def test_compile_passes_the_mode_and_kernel_tuning_as_inductor_options(monkeypatch, mode, tuning, want):
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: calls.append((self, kwargs)))
    model = build_model(tiny())
    assert fast_paths.apply_compile(model, "blocks", inductor_mode=mode, kernel_tuning=tuning) == 2
    assert [module for module, _ in calls] == list(model.blocks)
    assert all(kwargs == {"backend": "inductor", "options": want} for _, kwargs in calls)


def test_model_compile_tuning_reaches_the_compiled_blocks(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: calls.append(kwargs))
    cfg = SFDConfig(model=tiny(compile="blocks", compile_tuning=True))
    build_training_model(cfg)
    assert calls and all(kwargs["options"] == {"coordinate_descent_tuning": True} for kwargs in calls)


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_residual_precision_sets_the_stream_dtype_under_autocast_only(precision, dtype):
    cfg = tiny()
    model = build_training_model(SFDConfig(model=dataclasses.replace(cfg, residual_precision=precision)))
    assert model.residual_dtype == dtype
    streams = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: streams.append((args[0].dtype, out.dtype)))
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size)
    t, y = torch.rand(2), torch.tensor([1, 3])
    with torch.autocast("cpu", torch.bfloat16):
        model(x, t, t, y)
    assert streams == [(dtype, dtype)] * cfg.depth           # every block takes and returns it
    streams.clear()
    model(x, t, t, y)
    assert streams == [(torch.float32, torch.float32)] * cfg.depth
    plain = build_model(dataclasses.replace(cfg, residual_precision=precision))
    assert plain.residual_dtype == torch.float32            # sampling and evaluation: the reference's stream
    with pytest.raises(ValueError, match="model.residual_precision='fp16' is unknown"):
        fast_paths.apply_residual_precision(model, "fp16")


@pytest.mark.skipif(not triton_installed(), reason="Triton is not installed")
def test_fused_kernels_stay_whole_inside_a_compiled_graph():
    """The kernels are registered custom ops: dynamo records them as single graph nodes (one graph,
    no break) and the compiled forward and backward equal the uncompiled fused model."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fused = _model_with_weights(device)
    fast_paths.apply_fused_kernels(fused, device)
    block = fused.blocks[0]
    x = torch.randn(2, 16, 32, device=device, requires_grad=True)
    cond = torch.randn(2, 32, device=device)
    rope = fused.feat_rope
    explained = torch._dynamo.explain(block)(x, cond, rope)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    ops = {str(node.target) for graph in explained.graphs for node in graph.graph.nodes}
    assert {"sfd_scale.rmsnorm_modulate.default", "sfd_scale.swiglu.default",
            "sfd_scale.rope_rotate.default"} <= ops
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    got = compiled(x, cond, rope)
    (grad_got,) = torch.autograd.grad(got.square().sum(), x)
    want = block(x, cond, rope)
    (grad_want,) = torch.autograd.grad(want.square().sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# AdamW kernel
# ---------------------------------------------------------------------------------------------
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)


class ApexLikeFusedAdam(torch.optim.Optimizer):
    """What apex.optimizers.FusedAdam (adam_w_mode) does, in plain PyTorch: one 'step' per
    parameter group, exp_avg/exp_avg_sq per parameter, and a zero_grad() without arguments."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
                 adam_w_mode=True, weight_decay=0.0):
        assert adam_w_mode
        super().__init__(params, dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                                      weight_decay=weight_decay))

    def zero_grad(self):
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            group["step"] = t = group.get("step", 0) + 1
            (b1, b2), lr = group["betas"], group["lr"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (v / (1 - b2 ** t)).sqrt() + group["eps"]
                p.sub_(lr * (m / (1 - b1 ** t) / denom + group["weight_decay"] * p))


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(5))]


def _train(opt, params, steps, first=0):
    for k in range(first, first + steps):
        g = torch.Generator().manual_seed(k)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach() for p in params]


def _plain_adamw(params):
    return torch.optim.AdamW(params, **HYPER, foreach=False, fused=False)


def _apex_adamw(params):
    return optim.with_adamw_interface(ApexLikeFusedAdam)(params, adam_w_mode=True, **HYPER)


@pytest.mark.parametrize("kernel", ["foreach", "fused"])
def test_adamw_kernels_give_plain_adamw_numbers(kernel):
    plain = _train(_plain_adamw(params := _params()), params, 5)
    fast = _train(torch.optim.AdamW(params := _params(), **HYPER, **{kernel: True}), params, 5)
    for got, want in zip(fast, plain):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("first,second", [(_plain_adamw, _apex_adamw), (_apex_adamw, _plain_adamw),
                                          (_apex_adamw, _apex_adamw)])
def test_checkpoints_move_between_apex_and_torch_adamw_exactly(first, second):
    straight = _train(_plain_adamw(params := _params()), params, 5)
    params = _params()
    opt = first(params)
    _train(opt, params, 3)
    state = copy.deepcopy(opt.state_dict())
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in state["state"].values())  # AdamW layout
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = second(resumed)
    opt.load_state_dict(state)
    for got, want in zip(_train(opt, resumed, 2, first=3), straight):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    opt.zero_grad(set_to_none=True)          # the engines' call; apex's own takes no argument
    assert all(p.grad is None for p in resumed)


def test_adamw_kernel_choice(monkeypatch):
    params = [torch.zeros(3)]
    assert optim.adamw_kernel(params, torch.device("cpu")) == "foreach"
    monkeypatch.setattr(optim, "_apex_fused_adam", lambda: None)
    assert optim.adamw_kernel(params, torch.device("cuda")) == "fused"
    monkeypatch.setattr(optim, "_apex_fused_adam", lambda: ApexLikeFusedAdam)
    assert optim.adamw_kernel(params, torch.device("cuda")) == "apex"
    cfg = OptimConfig(lr=2e-4, beta1=0.8, beta2=0.95, weight_decay=0.1, eps=1e-7)
    built = optim.build_optimizer(build_model(tiny()), cfg, torch.device("cuda"))
    assert isinstance(built, ApexLikeFusedAdam)
    assert built.defaults == dict(lr=2e-4, bias_correction=True, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1)


def test_pypi_apex_is_not_mistaken_for_nvidia_apex(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))   # the unrelated PyPI package
    assert optim._apex_fused_adam() is None
