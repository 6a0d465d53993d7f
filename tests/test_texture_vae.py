"""Texture VAE (LDM AutoencoderKL) and the shared checkpoint reader in sfd_scale.models.weights."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from sfd_scale.models.texture_vae import (
    AttnBlock,
    AutoencoderKL,
    DiagonalGaussian,
    Downsample,
    TextureVAEConfig,
    load_texture_vae,
    texture_vae_loss,
)
from sfd_scale.models.weights import load_strict, read_state_dict


def tiny_cfg() -> TextureVAEConfig:
    # Two levels -> f = 2; attention sits at the 16 x 16 level of a 32 x 32 image.
    return TextureVAEConfig(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16],
                            z_channels=4, embed_dim=4, resolution=32)


def tiny_model(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(tiny_cfg())


# ---------------------------------------------------------------- architecture and key names


def conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout


def resnet(cin: int, cout: int) -> int:
    shortcut = conv(cin, cout, 1) if cin != cout else 0
    return 2 * cin + conv(cin, cout, 3) + 2 * cout + conv(cout, cout, 3) + shortcut


def attn(c: int) -> int:
    return 2 * c + 4 * conv(c, c, 1)


def ldm_param_count(ch=128, mult=(1, 1, 2, 2, 4), blocks=2, z=32, embed=32, attn_levels=(4,)) -> int:
    """Parameter count of the LDM AutoencoderKL, tallied layer by layer from its definition."""
    widths = [ch * m for m in mult]
    enc = conv(3, ch, 3)
    cin = ch
    for i, w in enumerate(widths):
        for b in range(blocks):
            enc += resnet(cin if b == 0 else w, w) + (attn(w) if i in attn_levels else 0)
        cin = w
        enc += conv(w, w, 3) if i < len(widths) - 1 else 0
    top = widths[-1]
    enc += 2 * resnet(top, top) + attn(top) + 2 * top + conv(top, 2 * z, 3)
    dec = conv(z, top, 3) + 2 * resnet(top, top) + attn(top)
    cin = top
    for i in reversed(range(len(widths))):
        w = widths[i]
        for b in range(blocks + 1):
            dec += resnet(cin if b == 0 else w, w) + (attn(w) if i in attn_levels else 0)
        cin = w
        dec += conv(w, w, 3) if i > 0 else 0
    dec += 2 * widths[0] + conv(widths[0], 3, 3)
    return enc + dec + conv(2 * z, 2 * embed, 1) + conv(embed, z, 1)


def test_f16d32_has_ldm_key_names_and_param_count():
    model = AutoencoderKL(TextureVAEConfig())
    state = model.state_dict()
    expected_shapes = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.0.norm1.weight": (128,),
        "encoder.down.0.block.1.conv2.weight": (128, 128, 3, 3),
        "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.4.block.0.nin_shortcut.weight": (512, 256, 1, 1),
        "encoder.down.4.attn.1.proj_out.weight": (512, 512, 1, 1),
        "encoder.mid.block_1.norm1.bias": (512,),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.norm.weight": (512,),
        "encoder.mid.block_2.conv2.bias": (512,),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (64, 512, 3, 3),
        "quant_conv.weight": (64, 64, 1, 1),
        "post_quant_conv.weight": (32, 32, 1, 1),
        "decoder.conv_in.weight": (512, 32, 3, 3),
        "decoder.mid.attn_1.v.bias": (512,),
        "decoder.up.4.block.2.conv1.weight": (512, 512, 3, 3),
        "decoder.up.4.attn.2.k.weight": (512, 512, 1, 1),
        "decoder.up.4.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.1.upsample.conv.weight": (128, 128, 3, 3),
        "decoder.up.0.block.2.norm2.weight": (128,),
        "decoder.norm_out.bias": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    # Levels without resampling or attention have no such keys (LDM layout).
    assert not any(k.startswith("encoder.down.4.downsample") for k in state)
    assert not any(k.startswith("decoder.up.0.upsample") for k in state)
    assert not any(".attn." in k for k in state if k.startswith(("encoder.down.3", "decoder.up.3")))
    assert not any("temb" in k for k in state)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == ldm_param_count()
    assert 69e6 < n_params < 71e6  # VA-VAE f16d32 is ~70 M parameters


def test_tiny_config_shapes_and_downsample_factor():
    model = tiny_model()
    assert model.downsample_factor == 2
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    posterior = model.encode(images)
    assert posterior.mean.shape == (2, 4, 16, 16)
    assert posterior.sample().shape == (2, 4, 16, 16)
    assert model.decode(posterior.mode()).shape == (2, 3, 32, 32)
    assert TextureVAEConfig(ch_mult=[1, 2, 2]).downsample_factor == 4
    with pytest.raises(ValueError, match="not divisible by the downsample factor 2"):
        model.encode(torch.zeros(1, 3, 31, 32))


def test_config_rejects_group_norm_incompatible_width():
    with pytest.raises(ValueError, match="multiples of 32"):
        TextureVAEConfig(ch=48, ch_mult=[1, 2])


def test_attention_matches_explicit_single_head_softmax():
    torch.manual_seed(0)
    block = AttnBlock(32)
    x = torch.randn(2, 32, 4, 5)
    h = block.norm(x)
    q = block.q(h).flatten(2)  # (B, C, N)
    k = block.k(h).flatten(2)
    v = block.v(h).flatten(2)
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(32), dim=-1)
    attended = torch.einsum("bij,bcj->bci", weights, v).reshape(2, 32, 4, 5)
    expected = x + block.proj_out(attended)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_downsample_pads_only_bottom_right():
    torch.manual_seed(0)
    down = Downsample(32)
    x = torch.randn(1, 32, 8, 8)
    y = down(x)
    assert y.shape == (1, 32, 4, 4)
    # Output pixel (0, 0) sees input rows/cols 0..2: no padding on the top/left.
    expected = (down.conv.weight * x[:, :, 0:3, 0:3]).sum(dim=(1, 2, 3)) + down.conv.bias
    torch.testing.assert_close(y[0, :, 0, 0], expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- posterior


def test_diagonal_gaussian_kl_sample_and_clamp():
    mean = torch.full((2, 3, 2, 2), 1.0)
    logvar = torch.full((2, 3, 2, 2), math.log(4.0))
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    # Per element 0.5 * (mu^2 + var - 1 - logvar) = 0.5 * (1 + 4 - 1 - ln 4); 12 elements per sample.
    expected = 12 * 0.5 * (4.0 - math.log(4.0))
    torch.testing.assert_close(posterior.kl(), torch.tensor([expected, expected]))
    torch.testing.assert_close(posterior.mode(), mean)
    a = posterior.sample(torch.Generator().manual_seed(3))
    b = posterior.sample(torch.Generator().manual_seed(3))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, mean + 2.0 * noise)
    clamped = DiagonalGaussian(torch.cat([mean, torch.full_like(mean, 100.0)], dim=1))
    assert torch.all(clamped.logvar == 20.0)


# ---------------------------------------------------------------- loading


def ldm_checkpoint(model: AutoencoderKL, prefix: str = "") -> dict:
    state = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    state[prefix + "loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    state[prefix + "loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(4, 3, 3, 3)
    state[prefix + "loss.logvar"] = torch.zeros(())
    return {"state_dict": state, "global_step": 10, "epoch": 1}


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_load_ldm_training_checkpoint_round_trip(tmp_path: Path):
    source = tiny_model(seed=1)
    path = tmp_path / "vae.ckpt"
    torch.save(ldm_checkpoint(source), path)
    loaded = load_texture_vae(path, tiny_cfg())
    assert not loaded.training
    assert_same_weights(source, loaded)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(loaded.encode(images).mode()),
                                   source.eval().decode(source.encode(images).mode()))


def test_load_first_stage_prefix_and_safetensors(tmp_path: Path):
    source = tiny_model(seed=2)
    path = tmp_path / "ldm.ckpt"
    checkpoint = ldm_checkpoint(source, prefix="first_stage_model.")
    checkpoint["state_dict"]["model.diffusion_model.out.weight"] = torch.zeros(2)
    torch.save(checkpoint, path)
    assert_same_weights(source, load_texture_vae(path, tiny_cfg()))
    st_path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(st_path))
    assert_same_weights(source, load_texture_vae(st_path, tiny_cfg()))


def test_load_rejects_wrong_architecture_and_unknown_keys(tmp_path: Path):
    source = tiny_model()
    path = tmp_path / "vae.pt"
    checkpoint = ldm_checkpoint(source)
    checkpoint["state_dict"]["encoder.extra.weight"] = torch.zeros(1)
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"(?s)vae\.pt.*1 unexpected keys: encoder\.extra\.weight"):
        load_texture_vae(path, tiny_cfg())
    torch.save(ldm_checkpoint(source), path)
    wider = TextureVAEConfig(ch=64, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, embed_dim=4,
                             resolution=32)
    with pytest.raises(ValueError, match=r"shape mismatches: encoder\.conv_in\.weight: file \(32, 3, 3, 3\)"):
        load_texture_vae(path, wider)


def test_missing_file_names_path_and_source(tmp_path: Path):
    path = tmp_path / "nowhere" / "vavae.pt"
    with pytest.raises(FileNotFoundError) as info:
        load_texture_vae(path)
    message = str(info.value)
    assert str(path) in message
    assert "hustvl/vavae-imagenet256-f16d32-dinov2" in message and "SFD-Project/SFD" in message


# ---------------------------------------------------------------- training objective


def test_texture_vae_loss_terms_and_optimisation():
    torch.manual_seed(0)
    model = tiny_model()
    # Smooth structured images: sums of low-frequency sinusoids, in [-1, 1].
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    phases = torch.rand(4, 3, 1, 1) * 6.28
    images = 0.5 * torch.sin(6.28 * xx + phases) + 0.4 * torch.cos(6.28 * yy - phases)

    terms = texture_vae_loss(model, images, kl_weight=1e-3, generator=torch.Generator().manual_seed(5))
    recon, posterior = model(images, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(terms["l1"], (recon - images).abs().mean())
    torch.testing.assert_close(terms["mse"], F.mse_loss(recon, images))
    torch.testing.assert_close(terms["kl"], posterior.kl().mean())
    torch.testing.assert_close(terms["loss"], terms["l1"] + terms["mse"] + 1e-3 * terms["kl"])

    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = None
    for step in range(40):
        loss = texture_vae_loss(model, images, 1e-3, torch.Generator().manual_seed(step))["loss"]
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = texture_vae_loss(model, images, 1e-3, torch.Generator().manual_seed(0))["loss"].item()
    assert final < 0.5 * first


# ---------------------------------------------------------------- weights.read_state_dict / load_strict


def test_read_state_dict_prefers_in_given_order_and_strips_module_prefix(tmp_path: Path):
    ema = {"module.w": torch.ones(2)}
    raw = {"module.w": torch.zeros(2)}
    path = tmp_path / "ckpt.pt"
    torch.save({"model": raw, "ema": ema, "opt": {"state": {}}, "step": 3}, path)
    assert torch.equal(read_state_dict(path, "x", "y")["w"], torch.ones(2))
    assert torch.equal(read_state_dict(path, "x", "y", prefer=("model", "ema"))["w"], torch.zeros(2))
    torch.save({"_orig_mod.a": torch.ones(1), "_orig_mod.b": torch.ones(1)}, path)
    assert set(read_state_dict(path, "x", "y")) == {"a", "b"}


def test_read_state_dict_refuses_pickled_objects_and_corrupt_files(tmp_path: Path):
    pickled = tmp_path / "objects.pth"
    torch.save({"w": torch.ones(1), "optimizer": nn.Linear(1, 1)}, pickled)
    with pytest.raises(ValueError, match=r"objects\.pth.*not a plain tensor checkpoint.*unpickled blindly"):
        read_state_dict(pickled, "x", "y")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(pickled.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"broken\.pt"):
        read_state_dict(broken, "x", "y")
    bad_st = tmp_path / "broken.safetensors"
    bad_st.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"broken\.safetensors.*corrupt"):
        read_state_dict(bad_st, "x", "y")
    with pytest.raises(ValueError, match="unsupported checkpoint extension '.npz'"):
        (tmp_path / "w.npz").write_bytes(b"")
        read_state_dict(tmp_path / "w.npz", "x", "y")
    mixed = tmp_path / "mixed.pt"
    torch.save({"w": torch.ones(1), "step": 7}, mixed)
    with pytest.raises(ValueError, match=r"non-tensor entries step"):
        read_state_dict(mixed, "x", "y")


def test_read_state_dict_missing_file_names_what_and_where(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"LightningDiT-XL weights not found at .*xl\.pt.*HF SFD-Project/SFD"):
        read_state_dict(tmp_path / "xl.pt", "LightningDiT-XL", "HF SFD-Project/SFD")


def test_load_strict_lists_at_most_ten_keys():
    module = nn.ModuleDict({f"l{i}": nn.Linear(1, 1) for i in range(12)})
    with pytest.raises(ValueError) as info:
        load_strict(module, {}, source="empty.pt")
    message = str(info.value)
    assert "empty.pt" in message and "24 missing keys" in message and "(14 more)" in message
