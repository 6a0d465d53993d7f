"""FP8 training linears (torchao float8, emulated on the CPU) and the bf16-vs-FP8 loss-curve tool."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sfd_scale.config import ModelConfig, ParallelConfig
from sfd_scale.models import fast_paths
from sfd_scale.models.lightningdit import build_model
from sfd_scale.parallel.checkpointing import apply_activation_checkpointing
from sfd_scale.bench import Variant, bench_config
from sfd_scale.precision_curve import compare, loss_curves, recipe_variant, smooth
from fixtures import TINY_MODEL_ARGS

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # Width 48: the SwiGLU width 128 is divisible by 16, as FP8 matmuls need (XXL: 1536 -> 4096).
    model = build_model(ModelConfig(size="custom", depth=2, hidden_size=48, num_heads=2, input_size=4,
                                    in_channels=6, semantic_channels=2, num_classes=5, repa_depth=1,
                                    repa_projector_dim=16, repa_feature_dim=8)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)   # leave AdaLN-Zero so every block matters
    return model


def forward(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 6, 4, 4, generator=g), torch.rand(2, generator=g)
    return model(x, t, t, torch.tensor([1, 3]))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_swaps_the_blocks_large_linears_and_keeps_parameters_and_keys(recipe):
    plain = tiny_model()
    model = tiny_model()
    params = dict(model.named_parameters())
    assert fast_paths.apply_fp8(model, recipe, CPU) == 4 * 2            # qkv, proj, w12, w3 per block
    swapped = sorted(name for name, m in model.named_modules() if type(m).__name__ == "Float8Linear")
    assert swapped == [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.proj", "attn.qkv", "mlp.w12", "mlp.w3")]
    assert list(model.state_dict()) == list(plain.state_dict())
    assert all(params[name] is p for name, p in model.named_parameters())  # the optimizer's tensors stay
    got, want = forward(model), forward(plain)
    error = ((got - want).norm() / want.norm()).item()
    assert 0 < error < 0.05, error        # really quantised, and close: e4m3 keeps 3 mantissa bits


def test_fp8_finds_the_linears_inside_checkpoint_wrappers():
    model = tiny_model()
    apply_activation_checkpointing(model, ParallelConfig(activation_checkpointing="full"))
    assert fast_paths.apply_fp8(model, "rowwise", CPU) == 8


def test_fp8_settings_are_checked(monkeypatch):
    model = tiny_model()
    assert fast_paths.apply_fp8(model, "none", CPU) == 0
    with pytest.raises(ValueError, match="model.fp8='e5m2' is unknown"):
        fast_paths.apply_fp8(model, "e5m2", CPU)
    real_find_spec = fast_paths.importlib.util.find_spec
    monkeypatch.setattr(fast_paths.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchao" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match=r"torchao is not installed \(pip install -e '.\[fp8\]'\)"):
        fast_paths.apply_fp8(model, "rowwise", CPU)


def test_smoothing_and_curve_gaps_by_hand():
    assert smooth([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    gaps = compare([2.0, 2.0, 2.0, 2.0], [2.0, 2.2, 2.2, 2.2], window=1)
    assert gaps["max_relative_gap"] == pytest.approx(0.1)
    assert gaps["mean_relative_gap"] == pytest.approx(0.075)
    assert gaps["final_loss_ratio"] == pytest.approx(1.1)


def test_compare_precision_trains_both_recipes_from_the_same_start(tmp_path):
    out = tmp_path / "curves.json"
    args = [*TINY_MODEL_ARGS, "--set", "train.device=cpu", "--set", "train.precision=bf16", "--set", "optim.lr=3e-3",
            "--recipes", "none", "rowwise", "delayed", "bf16_residual", "--steps", "30", "--batch-size", "8",
            "--pool", "4", "--json", str(out)]
    cpu_only = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # no Triton kernels here
    done = subprocess.run([sys.executable, "launchers/compare_precision.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=cpu_only)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| rowwise |" in done.stdout and "rowwise: FP8 casts by torchao" in done.stdout
    report = json.loads(out.read_text())
    # Each FP8 curve says what cast its tensors: torchao's, or ours (the PyTorch twins without CUDA).
    assert report["fp8_casts"] == {"rowwise": "torchao", "delayed": "pytorch (they need a CUDA device (got cpu; "
                                                                    "the CPU runs them only under TRITON_INTERPRET=1))"}
    bf16, fp8 = report["curves"]["none"], report["curves"]["rowwise"]
    assert len(bf16) == len(fp8) == 30 and report["data"] == "synthetic" and report["reference"] == "none"
    assert bf16[0] == fp8[0]                       # same seed, same batch, same draws: same first loss
    assert bf16 != fp8                             # the FP8 linears really ran
    assert min(bf16[-5:]) < bf16[0]                # and training moved
    gap = report["against_reference"]["rowwise"]
    assert 0 < gap["mean_relative_gap"] < 0.01 and gap == compare(bf16, fp8, report["window"])
    delayed = report["curves"]["delayed"]          # ours: real FP8 casts and matmuls on the CPU
    assert delayed != bf16 and delayed[0] == bf16[0]
    assert 0 < report["against_reference"]["delayed"]["mean_relative_gap"] < 0.01
    residual = report["curves"]["bf16_residual"]
    assert residual != bf16 and residual[0] == pytest.approx(bf16[0], rel=1e-2)  # the bf16 stream ran
    assert 0 < report["against_reference"]["bf16_residual"]["mean_relative_gap"] < 0.01


def test_loss_curves_hand_over_each_finished_recipe():
    # A GPU lease can end mid-run: every finished curve must already be with the caller.
    cfg = bench_config(None, TINY_MODEL_ARGS[1::2] + ["train.device=cpu", "train.precision=fp32"])
    seen: list[dict] = []
    final = loss_curves(cfg, Variant("reference", "math", "none", False), ["none", "bf16_residual"], steps=3,
                        batch_size=2, pool=2, device=CPU, window=1, on_curve=seen.append)
    assert [list(r["curves"]) for r in seen] == [["none"], ["none", "bf16_residual"]]
    assert seen[0]["against_reference"] == {} and seen[-1] == final
    assert final["curves"]["none"] == seen[0]["curves"]["none"]


def test_precision_recipes_combine_an_fp8_recipe_and_the_bf16_residual():
    base = Variant("reference", "math", "none", False)
    assert (recipe_variant(base, "rowwise+bf16_residual").fp8, recipe_variant(base, "rowwise+bf16_residual").residual) \
        == ("rowwise", "bf16")
    assert (recipe_variant(base, "bf16_residual").fp8, recipe_variant(base, "bf16_residual").residual) == ("none", "bf16")
    assert (recipe_variant(base, "tensorwise").fp8, recipe_variant(base, "tensorwise").residual) == ("tensorwise", "fp32")
    for bad in ("rowwise+tensorwise", "fp16", "bf16_residual+bf16_residual", ""):
        with pytest.raises(ValueError, match="precision recipe"):
            recipe_variant(base, bad)


@pytest.mark.distributed
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fsdp2_with_fp8_linears_trains_like_one_process(tmp_path, recipe):
    import yaml

    from dist_worker import launch, read_losses
    from fixtures import tiny_sfd_config, write_latent_folder
    from sfd_scale.config import to_dict
    from sfd_scale.train.trainer import Trainer

    data = write_latent_folder(tmp_path / "latents")
    # Width 48: the SwiGLU width 128 is divisible by 16, as FP8 matmuls need.
    cfg = tiny_sfd_config(data, model={"hidden_size": 48, "fp8": recipe}, train={"log_every": 1, "ckpt_every": 0})
    single = Trainer(cfg, tmp_path / "single")
    single.fit(3)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    dump = tmp_path / "fsdp.pt"
    logs = launch(2, ["--config", str(tmp_path / "cfg.yaml"), "--run-dir", str(tmp_path / "fsdp"), "--max-steps", "3",
                      "--set", "parallel.engine=fsdp2", "--dump", str(dump)], tmp_path / "logs", timeout=300)
    assert f"FP8 (torchao, {recipe} recipe, emulated on the CPU): 8 linear layers" in logs[0]  # rank 0 logs
    got, want = torch.load(dump, weights_only=True)["losses"], read_losses(tmp_path / "single")
    assert [got[s] for s in (1, 2, 3)] == pytest.approx([want[s] for s in (1, 2, 3)], rel=1e-4)
