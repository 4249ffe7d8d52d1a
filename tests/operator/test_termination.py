"""The trainer's termination message on the operator side: pod spec fields and reconcile decisions.

A checkpoint written after the operator's last poll (the final one, the one on SIGTERM) is only
in the trainer container's termination message; the plan must treat it like a polled status.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import kubernetes_validate
import pytest
from operator_helpers import make_trainingjob

from kubetuner_operator.builders import build_indexed_job, build_trainer_pod, hook_job_name
from kubetuner_operator.reconcile import (
    Counters,
    Observed,
    RunState,
    classify_pod,
    plan,
    terminated_report,
    trainer_report,
)
from kubetuner_operator.spec import parse_training_job
from kubetuner_trainer.contract import CheckpointInfo, TrainerState, TrainerStatus
from kubetuner_trainer.termination import (
    DEFAULT_TERMINATION_LOG,
    TERMINATION_LOG_ENV,
    config_error_status,
    termination_message,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
JOB = parse_training_job(make_trainingjob())
BASE = frozenset({("PersistentVolumeClaim", "sdxl-style-output"), ("PersistentVolumeClaim", "sdxl-style-latents")})


def checkpoint(step: int, complete: bool = True) -> CheckpointInfo:
    return CheckpointInfo(step, f"/workspace/output/checkpoint-{step}", "2026-03-01T11:50:00Z", complete)


def terminated_pod(attempt: int, code: int, report: TrainerStatus | None, *, last_state: bool = False,
                   raw: str | None = None) -> dict[str, Any]:
    obj = build_trainer_pod(JOB, attempt, resume=attempt > 0)
    message = raw if raw is not None else (termination_message(report) if report is not None else "")
    term = {"terminated": {"exitCode": code, "message": message}}
    status = {"name": "trainer", "state": {"running": {}}, "lastState": term} if last_state else \
        {"name": "trainer", "state": term}
    obj["status"] = {"phase": "Running" if last_state else ("Succeeded" if code == 0 else "Failed"),
                     "startTime": "2026-03-01T11:00:00Z", "containerStatuses": [status]}
    return obj


def running_status(step: int, *checkpoints: CheckpointInfo) -> dict[str, Any]:
    """The TrainingJob status after polls saw ``step`` and hooked ``checkpoints``."""
    return {"phase": "Running", "observedGeneration": 1, "conditions": [],
            "progress": {"step": step, "maxSteps": 1000, "epoch": 1, "percent": f"{step / 10:.1f}", "loss": "0.1000",
                         "samplesPerSecond": "", "eta": "1m00s"},
            "checkpoints": {"latestStep": checkpoints[-1].step if checkpoints else 0,
                            "latestPath": checkpoints[-1].path if checkpoints else "", "latestTime": ""},
            "hooks": [{"checkpointStep": c.step, "hook": "eval", "job": hook_job_name("sdxl-style", "eval", c.step),
                       "result": "Succeeded"} for c in checkpoints],
            "restarts": 0, "startTime": "2026-03-01T11:00:00Z", "completionTime": None, "message": ""}


def hook_job(step: int) -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": hook_job_name("sdxl-style", "eval", step)},
            "status": {"conditions": [{"type": "Complete", "status": "True"}]}}


# ---------------------------------------------------------------- pod spec


@pytest.mark.parametrize("overrides", [{}, {"nodes": 2}, {"nodes": 2, "resources": {"gpus": 4}}])
def test_trainer_container_writes_its_termination_message_to_a_file(overrides: dict[str, Any]) -> None:
    job = parse_training_job(make_trainingjob(**overrides))
    child = build_trainer_pod(job, 0, resume=False) if job.nodes == 1 else build_indexed_job(job, 0, resume=False)
    spec = child["spec"] if child["kind"] == "Pod" else child["spec"]["template"]["spec"]
    [container] = spec["containers"]
    assert container["terminationMessagePath"] == DEFAULT_TERMINATION_LOG == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "File"  # not FallbackToLogsOnError: logs are no JSON
    env = {e["name"]: e for e in container["env"]}
    assert env[TERMINATION_LOG_ENV] == {"name": "KUBETUNER_TERMINATION_LOG", "value": "/dev/termination-log"}
    kubernetes_validate.validate(child, kubernetes_validate.latest_version(), strict=True)
    kubernetes_validate.validate(child, "1.28", strict=True)


# ---------------------------------------------------------------- reading the pods


def test_terminated_report_reads_state_and_last_state() -> None:
    report = TrainerStatus(state=TrainerState.FINISHED, step=1000, max_steps=1000, checkpoints=(checkpoint(1000),))
    assert terminated_report(terminated_pod(0, 0, report)) == report
    assert terminated_report(terminated_pod(0, 0, report, last_state=True)) == report
    assert terminated_report(terminated_pod(0, 1, None, raw="Traceback (most recent call last): ...")) is None
    assert terminated_report(terminated_pod(0, 1, None)) is None
    running = build_trainer_pod(JOB, 0, resume=False)
    running["status"] = {"phase": "Running", "containerStatuses": [{"name": "trainer", "state": {"running": {}}}]}
    assert terminated_report(running) is None


def test_config_error_detail_comes_from_the_message_or_plain_text() -> None:
    status = config_error_status("1 configuration problem:\n  - --learning_rate: must be >= 0 (got -1)")
    structured = classify_pod(terminated_pod(0, 78, status))
    assert structured.state == RunState.CONFIG_ERROR
    assert structured.detail == "configuration error: 1 configuration problem: - --learning_rate: must be >= 0 (got -1)"
    assert "{" not in structured.detail  # the JSON document itself is not shown to users
    plain = classify_pod(terminated_pod(0, 78, None, raw="learning_rate: must be >= 0"))
    assert plain.state == RunState.CONFIG_ERROR and plain.detail == "learning_rate: must be >= 0"


# ---------------------------------------------------------------- planning


def test_final_checkpoint_only_in_the_message_gets_its_hook_job_and_progress() -> None:
    # Polls saw step 900 and checkpoint 500; the trainer then saved checkpoint 1000 and exited 0.
    prev = running_status(900, checkpoint(500))
    final = TrainerStatus(state=TrainerState.FINISHED, step=1000, max_steps=1000, epoch=3, loss=0.0421,
                          percent=100.0, checkpoints=(checkpoint(500), checkpoint(1000)))
    result = plan(JOB, counters=Counters(), trainer=None, previous_status=prev, now=NOW,
                  observed=Observed(pods=[terminated_pod(0, 0, final)], hook_jobs=[hook_job(500)], existing=BASE))
    assert result.status["phase"] == "Succeeded"
    assert [o["metadata"]["name"] for o in result.create] == [hook_job_name("sdxl-style", "eval", 1000)]
    [created] = result.create
    assert "/workspace/output/checkpoint-1000" in created["spec"]["template"]["spec"]["containers"][0]["command"]
    progress = result.status["progress"]
    assert (progress["step"], progress["loss"], progress["percent"]) == (1000, "0.0421", "100.0")
    assert result.status["checkpoints"]["latestStep"] == 1000
    assert {h["checkpointStep"]: h["result"] for h in result.status["hooks"]} == {500: "Succeeded", 1000: "Pending"}


def test_sigterm_checkpoint_of_an_interrupted_attempt_is_hooked_while_resuming() -> None:
    prev = running_status(520, checkpoint(500))
    stopped = TrainerStatus(state=TrainerState.TRAINING, step=531, max_steps=1000, loss=0.09,
                            checkpoints=(checkpoint(500), checkpoint(531)))
    observed = Observed(pods=[terminated_pod(0, 75, stopped)], hook_jobs=[hook_job(500)], existing=BASE)
    result = plan(JOB, counters=Counters(), trainer=None, previous_status=prev, now=NOW, observed=observed)
    assert result.status["phase"] == "Restarting" and result.counters == Counters(1, 1)
    created = [o["metadata"]["name"] for o in result.create]
    assert created == ["sdxl-style-t1", hook_job_name("sdxl-style", "eval", 531)]
    assert result.status["progress"]["step"] == 531 and result.status["checkpoints"]["latestStep"] == 531

    # A reconcile cut short after persisting the new attempt: replaying still plans the hook Job.
    replay = plan(JOB, counters=Counters(1, 1), trainer=None, previous_status=prev, now=NOW, observed=observed)
    assert hook_job_name("sdxl-style", "eval", 531) in [o["metadata"]["name"] for o in replay.create]
    # ... and the old attempt's message never becomes the progress of the new attempt.
    assert replay.status["progress"]["step"] == 520


def test_polled_progress_wins_and_old_messages_only_add_checkpoints() -> None:
    old = TrainerStatus(state=TrainerState.TRAINING, step=531, checkpoints=(checkpoint(531),))
    polled = TrainerStatus(state=TrainerState.TRAINING, step=700, max_steps=1000, checkpoints=(checkpoint(600),))
    observed = Observed(pods=[terminated_pod(0, 75, old)])
    report = trainer_report(polled, Counters(1, 1), observed)
    assert report is not None and report.step == 700
    assert [c.step for c in report.checkpoints] == [531, 600]
    assert trainer_report(None, Counters(1, 1), observed) is None  # no report of the current attempt
    assert trainer_report(polled, Counters(1, 1), Observed()) is polled


def test_incomplete_checkpoint_in_the_message_gets_no_hook() -> None:
    final = TrainerStatus(state=TrainerState.FAILED, step=40, checkpoints=(checkpoint(40, complete=False),))
    result = plan(JOB, counters=Counters(), trainer=None, previous_status=None, now=NOW,
                  observed=Observed(pods=[terminated_pod(0, 1, final)], existing=BASE))
    assert not [o for o in result.create if o["kind"] == "Job"]
    assert result.status["hooks"] == []


def test_replaying_with_the_same_message_changes_nothing() -> None:
    final = TrainerStatus(state=TrainerState.FINISHED, step=1000, max_steps=1000, checkpoints=(checkpoint(1000),))
    pods = [terminated_pod(0, 0, final)]
    first = plan(JOB, counters=Counters(), trainer=None, previous_status=running_status(900), now=NOW,
                 observed=Observed(pods=pods, existing=BASE))
    created = hook_job(1000)
    created["status"] = {}
    observed = Observed(pods=pods, hook_jobs=[created], existing=BASE)
    second = plan(JOB, counters=Counters(), trainer=None, previous_status=first.status, now=NOW, observed=observed)
    assert second.create == [] and second.status["hooks"][0]["result"] == "Running"
    third = plan(JOB, counters=Counters(), trainer=None, previous_status=second.status, now=NOW, observed=observed)
    assert third.create == [] and third.status == second.status and third.events == []
