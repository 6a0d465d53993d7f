"""Typed configuration: YAML files map onto dataclasses, with dotted command-line overrides.

Every default lives here, once. Unknown keys, missing required keys and wrong types stop with an
error that names the key and the file it came from.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from sfd_scale.models.dinov2 import DinoConfig
from sfd_scale.models.semantic_vae import SemanticVAEConfig
from sfd_scale.models.texture_vae import TextureVAEConfig

MISSING_REQUIRED = "???"  # a str field holding this must be set by the YAML or an override


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and the source."""


# ----------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """LightningDiT backbone with SFD dual-time conditioning and a REPA projector."""

    size: Literal["S", "B", "L", "XL", "XXL", "1p6B", "custom"] = "XXL"
    """Registry name (S/B/L/XL/XXL/1p6B); 'custom' takes depth/hidden_size/num_heads below."""
    depth: int = 0
    """Only for size=custom: number of transformer blocks."""
    hidden_size: int = 0
    """Only for size=custom: token width D."""
    num_heads: int = 0
    """Only for size=custom: attention heads (D must divide evenly)."""
    input_size: int = 16
    """Latent height and width (16 for ImageNet 256 with an f16 VAE)."""
    patch_size: int = 1
    in_channels: int = 48
    """Composite latent channels: texture first, semantic last."""
    semantic_channels: int = 16
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    """Label dropout for classifier-free guidance (the null class is row num_classes)."""
    mlp_ratio: float = 4.0
    repa_depth: int = 2
    """1-based block whose output feeds the REPA projector; 0 disables REPA."""
    repa_projector_dim: int = 2048
    repa_feature_dim: int = 768
    """Width of the REPA target (DINOv2 ViT-B/14: 768)."""
    attention: Literal["auto", "flash3", "flash2", "xformers", "sdpa", "math", "sdpa_flash", "sdpa_cudnn"] = "auto"
    """Attention kernel; 'auto' picks the fastest available at start-up (logged once)."""
    fused_kernels: bool = False
    """Triton kernels for RMSNorm+AdaLN modulate, SwiGLU and 2-D RoPE (GPU; same numbers)."""
    compile: Literal["none", "blocks", "model"] = "none"
    """torch.compile: each block (regional, short compile) or the whole forward."""
    fp8: Literal["none", "tensorwise", "rowwise", "rowwise_with_gw_hp", "delayed"] = "none"
    """FP8 matmuls for the blocks' large linears: a torchao float8 training recipe, or 'delayed',
    ours, whose scales come from the previous steps' amaxes so that compile fuses each cast into the
    kernel producing its tensor (models/fp8_delayed.py; local or ddp engine, no activation
    checkpointing). Ada/Hopper GPUs. Off by default: compare its loss curve with bf16 first
    (launchers/compare_precision.py)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    """Inductor mode of that compile; 'reduce-overhead' replays CUDA graphs (GPU), which takes the
    kernel launches off the CPU at the cost of static input copies."""
    compile_tuning: bool = False
    """Inductor tunes the block sizes of the kernels it generates (coordinate descent, GPU): a longer
    first compile, cached afterwards."""
    residual_precision: Literal["fp32", "bf16"] = "fp32"
    """Dtype of the residual stream between blocks under bf16 autocast in training. 'fp32' is the
    reference's numbers; 'bf16' halves the bytes of the residual and its gradient in every
    elementwise kernel around it (2.2x the output's rounding error, measured on the CPU): compare
    its loss curve first (launchers/compare_precision.py --recipes none bf16_residual)."""


MODEL_FAST_PATH_KEYS = frozenset({"attention", "fused_kernels", "compile", "compile_mode", "compile_tuning", "fp8",
                                  "residual_precision"})
"""`model` settings that change how the network runs, not what its weights mean: a run may resume
with other values (switch compile on, try FP8) and an export loads regardless of them."""


def model_differences(saved: dict[str, Any], cfg: ModelConfig) -> dict[str, tuple[Any, Any]]:
    """{key: (saved, configured)} for every architecture setting of a saved `model` section that
    differs from `cfg`; keys the saved section lacks (written by an older version) count as
    their defaults, and fast-path settings are not compared."""
    mine, defaults = to_dict(cfg), to_dict(ModelConfig())
    return {key: (saved.get(key, defaults[key]), value) for key, value in mine.items()
            if key not in MODEL_FAST_PATH_KEYS and saved.get(key, defaults[key]) != value}


@dataclass
class DiffusionConfig:
    """Flow-matching objective and the asynchronous semantic/texture time schedule."""

    offset: Literal["constant"] = "constant"
    delta_t: float = 0.3
    """How far semantics run ahead of texture."""
    time_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    semantic_weight: float = 2.0
    """MSE weight of the semantic channels."""
    cosine_weight: float = 1.0
    """Weight of the per-pixel cosine velocity loss (0 disables it)."""
    repa_weight: float = 1.0
    repa_mode: Literal["cos", "mse", "cos_mse"] = "cos"


@dataclass
class DataConfig:
    """Latent shards in the reference layout."""

    data_dir: str = MISSING_REQUIRED
    """Folder of *.safetensors shards with latents_stats.pt and latents_sv_stats.pt."""
    latent_norm: bool = True
    latent_sv_norm: bool = True
    latent_multiplier: float = 1.0
    random_flip: bool = True
    """Pick the stored image or its flipped copy at random, as the reference does."""
    read_mode: Literal["mmap", "pread"] = "mmap"
    """mmap: each shard mapped once, rows copied out (fastest); pread: positioned reads, nothing
    mapped (for a low `ulimit -v` or job monitors that count mapped page cache as memory)."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    """Global-norm gradient clipping; 0 disables it."""
    warmup_steps: int = 0
    fused_ema: bool = False
    """Clip scale, AdamW and the EMA in one Triton kernel launch (kernels/adamw_ema.py;
    local, ddp and fsdp2 engines, CUDA), skipping a non-finite step on the device: 26 % faster than
    the three passes on an H100 (docs/benchmarks.md). Off by default: DeepSpeed and tensor
    parallelism, which the cluster configs use, do not take it."""
    bf16_weights: bool = False
    """The module computes with bf16 copies of its linear layers' weights and biases, which the
    fused optimizer writes from its fp32 masters: no per-step cast of the weights in the forward nor
    of their gradients in the backward, with autocast's numbers. Needs optim.fused_ema, the local or
    ddp engine (DDP averages the bf16 gradients in fp32), bf16 precision and one micro-batch per
    step (bf16 gradients would accumulate in bf16)."""


def bf16_compute(precision: str, device_type: str) -> bool:
    """Whether `train.precision` means bf16 compute on this kind of device: 'bf16', or 'auto' on a
    GPU (the SPEC recipe); 'auto' on the CPU is fp32."""
    return precision == "bf16" or (precision == "auto" and device_type == "cuda")


@dataclass
class TrainConfig:
    output_dir: str = "runs"
    exp_name: str = "sfd"
    max_steps: int = 4_000_000
    global_batch_size: int = 256
    seed: int = 0
    ema_decay: float = 0.9999
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 autocast on GPU, fp32 on CPU."""
    device: str = "auto"
    log_every: int = 100
    ckpt_every: int = 80_000
    keep_last: int = 2
    sample_every: int = 0
    """Write a sample grid PNG every this many steps (0: only at the end)."""
    resume: Literal["auto", "never", "must"] = "auto"
    """auto: resume from the latest complete checkpoint if one exists; must: error if none."""
    gc_every: int = 50
    """Python's automatic garbage collection is off during training and its young generations
    are collected every this many steps instead (torchtitan's default), so a collection of the
    long-lived objects never stalls the host mid-step; 0 leaves Python's collector on."""
    async_metrics: bool = False
    """Read each step's loss, gradient norm and skip flag only after the next step is queued, so
    the host never waits for the GPU inside a step (needs optim.fused_ema: the skip of a
    non-finite step then happens on the device). The numbers are the same; the guard judges each
    step one step later, so a rollback also discards the step run meanwhile. Steps that log,
    checkpoint or preview still wait for their own numbers."""
    cuda_graph: bool = False
    """Replay the whole step (forward, loss, backward with DDP's all-reduces, clip, AdamW, EMA) as
    CUDA graphs after eager warm-up steps (2; 11 under DDP) (train/step_graph.py): the host launches
    two graphs per step instead of every kernel. Same numbers. Needs train.async_metrics,
    parallel.engine local or ddp, one micro-batch per step and no model.compile_mode=reduce-overhead
    (graphs do not nest); without CUDA the step runs eagerly on the same fixed input tensors."""


@dataclass
class GuardConfig:
    """Numerical guard (train/guards.py). Non-finite steps are always skipped and counted; these
    settings add rollback and loss-spike detection (the defaults leave both off)."""

    rollback_after: int = 0
    """Consecutive bad steps (non-finite loss or gradient norm, or loss spikes) after which model,
    EMA and optimizer go back to the last good checkpoint; 0 never rolls back."""
    rollback_lr_factor: float = 1.0
    """Learning-rate multiplier applied at each rollback (e.g. 0.5); it compounds."""
    max_rollbacks: int = 3
    """A run that needs more rollbacks than this stops with an error: it needs a person."""
    spike_factor: float = 0.0
    """A loss (averaged over ranks) above spike_factor x the mean of the last spike_window good
    steps is a spike: logged, counted and a bad step (its update is kept); 0 disables detection."""
    spike_window: int = 50
    """Good steps the spike reference averages over; detection starts once the window is full."""

    def __post_init__(self) -> None:
        if self.rollback_after < 0:
            raise ValueError(f"rollback_after={self.rollback_after} must be >= 0 (0: never roll back)")
        if not 0.0 < self.rollback_lr_factor <= 1.0:
            raise ValueError(f"rollback_lr_factor={self.rollback_lr_factor} must lie in (0, 1]")
        if self.max_rollbacks < 1:
            raise ValueError(f"max_rollbacks={self.max_rollbacks} must be >= 1")
        if self.spike_factor != 0.0 and self.spike_factor <= 1.0:
            raise ValueError(f"spike_factor={self.spike_factor} must be 0 (off) or greater than 1")
        if self.spike_window < 1:
            raise ValueError(f"spike_window={self.spike_window} must be >= 1")


@dataclass
class ParallelConfig:
    """Which engine trains the model across processes, and how memory is traded for compute."""

    engine: Literal["local", "ddp", "fsdp2", "deepspeed"] = "local"
    """local: one process; ddp; fsdp2 (fully_shard per block); deepspeed (ZeRO, see zero_stage)."""
    tensor_parallel: int = 1
    """megatron-core tensor parallelism degree (1, 2, 4, 8); data parallel over the other ranks."""
    zero_stage: int = 3
    """DeepSpeed ZeRO stage (1, 2, 3) when engine=deepspeed."""
    deepspeed_config: str = ""
    """Optional DeepSpeed JSON (configs/deepspeed/*.json); empty: generated from this YAML."""
    offload_optimizer: bool = False
    """DeepSpeed: keep optimizer state in CPU memory."""
    offload_params: bool = False
    """DeepSpeed ZeRO-3: keep parameters in CPU memory."""
    activation_checkpointing: Literal["none", "full", "selective", "ops"] = "none"
    """full: recompute every block; selective: every `checkpoint_every`-th block or attention only;
    ops: every block, keeping matmul and attention outputs and recomputing the ops between them."""
    checkpoint_every: int = 2
    """selective checkpointing: recompute every k-th block."""
    checkpoint_attention_only: bool = False
    """selective checkpointing: recompute only the attention of each block."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; global batch = micro batch x dp size x this."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend: auto picks nccl with CUDA, gloo otherwise."""


@dataclass
class SampleConfig:
    solver: Literal["euler", "heun", "dopri5"] = "dopri5"
    num_steps: int = 250
    atol: float = 1e-6
    rtol: float = 1e-3
    cfg_scale: float = 1.0
    cfg_scale_sem: Optional[float] = None
    """Semantic-channel guidance scale (defaults to cfg_scale)."""
    cfg_scale_tex: Optional[float] = None
    """Texture-channel guidance scale (defaults to cfg_scale)."""
    cfg_interval_start: float = 0.0
    """Guidance is off for a channel group while its t is below this."""
    timestep_shift: float = 0.0
    autoguidance_ckpt: str = ""
    """Checkpoint of the small guiding model; empty disables AutoGuidance."""
    autoguidance_config: str = ""
    """YAML of the guiding model (its `model` section is used)."""
    num_images: int = 50_000
    batch_size: int = 64
    balanced_labels: bool = True
    seed: int = 0


@dataclass
class LoggingConfig:
    wandb: Literal["disabled", "offline", "online"] = "offline"
    project: str = "sfd-scale"
    progress_bar: bool = True


@dataclass
class EncodersConfig:
    """The three frozen encoders behind the composite latent, each with its weight file."""

    texture_vae_checkpoint: str = ""
    """LDM AutoencoderKL f16d32 weights (VA-VAE or SD-VAE layout)."""
    texture_vae: TextureVAEConfig = field(default_factory=TextureVAEConfig)
    dino_checkpoint: str = ""
    """DINOv2 ViT-B/14-reg weights in the torch.hub layout (dinov2_vitb14_reg4_pretrain.pth)."""
    dino: DinoConfig = field(default_factory=DinoConfig)
    semvae_checkpoint: str = ""
    """Semantic VAE weights written by launchers/train_semvae.py."""
    semvae: SemanticVAEConfig = field(default_factory=SemanticVAEConfig)


@dataclass
class StageTraining:
    """Optimisation of one small training stage (an encoder of the demo, the Semantic VAE)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


@dataclass
class StageRunConfig:
    """How a stage trained on the engines runs (the Semantic VAE): clipping, EMA, precision,
    checkpoints and logging. Its optimizer is AdamW with the stage's lr and no weight decay."""

    max_grad_norm: float = 1.0
    """Global-norm gradient clipping; 0 disables it."""
    ema_decay: float = 0.0
    """EMA of the weights, which is what the stage writes out; 0 keeps none (the EMA then equals
    the trained weights)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 autocast (and bf16 sharded weights) on GPU, fp32 on CPU."""
    device: str = "auto"
    log_every: int = 100
    ckpt_every: int = 5000
    """Checkpoint every this many steps (0: only at the end)."""
    keep_last: int = 2
    resume: Literal["auto", "never", "must"] = "auto"
    """auto: resume from the latest complete checkpoint in run_dir if one exists; must: error if none."""
    wandb: Literal["disabled", "offline", "online"] = "offline"
    project: str = "sfd-scale"
    decode_workers: int = 8
    """PIL decoding threads per rank; the next step's images are decoded while this one trains."""

    def __post_init__(self) -> None:
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be >= 0 (0: no clipping)")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must lie in [0, 1]")
        if self.log_every < 1:
            raise ValueError(f"log_every={self.log_every} must be >= 1")
        if self.ckpt_every < 0:
            raise ValueError(f"ckpt_every={self.ckpt_every} must be >= 0 (0: only at the end)")
        if self.keep_last < 2:
            raise ValueError(f"keep_last={self.keep_last} must be >= 2 (resume falls back to the previous one)")
        if self.decode_workers < 0:
            raise ValueError(f"decode_workers={self.decode_workers} must be >= 0 (0: decode inline)")


