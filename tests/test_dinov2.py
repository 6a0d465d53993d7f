"""DINOv2 ViT with registers and the REPA-style DinoFeatureEncoder."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sfd_scale.models.dinov2 import (
    DinoConfig,
    DinoFeatureEncoder,
    DinoViT,
    SelfAttention,
    load_dinov2,
)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def tiny_cfg(**overrides) -> DinoConfig:
    # Same patch / grid / register logic as ViT-B/14-reg, tiny width and depth.
    fields = dict(embed_dim=32, depth=2, num_heads=2, patch_size=14, num_register_tokens=4,
                  mlp_ratio=2.0, pos_grid=37, input_size=224)
    fields.update(overrides)
    return DinoConfig(**fields)


def tiny_vit(seed: int = 0, **overrides) -> DinoViT:
    torch.manual_seed(seed)
    return DinoViT(tiny_cfg(**overrides)).eval()


def hub_vitb14_reg_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of dinov2_vitb14_reg4_pretrain.pth (torch.hub layout, block_chunks=0)."""
    d, hidden = 768, 3072
    shapes = {
        "cls_token": (1, 1, d),
        "register_tokens": (1, 4, d),
        "pos_embed": (1, 1 + 37 * 37, d),
        "mask_token": (1, d),
        "patch_embed.proj.weight": (d, 3, 14, 14),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    for i in range(12):
        block = {
            "norm1.weight": (d,), "norm1.bias": (d,),
            "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
            "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
            "ls1.gamma": (d,),
            "norm2.weight": (d,), "norm2.bias": (d,),
            "mlp.fc1.weight": (hidden, d), "mlp.fc1.bias": (hidden,),
            "mlp.fc2.weight": (d, hidden), "mlp.fc2.bias": (d,),
            "ls2.gamma": (d,),
        }
        shapes.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return shapes


def test_vitb14_reg_matches_hub_checkpoint_layout():
    model = DinoViT(DinoConfig())
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == hub_vitb14_reg_shapes()
    assert sum(p.numel() for p in model.parameters()) == 86_583_552


def test_encoder_output_shape_for_256_images():
    encoder = DinoFeatureEncoder(tiny_vit(), input_size=224)
    images = torch.rand(2, 3, 256, 256) * 2 - 1
    feats = encoder(images)
    assert feats.shape == (2, 32, 16, 16)
    assert encoder.grid == 16 and encoder.feat_dim == 32
    assert not any(p.requires_grad for p in encoder.parameters())


def test_encoder_follows_repa_preprocessing_and_drops_cls_and_registers():
    vit = tiny_vit()
    encoder = DinoFeatureEncoder(vit, input_size=224)
    images = torch.rand(2, 3, 256, 256) * 2 - 1
    # REPA: uint8 / 255 -> ImageNet normalize -> bicubic to 224 -> x_norm_patchtokens.
    x = ((images + 1) / 2 - IMAGENET_MEAN) / IMAGENET_STD
    x = F.interpolate(x, size=(224, 224), mode="bicubic")
    tokens = vit.forward_features(x)
    assert tokens.shape == (2, 1 + 4 + 256, 32)
    expected = tokens[:, 5:].transpose(1, 2).reshape(2, 32, 16, 16)
    torch.testing.assert_close(encoder(images), expected)
    # The final LayerNorm is applied: each patch token has ~zero mean over channels.
    assert encoder(images).mean(dim=1).abs().max() < 1e-4


def test_feature_map_layout_is_row_major():
    # Without blocks, a patch's output depends on that patch alone: a change to patch (row 2,
    # col 5) of the 224 image must show up only at feats[:, :, 2, 5].
    encoder = DinoFeatureEncoder(tiny_vit(depth=0), input_size=224)
    images = torch.rand(1, 3, 224, 224) * 2 - 1
    changed = images.clone()
    changed[:, :, 2 * 14:3 * 14, 5 * 14:6 * 14] = -images[:, :, 2 * 14:3 * 14, 5 * 14:6 * 14]
    diff = (encoder(changed) - encoder(images)).abs().sum(dim=(0, 1))
    assert diff[2, 5] > 1e-3
    diff[2, 5] = 0
    assert diff.max() < 1e-5


def test_pos_embed_interpolation():
    vit = tiny_vit()
    same = vit.interpolated_pos_embed(37, 37)
    assert same is vit.pos_embed
    resized = vit.interpolated_pos_embed(16, 16)
    assert resized.shape == (1, 1 + 256, 32)
    torch.testing.assert_close(resized[:, 0], vit.pos_embed[:, 0])  # cls position is kept
    assert vit.interpolated_pos_embed(16, 12).shape == (1, 1 + 16 * 12, 32)
    # Bicubic weights sum to one: a constant field stays constant; antialiasing smooths noise.
    with torch.no_grad():
        vit.pos_embed[:, 1:] = 0.75
    torch.testing.assert_close(vit.interpolated_pos_embed(16, 16)[:, 1:], torch.full((1, 256, 32), 0.75))
    identity_grid = tiny_vit(pos_grid=16)
    assert identity_grid.interpolated_pos_embed(16, 16) is identity_grid.pos_embed


def test_self_attention_matches_explicit_multi_head_softmax():
    torch.manual_seed(0)
    attn = SelfAttention(8, num_heads=2)
    x = torch.randn(3, 5, 8)
    q, k, v = attn.qkv(x).split(8, dim=-1)
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        weights = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(4), dim=-1)
        heads.append(weights @ v[..., sl])
    torch.testing.assert_close(attn(x), attn.proj(torch.cat(heads, dim=-1)), atol=1e-6, rtol=1e-5)


def test_load_round_trip(tmp_path: Path):
    source = tiny_vit(seed=3)
    with torch.no_grad():
        for block in source.blocks:
            block.ls1.gamma.uniform_(0.1, 2.0)  # non-default values must survive the round trip
    path = tmp_path / "tiny_dino.pth"
    torch.save(source.state_dict(), path)
    loaded = load_dinov2(path, tiny_cfg())
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    images = torch.rand(1, 3, 256, 256) * 2 - 1
    torch.testing.assert_close(DinoFeatureEncoder(loaded)(images), DinoFeatureEncoder(source)(images))


def test_load_rejects_register_free_checkpoint(tmp_path: Path):
    path = tmp_path / "no_registers.pth"
    torch.save(tiny_vit(num_register_tokens=0).state_dict(), path)
    with pytest.raises(ValueError, match=r"(?s)no_registers\.pth.*missing keys: register_tokens"):
        load_dinov2(path, tiny_cfg())


def test_missing_file_names_hub_file_and_url(tmp_path: Path):
    path = tmp_path / "dino.pth"
    with pytest.raises(FileNotFoundError) as info:
        load_dinov2(path)
    message = str(info.value)
    assert str(path) in message
    assert "dinov2_vitb14_reg4_pretrain.pth" in message
    assert "dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth" in message


def test_config_validation():
    with pytest.raises(ValueError, match="not a multiple of patch_size=14"):
        DinoConfig(input_size=256)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        DinoConfig(embed_dim=100, num_heads=12)
    with pytest.raises(ValueError, match=r"expects images \(B, 3, H, W\)"):
        DinoFeatureEncoder(tiny_vit())(torch.zeros(1, 1, 256, 256))
