"""What the training loop reports, and how the runtime learns it (torch-free).

The loop calls a :class:`TrainingEvents` object; the runtime (metrics, /status, webhooks,
hooks, publishing, trackers) implements it. ``NullEvents`` is the do-nothing default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .contract import CheckpointInfo, TrainerState


@dataclass(frozen=True)
class StepReport:
    """One optimizer step, as the loop saw it."""

    step: int
    max_steps: int
    epoch: int
    max_epochs: int | None
    loss: float
    loss_components: dict[str, float] = field(default_factory=dict)
    learning_rates: dict[str, float] = field(default_factory=dict)
    samples_per_second: float | None = None
    seconds_per_step: float | None = None
    data_wait_seconds: float | None = None
    grad_norm: float | None = None
    gpu_memory_allocated_bytes: int | None = None
    gpu_memory_peak_bytes: int | None = None


class TrainingEvents(Protocol):
    def state(self, state: TrainerState, message: str = "") -> None: ...
    def step(self, report: StepReport) -> None: ...
    def checkpoint(self, info: CheckpointInfo, *, seconds: float) -> None: ...
    def validation(self, step: int, images: list[Path], *, seconds: float,
                   scores: dict[str, float] | None = None) -> None:
        """Validation at ``step`` wrote ``images``; ``scores``: its CLIP scores (``clip/mean``, ...), if any."""
        ...
    def error(self, message: str) -> None: ...
    def stop_requested(self) -> bool: ...


class NullEvents:
    """Reports nowhere and never asks the loop to stop."""

    def state(self, state: TrainerState, message: str = "") -> None:
        pass

    def step(self, report: StepReport) -> None:
        pass

    def checkpoint(self, info: CheckpointInfo, *, seconds: float) -> None:
        pass

    def validation(self, step: int, images: list[Path], *, seconds: float,
                   scores: dict[str, float] | None = None) -> None:
        pass

    def error(self, message: str) -> None:
        pass

    def stop_requested(self) -> bool:
        return False
