"""Pure reconcile decisions: desired spec + observed children + trainer report -> a plan.

The handlers observe (list children, poll the trainer), call :func:`plan`, then apply it in order:
persist the attempt counters, delete, create (create-or-get by deterministic name), patch status,
post events. Every decision is a function of what is observed, so replaying a reconcile after an
operator restart converges on the same children instead of duplicating them.

Attempts: the trainer of attempt ``n`` is named ``<job>-t<n>``. A new attempt starts after a
preemption/eviction, an "interrupted" exit (75), a crash, or a running trainer being deleted
(all counted in ``restarts`` against ``runPolicy.backoffLimit``), and after a suspension (not
counted). Every attempt after the first resumes from the latest checkpoint, and is created only
once every older trainer is gone (a trainer stopping on SIGTERM writes its checkpoint first).
The counters live in annotations of the TrainingJob (the status schema has no room for them and
status may be lost); they are the durable decision, written before the child they name is created.

Replays: a reconcile cut short after the counters landed (an API error, the operator killed)
leaves a status whose ``restarts`` lags the annotation. That status describes an older attempt,
so a missing trainer of the current attempt is "not created yet", never "disappeared": the
next reconcile creates it and counts nothing again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from functools import partial
from typing import Any

from kubetuner_trainer.contract import CheckpointInfo, ExitCode, TrainerState, TrainerStatus
from kubetuner_trainer.termination import from_termination_message

from .builders import (
    build_headless_service,
    build_hook_job,
    build_indexed_job,
    build_jobset,
    build_network_policy,
    build_pvcs,
    build_trainer_pod,
    hook_job_name,
    jobset_name,
    trainer_name,
)
from .builders.common import LABEL_ATTEMPT, TRAINER_CONTAINER
from .builders.hook_job import default_checkpoint_path
from .builders.multinode import COMPLETION_INDEX_ANNOTATION
from .builders.network_policy import NetworkPolicySettings
from .spec import TrainingJobSpec
from .status import ACTIVE, TERMINAL, Outcome, Phase, derive_status, parse_time

ANNOTATION_ATTEMPT = "kubetuner.dev/attempt"
ANNOTATION_RESTARTS = "kubetuner.dev/restarts"
# Ready reasons that are final for the spec generation they were reported for (a new spec retries).
SPEC_FAILURES = frozenset({"InvalidSpec", "InvalidConfig", "CreateRejected"})
DISRUPTION_REASONS = frozenset({"Evicted", "Preempting", "Preempted", "Shutdown", "NodeShutdown", "Terminated",
                                "DeletionByTaintManager", "TerminationByKubelet"})
MESSAGE_LIMIT = 512
# What runs one attempt: a Pod (one node), an Indexed Job, or a JobSet (several nodes, JobSet installed).
TRAINER_KINDS = ("Pod", "Job", "JobSet")


class RunState(StrEnum):
    MISSING = "missing"
    QUEUED = "queued"
    PENDING = "pending"
    TERMINATING = "terminating"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    CONFIG_ERROR = "config-error"
    INTERRUPTED = "interrupted"
    EVICTED = "evicted"
    CRASHED = "crashed"


RETRYABLE = frozenset({RunState.INTERRUPTED, RunState.EVICTED, RunState.CRASHED})
FINISHED_STATES = RETRYABLE | {RunState.SUCCEEDED, RunState.CONFIG_ERROR}


@dataclass(frozen=True)
class Counters:
    attempt: int = 0
    restarts: int = 0

    @classmethod
    def from_annotations(cls, annotations: Mapping[str, str] | None) -> Counters:
        annotations = annotations or {}
        return cls(int(annotations.get(ANNOTATION_ATTEMPT, 0)), int(annotations.get(ANNOTATION_RESTARTS, 0)))

    def to_annotations(self) -> dict[str, str]:
        return {ANNOTATION_ATTEMPT: str(self.attempt), ANNOTATION_RESTARTS: str(self.restarts)}


@dataclass(frozen=True)
class Observed:
    """Children of one TrainingJob as listed from the API (by the ``kubetuner.dev/job`` label)."""

    pods: Sequence[Mapping[str, Any]] = ()  # trainer pods, every attempt (also multi-node pods)
    trainer_jobs: Sequence[Mapping[str, Any]] = ()  # multi-node Indexed Jobs and JobSets, every attempt
    hook_jobs: Sequence[Mapping[str, Any]] = ()
    existing: frozenset[tuple[str, str]] = frozenset()  # (kind, name) of PVC/Service/NetworkPolicy


@dataclass(frozen=True)
class Run:
    """The trainer of the current attempt as observed."""

    state: RunState
    detail: str = ""
    started_at: str | None = None
    ran: bool = False  # the trainer had started (a terminating trainer may have checkpointed)


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Plan:
    status: dict[str, Any]
    counters: Counters | None = None  # persist before creating anything
    delete: list[tuple[str, str]] = field(default_factory=list)  # (kind, name)
    create: list[dict[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    delete_trainingjob: bool = False
    requeue_after: float | None = None
    # The status for another outcome (same inputs): used when applying the plan meets a refusal.
    restatus: Callable[..., dict[str, Any]] | None = None
    outcome: Outcome | None = None


# ---------------------------------------------------------------- observation helpers

def _name(obj: Mapping[str, Any]) -> str:
    return str(obj.get("metadata", {}).get("name", ""))


def _attempt_of(obj: Mapping[str, Any]) -> int | None:
    value = (obj.get("metadata", {}).get("labels") or {}).get(LABEL_ATTEMPT)
    return int(value) if value is not None and str(value).isdigit() else None


def _kind(obj: Mapping[str, Any]) -> str:
    return str(obj.get("kind") or "Job")


def _group_finished(obj: Mapping[str, Any]) -> bool:
    """An Indexed Job or JobSet that completed (Job: ``Complete``, JobSet: ``Completed``) or failed."""
    return bool(_group_succeeded(obj) or _true_condition(obj, "Failed"))


def _group_succeeded(obj: Mapping[str, Any]) -> bool:
    return bool(_true_condition(obj, "Complete") or _true_condition(obj, "Completed"))


def _true_condition(obj: Mapping[str, Any], ctype: str) -> Mapping[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or ():
        if cond.get("type") == ctype and cond.get("status") == "True":
            return cond
    return None


def _terminated(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or ():
        if cs.get("name") == TRAINER_CONTAINER:
            return (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
    return None


def terminated_report(pod: Mapping[str, Any]) -> TrainerStatus | None:
    """The final trainer status a terminated trainer container left as its termination message."""
    term = _terminated(pod)
    return from_termination_message(term.get("message")) if term else None


def _waiting_reason(pod: Mapping[str, Any]) -> str:
    status = pod.get("status") or {}
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason") not in (None, "PodInitializing", "ContainerCreating"):
            return f"{waiting['reason']}: {waiting.get('message', '')}".strip(": ")
    cond = next((c for c in status.get("conditions") or () if c.get("type") == "PodScheduled"
                 and c.get("status") == "False"), None)
    return f"{cond.get('reason', 'Unschedulable')}: {cond.get('message', '')}".strip(": ") if cond else ""


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"


def classify_pod(pod: Mapping[str, Any]) -> Run:
    """The state of one trainer pod (preemption, exit codes, Kueue gates, scheduling)."""
    status = pod.get("status") or {}
    phase = status.get("phase", "Pending")
    disruption = _true_condition(pod, "DisruptionTarget")
    disrupted = disruption is not None or status.get("reason") in DISRUPTION_REASONS
    started = status.get("startTime")
    if phase == "Succeeded":
        return Run(RunState.SUCCEEDED, "", started)
    if phase == "Failed":
        term = _terminated(pod) or {}
        code = term.get("exitCode")
        if code == ExitCode.CONFIG_ERROR:
            report = from_termination_message(term.get("message"))
            detail = report.message if report is not None else term.get("message")  # older trainers: plain text
            return Run(RunState.CONFIG_ERROR, _short(detail or ExitCode.describe(code)), started)
        if code == ExitCode.INTERRUPTED:
            return Run(RunState.INTERRUPTED, ExitCode.describe(code), started)
        if disrupted:
            why = (disruption or {}).get("reason") or status.get("reason") or "Disrupted"
            return Run(RunState.EVICTED, _short(f"{why}: {status.get('message') or (disruption or {}).get('message', '')}"
                                                .strip(": ")), started)
        return Run(RunState.CRASHED, _short(ExitCode.describe(code) + (f" ({term['reason']})" if term.get("reason")
                                                                     else "")), started)
    if pod.get("metadata", {}).get("deletionTimestamp"):
        ran = phase == "Running" or any(cs.get("name") == TRAINER_CONTAINER and (cs.get("state") or {}).get("running")
                                        for cs in status.get("containerStatuses") or ())
        return Run(RunState.TERMINATING, "trainer pod is being deleted", started, ran=ran)
    if phase == "Running":
        return Run(RunState.RUNNING, "", started)
    if (pod.get("spec") or {}).get("schedulingGates"):
        return Run(RunState.QUEUED, "waiting for admission (scheduling gates)", started)
    return Run(RunState.PENDING, _short(_waiting_reason(pod)), started)


def _classify_failed_pods(pods: Sequence[Mapping[str, Any]]) -> Run:
    runs = [classify_pod(p) for p in pods]
    for state in (RunState.CONFIG_ERROR, RunState.EVICTED, RunState.INTERRUPTED, RunState.CRASHED):
        for run in runs:
            if run.state == state:
                return run
    return Run(RunState.CRASHED, "a node of the multi-node job failed")


def classify_run(job: TrainingJobSpec, attempt: int, observed: Observed) -> Run:
    """The trainer of ``attempt``: a Pod (one node) or an Indexed Job and its pods (several nodes)."""
    pods = [p for p in observed.pods if _attempt_of(p) == attempt]
    if job.nodes == 1:
        name = trainer_name(job, attempt)
        pod = next((p for p in pods if _name(p) == name), None)
        return classify_pod(pod) if pod is not None else Run(RunState.MISSING)
    tjob = _trainer_group(job, attempt, observed)
    if tjob is None:
        return Run(RunState.MISSING)
    started = (tjob.get("status") or {}).get("startTime") or next(
        (p.get("status", {}).get("startTime") for p in pods if (p.get("status") or {}).get("startTime")), None)
    if tjob.get("metadata", {}).get("deletionTimestamp"):
        return Run(RunState.TERMINATING, "trainer job is being deleted", started, ran=started is not None)
    if _group_succeeded(tjob):
        return Run(RunState.SUCCEEDED, "", started)
    if _true_condition(tjob, "Failed"):
        # Decide once every node has stopped: watch events of pods and Jobs arrive in no set order,
        # and the node that failed first may not be seen failed yet (its exit code decides).
        if any(classify_pod(p).state not in FINISHED_STATES for p in pods):
            return Run(RunState.TERMINATING, "waiting for the nodes of the failed attempt to stop", started)
        return _classify_failed_pods([p for p in pods if (p.get("status") or {}).get("phase") == "Failed"])
    if (tjob.get("spec") or {}).get("suspend"):
        return Run(RunState.QUEUED, "waiting for Kueue admission", started)
    runs = [classify_pod(p) for p in pods]
    if any(r.state in (RunState.CONFIG_ERROR,) for r in runs):
        return next(r for r in runs if r.state == RunState.CONFIG_ERROR)
    # One node failed, was evicted or is being deleted while running: its peers would only hang in
    # collectives, so the whole group ends now (JobSet's failure policy: restart the group).
    if any(r.state in RETRYABLE for r in runs):
        return _classify_failed_pods([p for p in pods if classify_pod(p).state in RETRYABLE])
    lost = next((r for r in runs if r.state == RunState.TERMINATING and r.ran), None)
    if lost is not None:
        return Run(RunState.EVICTED, f"a node's {lost.detail}", started)
    if len([r for r in runs if r.state == RunState.RUNNING]) >= 1:
        return Run(RunState.RUNNING, "", started)
    detail = next((r.detail for r in runs if r.detail), "")
    return Run(RunState.PENDING, detail, started)


def _trainer_group(job: TrainingJobSpec, attempt: int, observed: Observed) -> Mapping[str, Any] | None:
    """The Indexed Job or JobSet of ``attempt``, whichever exists (the kind is chosen when it is created)."""
    names = {trainer_name(job, attempt), jobset_name(job, attempt)}
    return next((j for j in observed.trainer_jobs if _name(j) in names), None)


def _trainer_ref(job: TrainingJobSpec, attempt: int, observed: Observed, *, jobset: bool) -> tuple[str, str]:
    """(kind, name) of the trainer of ``attempt``: as observed, else as it would be created."""
    if job.nodes == 1:
        return "Pod", trainer_name(job, attempt)
    found = _trainer_group(job, attempt, observed)
    if found is not None:
        return _kind(found), _name(found)
    return ("JobSet", jobset_name(job, attempt)) if jobset else ("Job", trainer_name(job, attempt))


def status_endpoint(job: TrainingJobSpec, counters: Counters, observed: Observed) -> tuple[str, int] | None:
    """(pod IP, port) of the trainer to poll: the running pod, or node 0 of a multi-node job."""
    for pod in observed.pods:
        if _attempt_of(pod) != counters.attempt or (pod.get("status") or {}).get("phase") != "Running":
            continue
        if job.nodes > 1:
            index = (pod.get("metadata", {}).get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION)
            labels = pod.get("metadata", {}).get("labels") or {}
            if index != "0" and labels.get("batch.kubernetes.io/job-completion-index") != "0":
                continue
        ip = (pod.get("status") or {}).get("podIP")
        if ip:
            return ip, job.metrics_port
    return None


def _merge_checkpoints(reports: Sequence[TrainerStatus]) -> tuple[CheckpointInfo, ...]:
    """Every checkpoint any report names, one per step (a complete report of a step wins)."""
    by_step: dict[int, CheckpointInfo] = {}
    for report in reports:
        for cp in report.checkpoints:
            known = by_step.get(cp.step)
            if known is None or (cp.complete and not known.complete):
                by_step[cp.step] = cp
    return tuple(by_step[step] for step in sorted(by_step))


def _final_reports(observed: Observed) -> list[tuple[int, TrainerStatus]]:
    """(attempt, status) of every terminated trainer pod that left a termination message."""
    return [(attempt, report) for pod in observed.pods
            if (report := terminated_report(pod)) is not None and (attempt := _attempt_of(pod)) is not None]


def trainer_report(polled: TrainerStatus | None, counters: Counters, observed: Observed) -> TrainerStatus | None:
    """What the trainer said last: the polled ``/status``, else the termination message of the current attempt.

    A checkpoint written after the last poll (the final one, the one on SIGTERM) is only in a
    termination message, so the checkpoints of every terminated trainer's message are merged in.
    Progress comes from the current attempt only: an old attempt's message never moves it back.
    """
    finals = _final_reports(observed)
    report = polled
    if report is None:
        current = [r for attempt, r in finals if attempt == counters.attempt]
        report = max(current, key=lambda r: (r.step, r.updated_at or "")) if current else None
    if report is None or not finals:
        return report
    return replace(report, checkpoints=_merge_checkpoints([report, *(r for _, r in finals)]))


def reported_checkpoints(report: TrainerStatus | None, observed: Observed) -> tuple[CheckpointInfo, ...]:
    """Every checkpoint the trainer reported: polled or in any attempt's termination message.

    Every attempt counts: a reconcile cut short right after moving on to the next attempt must
    not lose the hook Jobs of the checkpoint only the previous attempt's message names.
    """
    return _merge_checkpoints(([report] if report is not None else []) + [r for _, r in _final_reports(observed)])


def hook_job_result(obj: Mapping[str, Any]) -> str:
    if _true_condition(obj, "Complete"):
        return "Succeeded"
    if _true_condition(obj, "Failed"):
        return "Failed"
    return "Running"


# ---------------------------------------------------------------- planning

def _trainer_objects(job: TrainingJobSpec, attempt: int, *, resume: bool, jobset: bool) -> list[dict[str, Any]]:
    if job.nodes == 1:
        return [build_trainer_pod(job, attempt, resume=resume)]
    # A queued Job may be stopped and re-admitted by Kueue with the same template: always resume then.
    build = build_jobset if jobset else build_indexed_job
    return [build(job, attempt, resume=resume or bool(job.queue_name))]


def _active_trainers(job: TrainingJobSpec, observed: Observed, *, keep: int | None) -> list[tuple[str, str]]:
    """Trainer objects still running or pending (except those of attempt ``keep``)."""
    out: list[tuple[str, str]] = []
    if job.nodes == 1:
        for pod in observed.pods:
            if _attempt_of(pod) == keep or pod.get("metadata", {}).get("deletionTimestamp"):
                continue
            if classify_pod(pod).state not in FINISHED_STATES:
                out.append(("Pod", _name(pod)))
    else:
        for tjob in observed.trainer_jobs:
            if _attempt_of(tjob) == keep or tjob.get("metadata", {}).get("deletionTimestamp"):
                continue
            if not _group_finished(tjob):
                out.append((_kind(tjob), _name(tjob)))
    return out


def _lingering(job: TrainingJobSpec, observed: Observed, attempt: int) -> list[str]:
    """Trainers of attempts before ``attempt`` that still exist and have not finished (e.g. terminating):
    their pods, and for several nodes also their Jobs (a deleted Job's pods outlive it briefly)."""
    pods = [_name(p) for p in observed.pods if (_attempt_of(p) or 0) < attempt
            and classify_pod(p).state not in FINISHED_STATES]
    if job.nodes == 1:
        return sorted(pods)
    return sorted(pods + [_name(j) for j in observed.trainer_jobs if (_attempt_of(j) or 0) < attempt
                          and not j.get("metadata", {}).get("deletionTimestamp")
                          and not _group_finished(j)])


def _hooks(job: TrainingJobSpec, observed: Observed, checkpoints: Sequence[CheckpointInfo],
           previous: Sequence[Mapping[str, Any]], latest: Mapping[str, Any],
           compacted: Mapping[str, Any] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(hook status entries, hook Jobs to create): one Job per (checkpoint, hook), bounded concurrency."""
    entries: dict[tuple[int, str], dict[str, Any]] = {
        (int(h["checkpointStep"]), str(h["hook"])): dict(h) for h in previous or ()}
    paths: dict[int, str] = {}
    paths.update({c.step: c.path for c in checkpoints if c.complete})
    if latest.get("latestStep"):
        paths.setdefault(int(latest["latestStep"]), str(latest.get("latestPath") or ""))
    folded_through = int((compacted or {}).get("throughStep", -1))
    for step in sorted(paths):
        if step <= folded_through:
            continue  # its hooks ran and were folded into status.hooksCompacted (or are still listed)
        for hook in job.hooks:
            entries.setdefault((step, hook.name), {"checkpointStep": step, "hook": hook.name,
                                                   "job": hook_job_name(job.name, hook.name, step),
                                                   "result": "Pending"})
    jobs = {_name(j): j for j in observed.hook_jobs}
    running = 0
    for entry in entries.values():
        found = jobs.get(entry["job"])
        if found is not None:
            entry["result"] = hook_job_result(found)
        elif entry["result"] == "Running":
            entry["result"] = "Unknown"  # deleted behind our back (e.g. by its TTL before we saw the end)
        running += entry["result"] == "Running"
    specs = {h.name: h for h in job.hooks}
    create: list[dict[str, Any]] = []
    for key in sorted(entries):
        entry = entries[key]
        if entry["result"] != "Pending" or entry["hook"] not in specs:
            continue
        if running + len(create) >= job.hooks_max_concurrent:
            break
        step = key[0]
        path = paths.get(step) or default_checkpoint_path(step)
        create.append(build_hook_job(job, specs[entry["hook"]], step, path))
    return list(entries.values()), create


def plan(job: TrainingJobSpec, *, counters: Counters, observed: Observed, trainer: TrainerStatus | None,
         previous_status: Mapping[str, Any] | None, now: datetime,
         network: NetworkPolicySettings | None = None, jobset: bool = False) -> Plan:
    """Decide what to create/delete and what the status is. Pure and deterministic.

    ``network``: the operator's NetworkPolicy settings (None: it creates no per-job policy).
    ``jobset``: the JobSet API is installed; a new multi-node attempt is then a JobSet (an attempt
    that exists keeps its kind).
    """
    trainer = trainer_report(trainer, counters, observed)
    prev = dict(previous_status or {})
    prev_phase = Phase(prev["phase"]) if prev.get("phase") in Phase.__members__.values() else None
    ready_reason = next((c.get("reason", "") for c in prev.get("conditions") or () if c.get("type") == "Ready"), "")
    if ready_reason in SPEC_FAILURES and prev.get("observedGeneration") != job.generation:
        prev_phase = None  # the spec was fixed: an invalid spec is only final for its own generation
    # The status was written after the latest counters were decided (else it describes an older attempt).
    fresh = int(prev.get("restarts") or 0) == counters.restarts
    new_counters = counters
    create: list[dict[str, Any]] = []
    delete: list[tuple[str, str]] = []
    events: list[Event] = []
    run = classify_run(job, counters.attempt, observed)
    latest = prev.get("checkpoints") or {}
    has_checkpoint = bool(latest.get("latestStep")) or bool(trainer and trainer.latest_checkpoint)
    start = parse_time(prev.get("startTime")) or parse_time(run.started_at)
    deadline = job.run_policy.active_deadline_seconds

    if prev_phase in TERMINAL:
        outcome = Outcome(prev_phase, ready_reason or str(prev_phase), prev.get("message", ""))  # type: ignore[arg-type]
        delete += _active_trainers(job, observed, keep=None)
    else:
        desired = [*build_pvcs(job)]
        if job.nodes > 1 and not jobset:
            desired.append(build_headless_service(job))  # JobSet makes its own
        if network is not None:
            desired.append(build_network_policy(job, network))
        create += [c for c in desired if (c["kind"], c["metadata"]["name"]) not in observed.existing]
        delete += _active_trainers(job, observed, keep=counters.attempt)
        current_kind, current = _trainer_ref(job, counters.attempt, observed, jobset=jobset)
        if deadline and start and now >= start + timedelta(seconds=deadline):
            if run.state not in FINISHED_STATES | {RunState.MISSING}:
                delete.append((current_kind, current))
            outcome = Outcome(Phase.FAILED, "DeadlineExceeded",
                              f"Training ran longer than activeDeadlineSeconds ({deadline}s).")
        elif run.state == RunState.SUCCEEDED:  # a finished run wins over a late suspend
            outcome = Outcome(Phase.SUCCEEDED, "Completed", "Training finished.")
        elif run.state == RunState.CONFIG_ERROR:
            outcome = Outcome(Phase.FAILED, "ConfigError",
                              f"The trainer rejected its configuration (exit {int(ExitCode.CONFIG_ERROR)}, not "
                              f"retried): {run.detail}")
        elif job.run_policy.suspend:
            if run.state not in FINISHED_STATES | {RunState.MISSING}:
                delete.append((current_kind, current))
                new_counters = Counters(counters.attempt + 1, counters.restarts)
            outcome = Outcome(Phase.SUSPENDED, "Suspended",
                              "Suspended: trainer stopped, caches and outputs kept; resuming continues from the "
                              "latest checkpoint.")
        elif run.state == RunState.MISSING and prev_phase in ACTIVE and fresh:
            run = Run(RunState.EVICTED, "trainer disappeared while running (deleted or preempted)")
            outcome, new_counters, extra = _retry(job, counters, run, prev_phase, jobset=jobset)
            create += extra if not _lingering(job, observed, new_counters.attempt) else []
        elif run.state == RunState.MISSING and (lingering := _lingering(job, observed, counters.attempt)):
            outcome = _waiting(prev_phase if fresh else Phase.RESTARTING, "TrainerPending",
                               f"Waiting for {', '.join(lingering)} to stop before starting {current}.")
        elif run.state == RunState.MISSING:
            create += _trainer_objects(job, counters.attempt, resume=counters.attempt > 0 or has_checkpoint,
                                       jobset=jobset)
            # Reported as already pending: the pod's own watch event then changes nothing (no second write).
            outcome = _waiting(prev_phase if fresh else Phase.RESTARTING, "TrainerPending",
                               f"Trainer {current} is pending.")
        elif run.state == RunState.TERMINATING and run.ran:
            # Lost while running (deleted, drained): a new attempt resumes from the checkpoint the
            # trainer writes on SIGTERM, so it is created once this one is gone.
            outcome, new_counters, _ = _retry(job, counters, run, prev_phase, jobset=jobset)
        elif run.state == RunState.QUEUED:
            outcome = Outcome(Phase.PENDING, "Queued",
                              f"Waiting for Kueue admission in queue {job.queue_name}." if job.queue_name
                              else f"Trainer is gated: {run.detail}")
        elif run.state in (RunState.PENDING, RunState.TERMINATING):
            outcome = _waiting(prev_phase, "TrainerPending",
                               f"Trainer {current} is pending" + (f": {run.detail}" if run.detail else "."))
        elif run.state == RunState.RUNNING:
            caching = trainer is not None and trainer.state == TrainerState.CACHING
            outcome = Outcome(Phase.CACHING if caching else Phase.RUNNING, "Caching" if caching else "Training",
                              _running_message(trainer))
        else:
            outcome, new_counters, extra = _retry(job, counters, run, prev_phase, jobset=jobset)
            if job.nodes > 1 and new_counters.attempt != counters.attempt:
                delete.append((current_kind, current))  # stops every node of the old attempt at once
            # The next attempt starts once every node of this one has stopped (checkpoint on SIGTERM).
            create += extra if not _lingering(job, observed, new_counters.attempt) else []

    hooks, hook_jobs = _hooks(job, observed, reported_checkpoints(trainer, observed), prev.get("hooks") or (),
                              latest, prev.get("hooksCompacted"))
    create += hook_jobs
    stalled = next(((c.get("reason", ""), c.get("message", "")) for c in prev.get("conditions") or ()
                    if c.get("type") == "Stalled" and c.get("status") == "True"), None)
    status = derive_status(outcome=outcome, generation=job.generation, trainer=trainer, previous=prev, now=now,
                           restarts=new_counters.restarts, hooks=hooks, started_at=run.started_at,
                           stalled=stalled if prev_phase in TERMINAL else None)  # a final refusal stays reported
    if outcome.phase != prev_phase or new_counters.restarts != counters.restarts:
        warn = outcome.phase in (Phase.FAILED, Phase.RESTARTING)
        events.append(Event("Warning" if warn else "Normal", outcome.reason, outcome.message))
    for hook_job in hook_jobs:
        events.append(Event("Normal", "HookStarted", f"Started hook Job {hook_job['metadata']['name']}."))
    requeue = None
    phase = outcome.phase
    ttl = job.run_policy.ttl_seconds_after_finished
    delete_tj = False
    if phase in TERMINAL and ttl is not None and status.get("completionTime"):
        due = parse_time(status["completionTime"]) + timedelta(seconds=int(ttl))  # type: ignore[operator]
        delete_tj = now >= due
        requeue = None if delete_tj else (due - now).total_seconds()
    elif deadline and start and phase not in TERMINAL:
        requeue = max(0.0, (start + timedelta(seconds=deadline) - now).total_seconds())
    restatus = partial(derive_status, generation=job.generation, trainer=trainer, previous=prev, now=now,
                       restarts=new_counters.restarts, hooks=hooks, started_at=run.started_at)
    return Plan(status=status, counters=new_counters if new_counters != counters else None,
                delete=sorted(set(delete)), create=create, events=events, delete_trainingjob=delete_tj,
                requeue_after=requeue, restatus=restatus, outcome=outcome)


def _waiting(prev_phase: Phase | None, reason: str, message: str) -> Outcome:
    if prev_phase == Phase.RESTARTING:
        return Outcome(Phase.RESTARTING, "Restarting", message)
    return Outcome(Phase.PENDING, reason, message)


def _retry(job: TrainingJobSpec, counters: Counters, run: Run, prev_phase: Phase | None, *, jobset: bool
           ) -> tuple[Outcome, Counters, list[dict[str, Any]]]:
    reason = {RunState.INTERRUPTED: "Interrupted", RunState.EVICTED: "Preempted"}.get(run.state, "Crashed")
    limit = job.run_policy.backoff_limit
    if counters.restarts >= limit:
        return (Outcome(Phase.FAILED, "BackoffLimitExceeded",
                        f"{reason}: {run.detail}; giving up after {counters.restarts} restart(s) "
                        f"(backoffLimit {limit})."), counters, [])
    new = Counters(counters.attempt + 1, counters.restarts + 1)
    objs = _trainer_objects(job, new.attempt, resume=True, jobset=jobset)
    message = (f"{reason}: {run.detail}; restarting from the latest checkpoint as "
               f"{objs[0]['metadata']['name']} (restart {new.restarts} of {limit}).")
    return Outcome(Phase.RESTARTING, reason, message), new, objs


def _running_message(trainer: TrainerStatus | None) -> str:
    if trainer is None:
        return "Trainer is running."
    if trainer.state == TrainerState.CACHING:
        return trainer.message or "Trainer is filling the latent and text-embedding caches."
    steps = f"step {trainer.step}" + (f"/{trainer.max_steps}" if trainer.max_steps else "")
    return f"Training: {steps}, epoch {trainer.epoch}" + (f". {trainer.message}" if trainer.message else ".")
