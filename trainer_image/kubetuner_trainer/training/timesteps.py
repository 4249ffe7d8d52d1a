"""Which noise levels a batch trains on.

DDPM families: integer timesteps with ``--timestep_bias_*`` weighting and segmented (stratified)
sampling. Flow-matching families: sigmas in ``[0, 1]`` from :class:`FlowSchedule`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def bias_weights(num_timesteps: int, strategy: str | None, *, multiplier: float = 1.0,
                 portion: float = 0.25, begin: int = 0, end: int = 1000) -> torch.Tensor:
    """Relative sampling weight of each timestep under ``--timestep_bias_*``.

    ``earlier``/``later`` scale the first/last ``portion`` of the range by ``multiplier``;
    ``range`` scales ``[begin, end)``. A multiplier of 0 removes those timesteps.
    """
    weights = torch.ones(num_timesteps, dtype=torch.float64)
    if not strategy or strategy == "none":
        return weights
    if strategy in ("earlier", "later"):
        if not 0 < portion <= 1:
            raise ValueError(f"timestep_bias_portion must be in (0, 1], got {portion}")
        count = max(1, int(num_timesteps * portion))
        span = slice(0, count) if strategy == "earlier" else slice(num_timesteps - count, num_timesteps)
    elif strategy == "range":
        if not 0 <= begin < end <= num_timesteps:
            raise ValueError(
                f"timestep_bias_begin/end must satisfy 0 <= begin < end <= {num_timesteps}, got {begin}..{end}"
            )
        span = slice(begin, end)
    else:
        raise ValueError(f"timestep_bias_strategy {strategy!r} is not one of earlier, later, range, none")
    weights[span] *= multiplier
    if weights.sum() <= 0:
        raise ValueError("timestep bias leaves no timestep with a positive weight")
    return weights


def sample_timesteps(weights: torch.Tensor, batch_size: int, *, segmented: bool,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``batch_size`` timesteps. Segmented: one draw from each of ``batch_size`` equal slices.

    Segmenting spreads every batch over the whole noise range instead of leaving coverage to chance;
    a slice whose weights are all zero falls back to the whole distribution.
    """
    n = weights.numel()
    if not segmented or batch_size == 1:
        return torch.multinomial(weights, batch_size, replacement=True, generator=generator)
    bounds = torch.linspace(0, n, batch_size + 1).round().long().tolist()
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        seg = weights[lo:hi]
        if hi <= lo or seg.sum() <= 0:
            out.append(torch.multinomial(weights, 1, generator=generator))
        else:
            out.append(torch.multinomial(seg, 1, generator=generator) + lo)
    return torch.cat(out)


def refiner_timestep_range(num_timesteps: int, strength: float, *, invert: bool = False) -> tuple[int, int]:
    """The half-open timestep range ``[low, high)`` a refiner stage trains on (``--refiner_training*``).

    A refiner (or the low-noise expert of a mixture) takes the last ``strength`` of denoising: timesteps
    ``[0, int(T·strength))``. ``invert`` gives the other expert, ``[int(T·strength), T)`` (SimpleTuner's
    ``segmented_timestep_selection`` bounds). Raises ValueError when the range is empty.
    """
    cut = int(num_timesteps * strength)
    low, high = (cut, num_timesteps) if invert else (0, cut)
    if high <= low:
        raise ValueError(f"refiner_training_strength {strength} leaves no timestep of {num_timesteps} to train on")
    return low, high


class TimestepSampler:
    """Timestep sampling configured from the options.

    ``refiner``: draw only inside :func:`refiner_timestep_range` (unset: ``--refiner_training``); ``invert``:
    the other expert's range (unset: ``--refiner_training_invert_schedule``). The ``--timestep_bias_*``
    weights and segmented sampling then apply within that range.
    """

    def __init__(self, cfg: Any, num_timesteps: int, *, refiner: bool | None = None, invert: bool | None = None):
        weights = bias_weights(
            num_timesteps, cfg.timestep_bias_strategy,
            multiplier=cfg.timestep_bias_multiplier,
            portion=cfg.timestep_bias_portion,
            begin=cfg.timestep_bias_begin,
            end=cfg.timestep_bias_end if cfg.timestep_bias_end is not None else num_timesteps,
        )
        self.low, self.high = 0, num_timesteps
        if cfg.refiner_training if refiner is None else refiner:
            inverted = cfg.refiner_training_invert_schedule if invert is None else invert
            self.low, self.high = refiner_timestep_range(num_timesteps, float(cfg.refiner_training_strength),
                                                         invert=bool(inverted))
        self.weights = weights[self.low:self.high]
        if self.weights.sum() <= 0:
            raise ValueError(f"timestep bias leaves no timestep in [{self.low}, {self.high}) with a positive weight")
        self.segmented = not cfg.disable_segmented_timestep_sampling

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        drawn = sample_timesteps(self.weights, batch_size, segmented=self.segmented, generator=generator)
        return drawn + self.low


# ----- flow matching ---------------------------------------------------------------------------------

