"""Pure reconcile decisions: what to create, delete and report for each observed situation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from operator_helpers import make_trainingjob

from kubetuner_operator.builders import build_pvcs, build_trainer_pod, hook_job_name
from kubetuner_operator.reconcile import (
    Counters,
    Observed,
    Plan,
    RunState,
    classify_pod,
    plan,
    status_endpoint,
)
from kubetuner_operator.spec import parse_training_job
from kubetuner_trainer.contract import CheckpointInfo, TrainerState, TrainerStatus

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
JOB = parse_training_job(make_trainingjob())
BASE = frozenset({("PersistentVolumeClaim", "sdxl-style-output"), ("PersistentVolumeClaim", "sdxl-style-latents")})


def pod(attempt: int, **status: Any) -> dict[str, Any]:
    obj = build_trainer_pod(JOB, attempt, resume=attempt > 0)
    obj["status"] = status
    return obj


def trainer_state(code: int | None = None, **extra: Any) -> dict[str, Any]:
    state = {"terminated": {"exitCode": code}} if code is not None else {"running": {}}
    return {"containerStatuses": [{"name": "trainer", "state": state}], **extra}


def run_plan(*, pods: list[dict[str, Any]] = (), counters: Counters = Counters(), prev: dict | None = None,
             trainer: TrainerStatus | None = None, job=JOB, hook_jobs: list[dict[str, Any]] = (),
             now: datetime = NOW, existing: frozenset = BASE) -> Plan:
    observed = Observed(pods=list(pods), hook_jobs=list(hook_jobs), existing=existing)
    return plan(job, counters=counters, observed=observed, trainer=trainer, previous_status=prev, now=now)


def names(objs: list[dict[str, Any]]) -> list[str]:
    return [o["metadata"]["name"] for o in objs]


@pytest.mark.parametrize(("status", "spec", "meta", "state"), [
    ({"phase": "Pending"}, {}, {}, RunState.PENDING),
    ({"phase": "Pending"}, {"schedulingGates": [{"name": "kueue.x-k8s.io/admission"}]}, {}, RunState.QUEUED),
    ({"phase": "Running", **trainer_state()}, {}, {}, RunState.RUNNING),
    ({"phase": "Running"}, {}, {"deletionTimestamp": "2026-03-01T12:00:00Z"}, RunState.TERMINATING),
    ({"phase": "Succeeded", **trainer_state(0)}, {}, {}, RunState.SUCCEEDED),
    ({"phase": "Failed", **trainer_state(78)}, {}, {}, RunState.CONFIG_ERROR),
    ({"phase": "Failed", **trainer_state(75)}, {}, {}, RunState.INTERRUPTED),
    ({"phase": "Failed", **trainer_state(1)}, {}, {}, RunState.CRASHED),
    ({"phase": "Failed", **trainer_state(137, conditions=[{"type": "DisruptionTarget", "status": "True"}])}, {}, {},
     RunState.EVICTED),
    ({"phase": "Failed", "reason": "Evicted"}, {}, {}, RunState.EVICTED),
    ({"phase": "Failed", "reason": "Preempting"}, {}, {}, RunState.EVICTED),
])
def test_classify_pod(status: dict, spec: dict, meta: dict, state: RunState) -> None:
    obj = {"metadata": {"name": "p", **meta}, "spec": spec, "status": status}
    assert classify_pod(obj).state == state


def test_fresh_job_creates_everything_once() -> None:
    first = run_plan(existing=frozenset())
    assert [o["kind"] for o in first.create] == ["PersistentVolumeClaim", "PersistentVolumeClaim", "Pod"]
    assert first.status["phase"] == "Pending" and first.counters is None and not first.delete
    assert "--resume_from_checkpoint" not in first.create[-1]["spec"]["containers"][0]["args"]
    # Replaying with what was created observed converges: nothing more to create.
    again = run_plan(pods=[pod(0, phase="Pending")], prev=first.status)
    assert again.create == [] and again.delete == [] and again.status["phase"] == "Pending"
    assert again.status["conditions"][0]["reason"] == "TrainerPending"
    # ... and once more with nothing new observed, the status is identical (no churn).
    third = run_plan(pods=[pod(0, phase="Pending")], prev=again.status, now=NOW + timedelta(minutes=5))
    assert third.status == again.status and third.events == []


def test_caching_then_running() -> None:
    caching = run_plan(pods=[pod(0, phase="Running", podIP="10.0.0.5")],
                       trainer=TrainerStatus(state=TrainerState.CACHING, message="caching 3/10"))
    assert caching.status["phase"] == "Caching" and caching.status["message"] == "caching 3/10"
    running = run_plan(pods=[pod(0, phase="Running")], prev=caching.status,
                       trainer=TrainerStatus(state=TrainerState.TRAINING, step=5, max_steps=50))
    assert running.status["phase"] == "Running" and running.events[0].reason == "Training"


@pytest.mark.parametrize("failure", [trainer_state(75), {"reason": "Evicted"}, trainer_state(1)])
def test_retryable_failure_restarts_with_resume(failure: dict) -> None:
    result = run_plan(pods=[pod(0, phase="Failed", **failure)], prev={"phase": "Running"})
    assert result.counters == Counters(attempt=1, restarts=1)
    assert names(result.create) == ["sdxl-style-t1"]
    assert result.create[0]["spec"]["containers"][0]["args"][-2:] == ["--resume_from_checkpoint", "latest"]
    assert result.status["phase"] == "Restarting" and result.status["restarts"] == 1
    assert result.events[0].type == "Warning"
    # The new pod pending keeps the job "Restarting"; the old failed pod is left for its logs.
    after = run_plan(pods=[pod(0, phase="Failed", **failure), pod(1, phase="Pending")], counters=result.counters,
                     prev=result.status)
    assert after.status["phase"] == "Restarting" and after.create == [] and after.delete == []


def test_backoff_limit_exhausted() -> None:
    result = run_plan(pods=[pod(3, phase="Failed", **trainer_state(75))], counters=Counters(3, 3),
                      prev={"phase": "Running"})
    assert result.status["phase"] == "Failed" and result.create == [] and result.counters is None
    assert result.status["conditions"][3]["reason"] == "BackoffLimitExceeded"


def test_config_error_is_permanent() -> None:
    failed = run_plan(pods=[pod(0, phase="Failed", **trainer_state(78))], prev={"phase": "Running"})
    assert failed.status["phase"] == "Failed" and failed.create == [] and failed.counters is None
    assert "not retried" in failed.status["message"]
    # Terminal is sticky: even with the pod gone, nothing is recreated.
    later = run_plan(pods=[], prev=failed.status, now=NOW + timedelta(hours=1))
    assert later.create == [] and later.status == failed.status and later.events == []


def test_pod_vanishing_while_running_counts_as_preemption() -> None:
    result = run_plan(pods=[], prev={"phase": "Running"})
    assert result.counters == Counters(1, 1) and names(result.create) == ["sdxl-style-t1"]


def test_suspend_deletes_pod_once_and_resume_resumes() -> None:
    suspended_job = parse_training_job(make_trainingjob(runPolicy={"suspend": True}))
    first = run_plan(job=suspended_job, pods=[pod(0, phase="Running")], prev={"phase": "Running"})
    assert first.delete == [("Pod", "sdxl-style-t0")] and first.counters == Counters(1, 0)
    assert first.status["phase"] == "Suspended" and first.create == []
    again = run_plan(job=suspended_job, pods=[], counters=Counters(1, 0), prev=first.status)
    assert again.delete == [] and again.counters is None and again.create == []
    resumed = run_plan(pods=[], counters=Counters(1, 0), prev=again.status)
    assert names(resumed.create) == ["sdxl-style-t1"] and resumed.status["restarts"] == 0
    assert resumed.create[0]["spec"]["containers"][0]["args"][-2:] == ["--resume_from_checkpoint", "latest"]


def test_stale_attempts_are_deleted() -> None:
    result = run_plan(pods=[pod(0, phase="Running"), pod(1, phase="Running")], counters=Counters(1, 1),
                      prev={"phase": "Running"})
    assert result.delete == [("Pod", "sdxl-style-t0")]


def test_hook_jobs_bounded_and_idempotent() -> None:
    checkpoints = tuple(CheckpointInfo(s, f"/workspace/output/checkpoint-{s}", "t") for s in (100, 200, 300, 400))
    trainer = TrainerStatus(state=TrainerState.TRAINING, step=400, checkpoints=checkpoints)
    first = run_plan(pods=[pod(0, phase="Running")], trainer=trainer, prev={"phase": "Running"})
    hooks = [o for o in first.create if o["kind"] == "Job"]
    assert names(hooks) == [hook_job_name("sdxl-style", "eval", 100), hook_job_name("sdxl-style", "eval", 200)]
    assert [h["result"] for h in first.status["hooks"]] == ["Pending"] * 4
    running = [dict(h, status={"active": 1}) for h in hooks]
    second = run_plan(pods=[pod(0, phase="Running")], trainer=trainer, prev=first.status, hook_jobs=running)
    assert [o for o in second.create if o["kind"] == "Job"] == []  # at the limit of 2
    assert [h["result"] for h in second.status["hooks"]] == ["Running", "Running", "Pending", "Pending"]
    done = [dict(running[0], status={"conditions": [{"type": "Complete", "status": "True"}]}),
            dict(running[1], status={"conditions": [{"type": "Failed", "status": "True"}]})]
    third = run_plan(pods=[pod(0, phase="Running")], trainer=trainer, prev=second.status, hook_jobs=done)
    assert names([o for o in third.create if o["kind"] == "Job"]) == [hook_job_name("sdxl-style", "eval", 300),
                                                                       hook_job_name("sdxl-style", "eval", 400)]
    assert [h["result"] for h in third.status["hooks"]][:2] == ["Succeeded", "Failed"]
    # A finished hook is never relaunched, even after its Job is gone (TTL).
    fourth = run_plan(pods=[pod(0, phase="Running")], trainer=trainer, prev=third.status, hook_jobs=[])
    created = names([o for o in fourth.create if o["kind"] == "Job"])
    assert hook_job_name("sdxl-style", "eval", 100) not in created


def test_deadline_and_ttl() -> None:
    job = parse_training_job(make_trainingjob(hooks=None, runPolicy={"activeDeadlineSeconds": 600,
                                                                      "ttlSecondsAfterFinished": 60}))
    start = {"phase": "Running", "startTime": "2026-03-01T12:00:00Z"}
    within = run_plan(job=job, pods=[pod(0, phase="Running")], prev=start, now=NOW + timedelta(seconds=599))
    assert within.status["phase"] == "Running" and within.requeue_after == pytest.approx(1)
    over = run_plan(job=job, pods=[pod(0, phase="Running")], prev=start, now=NOW + timedelta(seconds=600))
    assert over.status["phase"] == "Failed" and over.delete == [("Pod", "sdxl-style-t0")]
    assert over.status["completionTime"] == "2026-03-01T12:10:00Z" and over.requeue_after == pytest.approx(60)
    assert not over.delete_trainingjob
    expired = run_plan(job=job, pods=[], prev=over.status, now=NOW + timedelta(seconds=660))
    assert expired.delete_trainingjob


def test_status_endpoint_is_the_running_pod_of_the_current_attempt() -> None:
    observed = Observed(pods=[pod(0, phase="Failed", podIP="10.0.0.1"), pod(1, phase="Running", podIP="10.0.0.2")])
    assert status_endpoint(JOB, Counters(1, 1), observed) == ("10.0.0.2", 9400)
    assert status_endpoint(JOB, Counters(0, 0), observed) is None


def test_multinode_queued_by_kueue() -> None:
    job = parse_training_job(make_trainingjob(nodes=2, queueName="q", hooks=None, caches=None,
                                              output={"pvc": {"existingClaim": "results"}}))
    fresh = plan(job, counters=Counters(), observed=Observed(), trainer=None, previous_status=None, now=NOW)
    [indexed] = [o for o in fresh.create if o["kind"] == "Job"]
    assert indexed["spec"]["suspend"] is True
    existing = frozenset((o["kind"], o["metadata"]["name"]) for o in fresh.create if o["kind"] != "Job")
    queued = plan(job, counters=Counters(), observed=Observed(trainer_jobs=[indexed], existing=existing),
                  trainer=None, previous_status=fresh.status, now=NOW)
    assert queued.status["phase"] == "Pending" and queued.create == [] and queued.delete == []
    assert "Kueue" in queued.status["message"]


def test_children_match_the_builders() -> None:
    result = run_plan(existing=frozenset())
    assert result.create[0:2] == build_pvcs(JOB) and result.create[2] == build_trainer_pod(JOB, 0, resume=False)


def test_invalid_spec_failure_ends_when_the_spec_changes() -> None:
    from kubetuner_operator.status import Outcome, Phase, derive_status

    invalid = derive_status(outcome=Outcome(Phase.FAILED, "InvalidSpec", "spec.config.output_dir: ..."),
                            generation=1, trainer=None, previous=None, now=NOW, restarts=0, hooks=[])
    same_generation = run_plan(prev=invalid, existing=frozenset())
    assert same_generation.create == [] and same_generation.status["phase"] == "Failed"
    fixed = parse_training_job(make_trainingjob() | {"metadata": {"name": "sdxl-style", "namespace": "team-a",
                                                                  "uid": "u", "generation": 2}})
    retried = run_plan(job=fixed, prev=invalid, existing=frozenset())
    assert retried.status["phase"] == "Pending" and [o["kind"] for o in retried.create][-1] == "Pod"
    assert retried.status["completionTime"] is None


def test_status_endpoint_of_a_multinode_job_is_node_zero() -> None:
    from kubetuner_operator.builders import build_indexed_job

    job = parse_training_job(make_trainingjob(nodes=2, hooks=None, caches=None,
                                              output={"pvc": {"existingClaim": "results"}}))
    template = build_indexed_job(job, 0, resume=False)["spec"]["template"]

    def node(index: int, ip: str) -> dict[str, Any]:
        return {"metadata": {"name": f"sdxl-style-t0-{index}-x", "labels": template["metadata"]["labels"],
                             "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
                "status": {"phase": "Running", "podIP": ip}}

    observed = Observed(pods=[node(1, "10.0.0.11"), node(0, "10.0.0.10")])
    assert status_endpoint(job, Counters(), observed) == ("10.0.0.10", 9400)


def test_finished_run_wins_over_a_late_suspend() -> None:
    suspended_job = parse_training_job(make_trainingjob(runPolicy={"suspend": True}))
    result = run_plan(job=suspended_job, pods=[pod(0, phase="Succeeded", **trainer_state(0))],
                      prev={"phase": "Running"})
    assert result.status["phase"] == "Succeeded" and result.delete == [] and result.counters is None


def test_replay_after_the_attempt_annotation_landed_creates_the_pod_and_counts_nothing() -> None:
    """A reconcile decided attempt 1 (annotation written) and was cut short before the pod and the status."""
    prev = run_plan(pods=[pod(0, phase="Running")], trainer=TrainerStatus(state=TrainerState.TRAINING, step=9)).status
    decided = run_plan(pods=[pod(0, phase="Failed", reason="Evicted")], prev=prev)
    assert decided.counters == Counters(1, 1)
    for observed in ([pod(0, phase="Failed", reason="Evicted")], []):  # the evicted pod may be gone by now
        replay = run_plan(pods=observed, counters=decided.counters, prev=prev)  # prev: still "Running", restarts 0
        assert replay.counters is None and names(replay.create) == ["sdxl-style-t1"]
        assert replay.create[0]["spec"]["containers"][0]["args"][-2:] == ["--resume_from_checkpoint", "latest"]
        assert replay.status["restarts"] == 1 and replay.status["phase"] == "Restarting"
    # Once the status caught up, a missing trainer of a running job is a real disappearance.
    running = run_plan(pods=[pod(1, phase="Running")], counters=decided.counters, prev=replay.status).status
    lost = run_plan(pods=[], counters=decided.counters, prev=running)
    assert lost.counters == Counters(2, 2) and names(lost.create) == ["sdxl-style-t2"]


def test_terminating_running_pod_is_a_counted_restart_created_once_it_is_gone() -> None:
    prev = run_plan(pods=[pod(0, phase="Running")]).status
    going = pod(0, phase="Running", **trainer_state())
    going["metadata"]["deletionTimestamp"] = "2026-03-01T12:00:00Z"
    decided = run_plan(pods=[going], prev=prev)
    assert decided.counters == Counters(1, 1) and decided.create == [] and decided.delete == []
    assert decided.status["phase"] == "Restarting"
    waiting = run_plan(pods=[going], counters=decided.counters, prev=decided.status)
    assert waiting.create == [] and waiting.counters is None and "sdxl-style-t0 to stop" in waiting.status["message"]
    gone = run_plan(pods=[], counters=decided.counters, prev=waiting.status)
    assert names(gone.create) == ["sdxl-style-t1"] and gone.counters is None and gone.status["restarts"] == 1
    assert gone.create[0]["spec"]["containers"][0]["args"][-2:] == ["--resume_from_checkpoint", "latest"]
    # A pod deleted before it ever ran is recreated as the same attempt, nothing counted.
    pending = pod(0, phase="Pending")
    pending["metadata"]["deletionTimestamp"] = "2026-03-01T12:00:00Z"
    assert run_plan(pods=[pending], prev=run_plan().status).counters is None
