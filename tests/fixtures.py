"""Small shared builders for tests: latent shard folders and tiny run configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sfd_scale.config import SFDConfig, from_dict
from sfd_scale.data.shards import RunningStats, shard_name, write_shard, write_stats

TINY = dict(c_tex=4, c_sem=2, c_dino=8, hw=4, num_classes=5)
TINY_MODEL_ARGS = ["--set", "model.size=custom", "--set", "model.depth=2", "--set", "model.hidden_size=32",
                   "--set", "model.num_heads=2", "--set", "model.input_size=4", "--set", "model.in_channels=6",
                   "--set", "model.semantic_channels=2", "--set", "model.num_classes=5",
                   "--set", "model.repa_projector_dim=16", "--set", "model.repa_feature_dim=8"]
"""Launcher arguments for a 0.1 M-parameter LightningDiT on 4x4 latents (benchmarks, CPU)."""


def write_latent_folder(root: Path, n: int = 40, shard_size: int = 16, seed: int = 0,
                        c_tex: int = TINY["c_tex"], c_sem: int = TINY["c_sem"],
                        c_dino: int = TINY["c_dino"], hw: int = TINY["hw"],
                        num_classes: int = TINY["num_classes"]) -> Path:
    """Random reference-layout shards with class-dependent means, plus exact stats files."""
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    labels = torch.arange(n) % num_classes
    tex = torch.randn(n, c_tex, hw, hw, generator=g) + labels.view(-1, 1, 1, 1)
    sem = torch.randn(n, c_sem, hw, hw, generator=g) - labels.view(-1, 1, 1, 1)
    dino = torch.randn(n, c_dino, hw, hw, generator=g).half()
    for k, start in enumerate(range(0, n, shard_size)):
        s = slice(start, start + shard_size)
        write_shard(root / shard_name(0, k), {
            "latents": tex[s], "latents_flip": tex[s].flip(-1),
            "latents_sv": sem[s], "latents_sv_flip": sem[s].flip(-1),
            "feats_dino": dino[s], "feats_dino_flip": dino[s].flip(-1),
            "labels": labels[s].to(torch.int64)})
    for key, x in (("latents", tex), ("latents_sv", sem)):
        stats = RunningStats(x.shape[1])
        stats.update(x)
        write_stats(root, key, stats.mean.float(), stats.std().float())
    return root


def tiny_sfd_config(data_dir: Path, **sections) -> SFDConfig:
    """A LightningDiT of a few thousand parameters over write_latent_folder's layout."""
    data = {
        "model": dict(size="custom", depth=2, hidden_size=32, num_heads=2,
                      input_size=TINY["hw"], in_channels=TINY["c_tex"] + TINY["c_sem"],
                      semantic_channels=TINY["c_sem"], num_classes=TINY["num_classes"],
                      repa_depth=1, repa_projector_dim=16, repa_feature_dim=TINY["c_dino"]),
        "data": {"data_dir": str(data_dir)},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": dict(max_steps=6, global_batch_size=8, log_every=2, ckpt_every=3, keep_last=2,
                      ema_decay=0.9),
        "logging": {"wandb": "disabled", "progress_bar": False},
        "sample": {"solver": "euler", "num_steps": 5},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return from_dict(SFDConfig, data, "tiny test config")


class HostReads(TorchDispatchMode):
    """Records every value read back to the host (`.item()`, `bool(t)`, a 0-d tensor taken as a Python
    scalar): aten._local_scalar_dense, which on CUDA makes the host wait for the GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True, scope="module")
def triton_interpreter_without_gpu():
    """On a machine without CUDA, the tests of a module that imports this fixture run Triton kernels in Triton's interpreter.
    The variable is read when a kernel module is imported and again when a kernel runs, so it is
    set for that module's tests only (and kernel modules are imported inside them)."""
    with pytest.MonkeyPatch.context() as patch:
        if not torch.cuda.is_available():
            patch.setenv("TRITON_INTERPRET", "1")
        yield


def hopper_ptx(monkeypatch: pytest.MonkeyPatch, module, kernel: str, signature: dict[str, str],
               constexprs: dict, attrs: dict | None = None, helpers: tuple[str, ...] = (), warps: int = 4) -> str:
    """PTX of `module.kernel` compiled for sm_90 with `warps` warps a program; Triton emits it
    without a GPU. The kernel and the jit `helpers` it calls are rebuilt as compilable functions,
    also where the module was imported under Triton's interpreter."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    # Triton's code generator imports Gluon, which refuses to wrap the interpreted helpers of
    # `triton.language` outside interpreter mode: import it while the mode is still on.
    with pytest.MonkeyPatch.context() as interpreting:
        interpreting.setenv("TRITON_INTERPRET", "1")
        import triton.compiler.code_generator  # noqa: F401
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for name in (kernel, *helpers):
        jitted = getattr(module, name)
        monkeypatch.setattr(module, name, JITFunction(getattr(jitted, "fn", jitted)))
    source = ASTSource(fn=getattr(module, kernel), signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