#: ``--flux_fast_schedule``: sigmas drawn from this list (7 in 10 draws at pure noise)
FAST_SCHEDULE_SIGMAS = (1.0,) * 7 + (0.75, 0.5, 0.25)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """``σ' = shift·σ / (1 + (shift−1)·σ)`` (SD3 paper §5.3.2); shift > 1 moves mass towards noise."""
    return sigmas * shift / (1 + (shift - 1) * sigmas)


def resolution_shift(latent_hw: tuple[int, int], *, base_seq_len: int = 256, max_seq_len: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15, seq_len: int | None = None) -> float:
    """``--flow_schedule_auto_shift``: ``exp(mu)`` with mu linear in the packed image sequence length.

    The sequence length is ``H·W/4`` for a ``H×W`` latent (2×2 patches) unless ``seq_len`` gives the
    family's own token count (e.g. frames·H·W for LTX-Video); the line through
    ``(base_seq_len, base_shift)`` and ``(max_seq_len, max_shift)`` is the one Flux inference uses
    (``FlowMatchEulerDiscreteScheduler``'s config supplies the four numbers).
    """
    if seq_len is None:
        seq_len = latent_hw[0] * latent_hw[1] // 4
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    mu = base_shift + slope * (seq_len - base_seq_len)
    return math.exp(mu)


@dataclass(frozen=True)
class FlowSchedule:
    """How flow-matching sigmas (noise levels in ``[0, 1]``, 1 = pure noise) are drawn.

    ``kind``: ``sigmoid`` (``sigmoid(scale·N(0,1))``, the default), ``uniform``
    (``--flow_use_uniform_schedule``), ``beta`` (``--flow_use_beta_schedule``, Beta(alpha, beta)) or
    ``fast`` (``--flux_fast_schedule``, :data:`FAST_SCHEDULE_SIGMAS`). The first three are then
    shifted by ``--flow_schedule_shift``, or with ``--flow_schedule_auto_shift`` by a
    resolution-dependent shift. Precedence follows SimpleTuner: uniform, then beta, then fast.
    """

    kind: str = "sigmoid"
    sigmoid_scale: float = 1.0
    beta: tuple[float, float] = (2.0, 2.0)
    shift: float | None = None
    auto_shift: bool = False
    shift_line: tuple[int, int, float, float] = (256, 4096, 0.5, 1.15)

    @classmethod
    def from_options(cls, cfg: Any, scheduler_config: Any = None) -> FlowSchedule:
        """The schedule the ``--flow_*``/``--flux_fast_schedule`` options describe."""
        if cfg.flow_use_uniform_schedule:
            kind = "uniform"
        elif cfg.flow_use_beta_schedule:
            kind = "beta"
        elif cfg.flux_fast_schedule:
            kind = "fast"
        else:
            kind = "sigmoid"
        line = cls.shift_line
        if scheduler_config is not None:
            line = tuple(getattr(scheduler_config, key, default) for key, default in zip(
                ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift"), cls.shift_line,
                strict=True))
        shift = cfg.flow_schedule_shift
        return cls(kind=kind, sigmoid_scale=float(cfg.flow_sigmoid_scale),
                   beta=(float(cfg.flow_beta_schedule_alpha), float(cfg.flow_beta_schedule_beta)),
                   shift=float(shift) if shift else None, auto_shift=bool(cfg.flow_schedule_auto_shift),
                   shift_line=line)  # type: ignore[arg-type]

    def sample(self, batch_size: int, generator: torch.Generator | None, latent_hw: tuple[int, int], *,
               seq_len: int | None = None) -> torch.Tensor:
        """``batch_size`` sigmas (float32, CPU) for latents of spatial size ``latent_hw`` (``seq_len``: the
        denoiser's token count for the auto shift, when it is not ``H·W/4``)."""
        if self.kind == "fast":
            index = torch.randint(len(FAST_SCHEDULE_SIGMAS), (batch_size,), generator=generator)
            return torch.tensor(FAST_SCHEDULE_SIGMAS, dtype=torch.float32)[index]
        if self.kind == "uniform":
            sigmas = torch.rand(batch_size, generator=generator)
        elif self.kind == "beta":
            # numpy draws Beta variates from a seed taken off our generator: resumable and per-rank
            seed = int(torch.randint(2**62, (1,), generator=generator).item())
            draws = np.random.default_rng(seed).beta(*self.beta, size=batch_size)
            sigmas = torch.from_numpy(draws).float()
        else:
            sigmas = torch.sigmoid(self.sigmoid_scale * torch.randn(batch_size, generator=generator))
        if self.auto_shift:
            base_len, max_len, base_shift, max_shift = self.shift_line
            sigmas = shift_sigmas(sigmas, resolution_shift(latent_hw, base_seq_len=base_len, max_seq_len=max_len,
                                                           base_shift=base_shift, max_shift=max_shift,
                                                           seq_len=seq_len))
        elif self.shift:
            sigmas = shift_sigmas(sigmas, self.shift)
        return sigmas
