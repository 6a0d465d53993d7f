"""CFG / AutoGuidance: the per-group combination by hand, call counts, and which branch is which."""
import pytest
import torch

from sfd_scale.diffusion.guidance import GuidedVelocity, combine_guidance

TEX, SEM = 2, 1  # tiny composite latent: 2 texture channels, then 1 semantic channel
NULL = 10


class LabelModel:
    """v = x + label, recording every call (batch size and labels)."""

    def __init__(self, offset: float = 0.0):
        self.offset = offset
        self.calls = []

    def __call__(self, x, t_tex, t_sem, y):
        self.calls.append((x.shape[0], y.tolist(), t_tex.tolist(), t_sem.tolist()))
        return x + y.to(x.dtype).view(-1, 1, 1, 1) + self.offset


def _inputs(t_tex, t_sem):
    x = torch.zeros(2, TEX + SEM, 1, 1)
    y = torch.tensor([1, 2])
    return x, torch.tensor(t_tex), torch.tensor(t_sem), y


def test_combine_by_hand_with_separate_scales_and_interval():
    cond = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).view(2, 3, 1, 1)
    uncond = torch.tensor([[0.0, 1.0, 1.0], [2.0, 2.0, 2.0]]).view(2, 3, 1, 1)
    # Sample 0: texture below the interval (keeps cond), semantic inside (guided with 3).
    # Sample 1: both inside; t_tex == start counts as inside (reference: off only where t < start).
    out = combine_guidance(cond, uncond, torch.tensor([0.2, 0.5]), torch.tensor([0.6, 0.9]),
                           scale_tex=2.0, scale_sem=3.0, interval_start=0.5, semantic_channels=1)
    expected = torch.tensor([
        [1.0, 2.0, 1.0 + 3.0 * (3.0 - 1.0)],
        [2.0 + 2.0 * (4.0 - 2.0), 2.0 + 2.0 * (5.0 - 2.0), 2.0 + 3.0 * (6.0 - 2.0)],
    ]).view(2, 3, 1, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_combine_scale_one_group_is_exactly_conditional():
    torch.manual_seed(0)
    cond, uncond = torch.randn(3, 5, 2, 2), torch.randn(3, 5, 2, 2)
    t = torch.full((3,), 0.8)
    out = combine_guidance(cond, uncond, t, t, scale_tex=1.0, scale_sem=1.7,
                           interval_start=0.0, semantic_channels=2)
    assert torch.equal(out[:, :3], cond[:, :3])
    torch.testing.assert_close(out[:, 3:], uncond[:, 3:] + 1.7 * (cond[:, 3:] - uncond[:, 3:]))


def test_cfg_batches_cond_and_null_in_one_forward():
    model = LabelModel()
    guided = GuidedVelocity(model, semantic_channels=SEM, null_label=NULL, scale_tex=2.0,
                            scale_sem=0.5)
    x, t_tex, t_sem, y = _inputs([0.4, 0.4], [0.7, 0.7])
    out = guided(x, t_tex, t_sem, y)
    assert len(model.calls) == 1
    batch, labels, call_t_tex, call_t_sem = model.calls[0]
    assert batch == 4 and labels == [1, 2, NULL, NULL]
    assert call_t_tex == pytest.approx([0.4] * 4) and call_t_sem == pytest.approx([0.7] * 4)
    # cond = label (1, 2), uncond = 10: tex 10 + 2 (c - 10), sem 10 + 0.5 (c - 10).
    expected = torch.tensor([[-8.0, -8.0, 5.5], [-6.0, -6.0, 6.0]]).view(2, 3, 1, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_cfg_interval_switches_each_group_on_its_own_time():
    model = LabelModel()
    guided = GuidedVelocity(model, semantic_channels=SEM, null_label=NULL, scale_tex=2.0,
                            scale_sem=2.0, interval_start=0.5)
    # Phase-I-like times: semantics ahead (guided), texture behind (conditional).
    x, t_tex, t_sem, y = _inputs([0.1, 0.1], [0.6, 0.6])
    out = guided(x, t_tex, t_sem, y)
    expected = torch.tensor([[1.0, 1.0, 10 + 2 * (1 - 10)], [2.0, 2.0, 10 + 2 * (2 - 10)]])
    torch.testing.assert_close(out, expected.view(2, 3, 1, 1), rtol=0, atol=0)


def test_cfg_skips_null_pass_when_no_group_is_inside_the_interval():
    model = LabelModel()
    guided = GuidedVelocity(model, semantic_channels=SEM, null_label=NULL, scale_tex=2.0,
                            scale_sem=2.0, interval_start=0.5)
    x, t_tex, t_sem, y = _inputs([0.1, 0.1], [0.4, 0.4])
    out = guided(x, t_tex, t_sem, y)
    assert [c[:2] for c in model.calls] == [(2, [1, 2])]
    assert torch.equal(out, x + torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))


def test_scale_one_is_one_conditional_forward_even_with_a_guide_model():
    model, guide = LabelModel(), LabelModel(offset=100.0)
    guided = GuidedVelocity(model, semantic_channels=SEM, null_label=NULL, guide_model=guide)
    x, t_tex, t_sem, y = _inputs([0.4, 0.9], [0.7, 1.0])
    out = guided(x, t_tex, t_sem, y)
    assert [c[:2] for c in model.calls] == [(2, [1, 2])] and guide.calls == []
    assert torch.equal(out, model(x, t_tex, t_sem, y))


def test_autoguidance_uses_guide_output_with_the_same_labels_as_unconditional():
    model, guide = LabelModel(), LabelModel(offset=-3.0)
    guided = GuidedVelocity(model, semantic_channels=SEM, null_label=NULL, scale_tex=1.5,
                            scale_sem=2.0, guide_model=guide)
    x, t_tex, t_sem, y = _inputs([0.4, 0.4], [0.7, 0.7])
    out = guided(x, t_tex, t_sem, y)
    assert [c[:2] for c in model.calls] == [(2, [1, 2])]
    assert [c[:2] for c in guide.calls] == [(2, [1, 2])]  # same labels, no null class
    # cond = label, uncond = label - 3: uncond + s * 3.
    expected = torch.tensor([[-2 + 4.5, -2 + 4.5, -2 + 6.0], [-1 + 4.5, -1 + 4.5, -1 + 6.0]])
    torch.testing.assert_close(out, expected.view(2, 3, 1, 1), rtol=0, atol=0)
