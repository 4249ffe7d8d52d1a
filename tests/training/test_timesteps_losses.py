"""Timestep sampling and loss weighting (pure functions)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kubetuner_trainer.training.losses import (
    compute_snr,
    element_loss,
    huber_c_for,
    input_perturbation_scale,
    masked_mean,
    offset_noise,
    snr_weights,
)
from kubetuner_trainer.training.timesteps import bias_weights, sample_timesteps


def _cfg(**kw):
    base = dict(loss_type="l2", huber_schedule="snr", huber_c=0.1, snr_gamma=None, use_soft_min_snr=False,
                noise_offset=None, noise_offset_probability=None, input_perturbation=None,
                input_perturbation_steps=None)
    base.update(kw)
    return SimpleNamespace(**base)


def test_bias_weights_scale_the_requested_part_of_the_range():
    w = bias_weights(1000, "later", multiplier=3.0, portion=0.25)
    assert w[:750].eq(1).all() and w[750:].eq(3).all()
    w = bias_weights(1000, "earlier", multiplier=0.0, portion=0.5)
    assert w[:500].eq(0).all() and w[500:].eq(1).all()
    w = bias_weights(1000, "range", multiplier=2.0, begin=200, end=300)
    assert w[200:300].eq(2).all() and w.sum() == 1000 + 100
    assert bias_weights(10, "none").eq(1).all()
    with pytest.raises(ValueError, match="begin < end"):
        bias_weights(1000, "range", begin=500, end=100)
    with pytest.raises(ValueError, match="no timestep"):
        bias_weights(1000, "range", multiplier=0.0, begin=0, end=1000)


def test_zero_multiplier_excludes_timesteps_from_sampling():
    w = bias_weights(1000, "earlier", multiplier=0.0, portion=0.5)
    gen = torch.Generator().manual_seed(0)
    t = sample_timesteps(w, 256, segmented=False, generator=gen)
    assert t.min() >= 500


def test_segmented_sampling_puts_one_timestep_in_each_slice():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        t = sample_timesteps(torch.ones(1000, dtype=torch.float64), 4, segmented=True, generator=gen)
        assert [int(x) // 250 for x in t] == [0, 1, 2, 3]


def test_huber_and_smooth_l1_approach_l2_and_l1():
    pred, target = torch.zeros(1, 4), torch.tensor([[0.01, -0.01, 5.0, -5.0]])
    c = torch.tensor([0.1])
    huber = element_loss(pred, target, "huber", c)
    l2 = element_loss(pred, target, "l2")
    assert torch.allclose(huber[0, :2], l2[0, :2], rtol=0.02)  # quadratic near 0
    smooth = element_loss(pred, target, "smooth_l1", c)
    assert torch.allclose(smooth[0, 2:], torch.full((2,), 2 * (5.0 - 0.1)), atol=0.01)  # linear far away


def test_huber_schedules():
    ac = torch.linspace(0.999, 0.01, 1000)
    t = torch.tensor([0, 999])
    assert torch.equal(huber_c_for("constant", 0.3, t, ac, 1000), torch.full((2,), 0.3))
    exp = huber_c_for("exponential", 0.1, t, ac, 1000)
    assert exp[0] == 1.0 and exp[1] == pytest.approx(0.1, rel=0.01)
    snr = huber_c_for("snr", 0.1, t, ac, 1000)
    assert snr[0] > snr[1] >= 0.1


def test_min_snr_weights():
    snr = torch.tensor([0.5, 5.0, 50.0])
    eps = snr_weights(snr, 5.0, "epsilon")
    assert torch.allclose(eps, torch.tensor([1.0, 1.0, 0.1]))
    v = snr_weights(snr, 5.0, "v_prediction")
    assert torch.allclose(v, torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))
    soft = snr_weights(snr, 5.0, "epsilon", soft=True)
    assert (soft < eps).all()  # the smooth clamp sits below the hard one
    ac = torch.tensor([0.5, 0.25])
    assert torch.allclose(compute_snr(ac, torch.tensor([0, 1])), torch.tensor([1.0, 1 / 3]))


def test_masked_loss_only_counts_the_masked_region():
    pred = torch.zeros(1, 4, 4, 4)
    target = torch.zeros(1, 4, 4, 4)
    target[..., :2] = 1.0  # error only in the left half
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1.0  # keep the right half (pixel mask, resized to the latent grid)
    assert masked_mean(element_loss(pred, target, "l2"), mask).mean() == 0.0
    assert masked_mean(element_loss(pred, target, "l2"), None).mean() == pytest.approx(0.5)


def test_noise_offset_probability_and_input_perturbation_decay():
    noise = torch.zeros(64, 4, 2, 2)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(offset_noise(_cfg(noise_offset=0.1, noise_offset_probability=0.0), noise, gen), noise)
    shifted = offset_noise(_cfg(noise_offset=0.1, noise_offset_probability=1.0), noise, gen)
    # constant over the spatial dims, different per sample/channel
    assert torch.equal(shifted[:, :, :1, :1].expand_as(shifted), shifted) and shifted.abs().sum() > 0
    half = offset_noise(_cfg(noise_offset=0.1, noise_offset_probability=0.5), noise, gen)
    hit = (half.flatten(1).abs().sum(1) > 0).float().mean()
    assert 0.2 < hit < 0.8
    cfg = _cfg(input_perturbation=0.2, input_perturbation_steps=10)
    assert [input_perturbation_scale(cfg, s) for s in (0, 5, 10, 20)] == pytest.approx([0.2, 0.1, 0.0, 0.0])
    assert input_perturbation_scale(_cfg(input_perturbation=0.2), 1000) == 0.2
