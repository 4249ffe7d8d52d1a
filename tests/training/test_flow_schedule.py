"""Flow-matching timestep sampling: each option changes the sampled sigma distribution as documented.

Statistical checks on 20 000 draws from a fixed seed; tolerances are several standard errors wide.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kubetuner_trainer.training.objectives import FlowMatchingObjective
from kubetuner_trainer.training.timesteps import FAST_SCHEDULE_SIGMAS, FlowSchedule, resolution_shift

N = 20_000


def _cfg(**kw):
    base = dict(flow_sigmoid_scale=1.0, flow_use_uniform_schedule=False, flow_use_beta_schedule=False,
                flow_beta_schedule_alpha=2.0, flow_beta_schedule_beta=2.0, flow_schedule_shift=0.0,
                flow_schedule_auto_shift=False, flux_fast_schedule=False)
    base.update(kw)
    return SimpleNamespace(**base)


def _draw(latent_hw=(32, 32), **kw) -> torch.Tensor:
    return FlowSchedule.from_options(_cfg(**kw)).sample(N, torch.Generator().manual_seed(0), latent_hw).double()


def _logit(s: torch.Tensor) -> torch.Tensor:
    return torch.log(s) - torch.log1p(-s)


def test_default_is_a_logit_normal_and_the_sigmoid_scale_is_its_spread():
    plain = _draw()
    assert 0 < plain.min() and plain.max() < 1
    assert plain.median() == pytest.approx(0.5, abs=0.01)
    assert _logit(plain).std() == pytest.approx(1.0, rel=0.03)
    wide = _draw(flow_sigmoid_scale=2.5)
    assert _logit(wide).std() == pytest.approx(2.5, rel=0.03)  # sigmoid(scale·N(0,1)): logit std = scale
    assert (wide < 0.1).float().mean() > 2 * (plain < 0.1).float().mean()  # more mass at the ends


def test_uniform_schedule_is_flat_on_the_unit_interval():
    sigmas = _draw(flow_use_uniform_schedule=True)
    assert sigmas.mean() == pytest.approx(0.5, abs=0.01) and sigmas.var() == pytest.approx(1 / 12, rel=0.03)
    deciles = torch.histc(sigmas.float(), bins=10, min=0, max=1) / N
    assert torch.allclose(deciles, torch.full((10,), 0.1), atol=0.01)


def test_beta_schedule_has_the_beta_moments():
    a, b = 2.0, 5.0
    sigmas = _draw(flow_use_beta_schedule=True, flow_beta_schedule_alpha=a, flow_beta_schedule_beta=b)
    assert sigmas.mean() == pytest.approx(a / (a + b), abs=0.005)
    assert sigmas.var() == pytest.approx(a * b / ((a + b) ** 2 * (a + b + 1)), rel=0.05)
    # drawn from our generator: the same seed gives the same sigmas, another seed others
    again = _draw(flow_use_beta_schedule=True, flow_beta_schedule_alpha=a, flow_beta_schedule_beta=b)
    assert torch.equal(sigmas, again)


def test_schedule_shift_moves_mass_towards_noise():
    shifted = _draw(flow_schedule_shift=3.0)
    # the shift is monotone, so the median maps like a point: 3·0.5 / (1 + 2·0.5) = 0.75
    assert shifted.median() == pytest.approx(0.75, abs=0.01)
    base = _draw()
    assert torch.allclose(shifted, 3 * base / (1 + 2 * base), atol=1e-6)  # same draws, shifted
    uniform_shifted = _draw(flow_use_uniform_schedule=True, flow_schedule_shift=3.0)
    assert (uniform_shifted > 0.5).float().mean() == pytest.approx(0.75, abs=0.01)  # P(u > 1/4)


def test_auto_shift_depends_on_the_resolution():
    assert resolution_shift((32, 32)) == pytest.approx(math.exp(0.5))  # 256 tokens: base shift
    assert resolution_shift((128, 128)) == pytest.approx(math.exp(1.15))  # 4096 tokens (1024 px): max shift
    small = _draw((32, 32), flow_schedule_auto_shift=True)
    large = _draw((128, 128), flow_schedule_auto_shift=True)
    for sigmas, shift in ((small, math.exp(0.5)), (large, math.exp(1.15))):
        assert sigmas.median() == pytest.approx(shift / (1 + shift), abs=0.01)
    assert large.median() > small.median() + 0.05


def test_fast_schedule_draws_from_its_short_list():
    sigmas = _draw(flux_fast_schedule=True)
    assert set(sigmas.unique().tolist()) == set(FAST_SCHEDULE_SIGMAS)
    assert (sigmas == 1.0).float().mean() == pytest.approx(0.7, abs=0.01)
    # uniform and beta take precedence over the fast schedule (as in SimpleTuner)
    assert FlowSchedule.from_options(_cfg(flux_fast_schedule=True, flow_use_uniform_schedule=True)).kind == "uniform"


def test_flow_objective_interpolates_and_targets_the_velocity():
    objective = FlowMatchingObjective(_cfg())
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = objective.sample_timesteps(latents, torch.Generator().manual_seed(1))
    assert timesteps.shape == (3,) and timesteps.dtype == torch.float32 and (0 < timesteps).all()
    assert (timesteps < 1000).all()
    edges = torch.tensor([0.0, 1000.0, 250.0])
    noisy = objective.noisy_latents(latents, noise, edges)
    assert torch.equal(noisy[0], latents[0]) and torch.equal(noisy[1], noise[1])
    assert torch.allclose(noisy[2], 0.75 * latents[2] + 0.25 * noise[2])
    assert torch.equal(objective.target(latents, noise, edges), noise - latents)
    assert objective.eval_timesteps(4) == [125.0, 375.0, 625.0, 875.0]
    perfect = objective.loss(SimpleNamespace(loss_type="l2"), noise - latents, noise - latents, edges)
    assert perfect == 0.0
