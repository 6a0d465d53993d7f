"""Configuration: YAML -> typed dataclasses, overrides, and errors that name the key and file."""
from pathlib import Path

import pytest

from sfd_scale.config import (ConfigError, DemoConfig, SemVAETrainConfig, SFDConfig, from_dict,
                              load_config, to_dict)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_are_the_spec_values(tmp_path):
    cfg = load_config(write(tmp_path, "data: {data_dir: /x}\n"))
    assert cfg.model.size == "XXL" and cfg.model.in_channels == 48 and cfg.model.semantic_channels == 16
    assert cfg.diffusion.delta_t == 0.3 and cfg.diffusion.semantic_weight == 2.0
    assert cfg.optim.lr == 1e-4 and cfg.optim.beta2 == 0.999 and cfg.optim.weight_decay == 0
    assert cfg.train.ema_decay == 0.9999 and cfg.train.global_batch_size == 256
    assert cfg.model.class_dropout_prob == 0.1 and cfg.model.repa_depth == 2


def test_overrides_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, "data: {data_dir: /x}\n"),
                      ["optim.lr=2e-4", "train.max_steps=10", "sample.cfg_scale_sem=1.5"])
    assert cfg.optim.lr == 2e-4 and cfg.train.max_steps == 10 and cfg.sample.cfg_scale_sem == 1.5


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "data: {data_dir: /x}\noptim: {lr: 1e-4, betta2: 0.9}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key optim\.betta2"):
        load_config(p)


def test_wrong_type_names_key(tmp_path):
    p = write(tmp_path, "data: {data_dir: /x}\ntrain: {max_steps: lots}\n")
    with pytest.raises(ConfigError, match=r"train\.max_steps must be an integer"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"sample\.solver = 'rk4' is not one of"):
        load_config(write(tmp_path, "data: {data_dir: /x}\n"), ["sample.solver=rk4"])


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match=r"required key data\.data_dir is missing"):
        load_config(write(tmp_path, "train: {seed: 1}\n"))


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/config.yaml")


def test_round_trip_through_dict(tmp_path):
    cfg = load_config(write(tmp_path, "data: {data_dir: /x}\n"))
    assert from_dict(SFDConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize("name", ["sfd_xxl.yaml", "sfd_xl.yaml", "autoguidance_b.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name, ["data.data_dir=/data"])
    assert cfg.model.in_channels == cfg.model.semantic_channels + cfg.encoders.texture_vae.embed_dim


def test_demo_config_shapes_fit_together():
    cfg = load_config(CONFIGS / "demo.yaml", cls=DemoConfig)
    enc = cfg.sfd.encoders
    assert cfg.sfd.model.in_channels == enc.texture_vae.embed_dim + enc.semvae.latent_channels
    assert cfg.sfd.model.semantic_channels == enc.semvae.latent_channels
    assert cfg.sfd.model.repa_feature_dim == enc.dino.embed_dim == enc.semvae.feat_dim
    latent = cfg.image_size // 2 ** (len(enc.texture_vae.ch_mult) - 1)
    assert cfg.sfd.model.input_size == latent == enc.dino.input_size // enc.dino.patch_size == enc.semvae.grid


def test_semvae_config_loads():
    cfg = load_config(CONFIGS / "semvae.yaml", ["image_dir=/images", "encoders.dino_checkpoint=/w.pth"],
                      cls=SemVAETrainConfig)
    assert cfg.encoders.semvae.latent_channels == 16 and cfg.encoders.dino.embed_dim == 768


def test_component_validation_errors_name_the_section(tmp_path):
    p = write(tmp_path, "data: {data_dir: /x}\nencoders: {dino: {input_size: 225}}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*encoders\.dino"):
        load_config(p)
