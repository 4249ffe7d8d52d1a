"""Which diffusion timesteps a batch trains on: bias weighting and segmented (stratified) sampling."""

from __future__ import annotations

from typing import Any

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


class TimestepSampler:
    """Timestep sampling configured from the options."""

    def __init__(self, cfg: Any, num_timesteps: int):
        self.weights = bias_weights(
            num_timesteps, cfg.timestep_bias_strategy,
            multiplier=1.0 if cfg.timestep_bias_multiplier is None else cfg.timestep_bias_multiplier,
            portion=cfg.timestep_bias_portion if cfg.timestep_bias_portion is not None else 0.25,
            begin=cfg.timestep_bias_begin or 0,
            end=cfg.timestep_bias_end if cfg.timestep_bias_end is not None else num_timesteps,
        )
        self.segmented = not cfg.disable_segmented_timestep_sampling

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return sample_timesteps(self.weights, batch_size, segmented=self.segmented, generator=generator)
