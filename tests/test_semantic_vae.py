"""Semantic VAE over DINOv2 patch features."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sfd_scale.models.semantic_vae import (
    SemanticVAE,
    SemanticVAEConfig,
    load_semantic_vae,
    semantic_vae_loss,
    semantic_vae_loss_terms,
)
from sfd_scale.models.texture_vae import DiagonalGaussian


def tiny_cfg(**overrides) -> SemanticVAEConfig:
    fields = dict(feat_dim=24, latent_channels=4, width=32, depth=1, num_heads=2, grid=4)
    fields.update(overrides)
    return SemanticVAEConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> SemanticVAE:
    torch.manual_seed(seed)
    return SemanticVAE(tiny_cfg(**overrides))


def test_default_config_shapes_match_spec():
    cfg = SemanticVAEConfig()
    assert (cfg.feat_dim, cfg.latent_channels, cfg.grid) == (768, 16, 16)
    model = SemanticVAE(SemanticVAEConfig(width=64, depth=1))
    feats = torch.randn(2, 768, 16, 16)
    posterior = model.encode(feats)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 16, 16, 16)
    z = posterior.sample()
    assert z.shape == (2, 16, 16, 16)
    assert model.decode(z).shape == (2, 768, 16, 16)
    assert not any("pos_embed" in k for k in model.state_dict())  # fixed, rebuilt from config


def test_shape_errors_name_expected_shape():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"features \(B, 24, 4, 4\)"):
        model.encode(torch.zeros(1, 23, 4, 4))
    with pytest.raises(ValueError, match="expects a 4 x 4 grid; got 5 x 5"):
        model.encode(torch.zeros(1, 24, 5, 5))
    with pytest.raises(ValueError, match=r"latents \(B, 4, 4, 4\)"):
        model.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        SemanticVAEConfig(width=30, num_heads=4)


def test_loss_terms_match_hand_computation():
    # Two positions, two channels: target tokens (1, 0) and (0, 2); reconstruction (1, 0), (1, 1).
    feats = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])  # (B=1, C=2, h=1, w=2)
    recon = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]]]])
    mean = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1).expand(1, 2, 1, 2)
    logvar = torch.zeros(1, 2, 1, 2)
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    terms = semantic_vae_loss_terms(recon, feats, posterior, cos_weight=0.5, kl_weight=0.1)
    mse = (0 + 1 + 0 + 1) / 4  # squared errors per element
    cos = ((1 - 1.0) + (1 - 2 / (2 * math.sqrt(2)))) / 2  # position 0 identical; position 1 at 45 deg
    kl = 0.5 * 4 * 1.0  # per element 0.5 * (mu^2 + 1 - 1 - 0) with mu^2 = 1, four elements
    torch.testing.assert_close(terms["mse"], torch.tensor(mse))
    torch.testing.assert_close(terms["cos"], torch.tensor(cos))
    torch.testing.assert_close(terms["kl"], torch.tensor(kl))
    torch.testing.assert_close(terms["loss"], torch.tensor(mse + 0.5 * cos + 0.1 * kl))


def test_loss_uses_model_weights_and_sampled_latent():
    model = tiny_model(cos_weight=0.3, kl_weight=0.01)
    feats = torch.randn(2, 24, 4, 4)
    terms = semantic_vae_loss(model, feats, generator=torch.Generator().manual_seed(1))
    posterior = model.encode(feats)
    recon = model.decode(posterior.sample(torch.Generator().manual_seed(1)))
    expected = semantic_vae_loss_terms(recon, feats, posterior, cos_weight=0.3, kl_weight=0.01)
    for key in ("loss", "mse", "cos", "kl"):
        torch.testing.assert_close(terms[key], expected[key])


def test_mode_is_deterministic_and_sampling_follows_generator():
    model = tiny_model().eval()
    feats = torch.randn(2, 24, 4, 4)
    torch.testing.assert_close(model.encode(feats).mode(), model.encode(feats).mode(), rtol=0, atol=0)
    posterior = model.encode(feats)
    a = posterior.sample(torch.Generator().manual_seed(7))
    b = posterior.sample(torch.Generator().manual_seed(7))
    c = posterior.sample(torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_adam_steps_reduce_loss_on_low_rank_features():
    torch.manual_seed(0)
    model = tiny_model()
    # Rank-3 features: every token is a mix of three fixed directions, like redundant DINO channels.
    basis = torch.randn(3, 24)
    mix = torch.randn(8, 16, 3)
    feats = (mix @ basis).transpose(1, 2).reshape(8, 24, 4, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for step in range(60):
        loss = semantic_vae_loss(model, feats, torch.Generator().manual_seed(step))["loss"]
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = semantic_vae_loss(model, feats, torch.Generator().manual_seed(0))
    assert final["loss"].item() < 0.1 * first
    assert final["cos"].item() < 0.1


def test_load_round_trip_prefers_ema_and_checks_architecture(tmp_path: Path):
    trained, averaged = tiny_model(seed=1), tiny_model(seed=2)
    path = tmp_path / "semvae.pt"
    torch.save({"model": trained.state_dict(), "ema": averaged.state_dict(), "step": 100}, path)
    loaded = load_semantic_vae(path, tiny_cfg())
    assert not loaded.training
    feats = torch.randn(1, 24, 4, 4)
    torch.testing.assert_close(loaded.encode(feats).mode(), averaged.encode(feats).mode())
    raw = load_semantic_vae(path, tiny_cfg(), prefer=("model",))
    torch.testing.assert_close(raw.encode(feats).mode(), trained.encode(feats).mode())
    with pytest.raises(ValueError, match=r"(?s)semvae\.pt.*shape mismatches"):
        load_semantic_vae(path, tiny_cfg(width=64))
    with pytest.raises(FileNotFoundError, match=r"Semantic VAE weights not found at .*missing\.pt.*train_semvae"):
        load_semantic_vae(tmp_path / "missing.pt", tiny_cfg())
