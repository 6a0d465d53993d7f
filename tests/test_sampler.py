"""SFD sampler: phase masks, parity with torchdiffeq, dopri5 accuracy, grid shift, labels, noise."""
import math

import pytest
import torch
from torchdiffeq import odeint

from sfd_scale.diffusion.guidance import GuidedVelocity
from sfd_scale.diffusion.sampler import (SamplerSettings, Solver, balanced_labels, integrate_fixed,
                                         per_index_noise, sample, sfd_drift)
from sfd_scale.diffusion.schedule import ConstantOffset, sampling_grid

SEM = 2  # composite latent in these tests: 3 texture channels, then 2 semantic
SCHEDULE = ConstantOffset(0.3)


def ones_model(x, t_tex, t_sem, y):
    return torch.ones_like(x)


def nonlinear_model(x, t_tex, t_sem, y):
    tt, ts = t_tex.view(-1, 1, 1, 1), t_sem.view(-1, 1, 1, 1)
    return torch.sin(x) * (1 + tt) - ts * x + 0.1 * y.to(x.dtype).view(-1, 1, 1, 1)


def _zeros(batch=2, dtype=torch.float32):
    return torch.zeros(batch, 3 + SEM, 2, 2, dtype=dtype)


def _labels(batch=2):
    return torch.arange(batch)


def test_euler_phases_move_each_group_over_its_own_window():
    # Grid tau = 0, 0.1, ..., 1.3. Euler moves a group by dt on each step whose start it is active
    # at: texture where tau >= 0.3 (steps 0.3 .. 1.2: 1.0 in all), semantics where tau <= 1
    # (reference rule, inclusive, so the step starting at tau = 1.0 counts: 0 .. 1.0 -> 1.1).
    out = sample(ones_model, _zeros(), _labels(), SCHEDULE, SamplerSettings("euler", 14), SEM)
    torch.testing.assert_close(out[:, :3], torch.full_like(out[:, :3], 1.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, 3:], torch.full_like(out[:, 3:], 1.1), rtol=0, atol=1e-6)


def test_phase_one_leaves_texture_untouched():
    drift = sfd_drift(ones_model, _labels(), SCHEDULE, SEM)
    grid = torch.linspace(0.0, 0.3, 4, dtype=torch.float64)
    out = integrate_fixed(drift, _zeros(), grid, Solver.EULER)
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    torch.testing.assert_close(out[:, 3:], torch.full_like(out[:, 3:], 0.3), rtol=0, atol=1e-6)


def test_phase_three_leaves_semantics_untouched():
    drift = sfd_drift(ones_model, _labels(), SCHEDULE, SEM)
    grid = torch.linspace(1.05, 1.3, 6, dtype=torch.float64)
    out = integrate_fixed(drift, _zeros(), grid, Solver.HEUN)
    assert torch.equal(out[:, 3:], torch.zeros_like(out[:, 3:]))
    torch.testing.assert_close(out[:, :3], torch.full_like(out[:, :3], 0.25), rtol=0, atol=1e-6)


def test_drift_passes_the_schedule_times_to_the_model():
    seen = []

    def recording(x, t_tex, t_sem, y):
        seen.append((t_tex.tolist(), t_sem.tolist(), y.tolist()))
        return torch.zeros_like(x)

    drift = sfd_drift(recording, _labels(), SCHEDULE, SEM)
    drift(torch.tensor(0.5, dtype=torch.float64), _zeros())
    drift(torch.tensor(1.2, dtype=torch.float64), _zeros())
    assert seen[0][0] == pytest.approx([0.2, 0.2]) and seen[0][1] == pytest.approx([0.5, 0.5])
    assert seen[1][0] == pytest.approx([0.9, 0.9]) and seen[1][1] == pytest.approx([1.0, 1.0])
    assert seen[0][2] == [0, 1]


@pytest.mark.parametrize("solver, method", [("euler", "euler"), ("heun", "heun2")])
def test_fixed_solvers_equal_torchdiffeq_on_the_same_grid(solver, method):
    torch.manual_seed(0)
    noise = torch.randn(3, 3 + SEM, 2, 2)
    labels = _labels(3)
    settings = SamplerSettings(solver, num_steps=17, timestep_shift=3.0)
    ours = sample(nonlinear_model, noise, labels, SCHEDULE, settings, SEM)
    grid = sampling_grid(17, SCHEDULE, 3.0)
    drift = sfd_drift(nonlinear_model, labels, SCHEDULE, SEM)
    theirs = odeint(drift, noise, grid, method=method)[-1]
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, noise)


