"""FID Inception: the real architecture and key layout, TF1 resizing, the three feature heads."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sfd_scale.eval.inception import (FIDInceptionV3, _tf_avg_pool, extract_features,
                                      load_inception, tf1_resize_bilinear)

# torchvision's Inception-v3 (27,161,264 parameters) without its auxiliary head (3,326,696) and
# with 1008 instead of 1000 classes (+8 x 2049): the size of pytorch-fid's FID Inception.
FID_INCEPTION_PARAMETERS = 27_161_264 - 3_326_696 + 8 * 2049

STEM = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
BRANCHES = {
    "A": ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3", "branch_pool"],
    "B": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
    "C": ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3"]
         + [f"branch7x7dbl_{i}" for i in range(1, 6)] + ["branch_pool"],
    "D": ["branch3x3_1", "branch3x3_2"] + [f"branch7x7x3_{i}" for i in range(1, 5)],
    "E": ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
          "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"],
}
BLOCKS = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B", "Mixed_6b": "C",
          "Mixed_6c": "C", "Mixed_6d": "C", "Mixed_6e": "C", "Mixed_7a": "D", "Mixed_7b": "E",
          "Mixed_7c": "E"}


def reference_layout_keys() -> set[str]:
    """The keys of pytorch-fid's weight file, spelled out from torchvision's module names."""
    convs = STEM + [f"{block}.{branch}" for block, kind in BLOCKS.items()
                    for branch in BRANCHES[kind]]
    bn = ("weight", "bias", "running_mean", "running_var")
    keys = {f"{c}.conv.weight" for c in convs} | {f"{c}.bn.{p}" for c in convs for p in bn}
    return keys | {"fc.weight", "fc.bias"}


def scaled_random_inception(seed: int = 0) -> FIDInceptionV3:
    """Random weights with He-scaled convolutions, so features neither vanish nor explode."""
    torch.manual_seed(seed)
    model = FIDInceptionV3()
    for name, p in model.named_parameters():
        if name.endswith("conv.weight"):
            torch.nn.init.kaiming_normal_(p, nonlinearity="relu")
        elif name.endswith("bn.bias") or name == "fc.bias":
            torch.nn.init.normal_(p, std=0.1)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> FIDInceptionV3:
    return scaled_random_inception()


def test_architecture_has_the_size_and_keys_of_the_released_weights():
    model = FIDInceptionV3()
    assert sum(p.numel() for p in model.parameters()) == FID_INCEPTION_PARAMETERS
    state = model.state_dict()
    assert set(state) == reference_layout_keys()
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_6d.branch7x7_2.conv.weight"].shape == (160, 160, 1, 7)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert state["fc.weight"].shape == (1008, 2048)


def test_released_layout_round_trips_through_a_torch_file(tmp_path, model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # Some saves of the released file carry BatchNorm's step counters; they must be ignored.
    state.update({k.replace("running_mean", "num_batches_tracked"): torch.tensor(0)
                  for k in list(state) if k.endswith("running_mean")})
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    loaded = load_inception(path)
    loaded_state = loaded.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded_state[key], value), key
    assert not any(p.requires_grad for p in loaded.parameters())


def test_missing_weights_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="mseitzer/pytorch-fid/releases"):
        load_inception(tmp_path / "pt_inception-2015-12-05-6726825d.pth")


def test_foreign_layout_is_refused_with_the_key_named(tmp_path, model):
    state = dict(model.state_dict())
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)   # torchvision's ImageNet weights
    path = tmp_path / "torchvision_inception.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="AuxLogits.fc.weight"):
        load_inception(path)


def test_tf1_resize_maps_destination_to_source_without_half_pixel_centres():
    x = torch.tensor([[0.0, 10.0], [20.0, 30.0]]).view(1, 1, 2, 2)
    # Source coordinates 0, 0.5, 1, 1.5; the last clamps to the edge.
    expected = torch.tensor([[0.0, 5.0, 10.0, 10.0],
                             [10.0, 15.0, 20.0, 20.0],
                             [20.0, 25.0, 30.0, 30.0],
                             [20.0, 25.0, 30.0, 30.0]])
    out = tf1_resize_bilinear(x, 4)
    assert torch.equal(out[0, 0], expected)
    assert not torch.allclose(out, F.interpolate(x, size=4, mode="bilinear", align_corners=False))
    same = torch.rand(1, 3, 7, 7)
    assert torch.equal(tf1_resize_bilinear(same, 7), same)


def test_pools_follow_the_tf_graph():
    # TF's SAME average pool divides by the real pixels: a constant map stays constant at the
    # borders (torch's default would give 4/9 in the corners).
    assert torch.equal(_tf_avg_pool(torch.ones(1, 1, 4, 4)), torch.ones(1, 1, 4, 4))
    model = FIDInceptionV3()
    assert model.Mixed_7c.max_pool and not model.Mixed_7b.max_pool


def test_preprocessing_matches_the_tf_graph_scaling():
    flat = torch.tensor([0.0, 128.0, 255.0]).view(3, 1, 1, 1).expand(3, 3, 5, 5)
    out = FIDInceptionV3.preprocess(flat)
    assert out.shape == (3, 3, 299, 299)
    assert out[:, 0, 0, 0].tolist() == [-1.0, 0.0, 127.0 / 128.0]


def test_heads_have_adm_shapes_and_definitions(model):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 40, 48, 3), dtype=np.uint8)
    maps = []
    hook = model.Mixed_6d.branch1x1.register_forward_hook(
        lambda module, inputs, output: maps.append(output) and None)
    try:
        feats = extract_features(model, [images[:2], images[2:]])
    finally:
        hook.remove()
    assert feats.pool.shape == (3, 2048) and feats.spatial.shape == (3, 2023)
    assert feats.logits.shape == (3, 1008) and feats.pool.dtype == np.float32
    assert feats.pool.std() > 1e-3 and feats.spatial.std() > 1e-3     # features carry signal
    # spatial = mixed_6/conv (17 x 17) channels 0..6, flattened as TF's NHWC.
    spatial_map = maps[0]
    assert spatial_map.shape == (2, 192, 17, 17)
    expected = spatial_map[:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy()
    np.testing.assert_array_equal(feats.spatial[:2], expected)
    # Logits are pool @ W, without the classifier bias (the input of ADM's softmax).
    assert model.fc.bias.abs().sum() > 0
    np.testing.assert_allclose(feats.logits, feats.pool @ model.fc.weight.detach().numpy().T,
                               rtol=1e-4, atol=1e-5)


def test_features_do_not_depend_on_batching(model):
    images = np.random.default_rng(1).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    together = extract_features(model, [images])
    apart = extract_features(model, [images[:1], images[1:]])
    np.testing.assert_allclose(together.pool, apart.pool, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(together.spatial, apart.spatial, rtol=1e-4, atol=1e-5)
