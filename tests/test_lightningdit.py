"""LightningDiT: sizes, reference key names, zero-init, golden outputs of the reference model."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sfd_scale.config import ModelConfig
from sfd_scale.models.layers import Rope2D, attention_math, attention_sdpa, sincos_pos_embed_2d
from sfd_scale.models.lightningdit import build_model, count_parameters

DATA = Path(__file__).parent / "data"


def tiny(**kw) -> ModelConfig:
    base = dict(size="custom", depth=2, hidden_size=64, num_heads=2, input_size=8, in_channels=12,
                semantic_channels=4, num_classes=10, repa_depth=1, repa_projector_dim=32,
                repa_feature_dim=384)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("size,millions", [("XL", 682.77), ("XXL", 1037.19)])
def test_parameter_count_matches_reference(size, millions):
    with torch.device("meta"):
        model = build_model(ModelConfig(size=size))
    assert round(count_parameters(model) / 1e6, 2) == millions


def test_state_dict_keys_are_reference_keys():
    with torch.device("meta"):
        keys = set(build_model(ModelConfig(size="XXL")).state_dict())
    expected_top = {
        "x_embedder.proj.weight", "x_embedder.proj.bias", "pos_embed", "feat_rope.freqs_cos",
        "feat_rope.freqs_sin", "y_embedder.embedding_table.weight",
        "final_layer.norm_final.weight", "final_layer.linear.weight", "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"}
    for which in ("sem", "tex"):
        for i in (0, 2):
            expected_top |= {f"t_embedder_{which}.mlp.{i}.weight", f"t_embedder_{which}.mlp.{i}.bias"}
    for i in (0, 2, 4):
        expected_top |= {f"repa_projector.{i}.weight", f"repa_projector.{i}.bias"}
    block = {"norm1.weight", "norm2.weight", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
             "attn.proj.bias", "attn.q_norm.weight", "attn.k_norm.weight", "mlp.w12.weight",
             "mlp.w12.bias", "mlp.w3.weight", "mlp.w3.bias", "adaLN_modulation.1.weight",
             "adaLN_modulation.1.bias"}
    expected = expected_top | {f"blocks.{n}.{k}" for n in range(24) for k in block}
    assert keys == expected


def test_xxl_shapes_follow_spec():
    with torch.device("meta"):
        sd = build_model(ModelConfig(size="XXL")).state_dict()
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, 1536)
    assert sd["t_embedder_sem.mlp.2.weight"].shape == (768, 768)
    assert sd["blocks.0.mlp.w12.weight"].shape == (2 * 4096, 1536)   # hidden int(2/3 * 4 * 1536)
    assert sd["blocks.0.adaLN_modulation.1.weight"].shape == (6 * 1536, 1536)
    assert sd["repa_projector.4.weight"].shape == (768, 2048)
    assert sd["feat_rope.freqs_cos"].shape == (256, 64)


def test_zero_initialised_model_predicts_zero_velocity():
    torch.manual_seed(0)
    model = build_model(tiny()).eval()
    x = torch.randn(3, 12, 8, 8)
    out = model(x, torch.rand(3), torch.rand(3), torch.tensor([0, 5, 10]))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0


def test_train_mode_returns_repa_projection_and_eval_mode_does_not():
    model = build_model(tiny())
    x, t, y = torch.randn(2, 12, 8, 8), torch.rand(2), torch.tensor([1, 2])
    out, repa = model.train()(x, t, t, y)
    assert out.shape == x.shape and repa.shape == (2, 64, 384)
    assert isinstance(model.eval()(x, t, t, y), torch.Tensor)


def _golden_weights(model):
    """Deterministic non-trivial weights, drawn in sorted-key order (as the golden file was made)."""
    g = torch.Generator().manual_seed(1234)
    sd = model.state_dict()
    out = {}
    for k in sorted(sd):
        if k == "pos_embed" or k.startswith("feat_rope"):
            out[k] = sd[k]
        else:
            out[k] = torch.randn(sd[k].shape, generator=g) * 0.1 + (1.0 if "norm" in k else 0.0)
    return out, g


def test_outputs_equal_the_reference_implementation():
    """tests/data/reference_lightningdit_golden.safetensors holds outputs of the reference
    LightningDiT (yuemingPAN/SFD) for these weights and inputs, made once outside CI."""
    golden = load_file(DATA / "reference_lightningdit_golden.safetensors")
    model = build_model(tiny())
    weights, _ = _golden_weights(model)
    model.load_state_dict(weights, strict=True)
    args = golden["x"], golden["t_tex"], golden["t_sem"], golden["y"]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(*args), golden["velocity"], rtol=1e-5, atol=1e-5)
        model.train().y_embedder.dropout_prob = 0.0
        _, repa = model(*args)
    torch.testing.assert_close(repa, golden["repa"], rtol=1e-5, atol=1e-5)


def test_sincos_pos_embed_formula():
    table = sincos_pos_embed_2d(8, 3)        # quarter = 2, omega = [1, 1/100]
    row, col = 1, 2
    token = row * 3 + col
    omega = torch.tensor([1.0, 0.01])
    expect = torch.cat([torch.sin(col * omega), torch.cos(col * omega),
                        torch.sin(row * omega), torch.cos(row * omega)])
    torch.testing.assert_close(table[token], expect)


def test_rope_rotates_pairs_by_row_then_column_angle():
    rope = Rope2D(head_dim=8, grid=4)
    x = torch.zeros(1, 1, 16, 8)
    x[..., 0] = 1.0   # pair 0 of the row half
    x[..., 4] = 1.0   # pair 0 of the column half
    out = rope(x)
    row, col = 2, 3
    token = row * 4 + col
    # frequency 0 is 1 rad per position: (1, 0) rotates to (cos a, sin a)
    torch.testing.assert_close(out[0, 0, token, :2], torch.tensor([torch.cos(torch.tensor(2.)), torch.sin(torch.tensor(2.))]))
    torch.testing.assert_close(out[0, 0, token, 4:6], torch.tensor([torch.cos(torch.tensor(3.)), torch.sin(torch.tensor(3.))]))
    # rotation keeps the norm
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))


def test_sdpa_equals_math_attention():
    q, k, v = (torch.randn(2, 3, 10, 16) for _ in range(3))
    torch.testing.assert_close(attention_sdpa(q, k, v), attention_math(q, k, v), rtol=1e-5, atol=1e-5)


def test_bad_sizes_name_the_key():
    with pytest.raises(ValueError, match="num_heads"):
        build_model(tiny(hidden_size=66, num_heads=4))
    with pytest.raises(ValueError, match="model.semantic_channels"):
        build_model(tiny(semantic_channels=12))
    with pytest.raises(ValueError, match="model.size=custom"):
        build_model(ModelConfig(size="custom"))


def _reference_style_checkpoint(tmp_path, model, with_omegaconf: bool):
    from omegaconf import OmegaConf

    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    config = {"model": {"model_type": "LightningDiT-XL/1", "semantic_chans": 4}}
    ckpt = {"model": model.state_dict(), "ema": ema, "opt": {"state": {}, "param_groups": []},
            "config": OmegaConf.create(config) if with_omegaconf else config}
    path = tmp_path / "0070000.pt"
    torch.save(ckpt, path)
    return path, ema


@pytest.mark.parametrize("with_omegaconf", [False, True])
def test_reference_training_checkpoint_loads_ema_strictly(tmp_path, with_omegaconf):
    from sfd_scale.models.lightningdit import load_lightningdit

    model = build_model(tiny())
    path, ema = _reference_style_checkpoint(tmp_path, model, with_omegaconf)
    loaded = load_lightningdit(path, tiny())
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ema[k]), k


def test_plain_and_safetensors_state_dicts_load(tmp_path):
    from safetensors.torch import save_file

    from sfd_scale.models.lightningdit import load_lightningdit

    model = build_model(tiny())
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    for name in ("plain.pt", "w.safetensors"):
        loaded = load_lightningdit(tmp_path / name, tiny())
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_checkpoint_of_another_model_is_refused(tmp_path):
    from sfd_scale.models.lightningdit import load_lightningdit

    torch.save(build_model(tiny(hidden_size=32)).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"(?s)other\.pt.*shape mismatches"):
        load_lightningdit(tmp_path / "other.pt", tiny())
    with pytest.raises(FileNotFoundError, match="SFD-Project/SFD"):
        load_lightningdit(tmp_path / "missing.pt", tiny())


def test_arbitrary_pickled_objects_are_refused(tmp_path):
    from sfd_scale.models.lightningdit import load_lightningdit

    from argparse import Namespace  # any importable class that is not allow-listed

    torch.save({"ema": build_model(tiny()).state_dict(), "extra": Namespace(a=1)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a plain tensor checkpoint"):
        load_lightningdit(tmp_path / "evil.pt", tiny())
    # Libraries allow-list classes for the whole process on import (megatron-core does Namespace):
    # our loads still accept exactly their own list, and leave the process-wide one as it was.
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([Namespace])
    try:
        with pytest.raises(ValueError, match="not a plain tensor checkpoint"):
            load_lightningdit(tmp_path / "evil.pt", tiny())
        assert Namespace in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)