def test_heun_phase_edges_follow_the_reference_masks():
    # Heun averages the drift at both ends of a step, and each end is masked on its own: the step
    # 0.2 -> 0.3 moves texture by half a step (active at its end), the step 1.0 -> 1.1 moves
    # semantics by half a step (active at its start). So both groups move 1.05 on the 0.1 grid.
    out = sample(ones_model, _zeros(), _labels(), SCHEDULE, SamplerSettings("heun", 14), SEM)
    torch.testing.assert_close(out, torch.full_like(out, 1.05), rtol=0, atol=1e-6)


def test_dopri5_solves_a_linear_ode_exactly():
    # v = t_group * x per group: each group integrates t dt over its own [0, 1] -> x0 * e^(1/2).
    def linear(x, t_tex, t_sem, y):
        tt, ts = t_tex.view(-1, 1, 1, 1), t_sem.view(-1, 1, 1, 1)
        return torch.cat([tt * x[:, :3], ts * x[:, 3:]], dim=1)

    torch.manual_seed(2)
    noise = torch.randn(2, 3 + SEM, 2, 2, dtype=torch.float64)
    settings = SamplerSettings("dopri5", atol=1e-10, rtol=1e-8)
    out = sample(linear, noise, _labels(), SCHEDULE, settings, SEM)
    torch.testing.assert_close(out, noise * math.exp(0.5), rtol=1e-6, atol=1e-8)


def test_guided_velocity_with_scale_one_samples_like_the_bare_model():
    torch.manual_seed(3)
    noise = torch.randn(2, 3 + SEM, 2, 2)
    settings = SamplerSettings("heun", num_steps=6)
    guided = GuidedVelocity(nonlinear_model, semantic_channels=SEM, null_label=10)
    assert torch.equal(sample(guided, noise, _labels(), SCHEDULE, settings, SEM),
                       sample(nonlinear_model, noise, _labels(), SCHEDULE, settings, SEM))


def test_shifted_grid_endpoints_monotone_and_formula():
    s, n = 3.0, 9
    grid = sampling_grid(n, SCHEDULE, s)
    assert grid[0].item() == 0.0 and grid[-1].item() == pytest.approx(1.3, abs=1e-12)
    assert bool((grid[1:] > grid[:-1]).all())
    u = torch.linspace(0, 1, n, dtype=torch.float64)
    torch.testing.assert_close(grid, 1.3 * s * u / (1 + (s - 1) * u))
    # By hand: u = 0.5 -> 3 * 0.5 / (1 + 2 * 0.5) = 0.75, times t_end 1.3.
    assert sampling_grid(3, SCHEDULE, s)[1].item() == pytest.approx(0.975)
    torch.testing.assert_close(sampling_grid(n, SCHEDULE, 0.0), 1.3 * u)


def test_settings_validation_names_the_config_key():
    with pytest.raises(ValueError, match="sample.solver"):
        SamplerSettings("rk4")
    with pytest.raises(ValueError, match="sample.num_steps"):
        SamplerSettings("euler", num_steps=1)
    assert SamplerSettings("heun").solver is Solver.HEUN
    with pytest.raises(ValueError, match="labels"):
        sample(ones_model, _zeros(), _labels(3), SCHEDULE, SamplerSettings("euler", 3), SEM)
    with pytest.raises(ValueError, match="semantic_channels"):
        sample(ones_model, _zeros(), _labels(), SCHEDULE, SamplerSettings("euler", 3), 6)


def test_balanced_labels_counts_and_order():
    labels = balanced_labels(50_000, 1000)
    assert torch.equal(torch.bincount(labels, minlength=1000), torch.full((1000,), 50))
    assert labels[:50].eq(0).all() and labels[50].item() == 1 and labels[-1].item() == 999
    # Leftover indices (10 % 4 = 2) get classes 0, 1, as in the reference.
    assert balanced_labels(10, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 0, 1]
    assert balanced_labels(3, 5).tolist() == [0, 1, 2]


def test_per_index_noise_does_not_depend_on_the_batch():
    batch = per_index_noise([3, 7, 11, 2], (4, 2, 2), seed=5)
    alone = per_index_noise([7], (4, 2, 2), seed=5)
    assert batch.shape == (4, 4, 2, 2)
    assert torch.equal(batch[1], alone[0])
    assert not torch.equal(batch[0], batch[1])
    assert not torch.equal(per_index_noise([7], (4, 2, 2), seed=6)[0], alone[0])
    many = per_index_noise(range(64), (256,), seed=0)
    assert abs(many.mean().item()) < 0.02 and abs(many.std().item() - 1.0) < 0.02
