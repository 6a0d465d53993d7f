"""SFD loss and schedule against hand computations (SPEC section 3)."""
import math

import pytest
import torch
import torch.nn.functional as F

from sfd_scale.config import DiffusionConfig, ModelConfig
from sfd_scale.diffusion.loss import SFDLoss, repa_loss
from sfd_scale.diffusion.schedule import ConstantOffset, sample_train_t, shift_time
from sfd_scale.models.lightningdit import build_model


def test_async_times_follow_spec():
    sched = ConstantOffset(0.3)
    t = torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0])
    t_sem, t_tex = sched.train_times(t)
    torch.testing.assert_close(t_sem, torch.clamp(t * 1.3, max=1.0))
    torch.testing.assert_close(t_tex, torch.clamp(t * 1.3 - 0.3, min=0.0))
    assert torch.all(t_sem >= t_tex) and torch.all((t_sem - t_tex) <= 0.3 + 1e-7)
    assert t_sem[0] == 0 and t_tex[0] == 0 and abs(t_tex[-1].item() - 1) < 1e-6
    tau = torch.tensor([0.1, 0.6, 1.2])
    s, x = sched.sample_times(tau)
    torch.testing.assert_close(s, torch.tensor([0.1, 0.6, 1.0]))
    torch.testing.assert_close(x, torch.tensor([0.0, 0.3, 0.9]))
    assert sched.t_end == pytest.approx(1.3)


def test_offset_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="delta_t"):
        ConstantOffset(1.5)


def test_logit_normal_times_have_the_right_median_and_spread():
    t = sample_train_t(200_000, "logit_normal", torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item()) < 0.01 and abs(logit.std().item() - 1) < 0.01


def test_shift_formula():
    assert shift_time(0.5, 3.0) == pytest.approx(1.5 / 2.0)
    assert shift_time(0.5, 0.0) == 0.5


def test_noised_batch_uses_group_times():
    loss = SFDLoss(DiffusionConfig(), semantic_channels=2)
    x1 = torch.randn(4, 6, 3, 3)
    g = torch.Generator().manual_seed(0)
    b = loss.noise(x1, g)
    x0 = x1 - b.target
    tt = b.t_tex[:, None, None, None]
    ts = b.t_sem[:, None, None, None]
    torch.testing.assert_close(b.x_t[:, :4], tt * x1[:, :4] + (1 - tt) * x0[:, :4])
    torch.testing.assert_close(b.x_t[:, 4:], ts * x1[:, 4:] + (1 - ts) * x0[:, 4:])
    # the same generator state gives the same draw (exact resume depends on it)
    again = loss.noise(x1, torch.Generator().manual_seed(0))
    assert torch.equal(again.x_t, b.x_t)


def test_label_dropout_drawn_by_the_loss_is_the_dropout_the_model_would_draw():
    # A replayed step (CUDA graph) needs every draw made before the step; the loss now draws the
    # label-dropout uniforms and hands them to the model: the same numbers as the model's own draw.
    cfg = ModelConfig(size="custom", depth=1, hidden_size=32, num_heads=2, input_size=4, in_channels=6,
                      semantic_channels=2, num_classes=5, repa_depth=0, class_dropout_prob=0.5)
    model = build_model(cfg).train()
    x, t, y = torch.randn(16, 6, 4, 4), torch.rand(16), torch.arange(16) % 5
    uniforms = torch.rand(16, generator=torch.Generator().manual_seed(3))
    assert 0 < int((uniforms < 0.5).sum()) < 16               # some labels dropped, some kept
    # The conditioning vector (the output layer starts at zero, so outputs would all be 0).
    drawn_by_model = model.condition(t, t, y, drop_labels=True, generator=torch.Generator().manual_seed(3))
    given = model.condition(t, t, y, drop_labels=True, label_uniforms=uniforms)
    torch.testing.assert_close(given, drawn_by_model, rtol=0, atol=0)
    kept = model.condition(t, t, y, drop_labels=True, label_uniforms=torch.ones(16))
    assert not torch.allclose(kept, drawn_by_model)           # the uniforms decide which labels drop

    loss = SFDLoss(DiffusionConfig(), semantic_channels=2)
    draws = loss.draw(x, torch.Generator().manual_seed(0))
    terms = loss.compute(model, x, y, None, draws)
    assert terms["loss"] == loss(model, x, y, None, generator=torch.Generator().manual_seed(0))["loss"]


def test_loss_terms_against_hand_computation():
    cfg = DiffusionConfig(semantic_weight=2.0, cosine_weight=1.0, repa_weight=0.5, repa_mode="cos")
    loss = SFDLoss(cfg, semantic_channels=1)
    # 1 sample, 2 channels (texture, semantic), 1 pixel each -> easy numbers
    pred = torch.tensor([[[[1.0]], [[2.0]]]])
    target = torch.tensor([[[[0.0]], [[1.0]]]])
    repa_pred = torch.tensor([[[1.0, 0.0]]])             # (B, N=1, C=2)
    feats = torch.tensor([[[[0.0]], [[1.0]]]])           # (B, C=2, 1, 1): orthogonal
    out = loss.terms(pred, target, repa_pred, feats)
    mse = (1.0 * 1 + 2.0 * 1) / 2                        # weighted, mean over channels
    cos = 1 - (1 * 0 + 2 * 1) / (math.sqrt(5) * 1)
    assert out["mse"].item() == pytest.approx(mse)
    assert out["cos"].item() == pytest.approx(cos)
    assert out["repa"].item() == pytest.approx(1.0)
    assert out["loss"].item() == pytest.approx(mse + cos + 0.5 * 1.0)


def test_repa_modes():
    a, b = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    cos = (1 - F.cosine_similarity(a, b, dim=-1)).mean()
    mse = ((a - b) ** 2).mean()
    torch.testing.assert_close(repa_loss(a, b, "cos"), cos)
    torch.testing.assert_close(repa_loss(a, b, "mse"), mse)
    torch.testing.assert_close(repa_loss(a, b, "cos_mse"), (cos + mse) / 2)
    with pytest.raises(ValueError, match="repa_mode"):
        repa_loss(a, b, "l1")


def test_loss_without_cosine_or_repa():
    loss = SFDLoss(DiffusionConfig(cosine_weight=0.0), semantic_channels=1)
    out = loss.terms(torch.zeros(1, 2, 1, 1), torch.ones(1, 2, 1, 1), None, None)
    assert set(out) == {"mse", "loss"} and out["loss"].item() == pytest.approx(1.5)
