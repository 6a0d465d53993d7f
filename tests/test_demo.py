"""The README's demo pipeline, end to end at a still smaller size (every stage runs for real)."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from sfd_scale.config import DemoConfig, load_config
from sfd_scale.data.shards import list_shards, validate_shard
from sfd_scale.demo import run_demo

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def tiny_demo_config(work: Path) -> DemoConfig:
    overrides = [
        f"workdir={work}", f"sfd.data.data_dir={work}/shards", f"sfd.train.output_dir={work}",
        f"sfd.encoders.texture_vae_checkpoint={work}/tv.safetensors",
        f"sfd.encoders.dino_checkpoint={work}/dino.safetensors",
        f"sfd.encoders.semvae_checkpoint={work}/semvae.safetensors",
        "texture_vae.steps=10", "dino.steps=40", "semvae.steps=10", "samples_per_class=2",
        "sfd.train.max_steps=6", "sfd.train.log_every=3", "sfd.train.ckpt_every=3",
        "sfd.train.global_batch_size=16", "sfd.sample.num_steps=4",
        "sfd.logging.wandb=disabled", "sfd.logging.progress_bar=false",
        "sfd.model.depth=2", "sfd.model.hidden_size=32", "sfd.model.num_heads=2",
        "sfd.model.repa_projector_dim=16",
    ]
    return load_config(CONFIG, overrides, cls=DemoConfig)


def test_demo_pipeline_runs_every_stage(tmp_path):
    cfg = tiny_demo_config(tmp_path)
    result = run_demo(cfg)

    shards = list_shards(tmp_path / "shards")
    assert len(shards) == 4                                 # 1797 digits in shards of 512
    assert sum(validate_shard(s).num_samples for s in shards) == 1797
    assert (tmp_path / "shards" / "latents_stats.pt").is_file()
    grid = Image.open(result.grid_path)
    assert grid.size == (2 * 32, 10 * 32)                    # 2 samples per class, one row per class
    assert (tmp_path / "sfd" / "checkpoints" / "latest").is_file()
    # The stand-in encoder was trained as a classifier for a few steps: its features must already
    # carry class information well above chance (10 %), and so must the semantic latents.
    assert result.dino_probe_accuracy > 0.3
    assert result.semantic_probe_accuracy > 0.2
    assert result.classifier_real_accuracy > 0.9
    assert 0.0 <= result.sample_accuracy <= 1.0
    saved = json.loads((tmp_path / "demo_result.json").read_text())
    assert saved["sample_accuracy"] == result.sample_accuracy

    # A second run reuses every finished stage and continues training from the checkpoint.
    again = run_demo(cfg)
    assert again.dino_probe_accuracy == result.dino_probe_accuracy
