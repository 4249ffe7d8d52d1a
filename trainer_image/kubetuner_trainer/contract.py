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
from dataclasses import asdict, dataclass, field
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any

CONTRACT_VERSION = 1
STATUS_PATH = "/status"
METRICS_PATH = "/metrics"
DEFAULT_METRICS_PORT = 9400
# A checkpoint folder ``checkpoint-<step>`` is complete once this file exists in it (written last).
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_COMPLETE_MARKER = "COMPLETE"


def checkpoint_folder(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of optimizer step ``step`` lives: ``<output_dir>/checkpoint-<step>``."""
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_folders(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoint-<step>`` folder under ``output_dir``, complete or not, by step.

    The one checkpoint discovery: the trainer's resume, pruning and scripts, the local runner and
    anything else that reads an output folder use it (or :func:`complete_checkpoints`).
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        suffix = child.name.removeprefix(CHECKPOINT_PREFIX)
        if child.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() and child.is_dir():
            found.append((int(suffix), child))
    return sorted(found)


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint (its ``COMPLETE`` marker exists, written last), by step."""
    return [(step, folder) for step, folder in checkpoint_folders(output_dir)
            if (folder / CHECKPOINT_COMPLETE_MARKER).is_file()]


#: the folder under ``output_dir`` that holds validation renders, one ``step-<n>`` folder per validation
VALIDATION_FOLDER = "validation"
#: the description of one step's renders inside its folder (the renders are every other file there)
VALIDATION_INDEX = "index.json"


def validation_folder(output_dir: str | Path, step: int) -> Path:
    """Where the validation renders of optimizer step ``step`` are written."""
    return Path(output_dir) / VALIDATION_FOLDER / f"step-{step}"


def benchmark_folder(output_dir: str | Path) -> Path:
    """Where the base model's renders (``--disable_benchmark false``) are kept, once per output folder."""
    return Path(output_dir) / VALIDATION_FOLDER / "benchmark"


def validation_renders(output_dir: str | Path) -> list[Path]:
    """Every validation render (image or video file) under ``output_dir``, by path."""
    root = Path(output_dir) / VALIDATION_FOLDER
    return sorted(p for p in root.glob("step-*/*") if p.is_file() and p.name != VALIDATION_INDEX)


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
    def from_dict(cls, data: Any) -> TrainerStatus:
        """Parse a status document; unknown fields are ignored, a newer major version is refused.

        Raises ``ValueError`` for anything that is not a status document of this contract (not
        an object, a field of the wrong JSON type, an unknown state), so a reader never gets
        a half-typed object: the caller treats the document as "no status".
        """
        if not isinstance(data, dict):
            raise ValueError(f"a trainer status must be a JSON object, not {type(data).__name__}")
        version = _typed(data, "version", int, CONTRACT_VERSION)
        if version > CONTRACT_VERSION:
            raise ValueError(f"trainer status version {version} is newer than supported {CONTRACT_VERSION}")
        kwargs: dict[str, Any] = {name: _typed(data, name, kind, None if nullable else getattr(cls(), name))
                                  for name, (kind, nullable) in _STATUS_FIELDS.items() if name in data}
        try:
            kwargs["state"] = TrainerState(_typed(data, "state", str, str(TrainerState.STARTING)))
        except ValueError as exc:
            raise ValueError(f"unknown trainer state {data.get('state')!r}") from exc
        losses = _typed(data, "last_losses", dict, {})
        if not all(isinstance(k, str) and _is(v, float) for k, v in losses.items()):
            raise ValueError("last_losses must map names to numbers")
        kwargs["last_losses"] = {k: float(v) for k, v in losses.items()}
        checkpoints = _typed(data, "checkpoints", list, [])
        kwargs["checkpoints"] = tuple(_checkpoint(c) for c in checkpoints)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str | bytes) -> TrainerStatus:
        return cls.from_dict(json.loads(text))


# name -> (JSON type, may be null); ``state``, ``last_losses`` and ``checkpoints`` are parsed apart.
_STATUS_FIELDS: dict[str, tuple[type, bool]] = {
    "step": (int, False), "max_steps": (int, True), "epoch": (int, False), "max_epochs": (int, True),
    "percent": (float, True), "eta_seconds": (float, True), "loss": (float, True),
    "samples_per_second": (float, True), "learning_rate": (float, True), "message": (str, False),
    "job_id": (str, True), "updated_at": (str, True), "version": (int, False),
}


def _is(value: Any, kind: type) -> bool:
    """JSON typing: bools are not numbers; an integer is a valid float."""
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def _typed(data: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = data.get(name, default)
    if value is None and default is None:
        return None
    if not _is(value, kind):
        raise ValueError(f"trainer status field {name!r} must be {kind.__name__}, got {value!r:.60}")
    return float(value) if kind is float else value


def _checkpoint(data: Any) -> CheckpointInfo:
    if not isinstance(data, dict):
        raise ValueError(f"a checkpoint must be a JSON object, not {type(data).__name__}")
    if "step" not in data or "path" not in data:
        raise ValueError("a checkpoint needs its step and path")
    return CheckpointInfo(step=_typed(data, "step", int, 0), path=_typed(data, "path", str, ""),
                          time=_typed(data, "time", str, ""), complete=_typed(data, "complete", bool, True))