@dataclass
class SFDConfig:
    """One run of SFD training and sampling."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    encoders: EncodersConfig = field(default_factory=EncodersConfig)


@dataclass
class SemVAETrainConfig:
    """Training the Semantic VAE on DINOv2 features of an image folder (launchers/train_semvae.py)."""

    image_dir: str = MISSING_REQUIRED
    """Class-subfolder images (ImageNet train layout)."""
    image_size: int = 256
    output: str = "runs/semvae/semvae.safetensors"
    """Where the trained (EMA) weights are written; point encoders.semvae_checkpoint at it."""
    run_dir: str = "runs/semvae"
    """Checkpoints (run_dir/checkpoints) and metrics (run_dir/metrics.jsonl); a run resumes from here."""
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    training: StageTraining = field(default_factory=lambda: StageTraining(steps=100_000, batch_size=256, lr=1e-4))
    """batch_size is the global batch: every optimizer step, over all ranks."""
    run: StageRunConfig = field(default_factory=StageRunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """engine local|ddp|fsdp2|deepspeed (zero_stage, deepspeed_config, offload_*), grad_accum_steps,
    backend; the Semantic VAE is small, so tensor_parallel and activation_checkpointing are refused."""


@dataclass
class DemoConfig:
    """The CPU demo: every stage of SFD at toy size on scikit-learn's digits."""

    workdir: str = "runs/demo"
    image_size: int = 32
    texture_vae: StageTraining = field(default_factory=StageTraining)
    texture_vae_kl_weight: float = 1e-6
    dino: StageTraining = field(default_factory=StageTraining)
    """The stand-in DINO encoder is trained as a digit classifier so its features carry class."""
    semvae: StageTraining = field(default_factory=StageTraining)
    shard_size: int = 512
    samples_per_class: int = 10
    sfd: SFDConfig = field(default_factory=SFDConfig)


