"""The training-step benchmark: FLOP count against a hand count and SPEC section 6, the datasheet
table, synthetic batches, and the launcher end to end on a tiny model (CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sfd_scale.bench import (
    SYNTHETIC_DATA,
    BenchOptions,
    bench_config,
    count_step_flops,
    datasheet_peak_tflops,
    synthetic_batch,
)
from sfd_scale.config import ModelConfig
from sfd_scale.profile_step import (category, format_profile, idle_gaps, kernel_launchers, profile_training_step,
                                    sync_site,
                                    sync_warning_stacks)
from fixtures import TINY_MODEL_ARGS

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(**kw) -> ModelConfig:
    base = dict(size="custom", depth=2, hidden_size=32, num_heads=2, input_size=4, in_channels=6,
                semantic_channels=2, num_classes=5, repa_depth=1, repa_projector_dim=16, repa_feature_dim=8)
    base.update(kw)
    return ModelConfig(**base)


def test_step_flops_equal_a_hand_count():
    b, d, n, c, p, f, depth = 3, 32, 16, 6, 16, 8, 2
    hidden = int(2 / 3 * 4 * d)                     # SwiGLU width
    # Matmuls whose input needs a gradient cost 3x their forward (forward, grad input, grad weight);
    # the patchify conv and the first timestep layers (inputs without gradient) cost 2x.
    per_block = 2 * b * d * 6 * d + 2 * b * n * d * (3 * d + d + 2 * hidden) + 2 * b * n * hidden * d
    three = (2 * 2 * b * (d // 2) ** 2 + depth * per_block + 2 * b * d * 2 * d + 2 * b * n * d * c
             + 2 * b * n * (d * p + p * p + p * f))
    two = 2 * b * n * c * d + 2 * 2 * b * 256 * (d // 2)
    # Attention as the flash kernel is counted: 2 batched matmuls forward, 5 backward.
    attention = depth * 7 * 2 * b * n * n * d
    assert count_step_flops(tiny_model(), b, with_repa=True) == 3 * three + 2 * two + attention


def test_xxl_step_flops_match_spec_section_6():
    assert round(count_step_flops(ModelConfig(size="XXL"), 32, with_repa=True) / 1e12, 2) == 34.99


@pytest.mark.parametrize("name,dtype,peak", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),
    ("NVIDIA H200", torch.bfloat16, 989.4),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756.0),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, None),
    ("NVIDIA H100 80GB HBM3", torch.float32, None),
    ("cpu", torch.float32, None),
])
def test_datasheet_peak(name, dtype, peak):
    assert datasheet_peak_tflops(name, dtype) == peak


def test_config_without_data_and_synthetic_batch_shapes():
    cfg = bench_config(None, ["model.size=custom", "model.depth=1", "model.hidden_size=32",
                              "model.num_heads=2", "model.input_size=8", "model.patch_size=2"])
    assert cfg.data.data_dir == SYNTHETIC_DATA and cfg.model.depth == 1
    x, y, feats = synthetic_batch(cfg.model, 3, torch.device("cpu"))
    assert x.shape == (3, 48, 8, 8) and feats.shape == (3, 768, 4, 4)     # DINO features per token
    assert y.dtype == torch.int64 and int(y.max()) < cfg.model.num_classes
    with pytest.raises(ValueError, match="compile 'graph' is unknown"):
        BenchOptions(compile="graph")
    with pytest.raises(ValueError, match="compile mode 'fast' is unknown"):
        BenchOptions(compile_mode="fast")
    with pytest.raises(ValueError, match="profile_steps >= 0"):
        BenchOptions(profile_steps=-1)


def test_launcher_times_the_step_and_writes_the_json(tmp_path):
    out = tmp_path / "bench.json"
    args = [*TINY_MODEL_ARGS, "--device", "cpu", "--batch-size", "4", "--warmup", "1", "--steps", "3", "--json", str(out)]
    done = subprocess.run([sys.executable, "launchers/bench.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| configured | sdpa | none | no |" in done.stdout and "| plain eager |" in done.stdout
    assert "configured: 3 steps back to back (no wait between them)" in done.stdout
    assert "configured: one by one, the host issued a step in" in done.stdout
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["batch_size"] == 4 and report["precision"] == "float32"
    assert report["step_tflop"] * 1e12 == count_step_flops(tiny_model(), 4, with_repa=True)
    assert report["datasheet_peak_tflops_per_s"] is None and report["matmul_ceiling_tflops_per_s"] > 0
    for run in (report, report["baseline"]):
        assert len(run["step_s_all"]) == 3 and run["peak_mem_gib"] is None
        # On the CPU the host does all of a step, inside the step's own timing.
        assert len(run["host_s_all"]) == 3 and all(0 < h <= t for h, t in zip(run["host_s_all"], run["step_s_all"]))
        assert run["host_s_median"] == sorted(run["host_s_all"])[1]
        assert run["step_s_median"] == sorted(run["step_s_all"])[1]
        assert run["images_per_s"] == pytest.approx(4 / run["step_s_median"])
        assert run["images_per_s_back_to_back"] == pytest.approx(4 / run["step_s_back_to_back"]) and \
            run["step_s_back_to_back"] > 0
        assert run["tflops_per_s"] == pytest.approx(report["step_tflop"] / run["step_s_median"])
        assert run["mfu"]["vs_measured_ceiling"] == pytest.approx(
            run["tflops_per_s"] / report["matmul_ceiling_tflops_per_s"])
        assert run["mfu"]["vs_datasheet_peak"] is None and run["fp8_casts"] is None
    assert report["baseline"]["attention"] == "sdpa" and report["baseline"]["compile"] == "none"
    ratio = report["images_per_s"] / report["baseline"]["images_per_s"]
    assert report["speedup_vs_baseline"] == pytest.approx(ratio)
    assert report["command"].startswith("python launchers/bench.py --set model.size=custom")


def test_profile_sums_operator_time_by_category_and_name():
    a, b = torch.randn(64, 64), torch.randn(64, 64)

    def step():
        (a @ b).relu_().sum()

    report = profile_training_step(step, torch.device("cpu"), steps=4, top=5)
    assert report["steps"] == 4 and report["clock"].startswith("cpu")
    names = {row["name"]: row for row in report["top"]}
    assert names["aten::mm"]["category"] == "matmul" and names["aten::mm"]["calls_per_step"] == 1.0
    assert len(report["top"]) == 5
    assert sum(report["categories"].values()) == pytest.approx(report["busy_s_per_step"])
    assert report["categories"]["matmul"] >= names["aten::mm"]["s_per_step"]
    assert 0 < report["busy_s_per_step"] <= report["wall_s_per_step"] * 1.05
    text = format_profile(report)
    assert "| matmul |" in text and "aten::mm" in text


def test_idle_gaps_are_attributed_to_the_launching_thread_and_the_next_kernel():
    # Times in microseconds. Kernels on two streams overlap (no gap there); gaps under 10 us do
    # not count. Thread 1 launches the forward, thread 3 (autograd's device thread) the backward;
    # thread 2 is a reader that also runs during the first gap.
    kernels = [(0, 100, "gemm"), (50, 120, "copy"), (170, 200, "adamw"),       # gap 120-170: 50 us
               (205, 300, "gemm"), (305, 400, "relu"), (500, 600, "adamw"),    # 5 us gaps, then 100 us
               (680, 700, "gemm_backward")]                                    # gap 600-680: 80 us
    host = [(0, 2000, "step", 1), (110, 180, "Optimizer.step", 1), (140, 160, "aten::_local_scalar_dense", 1),
            (140, 160, "pread", 2), (390, 510, "Optimizer.step", 1), (0, 1, "cudaLaunchKernel", 1),
            (2, 3, "cudaLaunchKernel", 1), (0, 1, "cudaMemcpyAsync", 2), (520, 650, "autograd::engine::evaluate", 3),
            (610, 660, "MulBackward0", 3), (665, 670, "cuLaunchKernel", 3)]
    idle = idle_gaps(kernels, host, steps=2, min_gap_us=10)
    assert idle["s_per_step"] == pytest.approx(230e-6 / 2) and idle["gaps_per_step"] == 1.5
    by_host = {row["name"]: (row["s_per_step"], row["gaps_per_step"]) for row in idle["by_host_op"]}
    assert by_host == {"aten::_local_scalar_dense": (25e-6, 0.5), "Optimizer.step": (50e-6, 0.5),
                       "MulBackward0": (40e-6, 0.5)}
    assert [row["name"] for row in idle["before_kernel"]] == ["adamw", "gemm_backward"]
    assert idle["before_kernel"][0]["s_per_step"] == pytest.approx(75e-6)
    report = {"steps": 2, "clock": "device", "wall_s_per_step": 1e-3, "busy_s_per_step": 5e-4,
              "categories": {"matmul": 5e-4}, "top": [], "idle": idle}
    text = format_profile(report)
    assert "GPU idle between kernels: 0.12 ms/step in 2 gaps" in text
    assert "| aten::_local_scalar_dense | 0.025 | 0.5 |" in text and "| adamw | 0.075 | 1.0 |" in text


def test_kernels_are_attributed_to_the_host_operators_that_launched_them():
    from types import SimpleNamespace as Event

    def op(name, parent=None):
        return Event(name=name, cpu_parent=parent, kernels=[])

    def launch(parent, *kernels, name="cudaLaunchKernel"):
        return Event(name=name, cpu_parent=parent, kernels=[Event(name=k) for k in kernels])

    node = op("autograd::engine::evaluate_function: MulBackward0", op("autograd::engine::run"))
    summed = op("aten::sum", op("aten::sum_to_size", node))
    step = op("## Call CompiledFxGraph f1 ##", op("CompiledFunction", op("step")))
    events = [node, summed, launch(summed, "reduce_kernel"), launch(summed, "reduce_kernel"),
              launch(op("aten::sum", op("loss")), "reduce_kernel"), launch(step, "triton_poi_fused_0", "triton_red_1"),
              launch(None, "gemm", name="cudaGraphLaunch")]
    launchers = kernel_launchers(events, depth=3)
    assert launchers["reduce_kernel"] == {
        "aten::sum < aten::sum_to_size < autograd::engine::evaluate_function: MulBackward0": 2, "aten::sum < loss": 1}
    assert launchers["triton_red_1"] == {"## Call CompiledFxGraph f1 ## < CompiledFunction < step": 1}
    assert launchers["gemm"] == {"cudaGraphLaunch": 1}
    report = {"steps": 1, "clock": "device", "wall_s_per_step": 1e-3, "busy_s_per_step": 5e-4,
              "categories": {"elementwise/reduction": 5e-4},
              "top": [{"name": "reduce_kernel", "category": "elementwise/reduction", "s_per_step": 5e-4,
                       "calls_per_step": 3.0, "launched_by": launchers["reduce_kernel"].most_common(1)[0][0]}]}
    assert "| reduce_kernel | aten::sum < aten::sum_to_size < autograd::engine::evaluate_function: MulBackward0 |" \
        in format_profile(report, width=120)


def test_sync_sites_name_the_caller_when_the_sync_is_inside_torch():
    import traceback
    import warnings

    def frame(path, line):
        return traceback.FrameSummary(path, line, "f")

    ours = frame("/w/sfd_scale/bench.py", 281)
    sync = frame("/v/site-packages/torch/cuda/__init__.py", 1270)
    trees = frame("/v/site-packages/torch/_inductor/cudagraph_trees.py", 2411)
    dynamo = frame("/v/site-packages/torch/_dynamo/eval_frame.py", 10)
    assert sync_site(traceback.StackSummary.from_list([ours, dynamo, trees, sync])) == \
        "/v/site-packages/torch/cuda/__init__.py:1270 < /v/site-packages/torch/_inductor/cudagraph_trees.py:2411" \
        " < /w/sfd_scale/bench.py:281"
    assert sync_site(traceback.StackSummary.from_list([ours])) == "/w/sfd_scale/bench.py:281"

    def optimizer_step():
        warnings.warn("called a synchronizing CUDA operation")  # what the sync debug mode says
        warnings.warn("something else")

    stacks = sync_warning_stacks(optimizer_step)
    assert len(stacks) == 1 and stacks[0][-1].name == "optimizer_step"
    assert sync_site(stacks[0]).endswith(f"test_bench.py:{stacks[0][-1].lineno}")


@pytest.mark.parametrize("name,expected", [
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26", "attention"),
    ("void at::native::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>, FusedAdamMathFunctor>", "optimizer/EMA/clip"),
    ("triton_poi_fused__to_copy_add_mul_silu_2", "triton"),
    ("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>", "elementwise/reduction"),
    ("Memcpy DtoD (Device -> Device)", "copy/memset"),
])
def test_kernel_categories(name, expected):
    assert category(name) == expected


def test_launcher_profiles_and_takes_an_inductor_mode(tmp_path):
    out = tmp_path / "bench.json"
    args = [*TINY_MODEL_ARGS, "--device", "cpu", "--batch-size", "2", "--warmup", "1", "--steps", "2", "--no-baseline",
            "--compile", "blocks", "--compile-mode", "reduce-overhead", "--compile-tuning", "--residual", "bf16",
            "--profile-steps", "2", "--json", str(out)]
    done = subprocess.run([sys.executable, "launchers/bench.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["compile"] == "blocks" and report["compile_mode"] == "reduce-overhead"
    assert report["compile_tuning"] and report["residual"] == "bf16"
    assert "| blocks (reduce-overhead), tuned |" in done.stdout
    assert "| none, bf16 residual |" in done.stdout
    assert report["profile"]["steps"] == 2 and report["profile"]["top"]
    assert "| category | ms/step | share |" in done.stdout


def test_launcher_sync_free_and_graphed_steps_need_the_fused_optimizer(tmp_path):
    out = tmp_path / "bench.json"
    base = [*TINY_MODEL_ARGS, "--device", "cpu", "--batch-size", "2", "--steps", "2", "--no-baseline"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}

    def bench(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "launchers/bench.py", *base, *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env=env)

    refused = bench("--warmup", "1", "--sync-free")
    assert refused.returncode != 0 and "--sync-free and --cuda-graph need --set optim.fused_ema=true" in refused.stderr
    done = bench("--warmup", "1", "--sync-free", "--set", "optim.fused_ema=true", "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["sync_free"] is True and report["cuda_graph"] is False and len(report["step_s_all"]) == 2
    refused = bench("--warmup", "2", "--cuda-graph", "--set", "optim.fused_ema=true")
    assert refused.returncode != 0 and "--cuda-graph needs --warmup 3 or more" in refused.stderr
    # With our delayed FP8, whose casts are Triton kernels (interpreted here) after their start-up check.
    done = bench("--warmup", "3", "--cuda-graph", "--set", "optim.fused_ema=true", "--fp8", "delayed", "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["cuda_graph"] is True and "| none, step graph | no | delayed |" in done.stdout
    assert report["fp8_casts"] == "triton" and "configured: FP8 casts by triton" in done.stdout


def test_trainer_benchmark_times_both_loops_through_the_loader(tmp_path):
    out = tmp_path / "trainer.json"
    args = [*TINY_MODEL_ARGS, "--set", "train.device=cpu", "--batch-size", "4", "--warmup", "1", "--steps", "3",
            "--samples", "24", "--work-dir", str(tmp_path / "work"), "--profile-steps", "2", "--json", str(out)]
    done = subprocess.run([sys.executable, "launchers/bench_trainer.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert (report["engine"], report["world_size"], report["global_batch"], report["fused_ema"]) == ("local", 1, 4, True)
    assert [(r["async_metrics"], r["steps"]) for r in report["runs"]] == [(False, 3), (True, 3)]
    assert all(r["images_per_s"] > 0 and r["host_syncs_per_step"] is None for r in report["runs"])  # CPU
    assert report["async_speedup"] == pytest.approx(report["runs"][1]["images_per_s"] / report["runs"][0]["images_per_s"])
    assert len(list((tmp_path / "work" / "shards").glob("*.safetensors"))) == 2
    assert "| async metrics |" in done.stdout
    assert "profile" not in report["runs"][0] and report["runs"][1]["profile"]["steps"] == 2  # the async loop's
    assert "profile over 2 step(s)" in done.stdout


def test_trainer_benchmark_times_one_loop_on_a_resident_batch(tmp_path, monkeypatch):
    # Without the loader (one batch kept on the device, as bench.py trains) the loop must not
    # read the shards again after its first batch.
    from sfd_scale.bench import bench_config
    from sfd_scale.data.loader import LatentShardDataset
    from sfd_scale.trainer_bench import run_trainer_benchmark

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = bench_config(None, TINY_MODEL_ARGS[1::2] + [f"train.device={device}", "optim.fused_ema=true"])
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # before the fused kernel's module is first imported
    reads = []
    gather = LatentShardDataset.gather_into
    monkeypatch.setattr(LatentShardDataset, "gather_into", lambda self, *a: reads.append(1) or gather(self, *a))
    report = run_trainer_benchmark(cfg, rank_batch=4, warmup_steps=1, steps=3, samples=24, work_dir=tmp_path,
                                   loops="async", resident_batch=True)
    assert [r["async_metrics"] for r in report["runs"]] == [True] and report["async_speedup"] is None
    assert report["resident_batch"] is True and report["runs"][0]["images_per_s"] > 0
    assert len(reads) <= 1 + 2  # the first batch, and at most the loader's read-ahead (prefetch 2)
    with pytest.raises(ValueError, match="loops='fast'"):
        run_trainer_benchmark(cfg, 4, 1, 3, 24, tmp_path, loops="fast")
    graphed = bench_config(None, TINY_MODEL_ARGS[1::2] + [f"train.device={device}", "optim.fused_ema=true",
                                                          "train.cuda_graph=true"])
    with pytest.raises(ValueError, match="captures the async-metrics step only"):
        run_trainer_benchmark(graphed, 4, 1, 3, 24, tmp_path, loops="both")
    report = run_trainer_benchmark(graphed, rank_batch=4, warmup_steps=3, steps=3, samples=24, work_dir=tmp_path,
                                   loops="async")
    assert report["cuda_graph"] is True and report["runs"][0]["images_per_s"] > 0


def test_trainer_benchmark_reads_the_peak_of_the_timed_window_from_the_log(tmp_path):
    # Logging resets CUDA's peak counter after each row, so after the loop the counter holds only
    # what is still allocated; the window's peak is in the loop's last row.
    from sfd_scale.trainer_bench import _logged_peak_gib

    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "mem_device_peak_gib": 31.5}\n'
                                            '{"step": 25, "mem_device_peak_gib": 29.25}\n')
    assert _logged_peak_gib(tmp_path) == 29.25


@pytest.mark.distributed
@pytest.mark.parametrize("engine, loops", [("fsdp2", [False, True]), ("deepspeed", [False])])
def test_trainer_benchmark_runs_the_configured_engine_on_two_ranks(tmp_path, engine, loops):
    from dist_worker import launch

    out = tmp_path / "trainer.json"
    args = [*TINY_MODEL_ARGS, "--set", "train.device=cpu", "--set", f"parallel.engine={engine}",
            "--batch-size", "2", "--warmup", "1", "--steps", "2", "--samples", "24",
            "--work-dir", str(tmp_path / "work"), "--json", str(out)]
    logs = launch(2, args, tmp_path / "logs", script=ROOT / "launchers" / "bench_trainer.py",
                  env={"TRITON_INTERPRET": "1"}, timeout=300)
    report = json.loads(out.read_text())
    assert (report["engine"], report["world_size"], report["global_batch"]) == (engine, 2, 4)
    assert [r["async_metrics"] for r in report["runs"]] == loops
    assert "| synchronous |" in logs[0] and "| synchronous |" not in logs[1]  # rank 0 reports


def test_fp8_kernel_benchmark_times_each_cast_and_the_large_ones_on_every_tile(tmp_path):
    out = tmp_path / "fp8_kernels.json"
    done = subprocess.run([sys.executable, "launchers/bench_fp8_kernels.py", "--tokens", "64", "--dim", "32", "--hidden",
                           "32", "--repeats", "1", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert all(r["us"] > 0 and r["bytes"] > 0 for r in rows)
    tiles = {kind: [r["kernel"] for r in rows if r["kernel"].startswith(kind)]
             for kind in ("cast gradient qkv", "swiglu activation", "swiglu gradient")}
    launched = ("64x64 4 warps", "64x64 4 warps", "64x32 8 warps")   # each kernel's tile as a step launches it
    assert all(len(t) > 1 and t[0].endswith(f"tile {first}") for t, first in zip(tiles.values(), launched))
    assert len(rows) == sum(map(len, tiles.values())) + 4   # three weight and gradient casts, the transpose
    assert {r["bytes"] for r in rows if r["kernel"] in tiles["swiglu gradient"]} == {64 * 32 * 10}  # bf16 in, FP8 out
    assert "| swiglu gradient cast, tile 64x32 8 warps |" in done.stdout
    assert "| cast gradient qkv (+ bias sums), tile 64x64 8 warps, 8 row blocks, 3 stages |" in done.stdout
    # The fastest tile of each compared kernel, in the form SFD_FP8_TILES takes (fp8_cast_kernel.parse_tiles).
    report = json.loads(out.read_text())
    fastest = {op: min((r for r in rows if r["compares"] == op), key=lambda r: r["us"])["tile"]
               for op in ("cast_transpose", "swiglu_cast", "swiglu_backward_cast")}
    assert report["fastest_tiles"] == fastest
    spec = ",".join(f"{op}={tile}" for op, tile in fastest.items())
    assert f"fastest: SFD_FP8_TILES={spec}" in done.stdout
    assert {r["tile"] for r in rows if r["compares"] == "swiglu_backward_cast"} >= {"64x32x8", "64x32x8x4x3"}
