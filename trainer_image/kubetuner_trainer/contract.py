"""The trainer ↔ operator contract: the status document and the exit codes.

Dependency-free on purpose: the operator and the trainer both import it. The trainer
serves :class:`TrainerStatus` as JSON at ``GET /status`` on its metrics port; the
operator polls it. The document is versioned by ``CONTRACT_VERSION``; readers ignore
fields they do not know, so adding fields is compatible, renaming or removing is not.

Exit codes (the pod's container exit code):

* ``0``  SUCCESS: training finished and the final model is saved.
* ``75`` INTERRUPTED (EX_TEMPFAIL): stopped early (SIGTERM, preemption) after writing a
  checkpoint; run again with ``--resume_from_checkpoint latest``.
* ``78`` CONFIG_ERROR (EX_CONFIG): the configuration is invalid; retrying cannot help.
* anything else: a crash; the operator retries within ``backoffLimit``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from enum import IntEnum, StrEnum
from typing import Any

CONTRACT_VERSION = 1
STATUS_PATH = "/status"
METRICS_PATH = "/metrics"
DEFAULT_METRICS_PORT = 9400
# A checkpoint folder ``checkpoint-<step>`` is complete once this file exists in it (written last).
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_COMPLETE_MARKER = "COMPLETE"


class ExitCode(IntEnum):
    SUCCESS = 0
    INTERRUPTED = 75
    CONFIG_ERROR = 78

    @classmethod
    def describe(cls, code: int | None) -> str:
        """A short human sentence for a container exit code."""
        if code == cls.SUCCESS:
            return "training finished"
        if code == cls.INTERRUPTED:
            return "trainer was interrupted after checkpointing and asks to be resumed"
        if code == cls.CONFIG_ERROR:
            return "trainer rejected its configuration (not retried)"
        return f"trainer exited with code {code}"


class TrainerState(StrEnum):
    STARTING = "starting"
    CACHING = "caching"
    TRAINING = "training"
    VALIDATING = "validating"
    CHECKPOINTING = "checkpointing"
    FINISHED = "finished"
    FAILED = "failed"


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: str
    time: str  # RFC 3339, UTC
    complete: bool = True


@dataclass(frozen=True)
class TrainerStatus:
    """What ``GET /status`` returns. Numbers are ``None`` until known."""

    state: TrainerState = TrainerState.STARTING
    step: int = 0
    max_steps: int | None = None
    epoch: int = 0
    max_epochs: int | None = None
    percent: float | None = None
    eta_seconds: float | None = None
    loss: float | None = None
    last_losses: dict[str, float] = field(default_factory=dict)
    samples_per_second: float | None = None
    learning_rate: float | None = None
    checkpoints: tuple[CheckpointInfo, ...] = ()
    message: str = ""
    job_id: str | None = None
    updated_at: str | None = None
    version: int = CONTRACT_VERSION

    @property
    def latest_checkpoint(self) -> CheckpointInfo | None:
        complete = [c for c in self.checkpoints if c.complete]
        return max(complete, key=lambda c: c.step) if complete else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = str(self.state)
        data["checkpoints"] = [asdict(c) for c in self.checkpoints]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerStatus:
        """Parse a status document; unknown fields are ignored, a newer major version is refused."""
        version = int(data.get("version", CONTRACT_VERSION))
        if version > CONTRACT_VERSION:
            raise ValueError(f"trainer status version {version} is newer than supported {CONTRACT_VERSION}")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["state"] = TrainerState(kwargs.get("state", TrainerState.STARTING))
        cp_known = {f.name for f in fields(CheckpointInfo)}
        kwargs["checkpoints"] = tuple(
            CheckpointInfo(**{k: v for k, v in c.items() if k in cp_known}) for c in data.get("checkpoints", ())
        )
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str | bytes) -> TrainerStatus:
        return cls.from_dict(json.loads(text))
