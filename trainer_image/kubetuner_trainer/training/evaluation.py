"""Evaluation loss on held-out datasets (``--eval_dataset_id``): when it runs and what it measures.

The loss is the plain mean squared error between the model's prediction and its training target
(the family's objective), averaged over every evaluation sample and ``--eval_timesteps`` noise
levels spread evenly over the schedule. The noise of each (sample, timestep) pair is drawn from a generator seeded by the
run's seed, the sample and the timestep, so the same weights always give the same number — in a
resumed run, and with any number of processes (each process evaluates its shard; sums and counts
are all-reduced).

Reported through ``StepReport.loss_components`` of the step it ran after: ``eval_loss`` (all
evaluation samples pooled) and, unless ``--eval_dataset_pooling``, ``eval_loss/<dataset id>``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

POOLED_KEY = "eval_loss"


def dataset_key(dataset_id: str) -> str:
    """The loss-component name of one evaluation dataset's loss."""
    return f"{POOLED_KEY}/{dataset_id}"


@dataclass(frozen=True)
class EvalSchedule:
    """After which optimizer steps the evaluation runs.

    ``every_steps``: every N steps. ``every_epochs``: every E epochs (fractions run several times per
    epoch), i.e. whenever the step count crosses a multiple of ``E * updates_per_epoch``. With both,
    either schedule triggers an evaluation. With neither, once per epoch.
    """

    every_steps: int | None
    every_epochs: Fraction | None
    updates_per_epoch: int

    def due(self, step: int) -> bool:
        if step <= 0:
            return False
        if self.every_steps and step % self.every_steps == 0:
            return True
        if self.every_epochs:
            interval = self.every_epochs * self.updates_per_epoch
            return math.floor(step / interval) > math.floor((step - 1) / interval)
        return False


def plan_eval_schedule(cfg: Any, updates_per_epoch: int) -> EvalSchedule:
    steps = cfg.eval_steps_interval or None
    epochs = Fraction(str(cfg.eval_epoch_interval)) if cfg.eval_epoch_interval else None
    if steps and epochs:
        log.warning("both eval_steps_interval and eval_epoch_interval are set; evaluating on both schedules")
    if not steps and not epochs:
        epochs = Fraction(1)
    return EvalSchedule(steps, epochs, max(1, updates_per_epoch))


def eval_timesteps(count: int, num_train_timesteps: int) -> list[int]:
    """``count`` timesteps spread evenly over ``[0, num_train_timesteps)`` (centres of equal slices)."""
    count = max(1, min(count, num_train_timesteps))
    return [min(num_train_timesteps - 1, int((i + 0.5) * num_train_timesteps / count)) for i in range(count)]


def sample_noise(shape: tuple[int, ...], *, seed: int, dataset_id: str, key: str, timestep_index: int) -> torch.Tensor:
    """The fixed noise of one (sample, timestep) pair (``key``: the sample's path)."""
    digest = hashlib.sha256(f"{seed}\0eval\0{dataset_id}\0{key}\0{timestep_index}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") & ((1 << 63) - 1))
    return torch.randn(shape, generator=generator)


# predict(batch, noisy_latents, timesteps) -> model output
Predict = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]
Reduce = Callable[[torch.Tensor], torch.Tensor]


class Evaluator:
    """Computes the evaluation loss over an ``EvalSource`` (see the module docstring)."""

    def __init__(self, source: Any, *, seed: int, objective: Any, count: int, pooling: bool, device: torch.device):
        self.source = source
        self.seed = seed
        self.objective = objective
        self.timesteps = objective.eval_timesteps(count)
        self.pooling = pooling
        self.device = device
        self.dataset_ids: list[str] = list(source.dataset_ids)

    @torch.no_grad()
    def evaluate(self, predict: Predict, reduce_sum: Reduce | None = None) -> dict[str, float]:
        """Loss components for this evaluation (every process must call it: sums are all-reduced)."""
        index = {d: i for i, d in enumerate(self.dataset_ids)}
        totals = torch.zeros(len(self.dataset_ids), 2, dtype=torch.float64)  # [sum of losses, count]
        for batch in self._batches():
            row = index[batch.dataset_ids[0]]
            latents = batch.latents.to(self.device, dtype=torch.float32)
            for t_index, t in enumerate(self.timesteps):
                noise = torch.stack([
                    sample_noise(tuple(latents.shape[1:]), seed=self.seed, dataset_id=batch.dataset_ids[0],
                                 key=path, timestep_index=t_index) for path in batch.paths]).to(self.device)
                objective = self.objective
                steps = torch.full((latents.shape[0],), t, dtype=objective.timestep_dtype, device=self.device)
                pred = predict(batch, objective.noisy_latents(latents, noise, steps), steps)
                per_sample = F.mse_loss(pred.float(), objective.target(latents, noise, steps).float(),
                                        reduction="none").flatten(1).mean(1)
                totals[row, 0] += float(per_sample.double().sum())
                totals[row, 1] += per_sample.shape[0]
        if reduce_sum is not None:
            totals = reduce_sum(totals.to(self.device)).cpu().double()
        return self._components(totals)

    def _batches(self) -> Iterable[Any]:
        return self.source.batches()

    def _components(self, totals: torch.Tensor) -> dict[str, float]:
        count = float(totals[:, 1].sum())
        if count == 0:
            raise RuntimeError(f"the evaluation datasets {', '.join(self.dataset_ids)} yielded no samples")
        out = {POOLED_KEY: float(totals[:, 0].sum()) / count}
        if not self.pooling:
            for i, dataset_id in enumerate(self.dataset_ids):
                if totals[i, 1] > 0:
                    out[dataset_key(dataset_id)] = float(totals[i, 0] / totals[i, 1])
        return out


def build_evaluator(cfg: Any, data: Any, *, seed: int, objective: Any,
                    device: torch.device) -> Evaluator | None:
    """An evaluator when the data has evaluation datasets and ``--eval_loss_disable`` is off."""
    source = getattr(data, "eval_source", None)
    if source is None or cfg.eval_loss_disable:
        return None
    count = cfg.eval_timesteps
    return Evaluator(source, seed=seed, objective=objective, count=count,
                     pooling=bool(cfg.eval_dataset_pooling), device=device)
