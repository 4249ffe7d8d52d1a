"""Training loss: element loss (l2/huber/smooth_l1), masks, and SNR-based timestep weighting."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


def compute_snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ/(1-ᾱ) at each timestep."""
    alpha = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha / (1.0 - alpha).clamp(min=1e-12)


def huber_c_for(schedule: str, huber_c: float, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                num_train_timesteps: int) -> torch.Tensor:
    """Per-sample Huber threshold: constant, decaying exponentially with t, or shaped by the noise level."""
    t = timesteps.float()
    if schedule == "constant":
        return torch.full_like(t, huber_c)
    if schedule == "exponential":
        return torch.exp(math.log(huber_c) * t / num_train_timesteps)
    if schedule == "snr":
        alpha = alphas_cumprod.to(t.device)[timesteps].float()
        sigma = ((1 - alpha) / alpha.clamp(min=1e-12)).sqrt()
        return (1 - huber_c) / (1 + sigma) ** 2 + huber_c
    raise ValueError(f"huber_schedule {schedule!r} is not one of snr, exponential, constant")


def element_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                 c: torch.Tensor | None = None) -> torch.Tensor:
    """Unreduced loss per element."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if c is None:
        raise ValueError("huber and smooth_l1 losses need a huber_c")
    c = c.view(-1, *([1] * (pred.dim() - 1)))
    soft = torch.sqrt((pred - target) ** 2 + c**2) - c
    if loss_type == "huber":
        return 2 * c * soft
    if loss_type == "smooth_l1":
        return 2 * soft
    raise ValueError(f"loss_type {loss_type!r} is not one of l2, huber, smooth_l1")


def snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str, *, soft: bool = False) -> torch.Tensor:
    """Min-SNR-γ loss weights (soft: the smooth γ·snr/(γ+snr) instead of min(snr, γ)).

    The weight is expressed for the model's target: ε-targets divide by snr, v-targets by snr+1.
    """
    clipped = gamma * snr / (gamma + snr) if soft else torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr.clamp(min=1e-8)


def resize_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B,1,H,W] (or [B,H,W]) mask in [0,1] resized to the latent grid."""
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    mask = mask.to(like.device, like.dtype)
    if mask.shape[-2:] != like.shape[-2:]:
        mask = F.interpolate(mask, size=like.shape[-2:], mode="area")
    return mask


def masked_mean(loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-sample mean of an element loss ``[B, ...]``; with a mask, the mean over the masked area."""
    if mask is None:
        return loss.flatten(1).mean(1)
    m = resize_mask(mask, loss)
    return (loss * m).flatten(1).sum(1) / (m.expand_as(loss).flatten(1).sum(1)).clamp(min=1.0)


def offset_noise(cfg: Any, noise: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``--noise_offset``: a per-sample, per-channel constant shift, applied with the configured probability.

    The shifted noise is both mixed into the latents and used as the target.
    """
    if not cfg.noise_offset:
        return noise
    prob = cfg.noise_offset_probability
    b, ch = noise.shape[:2]
    ones = [1] * (noise.dim() - 2)  # images [B,C,H,W], clips [B,C,F,H,W]: one shift per sample and channel
    shift = torch.randn(b, ch, *ones, generator=generator, device=noise.device, dtype=noise.dtype)
    apply = (torch.rand(b, 1, *ones, generator=generator, device=noise.device) < prob).to(noise.dtype)
    return noise + cfg.noise_offset * shift * apply


def input_perturbation_scale(cfg: Any, step: int) -> float:
    """``--input_perturbation`` strength at ``step``; decays linearly to 0 over ``--input_perturbation_steps``."""
    base = cfg.input_perturbation
    steps = cfg.input_perturbation_steps
    if not base or not steps:
        return base
    return base * max(0.0, 1.0 - step / steps)
