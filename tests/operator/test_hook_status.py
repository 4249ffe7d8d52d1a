"""status.hooks stays bounded: old finished hook runs are folded into counts and never run again."""

from __future__ import annotations

from datetime import UTC, datetime

from operator_helpers import make_trainingjob

from kubetuner_operator.builders import hook_job_name
from kubetuner_operator.crd.schema import status_schema
from kubetuner_operator.crd.validation import validate_value
from kubetuner_operator.reconcile import Counters, Observed, plan
from kubetuner_operator.spec import parse_training_job
from kubetuner_operator.status import HOOK_STATUS_LIMIT, compact_hooks
from kubetuner_trainer.contract import CheckpointInfo, TrainerState, TrainerStatus

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
JOB = parse_training_job(make_trainingjob())
EXISTING = frozenset({("PersistentVolumeClaim", "sdxl-style-output"),
                      ("PersistentVolumeClaim", "sdxl-style-latents")})
RUNNING_POD = {"metadata": {"name": "sdxl-style-t0", "labels": {"kubetuner.dev/attempt": "0"}},
               "status": {"phase": "Running", "containerStatuses": [{"name": "trainer", "state": {"running": {}}}]}}


def entry(step: int, result: str) -> dict:
    return {"checkpointStep": step, "hook": "eval", "job": hook_job_name("sdxl-style", "eval", step), "result": result}


def test_only_entries_finished_before_are_folded():
    steps = range(1, HOOK_STATUS_LIMIT + 11)
    finished = [entry(s, "Succeeded" if s % 3 else "Failed") for s in steps]
    kept, folded = compact_hooks(finished, {"hooks": finished})
    assert len(kept) == HOOK_STATUS_LIMIT and kept[0]["checkpointStep"] == 11
    assert folded == {"succeeded": 7, "failed": 3, "throughStep": 10}
    # Just finished (not finished in the previous status): kept this time, so metrics see them finish.
    kept, folded = compact_hooks(finished, {"hooks": [entry(s, "Running") for s in steps]})
    assert len(kept) == len(finished) and folded is None
    # Open hooks are never folded, even beyond the limit.
    pending = [entry(s, "Pending") for s in steps]
    assert compact_hooks(pending, {"hooks": pending}) == (pending, None)


def test_thousands_of_checkpoints_keep_the_status_small_and_hooks_run_once():
    steps = range(100, 100 * (HOOK_STATUS_LIMIT + 31), 100)
    checkpoints = tuple(CheckpointInfo(s, f"/workspace/output/checkpoint-{s}", "t") for s in steps)
    trainer = TrainerStatus(state=TrainerState.TRAINING, step=steps[-1], checkpoints=checkpoints)
    previous = {"phase": "Running", "hooks": [entry(s, "Succeeded") for s in steps]}
    observed = Observed(pods=[RUNNING_POD], hook_jobs=[], existing=EXISTING)
    first = plan(JOB, counters=Counters(), observed=observed, trainer=trainer, previous_status=previous, now=NOW)
    assert len(first.status["hooks"]) == HOOK_STATUS_LIMIT
    assert first.status["hooksCompacted"] == {"succeeded": 30, "throughStep": steps[29]}
    assert not [o for o in first.create if o["kind"] == "Job"], "folded hooks must not run again"
    assert validate_value(first.status, status_schema(), "status") == []
    second = plan(JOB, counters=Counters(), observed=observed, trainer=trainer, previous_status=first.status,
                  now=NOW)
    assert second.status["hooksCompacted"] == first.status["hooksCompacted"]
    assert not [o for o in second.create if o["kind"] == "Job"]
