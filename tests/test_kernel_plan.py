"""launchers/kernel_plan.py: inductor's GPU kernel plan of one block, worked out on the CPU."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sfd_scale.config import ModelConfig
from sfd_scale.kernel_plan import plan_block

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(size="custom", depth=2, hidden_size=64, num_heads=4, input_size=4)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_bf16_plan_lists_generated_kernels_beside_the_library_matmuls():
    forward, backward = plan_block(TINY, batch_size=2)
    matmuls = [k for k in forward.kernels if k.kind == "extern" and "mm" in k.ops[0]]
    assert len(matmuls) == 5                          # adaLN, qkv, proj, w12, w3
    # The norm and the modulate are one generated kernel (inductor fused them, as on the GPU).
    assert any({"rsqrt", "mean.dim", "mul.Tensor", "add.Tensor"} <= set(k.ops) for k in forward.kernels)
    # Every norm (the qk-norm too) computes its statistics in the kernel that applies them.
    norms = [set(k.ops) for k in forward.kernels if "mean.dim" in k.ops]
    assert len(norms) == 3 and all({"rsqrt", "mul.Tensor"} <= ops for ops in norms)  # norm1, q+k, norm2
    assert forward.memory_bound_bytes > 0 and backward.memory_bound_bytes > 0
    # bf16 weight copies spare autocast's cast of every weight, every step (measured on an H100:
    # 5.4 ms a step): the plan shows those kernels gone.
    bf16_forward, bf16_backward = plan_block(TINY, batch_size=2, bf16_weights=True)
    hidden = int(2 / 3 * 4 * 64)
    weights = 64 * (6 * 64 + 3 * 64 + 64 + 2 * hidden + hidden)  # adaLN, qkv, proj, w12, w3
    assert forward.memory_bound_bytes - bf16_forward.memory_bound_bytes >= 6 * weights  # fp32 read, bf16 write


def test_delayed_fp8_plan_fuses_each_input_cast_into_its_producer_and_casts_the_rest_in_our_kernel(tmp_path):
    done = subprocess.run([sys.executable, "launchers/kernel_plan.py", "--size", "S", "--batch-size", "1", "--fp8",
                           "none", "delayed", "--json", str(tmp_path / "plan.json")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "12 blocks" in done.stdout
    plans = json.loads((tmp_path / "plan.json").read_text())
    plan = plans["delayed"]
    forward = [set(k["ops"]) for k in plan["forward"]["kernels"] if k["kind"] == "triton"]
    # The norm + modulate kernels also cast to FP8 with the delayed scale and take this step's amax:
    # the premise of delayed scaling (no pass of its own over the matmul's input).
    assert sum({"rsqrt", "amax", "clamp_max"} <= ops for ops in forward) == 2
    # The backward no longer recomputes the SwiGLU from h (for w3's weight gradient): no generated
    # kernel computes the activation's exp outside the gradient's own op.
    assert not any("exp" in k["ops"] for k in plan["backward"]["kernels"] if k["kind"] == "triton")
    # The four weights and the SwiGLU's output (computed by the op that casts it), then the four
    # output gradients: w12's computed from the SwiGLU's output gradient by the op that casts it.
    ours = {phase: sorted(k["ops"][0].split(".")[3] for k in plan[phase]["kernels"] if k["kind"] == "ours")
            for phase in ("forward", "backward")}
    assert [op for op in ours["forward"] if op != "fp8_transpose"] == ["fp8_cast_transpose"] * 4 + ["fp8_swiglu_cast"]
    assert [op for op in ours["backward"] if op != "fp8_transpose"] == ["fp8_cast_transpose"] * 3 + [
        "fp8_swiglu_backward_cast"]
    # The inputs of qkv, proj and w12, column by column for their weight gradients, by our transpose
    # op (the partitioner may run it in either phase). Left to inductor, these copies were fused
    # into unrelated backward reductions, whose transposed accesses ran at a third of the copy rate
    # (H200, 2026-11-27): no generated kernel transposes an FP8 matmul operand.
    assert ours["forward"].count("fp8_transpose") + ours["backward"].count("fp8_transpose") == 3
    assert not any({"_scaled_mm", "clone"} <= set(k["ops"])
                   for phase in ("forward", "backward") for k in plan[phase]["kernels"] if k["kind"] == "triton")
    assert plan["backward"]["memory_bound_bytes"] == sum(
        k["bytes"] for k in plan["backward"]["kernels"] if k["kind"] in ("triton", "ours"))
    # The scales and the histories' shifts are one pass a step for all layers, outside the block,
    # and our op writes its amax into the history and its column sums in the bias's dtype: per
    # linear the forward adds our op and the end of the input's amax, plus the attention output's
    # cast, which no generated kernel produces, and the three transposes; the backward adds
    # nothing (bias gradients come from our op). Done per layer, that bookkeeping was ~50 tiny
    # kernels a block.
    count = {(recipe, phase): plans[recipe][phase]["memory_bound_kernels"]
             for recipe in ("none", "delayed") for phase in ("forward", "backward")}
    assert count["delayed", "forward"] <= count["none", "forward"] + 2 * 4 + 1 + 3
    assert count["delayed", "backward"] <= count["none", "backward"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the plan a GPU generates needs a GPU (the GPU script runs it)")
def test_on_a_gpu_the_plan_is_what_a_step_of_the_block_launches():
    # The CPU plan stands in for this one; on a GPU both the plan and the launches are real, and
    # every kernel the plan generates runs once a step, nothing generated runs beside it.
    launched: list[dict] = []
    forward, backward = plan_block(TINY, batch_size=2, bf16_weights=True, device="cuda", launched=launched)
    generated = sum(k.kind == "triton" for plan in (forward, backward) for k in plan.kernels)
    assert generated > 0
    assert sum(row["calls_per_step"] for row in launched if row["name"].startswith("triton_")) == generated
    assert all(row["s_per_step"] > 0 for row in launched)
