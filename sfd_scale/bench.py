"""Throughput of the full SFD training step on synthetic data (the library behind launchers/bench.py).

One measurement builds the model with the chosen attention backend, activation checkpointing,
Triton kernels and compile setting, wraps it in the single-device engine, warms up, then times
`steps` full training steps: noise draws, forward, SFD loss, backward, gradient clipping, AdamW
and the EMA update, exactly what `Trainer.train_step` runs (minus the data loader: the batch is
synthetic and already on the device). Steps are timed with CUDA events on GPU and perf_counter
on the CPU; the median is reported.

A plain-eager baseline of the same model (SDPA attention, no Triton kernels, no compile, same
checkpointing, precision and optimizer dispatch) is measured in the same run, so every speed-up
is stated against a number taken on the same card minutes apart.

FLOPs are model FLOPs: PyTorch's FlopCounterMode over one forward and backward of the model on
the meta device, with attention counted as PyTorch counts its flash kernel (the backward
recomputes the scores). That is how SPEC section 6's 34.99 TFLOP per XXL step at batch 32 was
counted; recomputation by activation checkpointing is not counted.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import itertools
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from sfd_scale.atomic import atomic_write_bytes
from sfd_scale.config import (MISSING_REQUIRED, ModelConfig, ParallelConfig, SFDConfig, apply_overrides, from_dict,
                              load_yaml)
from sfd_scale.diffusion.loss import BatchPart, SFDLoss
from sfd_scale.models.fast_paths import (
    ATTENTION_NAMES,
    COMPILE_INDUCTOR_MODES,
    COMPILE_MODES,
    FP8_CASTS_ATTR,
    FP8_RECIPES,
    RESIDUAL_PRECISIONS,
    apply_compile,
    apply_fp8,
    apply_fused_kernels,
    apply_residual_precision,
    fp8_unavailable,
    fused_kernels_unavailable,
    mark_step_begin,
    resolve_attention,
)
from sfd_scale.models.layers import Attention
from sfd_scale.models.lightningdit import build_model, count_parameters
from sfd_scale.parallel.checkpointing import apply_activation_checkpointing
from sfd_scale.parallel.dims import check_bf16_weights, check_delayed_fp8
from sfd_scale.parallel.engine import LocalEngine
from sfd_scale.profile_step import count_host_syncs, format_profile, profile_training_step
from sfd_scale.train.gc_schedule import ScheduledGC
from sfd_scale.train.trainer import autocast_for, build_graphed_step, resolve_device, step_inputs

log = logging.getLogger(__name__)

SYNTHETIC_DATA = "<synthetic>"
"""`data.data_dir` of a benchmark config: the batch is made up, no shards are read."""

DATASHEET_BF16_DENSE_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),   # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4),
)
"""Dense bf16 tensor-core peaks (half of NVIDIA's with-sparsity figures); the first name contained
in the device name wins, so the PCIe and NVL cards come before the plain H100 (SXM)."""

GIB = 2 ** 30


@dataclasses.dataclass
class BenchOptions:
    """What one benchmark run measures, besides the model and training config."""

    batch_size: int = 32
    """Images per training step (one micro-batch on one device)."""
    warmup_steps: int = 3
    """Untimed steps first (compilation, autotuning, allocator warm-up)."""
    steps: int = 10
    """Timed steps; the median is reported."""
    attention: str = "auto"
    """Attention backend of the measured run (sfd_scale.models.fast_paths.ATTENTION_NAMES)."""
    compile: str = "none"
    """none | blocks (regional, every block) | model (whole forward)."""
    compile_mode: str = "default"
    """Inductor mode (COMPILE_INDUCTOR_MODES); 'reduce-overhead' replays CUDA graphs."""
    compile_tuning: bool = False
    """Inductor tunes its generated kernels' block sizes (`model.compile_tuning`)."""
    residual: str = "fp32"
    """Residual stream dtype under autocast (`model.residual_precision`)."""
    fused_kernels: bool = False
    """Triton SwiGLU and RoPE kernels (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    fp8: str = "none"
    """torchao float8 recipe for the blocks' large linears (FP8_RECIPES); 'none' is bf16."""
    sync_free: bool = False
    """Steps with no host synchronisation (needs optim.fused_ema): the skip check stays on the
    device. What a trainer reading its metrics a step late would reach."""
    cuda_graph: bool = False
    """The sync-free step captured and replayed as CUDA graphs (`train.cuda_graph`; needs
    optim.fused_ema; the capture happens in the last warm-up step, which needs at least 3)."""
    baseline: bool = True
    """Also measure the plain-eager baseline in the same run."""
    profile_steps: int = 0
    """After timing, run this many more steps of the configured variant under the PyTorch
    profiler and report where the time goes (`sfd_scale.profile_step`); 0: no profile."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.steps < 1 or self.warmup_steps < 0 or self.profile_steps < 0:
            raise ValueError(f"benchmark needs batch_size >= 1, steps >= 1, warmup_steps >= 0 and "
                             f"profile_steps >= 0, got {self.batch_size}, {self.steps}, {self.warmup_steps}, "
                             f"{self.profile_steps}")
        if self.attention not in ATTENTION_NAMES:
            raise ValueError(f"attention {self.attention!r} is unknown (known: {', '.join(ATTENTION_NAMES)})")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile {self.compile!r} is unknown (known: {', '.join(COMPILE_MODES)})")
        if self.fp8 not in FP8_RECIPES:
            raise ValueError(f"fp8 recipe {self.fp8!r} is unknown (known: {', '.join(FP8_RECIPES)})")
        if self.compile_mode not in COMPILE_INDUCTOR_MODES:
            raise ValueError(f"compile mode {self.compile_mode!r} is unknown "
                             f"(known: {', '.join(COMPILE_INDUCTOR_MODES)})")
        if self.residual not in RESIDUAL_PRECISIONS:
            raise ValueError(f"residual precision {self.residual!r} is unknown "
                             f"(known: {', '.join(RESIDUAL_PRECISIONS)})")


@dataclasses.dataclass(frozen=True)
class Variant:
    """The fast-path settings of one measurement."""

    label: str
    attention: str
    compile: str
    fused_kernels: bool
    compile_mode: str = "default"
    fp8: str = "none"
    sync_free: bool = False
    compile_tuning: bool = False
    residual: str = "fp32"
    cuda_graph: bool = False


def bench_config(path: str | Path | None, overrides: list[str]) -> SFDConfig:
    """A run config (YAML and `--set` overrides, or the defaults: XXL) whose data is synthetic."""
    data = apply_overrides(load_yaml(path) if path is not None else {}, overrides)
    section = data.setdefault("data", {})
    if section.get("data_dir", MISSING_REQUIRED) == MISSING_REQUIRED:
        section["data_dir"] = SYNTHETIC_DATA
    source = f"{path or 'defaults'}" + (" (with --set overrides)" if overrides else "")
    return from_dict(SFDConfig, data, source)


def synthetic_batch(cfg: ModelConfig, batch_size: int, device: torch.device, seed: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Composite latents (B, in_channels, H, W), labels (B,) and DINO features (B, C_dino, h, w) on
    the grid of model tokens, shaped as the loader delivers them."""
    g = torch.Generator().manual_seed(seed)
    grid = cfg.input_size // cfg.patch_size
    x = torch.randn(batch_size, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    y = torch.randint(0, cfg.num_classes, (batch_size,), generator=g)
    feats = torch.randn(batch_size, cfg.repa_feature_dim, grid, grid, generator=g)
    return x.to(device), y.to(device), feats.to(device)


def _flash_attention_counted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # On the meta device this only computes shapes; its FLOPs are counted as on a GPU.
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]


def build_model_meta(cfg: ModelConfig) -> torch.nn.Module:
    """The model with shapes only (no memory, no compute), in train mode."""
    with torch.device("meta"):
        return build_model(dataclasses.replace(cfg, attention="math")).train()


def count_step_flops(cfg: ModelConfig, batch_size: int, with_repa: bool) -> int:
    """Model FLOPs of one training forward + backward (see the module docstring), on meta tensors.

    Draws nothing from the global generators (label dropout would), so counting inside a
    resumed run leaves its random stream exactly where the checkpoint put it.
    """
    with torch.random.fork_rng(devices=[]):
        return _count_step_flops(cfg, batch_size, with_repa)


def _count_step_flops(cfg: ModelConfig, batch_size: int, with_repa: bool) -> int:
    model = build_model_meta(cfg)
    with torch.device("meta"):
        x = torch.empty(batch_size, cfg.in_channels, cfg.input_size, cfg.input_size)
        t = torch.empty(batch_size)
        y = torch.zeros(batch_size, dtype=torch.long)
    for module in model.modules():
        if isinstance(module, Attention):
            module.attend = _flash_attention_counted
    with FlopCounterMode(display=False) as counter:
        out = model(x, t, t, y, return_repa=with_repa)
        pred, repa = out if with_repa else (out, None)
        loss = pred.float().square().mean() + (repa.float().square().mean() if with_repa else 0.0)
        loss.backward()
    return counter.get_total_flops()


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """What the matmuls of a step run in, read off the trainer's own autocast policy."""
    with autocast_for(precision, device):
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    return torch.float32


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of `fn` takes on `device`."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_s = time.perf_counter()
    fn()
    return time.perf_counter() - start_s


def matmul_ceiling_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None,
                          repeats: int = 10) -> float:
    """Best measured TFLOP/s of a square matmul: what this device can reach on dense matmuls."""
    n = size or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = min(_timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e12


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def datasheet_peak_tflops(name: str, dtype: torch.dtype) -> float | None:
    """Dense bf16 datasheet peak of a known card; None for any other card or dtype."""
    if dtype != torch.bfloat16:
        return None
    return next((peak for key, peak in DATASHEET_BF16_DENSE_TFLOPS if key in name), None)


StepFn = Callable[[], tuple[dict[str, torch.Tensor], bool | torch.Tensor]]
"""One full training step; returns its loss terms and whether the update was skipped (a device
scalar for sync-free steps)."""


def build_training_step(cfg: SFDConfig, variant: Variant, batches: list[tuple[torch.Tensor, ...]],
                        device: torch.device) -> tuple[LocalEngine, StepFn]:
    """The model with `variant`'s fast paths in a single-device engine, and a function that runs one
    full training step on the next of `batches` (cycling), exactly as `Trainer.train_step` does."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(dataclasses.replace(cfg.model, attention=variant.attention)).train()
    apply_residual_precision(model, variant.residual)
    apply_activation_checkpointing(model, cfg.parallel)
    if cfg.optim.bf16_weights:  # this single-device step is the local engine's, whatever the config says
        check_bf16_weights(dataclasses.replace(cfg, parallel=ParallelConfig()), device.type)
    # The EMA copy is made from the plain model; FP8, kernels and compile go on the trained module only.
    engine = LocalEngine(model, cfg.optim, cfg.train.ema_decay, device)
    apply_fp8(engine.module, variant.fp8, device)
    if variant.fused_kernels:
        apply_fused_kernels(engine.module, device)
    apply_compile(engine.module, variant.compile, inductor_mode=variant.compile_mode,
                  kernel_tuning=variant.compile_tuning)
    loss_fn = SFDLoss(cfg.diffusion, cfg.model.semantic_channels)
    use_feats = cfg.model.repa_depth > 0
    generator = torch.Generator().manual_seed(cfg.train.seed + 1)
    position = itertools.cycle(range(len(batches)))

    if variant.cuda_graph:
        graphed, names = build_graphed_step(engine, loss_fn, cfg.train.precision, device)

        def graphed_step() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
            x, y, feats = batches[next(position)]
            inputs = step_inputs(loss_fn, x, y, feats if use_feats else None, generator, BatchPart(0, x.shape[0]))
            out = graphed(inputs, cfg.optim.lr)  # loss terms, grad norm, skip flag
            return dict(zip(names, out[:len(names)])), out[len(names) + 1]

        return engine, graphed_step

    def step() -> tuple[dict[str, torch.Tensor], bool]:
        x, y, feats = batches[next(position)]
        mark_step_begin(variant.compile_mode)
        engine.zero_grad()
        with autocast_for(cfg.train.precision, device):
            terms = loss_fn(engine.model, x, y, feats if use_feats else None, generator=generator)
        engine.backward(terms["loss"])
        if variant.sync_free:
            skipped = engine.step_on_device(cfg.optim.lr, terms["loss"].detach())[1]
        else:
            skipped = engine.step(cfg.optim.lr, terms["loss"].detach()).skipped
        return {name: value.detach() for name, value in terms.items()}, skipped

    return engine, step


def measure(cfg: SFDConfig, variant: Variant, options: BenchOptions, device: torch.device,
            profile_steps: int = 0) -> dict:
    """Build one variant, warm up, time the full training step (then profile `profile_steps`
    more steps); returns its figures."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batch = synthetic_batch(cfg.model, options.batch_size, device, cfg.train.seed)
    engine, run_step = build_training_step(cfg, variant, [batch], device)
    skipped = 0  # a device scalar for sync-free steps, read once at the end
    collector, steps_run = ScheduledGC(cfg.train.gc_every), 0  # Python's GC as the trainer runs it

    def step(run: StepFn = run_step) -> None:
        nonlocal skipped, steps_run
        skipped = skipped + run()[1]
        steps_run += 1
        collector.after_step(steps_run)

    collector.start()
    try:
        for _ in range(options.warmup_steps):
            step()
        host: list[float] = []  # how long the host takes to issue each timed step (draws, copies, launches)

        def issued(run: Callable[[], None] = step) -> None:
            start = time.perf_counter()
            run()
            host.append(time.perf_counter() - start)

        times = [_timed(issued, device) for _ in range(options.steps)]
        # The same number of steps queued back to back, one wait at the end: how a training loop that
        # never waits inside a step runs (the per-step figure above is how the reference is timed).
        back_to_back = _timed(lambda run=step: [run() for _ in range(options.steps)], device) / options.steps
        peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
        syncs = count_host_syncs(step, device)
        profile = profile_training_step(step, device, profile_steps) if profile_steps else None
    finally:
        collector.stop()
    backend, fp8_casts = engine.module.attention_backend, getattr(engine.module, FP8_CASTS_ATTR, None)
    del engine, run_step, step, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    median = statistics.median(times)
    skipped = int(skipped)
    if skipped:
        log.warning("%s: %d step(s) were skipped as non-finite; their time still counts", variant.label, skipped)
    return {"label": variant.label, "attention": backend, "compile": variant.compile,
            "compile_mode": variant.compile_mode, "compile_tuning": variant.compile_tuning, "fp8": variant.fp8,
            "fp8_casts": fp8_casts,
            "residual": variant.residual, "sync_free": variant.sync_free, "cuda_graph": variant.cuda_graph,
            "fused_kernels": variant.fused_kernels, "images_per_s": options.batch_size / median,
            "step_s_median": median, "step_s_all": times, "host_s_all": host, "host_s_median": statistics.median(host),
            "step_s_back_to_back": back_to_back,
            "images_per_s_back_to_back": options.batch_size / back_to_back, "peak_mem_gib": peak, "host_syncs": syncs,
            **({"profile": profile} if profile is not None else {})}


def _add_rates(result: dict, step_flops: int, ceiling: float, peak: float | None) -> dict:
    tflops = step_flops / result["step_s_median"] / 1e12
    result["tflops_per_s"] = tflops
    result["mfu"] = {"vs_measured_ceiling": tflops / ceiling,
                     "vs_datasheet_peak": None if peak is None else tflops / peak}
    return result


def run_benchmark(cfg: SFDConfig, options: BenchOptions, device: torch.device | None = None,
                  command: str = "") -> dict:
    """Measure the configured step (and the baseline); returns the report `write_report` stores."""
    device = resolve_device(cfg.train.device) if device is None else device
    # Settings that cannot run here fail now, not after the FLOP count and the first build.
    resolve_attention(options.attention)
    reason = fused_kernels_unavailable(device) if options.fused_kernels else None
    if reason is not None:
        raise ValueError(f"--fused-kernels cannot run: {reason}")
    if (options.sync_free or options.cuda_graph) and not cfg.optim.fused_ema:
        raise ValueError("--sync-free and --cuda-graph need --set optim.fused_ema=true (the skip then happens "
                         "inside its kernel)")
    if options.cuda_graph and (options.warmup_steps < 3 or options.compile_mode == "reduce-overhead"):
        raise ValueError(f"--cuda-graph needs --warmup 3 or more (2 eager steps, then the capture; got "
                         f"{options.warmup_steps}) and a --compile-mode other than reduce-overhead (got "
                         f"{options.compile_mode}), whose own graphs cannot be captured")
    # The step below is the local engine's, whatever the config says.
    check_delayed_fp8(options.fp8, dataclasses.replace(cfg.parallel, engine="local"))
    reason = fp8_unavailable(device, options.fp8) if options.fp8 != "none" else None
    if reason is not None:
        raise ValueError(f"--fp8 {options.fp8} cannot run: {reason}")
    dtype = compute_dtype(cfg.train.precision, device)
    name = device_name(device)
    if cfg.parallel.engine != "local":
        log.info("benchmark runs one process on one device; parallel.engine=%s is not used", cfg.parallel.engine)
    with_repa = cfg.model.repa_depth > 0 and cfg.diffusion.repa_weight > 0
    step_flops = count_step_flops(cfg.model, options.batch_size, with_repa)
    ceiling = matmul_ceiling_tflops(device, dtype)
    peak = datasheet_peak_tflops(name, dtype)
    fast = Variant("configured", options.attention, options.compile, options.fused_kernels, options.compile_mode,
                   options.fp8, options.sync_free, options.compile_tuning, options.residual, options.cuda_graph)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "device": name,
        "torch": torch.__version__,
        "model": {"size": cfg.model.size, "parameters": count_parameters(build_model_meta(cfg.model)),
                  "tokens": (cfg.model.input_size // cfg.model.patch_size) ** 2},
        "batch_size": options.batch_size,
        "precision": str(dtype).removeprefix("torch."),
        "activation_checkpointing": cfg.parallel.activation_checkpointing,
        "optim": {"fused_ema": cfg.optim.fused_ema, "bf16_weights": cfg.optim.bf16_weights},
        "warmup_steps": options.warmup_steps,
        "steps": options.steps,
        "step_tflop": step_flops / 1e12,
        "matmul_ceiling_tflops_per_s": ceiling,
        "datasheet_peak_tflops_per_s": peak,
    }
    measured = _add_rates(measure(cfg, fast, options, device, options.profile_steps), step_flops, ceiling, peak)
    report.update(measured)
    if options.baseline:
        plain = Variant("plain eager", "sdpa", "none", False)
        report["baseline"] = _add_rates(measure(cfg, plain, options, device), step_flops, ceiling, peak)
        report["speedup_vs_baseline"] = measured["images_per_s"] / report["baseline"]["images_per_s"]
    return report


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(report: dict) -> str:
    """A plain-text table of the measured run(s) and the shared figures above it."""
    model, peak = report["model"], report["datasheet_peak_tflops_per_s"]
    lines = [f"{report['device']}, torch {report['torch']}, {model['size']} ({model['parameters'] / 1e6:.1f} M), "
             f"batch {report['batch_size']}, {report['precision']}, "
             f"checkpointing {report['activation_checkpointing']}",
             f"step {report['step_tflop']:.4g} TFLOP; matmul ceiling "
             f"{report['matmul_ceiling_tflops_per_s']:.4g} TFLOP/s; datasheet peak {_cell(peak, '.1f')} TFLOP/s",
             "| run | attention | compile | fused | fp8 | s/step | images/s | TFLOP/s | MFU ceiling | MFU peak | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in [report] + ([report["baseline"]] if "baseline" in report else []):
        compile_label = r["compile"] + ("" if r.get("compile_mode", "default") == "default" else f" ({r['compile_mode']})") \
            + (", tuned" if r.get("compile_tuning") else "") + (", step graph" if r.get("cuda_graph") else "")
        precision = r.get("fp8", "none") + ("" if r.get("residual", "fp32") == "fp32" else f", {r['residual']} residual")
        cells = [r["label"], r["attention"], compile_label, "yes" if r["fused_kernels"] else "no", precision,
                 f"{r['step_s_median']:.4g}", f"{r['images_per_s']:.4g}", f"{r['tflops_per_s']:.3g}",
                 _cell(r["mfu"]["vs_measured_ceiling"], ".1%"), _cell(r["mfu"]["vs_datasheet_peak"], ".1%"),
                 _cell(r["peak_mem_gib"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    for r in [report] + ([report["baseline"]] if "baseline" in report else []):
        lines.append(f"{r['label']}: one by one, the host issued a step in {r['host_s_median']:.4g} s (median; "
                     f"steps took {min(r['step_s_all']):.4g}-{max(r['step_s_all']):.4g} s)")
        lines.append(f"{r['label']}: {len(r['step_s_all'])} steps back to back (no wait between them): "
                     f"{r['images_per_s_back_to_back']:.4g} images/s, {r['step_s_back_to_back']:.4g} s/step")
        if r.get("fp8_casts"):
            lines.append(f"{r['label']}: FP8 casts by {r['fp8_casts']}")
        if r.get("host_syncs"):
            lines.append(f"{r['label']}: {r['host_syncs']['count']} host synchronisation(s) per step "
                         + ", ".join(r["host_syncs"]["sites"][:3]))
    if "speedup_vs_baseline" in report:
        lines.append(f"configured / plain eager: {report['speedup_vs_baseline']:.3f}x images/s")
    if "profile" in report:
        lines.append(format_profile(report["profile"]))
    return "\n".join(lines)


def write_report(report: dict, path: str | Path) -> None:
    """The report as JSON (written atomically)."""
    atomic_write_bytes(Path(path), (json.dumps(report, indent=2) + "\n").encode())
