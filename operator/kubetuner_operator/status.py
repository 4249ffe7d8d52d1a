"""Pure status derivation: the outcome of a reconcile in, the TrainingJob ``status`` out.

Deterministic on purpose: the same inputs give the same dict, and a condition keeps its
``lastTransitionTime`` while its status does not change, so an idle job is never re-patched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from kubetuner_trainer.contract import TrainerState, TrainerStatus


class Phase(StrEnum):
    PENDING = "Pending"
    CACHING = "Caching"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    RESTARTING = "Restarting"


TERMINAL = frozenset({Phase.SUCCEEDED, Phase.FAILED})
ACTIVE = frozenset({Phase.CACHING, Phase.RUNNING})
CONDITION_TYPES = ("Ready", "Running", "Succeeded", "Failed", "Suspended", "Stalled")
# status.hooks keeps at most this many entries (the CRD's maxItems): 10,000 checkpoints with two hooks
# each would otherwise grow the object past what the API server stores.
HOOK_STATUS_LIMIT = 50
FINISHED_HOOK_RESULTS = ("Succeeded", "Failed", "Unknown")


@dataclass(frozen=True)
class Outcome:
    """What the reconciler concluded about the trainer: phase, a CamelCase reason, a sentence."""

    phase: Phase
    reason: str
    message: str


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def format_duration(seconds: float | None) -> str:
    """``1h02m03s`` style; empty when unknown."""
    if seconds is None or seconds < 0:
        return ""
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def progress_from(trainer: TrainerStatus | None, previous: Mapping[str, Any] | None,
                  phase: Phase) -> dict[str, Any]:
    """Progress from the trainer; without a fresh report the previous values stay (no churn)."""
    if trainer is None:
        prev = dict(previous or {})
        base = {"step": 0, "maxSteps": 0, "epoch": 0, "percent": "0.0", "loss": "", "samplesPerSecond": "",
                "eta": ""}
        base.update(prev)
        if phase == Phase.SUCCEEDED:
            base["percent"] = "100.0"
            base["eta"] = ""
        return base
    max_steps = trainer.max_steps or 0
    percent = trainer.percent
    if percent is None and max_steps:
        percent = 100.0 * trainer.step / max_steps
    if phase == Phase.SUCCEEDED or trainer.state == TrainerState.FINISHED:
        percent = 100.0
    return {
        "step": int(trainer.step),
        "maxSteps": int(max_steps),
        "epoch": int(trainer.epoch),
        "percent": _fmt(percent if percent is not None else 0.0, 1),
        "loss": _fmt(trainer.loss, 4),
        "samplesPerSecond": _fmt(trainer.samples_per_second, 2),
        "eta": "" if phase in TERMINAL else format_duration(trainer.eta_seconds),
    }


def checkpoints_from(trainer: TrainerStatus | None, previous: Mapping[str, Any] | None) -> dict[str, Any]:
    prev = {"latestStep": 0, "latestPath": "", "latestTime": "", **dict(previous or {})}
    latest = trainer.latest_checkpoint if trainer else None
    if latest is None or latest.step < prev["latestStep"]:
        return prev
    return {"latestStep": int(latest.step), "latestPath": latest.path, "latestTime": latest.time}


def _condition(ctype: str, status: bool, reason: str, message: str, generation: int,
               previous: Mapping[str, Mapping[str, Any]], now: datetime) -> dict[str, Any]:
    value = "True" if status else "False"
    prev = previous.get(ctype)
    since = prev.get("lastTransitionTime") if prev and prev.get("status") == value else None
    return {"type": ctype, "status": value, "observedGeneration": generation,
            "lastTransitionTime": since or rfc3339(now), "reason": reason, "message": message}


def conditions_for(outcome: Outcome, generation: int, previous: Sequence[Mapping[str, Any]],
                   now: datetime, stalled: tuple[str, str] | None = None) -> list[dict[str, Any]]:
    """metav1.Conditions; ``Ready`` is kstatus' readiness: True while training runs or has succeeded.

    ``Stalled`` is kstatus' abnormal-true condition: True (with the API server's message) while
    the operator cannot make progress, e.g. a child it must create is refused; ``stalled`` is
    its (reason, message).
    """
    prev = {c.get("type", ""): c for c in previous or ()}
    phase = outcome.phase
    ready = phase in ACTIVE or phase == Phase.SUCCEEDED
    r, m = outcome.reason, outcome.message
    return [
        _condition("Ready", ready, r, m, generation, prev, now),
        _condition("Running", phase in ACTIVE, r if phase in ACTIVE else "NotRunning", m, generation, prev, now),
        _condition("Succeeded", phase == Phase.SUCCEEDED, r if phase == Phase.SUCCEEDED else "NotSucceeded", m,
                   generation, prev, now),
        _condition("Failed", phase == Phase.FAILED, r if phase == Phase.FAILED else "NotFailed", m, generation,
                   prev, now),
        _condition("Suspended", phase == Phase.SUSPENDED, r if phase == Phase.SUSPENDED else "NotSuspended", m,
                   generation, prev, now),
        _condition("Stalled", stalled is not None, *(stalled or ("NotStalled", "")), generation, prev, now),
    ]


def compact_hooks(hooks: Sequence[Mapping[str, Any]], previous: Mapping[str, Any]
                  ) -> tuple[list[dict[str, Any]], dict[str, int] | None]:
    """(hook entries to keep, counts of the entries folded away), at most HOOK_STATUS_LIMIT entries kept.

    The oldest entries that were already finished in ``previous`` status are folded into
    ``hooksCompacted`` (counts by result and ``throughStep``, the newest folded checkpoint step);
    the reconciler creates no hook for a checkpoint at or below ``throughStep``. Pending and running
    entries are never folded, so the list may exceed the limit only while that many hooks are open.
    """
    entries = sorted((dict(h) for h in hooks), key=lambda h: (h["checkpointStep"], h["hook"]))
    done_before = {(h.get("checkpointStep"), h.get("hook")) for h in previous.get("hooks") or ()
                   if h.get("result") in FINISHED_HOOK_RESULTS}
    folded = dict(previous.get("hooksCompacted") or {})
    excess = len(entries) - HOOK_STATUS_LIMIT
    kept = []
    for entry in entries:
        if excess > 0 and (entry["checkpointStep"], entry["hook"]) in done_before:
            key = str(entry["result"]).lower()
            folded[key] = int(folded.get(key, 0)) + 1
            folded["throughStep"] = max(int(folded.get("throughStep", 0)), int(entry["checkpointStep"]))
            excess -= 1
        else:
            kept.append(entry)
    return kept, folded or None


def derive_status(*, outcome: Outcome, generation: int, trainer: TrainerStatus | None,
                  previous: Mapping[str, Any] | None, now: datetime, restarts: int,
                  hooks: Sequence[Mapping[str, Any]], started_at: str | None = None,
                  stalled: tuple[str, str] | None = None) -> dict[str, Any]:
    """The complete ``status`` of a TrainingJob.

    ``stalled`` is (reason, message) of the ``Stalled`` condition when the operator cannot make progress.

    ``started_at`` is when the trainer was first seen running (the pod's start time when known);
    ``startTime`` and ``completionTime`` are set once and then kept.
    """
    prev = dict(previous or {})
    phase = outcome.phase
    start = prev.get("startTime") or (started_at if phase in ACTIVE | TERMINAL and started_at else None)
    if start is None and phase in ACTIVE | TERMINAL:
        start = rfc3339(now)
    completion = prev.get("completionTime") if prev.get("phase") in TERMINAL else None
    if phase in TERMINAL and completion is None:
        completion = rfc3339(now)
    kept_hooks, compacted = compact_hooks(hooks, prev)
    return {
        "phase": str(phase),
        "observedGeneration": generation,
        "conditions": conditions_for(outcome, generation, prev.get("conditions") or (), now, stalled),
        "progress": progress_from(trainer, prev.get("progress"), phase),
        "checkpoints": checkpoints_from(trainer, prev.get("checkpoints")),
        "hooks": kept_hooks,
        "hooksCompacted": compacted,
        "restarts": restarts,
        "startTime": start,
        "completionTime": completion if phase in TERMINAL else None,
        "message": outcome.message,
    }


def status_changed(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether a patch is needed (keys the operator does not own, e.g. ``kopf``, are ignored)."""
    old = old or {}
    return any(old.get(key) != value for key, value in new.items())
