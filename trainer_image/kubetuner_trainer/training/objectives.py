"""Training objectives: how a clean latent, noise and a noise level become the model input and target.

A model family owns one objective (``ModelFamily.objective``):

* :class:`DDPMObjective` — the UNet families. Integer timesteps ``t ∈ [0, T)``,
  ``x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε`` (the scheduler's ``add_noise``), target ``ε`` (epsilon) or
  ``v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀`` (v_prediction); Min-SNR-γ weighting.
* :class:`FlowMatchingObjective` — rectified flow (Flux, SD3). Sigma ``σ ∈ [0, 1]``,
  ``x_σ = (1−σ)·x₀ + σ·ε``, target the velocity ``ε − x₀``; timesteps handed to the model are
  ``1000·σ`` (the scale of ``FlowMatchEulerDiscreteScheduler``).

Both draw their noise levels from the options (:mod:`.timesteps`) and compute the loss with the
shared element losses and masks (:mod:`.losses`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from ..config import Problem
from .losses import compute_snr, element_loss, huber_c_for, masked_mean, snr_weights
from .timesteps import FlowSchedule, TimestepSampler

#: flow-matching model timesteps are sigma times this (FlowMatchEulerDiscreteScheduler's scale)
FLOW_TIMESTEP_SCALE = 1000.0


class Objective(ABC):
    """One family's diffusion objective. Timesteps are on the model's own scale (see module docstring)."""

    prediction_type: str
    num_train_timesteps: int
    timestep_dtype: torch.dtype

    def to(self, device: torch.device | str) -> Objective:
        return self

    @abstractmethod
    def sample_timesteps(self, latents: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Noise levels for a batch ``latents [B, C, H, W]``: a CPU tensor ``[B]`` of ``timestep_dtype``."""

    @abstractmethod
    def noisy_latents(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The model input at ``timesteps``."""

    @abstractmethod
    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model's prediction is compared against."""

    @abstractmethod
    def eval_timesteps(self, count: int) -> list[float]:
        """``count`` noise levels spread evenly over the schedule (centres of equal slices), for eval loss."""

    @abstractmethod
    def loss(self, cfg: Any, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """The scalar loss of a batch under ``--loss_type``/``--huber_*``/``--snr_gamma`` and the mask."""


class DDPMObjective(Objective):
    """ε- or v-prediction on a DDPM noise schedule (the scheduler's betas)."""

    timestep_dtype = torch.long

    def __init__(self, cfg: Any, scheduler: Any, prediction_type: str, *, refiner: bool | None = None,
                 invert: bool | None = None):
        """``refiner``/``invert``: train only one expert's timesteps (unset: ``--refiner_training`` /
        ``--refiner_training_invert_schedule``; see :class:`TimestepSampler`)."""
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.sampler = TimestepSampler(cfg, self.num_train_timesteps, refiner=refiner, invert=invert)
        self.alphas_cumprod = scheduler.alphas_cumprod

    def to(self, device: torch.device | str) -> DDPMObjective:
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    def sample_timesteps(self, latents, generator):
        return self.sampler(latents.shape[0], generator)

    def noisy_latents(self, latents, noise, timesteps):
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents, noise, timesteps):
        if self.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(latents, noise, timesteps)

    def eval_timesteps(self, count):
        """Spread over the timesteps this objective trains on (a refiner stage's range, else all)."""
        from .evaluation import eval_timesteps

        low, high = self.sampler.low, self.sampler.high
        return [low + t for t in eval_timesteps(count, high - low)]

    def loss(self, cfg, pred, target, timesteps, mask=None):
        loss_type = cfg.loss_type
        c = None
        if loss_type != "l2":
            c = huber_c_for(cfg.huber_schedule, cfg.huber_c,
                            timesteps, self.alphas_cumprod, self.num_train_timesteps)
        loss = masked_mean(element_loss(pred.float(), target.float(), loss_type, c), mask)
        if cfg.snr_gamma:
            snr = compute_snr(self.alphas_cumprod, timesteps)
            loss = loss * snr_weights(snr, cfg.snr_gamma, self.prediction_type, soft=bool(cfg.use_soft_min_snr))
        return loss.mean()


class FlowMatchingObjective(Objective):
    """Rectified flow: straight paths from data (σ=0) to noise (σ=1), velocity target."""

    prediction_type = "flow_matching"
    timestep_dtype = torch.float32
    num_train_timesteps = int(FLOW_TIMESTEP_SCALE)

    def __init__(self, cfg: Any, scheduler_config: Any = None):
        self.schedule = FlowSchedule.from_options(cfg, scheduler_config)

    @staticmethod
    def sigmas(timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``[B]`` model timesteps → sigmas broadcastable against ``like``."""
        return (timesteps.float() / FLOW_TIMESTEP_SCALE).to(like.device).view(-1, *([1] * (like.dim() - 1)))

    def sample_timesteps(self, latents, generator):
        sigmas = self.schedule.sample(latents.shape[0], generator, tuple(latents.shape[-2:]))
        return sigmas * FLOW_TIMESTEP_SCALE

    def noisy_latents(self, latents, noise, timesteps):
        sigma = self.sigmas(timesteps, latents)
        return (1.0 - sigma) * latents + sigma * noise

    def target(self, latents, noise, timesteps):
        return noise - latents

    def eval_timesteps(self, count):
        count = max(1, count)
        return [(i + 0.5) / count * FLOW_TIMESTEP_SCALE for i in range(count)]

    def loss(self, cfg, pred, target, timesteps, mask=None):
        """Plain MSE on the velocity (masked where a mask is given); as in SimpleTuner, flow matching
        ignores ``--loss_type`` and ``--snr_gamma`` (:func:`flow_schedule_warnings` says so)."""
        return masked_mean(element_loss(pred.float(), target.float(), "l2"), mask).mean()


def flow_schedule_problems(cfg: Any) -> list[Problem]:
    """Flow-schedule options that cannot work together (SimpleTuner refuses the same)."""
    problems = []
    if cfg.flow_schedule_auto_shift and (cfg.flow_schedule_shift or 0) > 0:
        problems.append(Problem("flow_schedule_shift", cfg.flow_schedule_shift,
                                "cannot be combined with flow_schedule_auto_shift; set it to 0 to pick the "
                                "shift from the resolution"))
    if cfg.flow_use_uniform_schedule and cfg.flow_use_beta_schedule:
        problems.append(Problem("flow_use_beta_schedule", True, "choose one of flow_use_uniform_schedule and "
                                                                "flow_use_beta_schedule"))
    return problems


def flow_schedule_warnings(cfg: Any) -> list[Problem]:
    """Options a flow-matching family ignores (accepted, as SimpleTuner does, but reported)."""
    warnings = []
    if (cfg.loss_type or "l2") != "l2":
        warnings.append(Problem("loss_type", cfg.loss_type, "has no effect with flow matching (always l2)"))
    if cfg.snr_gamma:
        warnings.append(Problem("snr_gamma", cfg.snr_gamma, "has no effect with flow matching (no SNR weighting)"))
    if cfg.timestep_bias_strategy not in (None, "none"):
        warnings.append(Problem("timestep_bias_strategy", cfg.timestep_bias_strategy,
                                "has no effect with flow matching; use the flow_* schedule options"))
    if cfg.refiner_training:
        warnings.append(Problem("refiner_training", True, "has no effect with flow matching (SimpleTuner restricts "
                                                          "DDPM timesteps only); use the flow_* schedule options"))
    return warnings
