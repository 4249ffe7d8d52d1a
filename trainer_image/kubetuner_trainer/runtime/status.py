"""Turns training events into the :class:`TrainerStatus` document served at ``GET /status``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

from ..contract import CheckpointInfo, TrainerState, TrainerStatus
from ..events import StepReport

# Weight of the newest step time in the smoothed average behind the ETA. Small enough that
# one slow step (a checkpoint, a validation) does not swing the estimate much.
ETA_SMOOTHING = 0.1
# The status document keeps this many most recent checkpoints.
MAX_CHECKPOINTS = 50


def utc_now() -> str:
    """The current time as RFC 3339 UTC with second precision."""
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class StatusTracker:
    """Thread-safe accumulator of the trainer's status.

    The training loop's thread feeds it events; the HTTP server's threads read
    :meth:`snapshot`. ``clock`` (monotonic seconds) and ``wall`` (RFC 3339 timestamps) are
    injectable so tests can drive time.
    """

    def __init__(
        self,
        *,
        job_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], str] = utc_now,
        smoothing: float = ETA_SMOOTHING,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._wall = wall
        self._smoothing = smoothing
        self._status = TrainerStatus(job_id=job_id, updated_at=wall())
        self._step_seconds: float | None = None
        self._last_step_at: float | None = None
        self._last_step: int | None = None
        self._eval_losses: dict[str, float] = {}  # the latest evaluation, kept until the next one

    def snapshot(self) -> TrainerStatus:
        with self._lock:
            return self._status

    @property
    def smoothed_step_seconds(self) -> float | None:
        with self._lock:
            return self._step_seconds

    def state(self, state: TrainerState, message: str = "") -> None:
        with self._lock:
            self._update(state=TrainerState(state), message=message)

    def step(self, report: StepReport) -> None:
        now = self._clock()
        with self._lock:
            measured = report.seconds_per_step
            if measured is None and self._last_step_at is not None and self._last_step is not None:
                steps = report.step - self._last_step
                if steps > 0:
                    measured = (now - self._last_step_at) / steps
            if measured is not None and measured >= 0:
                if self._step_seconds is None:
                    self._step_seconds = measured
                else:
                    self._step_seconds += self._smoothing * (measured - self._step_seconds)
            self._last_step_at, self._last_step = now, report.step

            max_steps = report.max_steps if report.max_steps > 0 else None
            percent = eta = None
            if max_steps:
                percent = round(min(100.0, 100.0 * report.step / max_steps), 2)
                if self._step_seconds is not None:
                    eta = round(max(0, max_steps - report.step) * self._step_seconds, 1)
            components = {k: float(v) for k, v in report.loss_components.items()}
            if any(k == "eval_loss" or k.startswith("eval_loss/") for k in components):
                self._eval_losses = {k: v for k, v in components.items()
                                     if k == "eval_loss" or k.startswith("eval_loss/")}
            losses = {"loss": float(report.loss), **self._eval_losses, **components}
            lr = None
            if report.learning_rates:
                lr = float(next(iter(report.learning_rates.values())))
            state = self._status.state
            if state in (TrainerState.STARTING, TrainerState.CACHING, TrainerState.VALIDATING,
                         TrainerState.CHECKPOINTING):
                state = TrainerState.TRAINING  # a step means the loop is training again
            self._update(
                state=state,
                step=report.step,
                max_steps=max_steps,
                epoch=report.epoch,
                max_epochs=report.max_epochs,
                percent=percent,
                eta_seconds=eta,
                loss=float(report.loss),
                last_losses=losses,
                samples_per_second=report.samples_per_second,
                learning_rate=lr,
            )

    def checkpoint(self, info: CheckpointInfo) -> None:
        with self._lock:
            kept = [c for c in self._status.checkpoints if c.step != info.step and c.path != info.path]
            kept.append(info)
            kept.sort(key=lambda c: c.step)
            self._update(checkpoints=tuple(kept[-MAX_CHECKPOINTS:]))

    def error(self, message: str) -> None:
        with self._lock:
            self._update(message=message)

    def _update(self, **changes: object) -> None:
        self._status = replace(self._status, updated_at=self._wall(), **changes)
