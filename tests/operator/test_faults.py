"""Fault injection: the real kopf operator against kmock while the API server or a trainer misbehaves.

Outages are measured in requests (``ApiServer.fail``), not seconds, so every test is deterministic:
the operator's API client retries a transient error 4 times, so 5 failures abort one reconcile.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from operator_helpers import (
    NS,
    TJ,
    Cluster,
    FakeTrainer,
    assert_status_fits_crd,
    checkpoint,
    condition,
    create,
    events,
    eventually,
    evicted,
    jobs,
    make_trainingjob,
    patch_spec,
    pods,
    running,
    set_pod_status,
    status,
)

from kubetuner_operator.reconcile import ANNOTATION_ATTEMPT, ANNOTATION_RESTARTS
from kubetuner_trainer.contract import TrainerState, TrainerStatus

GRACE = "test.kubetuner.dev/grace-period"
ABORTS_ONE_RECONCILE = 5  # 1 try + 4 retries of the operator's API client


def annotations(cluster: Cluster, name: str = "sdxl-style") -> dict[str, str]:
    return (cluster.server.get(TJ, NS, name) or {}).get("metadata", {}).get("annotations") or {}


def created_once(cluster: Cluster) -> None:
    created = [(plural, name) for plural, _, name in cluster.server.created if plural != "events"]
    assert len(created) == len(set(created)), created


async def running_job(cluster: Cluster, trainer: FakeTrainer, **spec: Any) -> None:
    await create(cluster, make_trainingjob(metricsPort=trainer.port, hooks=None, **spec))
    await eventually(lambda: "sdxl-style-t0" in pods(cluster), "t0")
    trainer.status = TrainerStatus(state=TrainerState.TRAINING, step=240, max_steps=1000)
    await set_pod_status(cluster, "sdxl-style-t0", running())
    await eventually(lambda: status(cluster).get("progress", {}).get("step") == 240, "Running at step 240")


@pytest.mark.parametrize("outage", [2, 8], ids=["shorter-than-backoffLimit", "longer-than-backoffLimit"])
async def test_pod_create_outage_after_eviction_counts_one_restart(cluster: Cluster, outage: int) -> None:
    """An eviction, then pod creates answered 500 for ``outage`` reconciles: one restart, t1 created after."""
    async with FakeTrainer() as trainer:
        await cluster.start_operator()
        await running_job(cluster, trainer)  # backoffLimit 3
        failure = cluster.server.fail("create", "pods", 500, "etcdserver: request timed out",
                                      times=outage * ABORTS_ONE_RECONCILE)
        await set_pod_status(cluster, "sdxl-style-t0", evicted())
        await eventually(lambda: failure.times == 0, "the outage to pass")
        t1 = await eventually(lambda: pods(cluster).get("sdxl-style-t1"), "t1 once the API recovers")
        assert t1["spec"]["containers"][0]["args"][-2:] == ["--resume_from_checkpoint", "latest"]
        await eventually(lambda: status(cluster).get("phase") == "Restarting"
                         and status(cluster)["restarts"] == 1, "Restarting, one restart")
        await cluster.nudge("sdxl-style", 3)
    assert set(pods(cluster)) == {"sdxl-style-t0", "sdxl-style-t1"}
    assert annotations(cluster)[ANNOTATION_RESTARTS] == "1" and annotations(cluster)[ANNOTATION_ATTEMPT] == "1"
    assert status(cluster)["restarts"] == 1 and status(cluster)["phase"] == "Restarting"
    created_once(cluster)


async def test_operator_killed_after_the_attempt_annotation_counts_one_restart(cluster: Cluster) -> None:
    """The attempt annotation lands, then the operator dies before the pod and the status: replay, not recount."""
    async with FakeTrainer() as trainer:
        await cluster.start_operator()
        await running_job(cluster, trainer)
        cluster.server.fail("create", "pods", 503, "apiserver is shutting down")
        await set_pod_status(cluster, "sdxl-style-t0", evicted())
        await eventually(lambda: annotations(cluster).get(ANNOTATION_ATTEMPT) == "1", "attempt 1 decided")
        await cluster.stop_operator()
        assert status(cluster)["phase"] == "Running" and status(cluster)["restarts"] == 0  # never written
        cluster.server.failures.clear()
        for _ in range(2):  # the second start must find nothing left to do
            await cluster.start_operator()
            await eventually(lambda: "sdxl-style-t1" in pods(cluster), "t1")
            await cluster.nudge("sdxl-style", 2)
            await cluster.stop_operator()
    assert set(pods(cluster)) == {"sdxl-style-t0", "sdxl-style-t1"}
    assert status(cluster)["restarts"] == 1 and annotations(cluster)[ANNOTATION_RESTARTS] == "1"
    created_once(cluster)


async def test_terminating_running_pod_restarts_with_resume_once_it_is_gone(cluster: Cluster) -> None:
    async with FakeTrainer() as trainer:
        await cluster.start_operator()
        await running_job(cluster, trainer)
        # Drained while running, no checkpoint reported yet (one is written on SIGTERM). A finalizer
        # stands in for the grace period: the pod stays, terminating, until the test releases it.
        await cluster.client.patch("Pod", NS, "sdxl-style-t0", {"metadata": {"finalizers": [GRACE]}})
        await cluster.client.delete("Pod", NS, "sdxl-style-t0")
        await eventually(lambda: status(cluster).get("phase") == "Restarting", "Restarting")
        assert status(cluster)["restarts"] == 1 and annotations(cluster)[ANNOTATION_ATTEMPT] == "1"
        await cluster.nudge("sdxl-style", 2)
        assert set(pods(cluster)) == {"sdxl-style-t0"}  # not while t0 may still be writing its checkpoint
        assert "t0 to stop" in status(cluster)["message"]
        await cluster.client.patch("Pod", NS, "sdxl-style-t0", {"metadata": {"finalizers": None}})
        await eventually(lambda: "sdxl-style-t0" not in pods(cluster), "t0 gone")
        t1 = await eventually(lambda: pods(cluster).get("sdxl-style-t1"), "t1 after t0 is gone")
        assert t1["spec"]["containers"][0]["args"][-2:] == ["--resume_from_checkpoint", "latest"]
        await set_pod_status(cluster, "sdxl-style-t1", running())
        await eventually(lambda: status(cluster).get("phase") == "Running", "Running again")
    assert status(cluster)["restarts"] == 1
    created_once(cluster)


@pytest.mark.parametrize("document", ['[1,2,3]', '{"step": "abc"}',
                                      '{"state": "training", "step": 5, "checkpoints": [{"step": "x", "path": "/p"}]}',
                                      '{not json'])
async def test_trainer_status_off_the_contract_is_no_status(cluster: Cluster, document: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    async with FakeTrainer() as trainer:
        trainer.raw = document
        await cluster.start_operator()
        with caplog.at_level(logging.WARNING, logger="kubetuner_operator.trainer_client"):
            await create(cluster, make_trainingjob(metricsPort=trainer.port))
            await eventually(lambda: "sdxl-style-t0" in pods(cluster), "t0")
            await set_pod_status(cluster, "sdxl-style-t0", running())
            await eventually(lambda: status(cluster).get("phase") == "Running", "Running without a status")
            hits = trainer.hits
            await eventually(lambda: trainer.hits >= hits + 3, "more polls")
        warnings = [r for r in caplog.records if "not a valid status document" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]  # logged once, not per poll
        assert status(cluster)["message"] == "Trainer is running." and status(cluster)["progress"]["step"] == 0
        trainer.raw = None  # the trainer recovers: progress and hooks flow again
        trainer.status = TrainerStatus(state=TrainerState.TRAINING, step=250, max_steps=1000,
                                       checkpoints=(checkpoint(250),))
        await eventually(lambda: status(cluster)["progress"]["step"] == 250 and status(cluster)["hooks"],
                         "progress and a hook")
    assert_status_fits_crd(cluster)


async def test_refused_trainer_pod_fails_the_job_with_the_servers_message(cluster: Cluster) -> None:
    message = 'Pod "sdxl-style-t0" is invalid: spec.containers[0].resources.limits[nvidia.com/gpu]: Invalid value'
    failure = cluster.server.fail("create", "pods", 422, message)
    await cluster.start_operator()
    await create(cluster, make_trainingjob(hooks=None))
    await eventually(lambda: status(cluster).get("phase") == "Failed", "Failed")
    stalled, failed = condition(cluster, "Stalled"), condition(cluster, "Failed")
    assert stalled["status"] == "True" and stalled["reason"] == "CreateRejected" and message in stalled["message"]
    assert failed["status"] == "True" and message in status(cluster)["message"]
    assert_status_fits_crd(cluster)
    tries = failure.seen
    await cluster.nudge("sdxl-style", 4)
    assert failure.seen == tries  # final for this generation: never retried
    assert [e["reason"] for e in events(cluster) if e["type"] == "Warning"] == ["CreateRejected"]
    assert ("team-a", "sdxl-style") not in cluster.reconciler.polled
    assert condition(cluster, "Stalled")["status"] == "True"  # still reported after later reconciles

    cluster.server.failures.clear()  # the user fixes the spec: a new generation is tried again
    await patch_spec(cluster, "sdxl-style", {"resources": {"gpus": 0, "cpu": "2", "memory": "8Gi"}})
    await eventually(lambda: "sdxl-style-t0" in pods(cluster), "t0 for the fixed spec")
    await eventually(lambda: status(cluster).get("observedGeneration") == 2 and status(cluster)["phase"] == "Pending"
                     and condition(cluster, "Stalled").get("status") == "False", "Pending, no longer stalled")


async def test_quota_refusal_stalls_with_one_event_and_recovers(cluster: Cluster) -> None:
    message = 'pods "sdxl-style-t0" is forbidden: exceeded quota: gpus, requested: nvidia.com/gpu=1'
    failure = cluster.server.fail("create", "pods", 403, message)
    await cluster.start_operator(poll_interval=0.05)
    await create(cluster, make_trainingjob(hooks=None))
    await eventually(lambda: condition(cluster, "Stalled").get("status") == "True", "Stalled")
    assert status(cluster)["phase"] == "Pending" and message in condition(cluster, "Stalled")["message"]
    await eventually(lambda: failure.seen >= 6, "retried by the periodic poll")
    assert [e["reason"] for e in events(cluster) if e["type"] == "Warning"] == ["CreateRefused"]
    cluster.server.failures.clear()  # quota freed
    await eventually(lambda: "sdxl-style-t0" in pods(cluster), "t0")
    await eventually(lambda: condition(cluster, "Stalled").get("status") == "False", "not stalled")


async def test_hanging_trainer_never_delays_another_jobs_progress(cluster: Cluster) -> None:
    async with FakeTrainer() as stuck, FakeTrainer() as healthy:
        stuck.hang = True
        await cluster.start_operator(poll_interval=0.05, trainer_timeout=60)
        for name, trainer in (("stuck", stuck), ("healthy", healthy)):
            await create(cluster, make_trainingjob(name=name, metricsPort=trainer.port, hooks=None))
            await eventually(lambda name=name: f"{name}-t0" in pods(cluster, name), f"{name} pod")
            await set_pod_status(cluster, f"{name}-t0", running())
        await eventually(lambda: stuck.hits >= 1, "the stuck trainer is being polled")
        for step in (10, 20, 30):  # each needs a new poll round while the stuck poll still hangs
            healthy.status = TrainerStatus(state=TrainerState.TRAINING, step=step, max_steps=100)
            await eventually(lambda step=step: status(cluster, "healthy").get("progress", {}).get("step") == step,
                             f"healthy job at step {step}", timeout=20)
        assert stuck.hits == 1  # one bounded poll in flight, not a pile-up


async def test_reconciles_read_the_watch_cache_not_the_api_server(cluster: Cluster) -> None:
    async with FakeTrainer() as trainer:
        await cluster.start_operator()
        await running_job(cluster, trainer)
        # kopf listed each kind once when it started watching: from here on, only watch streams.
        reads_at_start = {k: v for k, v in cluster.server.requests.items() if k.split()[0] in ("list", "fetch")}
        trainer.status = TrainerStatus(state=TrainerState.TRAINING, step=300, max_steps=1000)
        await eventually(lambda: status(cluster)["progress"]["step"] == 300, "polled progress")
        await set_pod_status(cluster, "sdxl-style-t0", evicted())
        await eventually(lambda: "sdxl-style-t1" in pods(cluster), "t1")
        await cluster.nudge("sdxl-style", 3)
    reads = {k: v for k, v in cluster.server.requests.items() if k.split()[0] in ("list", "fetch")}
    assert reads == reads_at_start  # kopf's initial lists only: every reconcile read memory
    writes = sorted(k for k in cluster.server.requests if k.split()[0] in ("create", "update") and k not in reads)
    assert "create pods" in writes and "update trainingjobs" in writes


async def test_one_evicted_node_restarts_the_whole_group_once(cluster: Cluster) -> None:
    await cluster.start_operator()
    await create(cluster, make_trainingjob(nodes=2, hooks=None,
                                           caches={"latents": {"size": "10Gi", "accessModes": ["ReadWriteMany"]}},
                                           output={"pvc": {"size": "10Gi", "accessModes": ["ReadWriteMany"]}}))
    indexed = await eventually(lambda: jobs(cluster).get("sdxl-style-t0"), "indexed job t0")
    template = indexed["spec"]["template"]
    nodes = [f"sdxl-style-t0-{index}-x" for index in range(2)]
    for index, pod in enumerate(nodes):  # the Job controller's pods; a finalizer holds node 0's grace period
        await cluster.client.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": pod, "namespace": NS, "labels": template["metadata"]["labels"], "finalizers": [GRACE],
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}}, "spec": template["spec"]})
        await set_pod_status(cluster, pod, running())
    await eventually(lambda: status(cluster).get("phase") == "Running", "Running")

    await set_pod_status(cluster, nodes[1], evicted())  # node 1 lost; node 0 would hang in a collective
    await eventually(lambda: "sdxl-style-t0" not in jobs(cluster), "the whole attempt stopped (Job deleted)")
    await eventually(lambda: status(cluster)["phase"] == "Restarting" and status(cluster)["restarts"] == 1,
                     "Restarting, one restart for the group")
    await cluster.nudge("sdxl-style", 2)
    assert "sdxl-style-t1" not in jobs(cluster)  # node 0 may still be writing its SIGTERM checkpoint
    for pod in nodes:
        await cluster.client.patch("Pod", NS, pod, {"metadata": {"finalizers": None}})
        await cluster.client.delete("Pod", NS, pod)
    t1 = await eventually(lambda: jobs(cluster).get("sdxl-style-t1"), "attempt 1 as a new Indexed Job")
    args = t1["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-2:] == ["--resume_from_checkpoint", "latest"]
    await cluster.nudge("sdxl-style", 2)
    assert status(cluster)["restarts"] == 1 and set(jobs(cluster)) == {"sdxl-style-t1"}
    created_once(cluster)
