"""Sampling at scale: global chunks, per-index determinism, 1 vs 2 ranks, resume, guidance wiring."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fixtures import tiny_sfd_config, write_latent_folder
from sfd_scale.config import SFDConfig, to_dict
from sfd_scale.eval.generate import generate_latents, load_model_for_sampling
from sfd_scale.eval.metrics import iter_npz_images
from sfd_scale.eval.sample_run import (PartStore, SamplePlan, build_image_fn, guide_model_config,
                                       run_rank, sample_images, sample_labels, sampling_settings)
from sfd_scale.models.lightningdit import build_model
from sfd_scale.models.texture_vae import AutoencoderKL, TextureVAEConfig
from sfd_scale.models.weights import save_weights
from sfd_scale.parallel.dims import ParallelDims
from sfd_scale.parallel.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
N = 7          # images per run in these tests
CHUNK = 2      # sample.batch_size: chunks [0,2) [2,4) [4,6) [6,7)


def random_model_weights(cfg: SFDConfig, path: Path, seed: int) -> Path:
    """A tiny LightningDiT whose zero-initialised (adaLN-Zero) layers are filled with noise, so
    its velocity depends on input, time and label."""
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return save_weights(path, model.state_dict())


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    data = write_latent_folder(root / "latents")
    vae_cfg = TextureVAEConfig(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
                               z_channels=4, embed_dim=4, resolution=8)
    torch.manual_seed(0)
    save_weights(root / "vae.safetensors", AutoencoderKL(vae_cfg).state_dict())
    cfg = tiny_sfd_config(data, sample={"batch_size": CHUNK, "num_steps": 4, "seed": 3},
                          encoders={"texture_vae_checkpoint": str(root / "vae.safetensors"),
                                    "texture_vae": to_dict(vae_cfg)})
    checkpoint = random_model_weights(cfg, root / "model.safetensors", seed=1)
    config_path = root / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(to_dict(cfg)))
    return cfg, checkpoint, config_path


def draw(cfg: SFDConfig, checkpoint: Path, out: Path, rank: int = 0, world_size: int = 1,
         generate=None, num_images: int = N) -> PartStore:
    plan = SamplePlan(num_images, cfg.sample.batch_size)
    labels = sample_labels(num_images, cfg.model.num_classes, True, cfg.sample.seed)
    store = PartStore(out)
    store.prepare(sampling_settings(cfg, checkpoint, plan, "fp32"))
    generate = generate or build_image_fn(cfg, checkpoint, CPU)
    run_rank(generate, plan, labels, store, rank, world_size)
    return store


def assembled(cfg: SFDConfig, store: PartStore, num_images: int = N) -> dict[str, np.ndarray]:
    plan = SamplePlan(num_images, cfg.sample.batch_size)
    labels = sample_labels(num_images, cfg.model.num_classes, True, cfg.sample.seed)
    with np.load(store.assemble(plan, labels)) as data:
        return {k: data[k] for k in data.files}


class Recorder:
    """Wraps an image function, recording the chunks it draws; optionally dies on call k."""

    def __init__(self, generate, die_on_call: int | None = None) -> None:
        self.generate, self.die_on_call, self.chunks = generate, die_on_call, []

    def __call__(self, indices, labels):
        if self.die_on_call is not None and len(self.chunks) + 1 == self.die_on_call:
            raise KeyboardInterrupt("simulated kill")
        self.chunks.append((int(indices[0]), int(indices[-1]) + 1))
        return self.generate(indices, labels)


# ----------------------------------------------------------------------------------------------
def test_plan_cuts_global_chunks_and_deals_them_round_robin():
    plan = SamplePlan(10, 4)
    assert plan.chunks() == [(0, 4), (4, 8), (8, 10)]
    assert plan.rank_chunks(0, 2) == [(0, 4), (8, 10)]
    assert plan.rank_chunks(1, 2) == [(4, 8)]
    assert plan.rank_chunks(3, 4) == []
    with pytest.raises(ValueError, match="batch_size"):
        SamplePlan(10, 0)


def test_labels_are_balanced_or_seeded():
    assert sample_labels(12, 5, True, 0).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 0, 1]
    random = sample_labels(50, 5, False, 7)
    assert torch.equal(random, sample_labels(50, 5, False, 7))
    assert not torch.equal(random, sample_labels(50, 5, False, 8))
    assert random.min() >= 0 and random.max() < 5


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_a_sample_depends_on_its_index_not_its_batch(run_setup, solver):
    cfg, checkpoint, _ = run_setup
    sample_cfg = replace(cfg.sample, solver=solver)
    model = load_model_for_sampling(checkpoint, cfg.model)
    labels = sample_labels(6, cfg.model.num_classes, True, 0)
    index = torch.arange(6)
    together = generate_latents(model, labels, index, sample_cfg, cfg.diffusion)
    parts = [generate_latents(model, labels[i], index[i], sample_cfg, cfg.diffusion)
             for i in ([4, 1], [0, 2, 3, 5])]
    torch.testing.assert_close(parts[0], together[[4, 1]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts[1], together[[0, 2, 3, 5]], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(together[0], together[1])


def test_one_and_two_ranks_write_identical_samples(run_setup, tmp_path):
    cfg, checkpoint, _ = run_setup
    one = assembled(cfg, draw(cfg, checkpoint, tmp_path / "one"))
    generate = build_image_fn(cfg, checkpoint, CPU)
    ranks = [Recorder(generate), Recorder(generate)]
    for rank, recorder in enumerate(ranks):
        store = draw(cfg, checkpoint, tmp_path / "two", rank, 2, generate=recorder)
    assert ranks[0].chunks == [(0, 2), (4, 6)] and ranks[1].chunks == [(2, 4), (6, 7)]
    two = assembled(cfg, store)
    assert one["arr_0"].shape == (N, 8, 8, 3) and one["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(one["arr_0"], two["arr_0"])
    assert one["labels"].tolist() == two["labels"].tolist() == [0, 1, 2, 3, 4, 0, 1]
    # ADM's evaluator streams arr_0 from the zip member: our streamed file must allow that.
    streamed = np.concatenate(list(iter_npz_images(tmp_path / "one" / "samples.npz", 3)))
    np.testing.assert_array_equal(streamed, one["arr_0"])


def test_two_processes_match_one_process(run_setup, tmp_path):
    cfg, checkpoint, config_path = run_setup
    expected = sample_images(cfg, checkpoint, tmp_path / "single", num_images=N,
                             dims=ParallelDims())
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "launchers/sample.py", "--config", str(config_path),
             "--checkpoint", str(checkpoint), "--out", str(tmp_path / "pair"),
             "--num-images", str(N)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-2000:]
        errors.append(err)
    assert "drew 7 images on 2 rank(s)" in errors[0]
    with np.load(expected) as one, np.load(tmp_path / "pair" / "samples.npz") as two:
        np.testing.assert_array_equal(one["arr_0"], two["arr_0"])
        np.testing.assert_array_equal(one["labels"], two["labels"])
    assert (tmp_path / "single" / "grid.png").is_file()


def test_resume_after_a_kill_redraws_only_unfinished_chunks(run_setup, tmp_path):
    cfg, checkpoint, _ = run_setup
    generate = build_image_fn(cfg, checkpoint, CPU)
    reference = assembled(cfg, draw(cfg, checkpoint, tmp_path / "straight"))

    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        draw(cfg, checkpoint, out, generate=Recorder(generate, die_on_call=3))
    store = PartStore(out)
    assert store.path(0, 2).is_file() and store.path(2, 4).is_file()
    assert not store.path(4, 6).exists()
    # A torn part (e.g. a copy cut short) must be redrawn; a whole one must be left alone.
    torn = store.path(2, 4)
    torn.write_bytes(torn.read_bytes()[:100])
    kept_mtime = store.path(0, 2).stat().st_mtime_ns

    again = Recorder(generate)
    draw(cfg, checkpoint, out, generate=again)
    assert again.chunks == [(2, 4), (4, 6), (6, 7)]
    assert store.path(0, 2).stat().st_mtime_ns == kept_mtime
    np.testing.assert_array_equal(assembled(cfg, store)["arr_0"], reference["arr_0"])
    # A third run has nothing left to draw.
    idle = Recorder(generate)
    draw(cfg, checkpoint, out, generate=idle)
    assert idle.chunks == []


def test_parts_of_other_settings_are_not_mixed_in(run_setup, tmp_path):
    cfg, checkpoint, _ = run_setup
    plan = SamplePlan(N, CHUNK)
    store = PartStore(tmp_path)
    store.prepare(sampling_settings(cfg, checkpoint, plan, "fp32"))
    store.prepare(sampling_settings(cfg, checkpoint, plan, "fp32"))    # same settings: fine
    fast = replace(cfg, model=replace(cfg.model, compile="blocks", compile_tuning=True, fp8="rowwise"))
    store.prepare(sampling_settings(fast, checkpoint, plan, "fp32"))   # fast paths: sampling uses none
    other = replace(cfg, sample=replace(cfg.sample, cfg_scale=2.0))
    with pytest.raises(ValueError, match="differing: sample"):
        store.prepare(sampling_settings(other, checkpoint, plan, "fp32"))
    with pytest.raises(RuntimeError, match="not finished"):
        store.assemble(plan, sample_labels(N, 5, True, 0))


def test_png_files_hold_the_same_images(run_setup, tmp_path):
    cfg, checkpoint, _ = run_setup
    plan = SamplePlan(3, CHUNK)
    labels = sample_labels(3, cfg.model.num_classes, True, 0)
    store = PartStore(tmp_path)
    store.prepare({})
    run_rank(build_image_fn(cfg, checkpoint, CPU), plan, labels, store, save_png=True)
    with np.load(store.assemble(plan, labels)) as data:
        images = data["arr_0"]
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "images" / f"{i:06d}.png")),
                                      images[i])


def test_guidance_settings_reach_the_images(run_setup, tmp_path):
    cfg, checkpoint, _ = run_setup
    guide_path = random_model_weights(cfg, tmp_path / "guide.safetensors", seed=2)
    guide_yaml = tmp_path / "guide.yaml"
    guide_yaml.write_text(yaml.safe_dump({"model": to_dict(cfg.model), "data": {"data_dir": "???"}}))
    assert guide_model_config(guide_yaml) == cfg.model
    assert guide_model_config(ROOT / "configs" / "autoguidance_b.yaml").size == "B"

    index, labels = torch.arange(3), torch.tensor([0, 1, 2])
    settings = {
        "plain": cfg.sample,
        "cfg": replace(cfg.sample, cfg_scale=3.0),
        "cfg_texture_only": replace(cfg.sample, cfg_scale=3.0, cfg_scale_sem=1.0),
        "autoguidance": replace(cfg.sample, cfg_scale=3.0, autoguidance_ckpt=str(guide_path),
                                autoguidance_config=str(guide_yaml)),
    }
    images = {name: build_image_fn(replace(cfg, sample=s), checkpoint, CPU)(index, labels)
              for name, s in settings.items()}
    names = list(images)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not np.array_equal(images[a], images[b]), (a, b)
    again = build_image_fn(replace(cfg, sample=settings["autoguidance"]), checkpoint, CPU)
    np.testing.assert_array_equal(again(index, labels), images["autoguidance"])
