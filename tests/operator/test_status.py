"""Status derivation: deterministic, churn-free, kstatus-friendly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kubetuner_operator.status import (
    Outcome,
    Phase,
    derive_status,
    format_duration,
    status_changed,
)
from kubetuner_trainer.contract import CheckpointInfo, TrainerState, TrainerStatus

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
RUNNING = Outcome(Phase.RUNNING, "Training", "Training: step 10/100, epoch 0.")
TRAINER = TrainerStatus(state=TrainerState.TRAINING, step=10, max_steps=100, epoch=1, loss=0.123456,
                        samples_per_second=2.5, eta_seconds=125.4,
                        checkpoints=(CheckpointInfo(5, "/out/checkpoint-5", "2026-03-01T11:59:00Z"),
                                     CheckpointInfo(10, "/out/checkpoint-10", "2026-03-01T12:00:00Z", complete=False)))


def derive(outcome: Outcome = RUNNING, *, trainer: TrainerStatus | None = TRAINER, previous: dict | None = None,
           now: datetime = T0, generation: int = 3, restarts: int = 0, hooks: list | None = None) -> dict:
    return derive_status(outcome=outcome, generation=generation, trainer=trainer, previous=previous, now=now,
                         restarts=restarts, hooks=hooks or [], started_at=None)


def test_same_inputs_give_the_same_status() -> None:
    assert derive() == derive()


def test_no_churn_when_nothing_changes() -> None:
    first = derive()
    later = derive(previous=first, now=T0 + timedelta(hours=5))
    assert later == first
    assert not status_changed(first, later)
    # Keys the operator does not own do not force a patch either.
    assert not status_changed({**first, "kopf": {"progress": {}}}, later)


def test_conditions_shape_and_transitions() -> None:
    first = derive()
    by_type = {c["type"]: c for c in first["conditions"]}
    assert list(by_type) == ["Ready", "Running", "Succeeded", "Failed", "Suspended", "Stalled"]
    for cond in first["conditions"]:
        assert set(cond) == {"type", "status", "observedGeneration", "lastTransitionTime", "reason", "message"}
        assert cond["observedGeneration"] == 3 and cond["lastTransitionTime"] == "2026-03-01T12:00:00Z"
    assert by_type["Ready"]["status"] == "True" and by_type["Running"]["status"] == "True"

    later = T0 + timedelta(minutes=30)
    done = derive(Outcome(Phase.SUCCEEDED, "Completed", "Training finished."), previous=first, now=later)
    by_type = {c["type"]: c for c in done["conditions"]}
    # Ready stays True: its transition time is kept. Running/Succeeded flip: they get the new time.
    assert by_type["Ready"]["lastTransitionTime"] == "2026-03-01T12:00:00Z"
    assert by_type["Running"] == {"type": "Running", "status": "False", "observedGeneration": 3,
                                  "lastTransitionTime": "2026-03-01T12:30:00Z", "reason": "NotRunning",
                                  "message": "Training finished."}
    assert by_type["Succeeded"]["status"] == "True" and by_type["Succeeded"]["reason"] == "Completed"
    assert done["completionTime"] == "2026-03-01T12:30:00Z" and done["startTime"] == "2026-03-01T12:00:00Z"

    failed = derive(Outcome(Phase.FAILED, "ConfigError", "bad"), previous=first, now=later)
    assert {c["type"]: c["status"] for c in failed["conditions"]} == {
        "Ready": "False", "Running": "False", "Succeeded": "False", "Failed": "True", "Suspended": "False",
        "Stalled": "False"}


def test_progress_and_checkpoints_from_trainer() -> None:
    status = derive()
    assert status["progress"] == {"step": 10, "maxSteps": 100, "epoch": 1, "percent": "10.0", "loss": "0.1235",
                                  "samplesPerSecond": "2.50", "eta": "2m05s"}
    # Only complete checkpoints count.
    assert status["checkpoints"] == {"latestStep": 5, "latestPath": "/out/checkpoint-5",
                                     "latestTime": "2026-03-01T11:59:00Z"}
    # Without a fresh report the last known values stay.
    quiet = derive(trainer=None, previous=status, now=T0 + timedelta(minutes=1))
    assert quiet["progress"] == status["progress"] and quiet["checkpoints"] == status["checkpoints"]
    # A trainer reporting an older checkpoint (e.g. restarted, not yet rescanned) does not regress it.
    older = TrainerStatus(step=1, checkpoints=(CheckpointInfo(2, "/out/checkpoint-2", "t"),))
    assert derive(trainer=older, previous=status)["checkpoints"]["latestStep"] == 5


def test_pending_status_has_no_start_time() -> None:
    pending = derive(Outcome(Phase.PENDING, "Creating", "Creating trainer."), trainer=None)
    assert pending["startTime"] is None and pending["completionTime"] is None
    assert pending["progress"]["percent"] == "0.0"
    assert {c["type"]: c["status"] for c in pending["conditions"]}["Ready"] == "False"


def test_hooks_sorted_and_restarts_reported() -> None:
    hooks = [{"checkpointStep": 20, "hook": "a", "job": "j3", "result": "Pending"},
             {"checkpointStep": 10, "hook": "b", "job": "j2", "result": "Running"},
             {"checkpointStep": 10, "hook": "a", "job": "j1", "result": "Succeeded"}]
    status = derive(hooks=hooks, restarts=2)
    assert [h["job"] for h in status["hooks"]] == ["j1", "j2", "j3"] and status["restarts"] == 2


@pytest.mark.parametrize(("seconds", "text"), [(None, ""), (-1, ""), (0, "0s"), (59.6, "1m00s"), (61, "1m01s"),
                                               (3600, "1h00m00s"), (90061, "25h01m01s")])
def test_format_duration(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("phase", list(Phase))
def test_every_status_fits_the_crd_schema(phase: Phase) -> None:
    """No field the API server would prune, no wrong type, every phase in the schema's enum."""
    from kubetuner_operator.crd.schema import trainingjob_openapi_schema
    from kubetuner_operator.crd.validation import validate_value

    hooks = [{"checkpointStep": 5, "hook": "eval", "job": "j", "result": "Running"}]
    status = derive(Outcome(phase, "Reason", "message"), hooks=hooks, restarts=1)
    schema = trainingjob_openapi_schema()["properties"]["status"]
    assert validate_value(status, schema, "status", strict=True) == []