# ----------------------------------------------------------------------------------------------
# Building dataclasses from plain data
# ----------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check (and minimally convert) one value against a field type."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key, source)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{source}: {key} = {value!r} is not one of {list(allowed)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, f"{key}.", source)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            value = _yaml11_float(value)  # YAML 1.1 reads '1e-4' (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: {key} has unsupported type {_type_name(tp)}")


def _yaml11_float(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _build(cls: type, data: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {prefix}{unknown[0]} (valid keys in {prefix or 'the top level'}: "
            f"{', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], prefix + f.name, source)
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a component's own validation (__post_init__)
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{source}: in section {prefix.rstrip('.') or 'top level'}: {exc}") from exc


def from_dict(cls: type, data: dict, source: str = "<dict>") -> Any:
    """Build a config dataclass from nested plain data, rejecting unknown keys and bad types."""
    cfg = _build(cls, data or {}, "", source)
    _check_required(cfg, "", source)
    return cfg


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (YAML/JSON-able) of a config dataclass."""
    return dataclasses.asdict(cfg)


def _check_required(cfg: Any, prefix: str, source: str) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _check_required(value, f"{prefix}{f.name}.", source)
        elif value == MISSING_REQUIRED:
            raise ConfigError(f"{source}: required key {prefix}{f.name} is missing (set it in the YAML "
                              f"or with --set {prefix}{f.name}=...)")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=2e-4' -> (['train', 'lr'], 2e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys in nested plain data (a copy); typing is checked when the dataclass is built."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None, cls: type = SFDConfig) -> Any:
    """Read a YAML file, apply `--set` overrides and build the typed config."""
    data = apply_overrides(load_yaml(path), overrides or [])
    source = str(path) + (" (with --set overrides)" if overrides else "")
    return from_dict(cls, data, source)
