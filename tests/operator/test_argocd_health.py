"""docs/argocd/trainingjob-health.lua run by a real Lua 5.4 against statuses the reconciler produces."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from operator_helpers import make_trainingjob

from kubetuner_operator.builders import build_trainer_pod
from kubetuner_operator.reconcile import Counters, Observed, plan
from kubetuner_operator.spec import parse_training_job
from kubetuner_trainer.contract import TrainerState, TrainerStatus

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "docs" / "argocd" / "trainingjob-health.lua"
LUA = shutil.which("lua5.4")
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
JOB = parse_training_job(make_trainingjob())
pytestmark = pytest.mark.skipif(LUA is None, reason="lua5.4 is not installed (scripts/test installs it as root)")


def lua_literal(value: Any) -> str:
    """A Lua table constructor for JSON-like data (as Argo CD hands ``obj`` to the script)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string literal is a valid Lua string literal for this text
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    return "{" + ", ".join(f"[{json.dumps(k)}] = {lua_literal(v)}" for k, v in value.items()) + "}"


def health(obj: dict[str, Any]) -> tuple[str, str]:
    harness = f"obj = {lua_literal(obj)}\nlocal hs = dofile({json.dumps(str(SCRIPT))})\nio.write(hs.status, '\\t', hs.message)"
    out = subprocess.run([LUA, "-"], input=harness, capture_output=True, text=True, timeout=30, check=True).stdout
    status, message = out.split("\t", 1)
    return status, message


def trainingjob(status: dict[str, Any] | None, generation: int = 1) -> dict[str, Any]:
    obj = make_trainingjob()
    obj["metadata"]["generation"] = generation
    if status is not None:
        obj["status"] = status
    return obj


def pod(attempt: int, **status: Any) -> dict[str, Any]:
    obj = build_trainer_pod(JOB, attempt, resume=attempt > 0)
    obj["status"] = status
    return obj


def planned(pods: list[dict[str, Any]], prev: dict[str, Any] | None = None, counters: Counters = Counters(),
            trainer: TrainerStatus | None = None) -> dict[str, Any]:
    return plan(JOB, counters=counters, observed=Observed(pods=pods), trainer=trainer, previous_status=prev,
                now=NOW).status


def terminated(code: int) -> dict[str, Any]:
    return {"phase": "Failed" if code else "Succeeded",
            "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": code}}}]}


def test_statuses_of_a_jobs_life() -> None:
    assert health(trainingjob(None))[0] == "Progressing"
    pending = planned([])
    assert health(trainingjob(pending)) == ("Progressing", pending["message"])
    running = planned([pod(0, phase="Running")], pending,
                      trainer=TrainerStatus(state=TrainerState.TRAINING, step=10, max_steps=100))
    assert health(trainingjob(running)) == ("Progressing", "Training: step 10/100, epoch 0.")
    restarting = planned([pod(0, phase="Failed", reason="Evicted")], running)
    assert restarting["phase"] == "Restarting" and health(trainingjob(restarting))[0] == "Progressing"
    done = planned([pod(1, **terminated(0))], restarting, counters=Counters(1, 1))
    assert health(trainingjob(done)) == ("Healthy", "Training finished.")


def test_failures_are_degraded_with_the_operators_message() -> None:
    config_error = planned([pod(0, **terminated(78))], planned([]))
    status, message = health(trainingjob(config_error))
    assert status == "Degraded" and "rejected its configuration" in message
    result = plan(JOB, counters=Counters(), observed=Observed(), trainer=None, previous_status=None, now=NOW)
    refused = "pods is forbidden: exceeded quota: gpus"
    stalled = result.restatus(outcome=result.outcome, stalled=("CreateRefused", refused))
    assert stalled["phase"] == "Pending" and health(trainingjob(stalled)) == ("Degraded", refused)


def test_suspended_and_an_unobserved_generation() -> None:
    suspended = plan(parse_training_job(make_trainingjob(runPolicy={"suspend": True})), counters=Counters(),
                     observed=Observed(), trainer=None, previous_status=None, now=NOW).status
    assert health(trainingjob(suspended))[0] == "Suspended"
    failed = planned([pod(0, **terminated(78))], planned([]))
    status, message = health(trainingjob(failed, generation=2))  # the user just fixed the spec
    assert failed["phase"] == "Failed" and status == "Progressing" and "generation 2" in message
