"""Semantic VAE stage on the engines (sfd_scale/train/semvae_stage.py, launchers/train_semvae.py).

2 ranks of ddp, fsdp2 and DeepSpeed ZeRO-3 (2 micro-batches of 2 rows per rank and step) against
one process on the same global batch of 8 (one micro-batch), exact resume, the written weights,
the global batch order, the generalised FSDP units, and configuration errors.

Tolerance for "same as one process" (fp32 on CPU; DINOv2 runs on 2-row instead of 8-row batches
and gradients are summed in another order): losses within 1e-5 relative; weights within rtol
1e-5 / atol 1e-5. Adam divides each gradient by its own running scale, so an element whose
gradient is near float noise moves by noise-driven fractions of a step (lr 3e-3): measured 2e-6
(1/1500 of a step) on one element; wrong data or noise rows move weights by whole steps. The
attention key bias is left out (see `without_key_bias`). A resume on the same engine and world
size must be bit-identical.

The multi-process part is ONE 2-rank launch (this file run as a script through
tests/dist_worker.launch): for each engine it trains STEPS steps (checkpoint at CKPT_STEP), then
resumes a copy of the CKPT_STEP checkpoint in a fresh run folder and trains to STEPS again; the
last run goes through the launcher's main(), as torchrun would start it.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fixtures, dist_worker (also as a script)

from dist_worker import REPO  # noqa: E402

STEPS = 4
CKPT_STEP = 2
GLOBAL_BATCH = 8
NUM_IMAGES = 12      # batch 8 over 12 images: step 2 spans two epochs' permutations
ENGINES = ("ddp", "fsdp2", "deepspeed")
LOSS_RTOL = 1e-5
TOL = dict(rtol=1e-5, atol=1e-5)
EXTENSIONS_DIR = os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/sfd_torch_extensions")

DINO = dict(embed_dim=16, depth=1, num_heads=2, patch_size=4, num_register_tokens=1, pos_grid=4, input_size=16)
SEMVAE = dict(feat_dim=16, latent_channels=4, width=32, depth=2, num_heads=2, grid=4, kl_weight=1e-2, cos_weight=0.5)


def stage_dict(work: Path, engine: str, name: str) -> dict:
    """A tiny stage config; ZeRO-3 reads a JSON with persistence off, so every parameter is
    really partitioned."""
    parallel = {"engine": engine, "grad_accum_steps": 2 if engine != "local" else 1, "backend": "gloo"}
    if engine == "deepspeed":
        ds = json.loads((REPO / "configs/deepspeed/zero3.json").read_text())
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        (work / "zero3_test.json").write_text(json.dumps(ds))
        parallel.update(zero_stage=3, deepspeed_config=str(work / "zero3_test.json"))
    return {
        "image_dir": str(work / "images"), "image_size": 16,
        "output": str(work / name / "semvae.safetensors"), "run_dir": str(work / name),
        "encoders": {"dino_checkpoint": str(work / "dino.safetensors"), "dino": DINO, "semvae": SEMVAE},
        "training": {"steps": STEPS, "batch_size": GLOBAL_BATCH, "lr": 3e-3, "seed": 0},
        # Clipping at 0.5 is active on most steps; an EMA of 0.5 differs from the weights.
        "run": {"max_grad_norm": 0.5, "ema_decay": 0.5, "precision": "fp32", "device": "cpu", "log_every": 1,
                "ckpt_every": CKPT_STEP, "keep_last": 2, "wandb": "disabled", "decode_workers": 0},
        "parallel": parallel,
    }


def stage_config(work: Path, engine: str, name: str):
    from sfd_scale.config import SemVAETrainConfig, from_dict

    return from_dict(SemVAETrainConfig, stage_dict(work, engine, name), "test stage config")


def plain_semvae():
    from sfd_scale.models.semantic_vae import SemanticVAE, SemanticVAEConfig

    return SemanticVAE(SemanticVAEConfig(**SEMVAE))


# ----------------------------------------------------------------------------------------------
# Worker (run as a script by dist_worker.launch)
# ----------------------------------------------------------------------------------------------
def _worker_main(work: Path) -> None:
    import deepspeed.ops
    import torch.distributed as dist

    from sfd_scale.config import SemVAETrainConfig, load_config
    from sfd_scale.logging import get_logger
    from sfd_scale.parallel.factory import build_engine
    from sfd_scale.train.semvae_stage import SemVAEObjective, engine_sections, process_layout, train_semvae

    # Only DeepSpeed's inference path uses its CPU shared-memory all-reduce: skip its JIT build.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    torch.set_num_threads(1)
    get_logger()
    launcher = load_launcher()
    for engine in ("fsdp2", "deepspeed"):  # ema_model() of a fresh sharded engine: the start weights
        cfg = load_config(work / f"{engine}.yaml", cls=SemVAETrainConfig)
        dims = process_layout(cfg)
        torch.manual_seed(cfg.training.seed)
        ema = build_engine(engine_sections(cfg), dims, torch.device("cpu"), plain_model=plain_semvae,
                           build=lambda: SemVAEObjective(cfg.encoders.semvae)).ema_model()
        if dims.is_main:
            torch.save({"type": type(ema).__name__, "state": ema.state_dict()}, work / f"{engine}_ema_model.pt")
    for engine in ENGINES:
        config = work / f"{engine}.yaml"
        cfg = load_config(config, cls=SemVAETrainConfig)
        dims = process_layout(cfg)
        train_semvae(cfg, dims)
        # Resume the CKPT_STEP checkpoint in a fresh run folder: a fresh engine starts from the
        # step-0 weights without optimizer state, so only a complete load can match the straight run.
        resumed = work / f"{engine}_resumed"
        if dims.is_main:
            shutil.copytree(work / engine / "checkpoints" / f"step-{CKPT_STEP:08d}",
                            resumed / "checkpoints" / f"step-{CKPT_STEP:08d}")
        dist.barrier()
        overrides = [f"run_dir={resumed}", f"output={resumed / 'semvae.safetensors'}", "run.resume=must"]
        if engine == ENGINES[-1]:  # the last run: the launcher itself (it ends the process group)
            launcher.main(["--config", str(config), *[a for o in overrides for a in ("--set", o)]])
        else:
            train_semvae(load_config(config, overrides, cls=SemVAETrainConfig), dims)


def load_launcher():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_semvae_launcher", REPO / "launchers/train_semvae.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _main() -> None:
    from dist_worker import run_and_exit

    run_and_exit(lambda: _worker_main(Path(sys.argv[1])))


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------
def write_workspace(work: Path) -> Path:
    """NUM_IMAGES small PNGs in two class folders and tiny DINOv2 weights."""
    import numpy as np
    from PIL import Image

    from sfd_scale.models.dinov2 import DinoConfig, DinoViT
    from sfd_scale.models.weights import save_weights

    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        folder = work / "images" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(20 + i % 3, 18, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
    torch.manual_seed(1)
    save_weights(work / "dino.safetensors", DinoViT(DinoConfig(**DINO)).state_dict())
    return work


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return write_workspace(tmp_path_factory.mktemp("semvae"))


@pytest.fixture(scope="module")
def reference(work):
    """One process, local engine, whole global batch in one micro-batch."""
    from sfd_scale.parallel.dims import ParallelDims
    from sfd_scale.train.semvae_stage import train_semvae

    train_semvae(stage_config(work, "local", "local"), ParallelDims())
    return run_results(work / "local")


@pytest.fixture(scope="module")
def runs(work):
    """Every engine straight and resumed on 2 ranks; returns the workspace."""
    pytest.importorskip("deepspeed")
    from dist_worker import launch

    for engine in ENGINES:
        (work / f"{engine}.yaml").write_text(yaml.safe_dump(stage_dict(work, engine, engine)))
    env = {"TORCH_EXTENSIONS_DIR": EXTENSIONS_DIR, "WANDB_MODE": "disabled"}
    launch(2, [str(work)], work / "logs", timeout=240, script=Path(__file__), env=env)
    return work


def run_results(run_dir: Path) -> dict:
    """Per-step losses, the written weights, and (model, EMA) consolidated from the last checkpoint."""
    from safetensors.torch import load_file

    from dist_worker import read_losses
    from sfd_scale.parallel.factory import read_consolidated
    from sfd_scale.train.checkpoint import CheckpointStore

    store = CheckpointStore(run_dir / "checkpoints")
    step = store.latest_step()
    store.verify(step)  # DeepSpeed's reader unpickles: verified folders only
    folder = store.step_dir(step)
    meta = json.loads((folder / "meta.json").read_text())
    model, ema = read_consolidated(folder, meta["layout"], plain_semvae)
    return {"losses": read_losses(run_dir), "output": load_file(run_dir / "semvae.safetensors"),
            "model": model, "ema": ema, "step": step, "meta": meta}


def without_key_bias(name: str, t: torch.Tensor) -> torch.Tensor:
    """`t` less the attention key bias. Adding a constant to every logit of a query leaves the
    softmax unchanged, so that bias has zero gradient in exact arithmetic: its float gradient is
    rounding noise (~1e-9), which Adam scales up to full-size steps, different for every
    summation order. The query and value biases are compared."""
    if not name.endswith("attn.qkv.bias"):
        return t
    width = t.shape[0] // 3
    return torch.cat([t[:width], t[2 * width:]])


def assert_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for k in want:
        torch.testing.assert_close(without_key_bias(k, got[k]), without_key_bias(k, want[k]), **TOL,
                                   msg=lambda m: f"{what} {k}: {m}")


# ----------------------------------------------------------------------------------------------
# Multi-process tests
# ----------------------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.parametrize("engine", ENGINES)
def test_two_ranks_match_one_process_on_the_same_global_batch(runs, reference, engine):
    got = run_results(runs / engine)
    assert got["step"] == STEPS and got["meta"]["world_size"] == 2
    assert got["meta"]["engine"] == {"ddp": "DDPEngine", "fsdp2": "FSDP2Engine", "deepspeed": "DeepSpeedEngine"}[engine]
    assert set(got["losses"]) == set(reference["losses"]) == set(range(1, STEPS + 1))
    for step, loss in reference["losses"].items():
        assert got["losses"][step] == pytest.approx(loss, rel=LOSS_RTOL), f"step {step}"
    for entry in ("model", "ema", "output"):
        assert_close(got[entry], reference[entry], f"{engine} {entry}")
    # Training moved the weights, and the EMA (decay 0.5) differs from them: the checks above
    # compare trajectories, and the output is the EMA.
    torch.manual_seed(0)
    start = plain_semvae().state_dict()
    assert (reference["model"]["decoder.out_proj.weight"] - start["decoder.out_proj.weight"]).abs().max() > 1e-3
    assert not torch.allclose(reference["ema"]["decoder.out_proj.weight"], reference["model"]["decoder.out_proj.weight"])


@pytest.mark.distributed
@pytest.mark.parametrize("engine", ENGINES)
def test_resume_mid_run_is_exact(runs, engine):
    straight, resumed = run_results(runs / engine), run_results(runs / f"{engine}_resumed")
    assert set(resumed["losses"]) == set(range(CKPT_STEP + 1, STEPS + 1))
    for step, loss in resumed["losses"].items():
        assert loss == straight["losses"][step], f"step {step}"
    for entry in ("model", "ema", "output"):
        assert resumed[entry].keys() == straight[entry].keys()
        for k in straight[entry]:
            assert torch.equal(resumed[entry][k], straight[entry][k]), f"{engine} {entry}.{k}"


@pytest.mark.distributed
@pytest.mark.parametrize("engine", ENGINES)
def test_written_weights_are_the_ema_and_load_into_a_fresh_semvae(runs, engine):
    from sfd_scale.models.semantic_vae import SemanticVAEConfig, load_semantic_vae

    got = run_results(runs / engine)
    semvae = load_semantic_vae(runs / engine / "semvae.safetensors", SemanticVAEConfig(**SEMVAE))
    state = semvae.state_dict()
    assert state.keys() == got["ema"].keys()
    for k, v in state.items():
        assert torch.equal(v, got["ema"][k]), k
    feats = torch.randn(2, SEMVAE["feat_dim"], SEMVAE["grid"], SEMVAE["grid"])
    assert semvae.encode(feats).mode().shape == (2, SEMVAE["latent_channels"], SEMVAE["grid"], SEMVAE["grid"])


@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed"])
def test_sharded_engines_gather_their_ema_into_a_plain_semvae(runs, engine):
    saved = torch.load(runs / f"{engine}_ema_model.pt", weights_only=True)
    assert saved["type"] == "SemanticVAE"
    torch.manual_seed(0)  # the stage's seed: a fresh engine's EMA is the start weights
    want = plain_semvae().state_dict()
    assert saved["state"].keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(saved["state"][k], v), k


# ----------------------------------------------------------------------------------------------
# Single-process tests
# ----------------------------------------------------------------------------------------------
def test_global_batches_cover_every_image_once_per_epoch_and_ranks_split_them():
    from sfd_scale.train.semvae_stage import GlobalBatchOrder

    order = GlobalBatchOrder(num_samples=12, batch_size=8, seed=3)
    stream = torch.cat([order.rows(step) for step in range(6)])  # 48 rows = 4 epochs
    for epoch in range(4):
        assert sorted(stream[12 * epoch:12 * (epoch + 1)].tolist()) == list(range(12))
    assert not torch.equal(stream[:12], stream[12:24])  # each epoch has its own permutation
    fresh = GlobalBatchOrder(num_samples=12, batch_size=8, seed=3)
    assert torch.equal(fresh.rows(4), order.rows(4))  # a function of the step: resume needs no state
    assert not torch.equal(GlobalBatchOrder(12, 8, seed=4).rows(0), order.rows(0))


def test_each_rank_decodes_its_disjoint_block_of_the_global_batch(work):
    from sfd_scale.data.images import ImageFolderIndex, load_image_pm1
    from sfd_scale.train.semvae_stage import GlobalBatchOrder, RankImages

    index = ImageFolderIndex.scan(work / "images")
    order = GlobalBatchOrder(len(index), GLOBAL_BATCH, seed=0)
    ranks = [RankImages(index, order, 16, rank, 2, workers=0) for rank in range(2)]
    try:
        for step in (0, 1, 1, 3):  # a repeated step (not prefetched) and a skipped one
            whole = [index.samples[int(i)][0] for i in order.rows(step)]
            assert ranks[0].paths(step) + ranks[1].paths(step) == whole
            images = ranks[1](step)
            want = torch.stack([load_image_pm1(p, 16) for p in whole[4:]])
            assert torch.equal(images, want)
    finally:
        for r in ranks:
            r.close()


def test_objective_is_the_semvae_loss_with_the_noise_passed_in():
    from sfd_scale.models.semantic_vae import SemanticVAEConfig, semantic_vae_loss
    from sfd_scale.train.semvae_stage import SemVAEObjective

    torch.manual_seed(0)
    model = SemVAEObjective(SemanticVAEConfig(**SEMVAE))
    feats = torch.randn(3, SEMVAE["feat_dim"], SEMVAE["grid"], SEMVAE["grid"])
    noise = torch.randn(3, SEMVAE["latent_channels"], SEMVAE["grid"], SEMVAE["grid"],
                        generator=torch.Generator().manual_seed(7))
    plain = plain_semvae()
    plain.load_state_dict(model.state_dict(), strict=True)  # same keys: its weights load into a SemanticVAE
    got = model(feats, noise)
    want = semantic_vae_loss(plain, feats, generator=torch.Generator().manual_seed(7))
    assert got.keys() == want.keys() == {"loss", "mse", "cos", "kl"}
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_fsdp_units_are_the_repeated_blocks_of_any_model():
    from fixtures import tiny_sfd_config
    from sfd_scale.models.lightningdit import build_model
    from sfd_scale.parallel.fsdp import repeated_blocks

    semvae = plain_semvae()
    assert repeated_blocks(semvae) == [*semvae.encoder.blocks, *semvae.decoder.blocks]
    dit = build_model(tiny_sfd_config(Path("unused")).model)
    assert repeated_blocks(dit) == list(dit.blocks)
    assert repeated_blocks(torch.nn.Linear(2, 2)) == []  # sharded as one unit, the root


TP_REFUSED = r"tensor_parallel=2: the Semantic VAE is small and trains with data parallelism only"


@pytest.mark.parametrize("section, value, match", [
    ("parallel", {"tensor_parallel": 2}, TP_REFUSED),
    ("parallel", {"activation_checkpointing": "full"}, r"activation_checkpointing='full'"),
    ("training", {"batch_size": 6}, r"training.batch_size=6 is not divisible by dp 1 x "
                                    r"parallel.grad_accum_steps 4 = 4"),
])
def test_configuration_errors_name_the_key(work, section, value, match):
    from sfd_scale.config import SemVAETrainConfig, from_dict
    from sfd_scale.parallel.dims import ParallelDims
    from sfd_scale.train.semvae_stage import train_semvae

    data = stage_dict(work, "local", "errors")
    data["parallel"]["grad_accum_steps"] = 4
    data[section].update(value)
    with pytest.raises(ValueError, match=match):
        train_semvae(from_dict(SemVAETrainConfig, data, "test"), ParallelDims())
    assert not (work / "errors").exists()  # refused before anything was built or written


def test_launch_with_tensor_parallel_is_refused_before_reading_the_launcher_environment(work, monkeypatch):
    from sfd_scale.config import SemVAETrainConfig, from_dict
    from sfd_scale.train.semvae_stage import process_layout

    data = stage_dict(work, "ddp", "errors")
    data["parallel"]["tensor_parallel"] = 2
    for key, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=TP_REFUSED):
        process_layout(from_dict(SemVAETrainConfig, data, "test"))


def test_resume_refuses_another_architecture(work, reference):
    from sfd_scale.config import SemVAETrainConfig, from_dict
    from sfd_scale.parallel.dims import ParallelDims
    from sfd_scale.train.semvae_stage import train_semvae

    data = stage_dict(work, "local", "local")
    data["encoders"]["semvae"] = {**SEMVAE, "width": 16}
    with pytest.raises(ValueError, match="another architecture"):
        train_semvae(from_dict(SemVAETrainConfig, data, "test"), ParallelDims())


if __name__ == "__main__":
    _main()
