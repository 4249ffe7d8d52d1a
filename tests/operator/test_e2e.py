"""End to end: the real kopf operator against kmock's Kubernetes emulator over HTTP.

The trainer is stood in for by a loopback HTTP server serving the trainer contract; pod and Job
phases are simulated by patching their status, as the kubelet and the Job controller would.
Every wait polls the emulator with a bounded deadline (``eventually``), never a fixed sleep.
Deletion: the test API server garbage-collects by ownerReferences uid like the real
kube-controller-manager, so "children gone" proves the owner references are right; the operator
itself never deletes children of a deleted TrainingJob.
"""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp
from operator_helpers import (
    NS,
    TJ,
    UNBUILT_OPTION,
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
    mounted_files,
    patch_spec,
    pods,
    printer_columns,
    running,
    set_pod_status,
    status,
    terminated,
)

from kubetuner_operator.builders import hook_job_name
from kubetuner_trainer.contract import TrainerState, TrainerStatus
from kubetuner_trainer.termination import termination_message


async def test_lifecycle_progress_hooks_preemption_and_success(cluster: Cluster) -> None:
    async with FakeTrainer() as trainer:
        reconciler = await cluster.start_operator()
        await create(cluster, make_trainingjob(metricsPort=trainer.port))

        # create -> children appear, labelled and owned by the TrainingJob
        await eventually(lambda: "sdxl-style-t0" in pods(cluster), "trainer pod t0")
        owner_uid = cluster.server.get(TJ, NS, "sdxl-style")["metadata"]["uid"]
        pvcs = {p["metadata"]["name"] for p in cluster.server.live("v1/persistentvolumeclaims", NS)}
        assert pvcs == {"sdxl-style-output", "sdxl-style-latents"}  # hf-models is an existing claim
        pod = pods(cluster)["sdxl-style-t0"]
        assert pod["metadata"]["ownerReferences"][0]["uid"] == owner_uid
        config = json.loads(mounted_files(pod)["config.json"])  # the trainer's files ride on the pod
        assert config["max_train_steps"] == 2000 and not cluster.server.requests["create configmaps"]
        assert "--resume_from_checkpoint" not in pod["spec"]["containers"][0]["args"]
        await eventually(lambda: status(cluster).get("phase") == "Pending", "Pending")

        # running + caching
        trainer.status = TrainerStatus(state=TrainerState.CACHING, message="caching latents 10/40")
        await set_pod_status(cluster, "sdxl-style-t0", running())
        await eventually(lambda: status(cluster).get("phase") == "Caching", "Caching")
        assert condition(cluster, "Ready")["status"] == "True"

        # training progress -> status and printer columns
        trainer.status = TrainerStatus(state=TrainerState.TRAINING, step=400, max_steps=1000, epoch=2, loss=0.08125,
                                       samples_per_second=3.5, eta_seconds=3723, checkpoints=(checkpoint(250),))
        await eventually(lambda: status(cluster).get("progress", {}).get("step") == 400, "progress")
        st = status(cluster)
        assert st["phase"] == "Running" and st["progress"]["percent"] == "40.0"
        assert st["progress"]["loss"] == "0.0812" or st["progress"]["loss"] == "0.0813"
        assert st["progress"]["eta"] == "1h02m03s"
        assert st["checkpoints"] == {"latestStep": 250, "latestPath": "/workspace/output/checkpoint-250",
                                     "latestTime": "2026-01-01T00:10:00Z"}
        assert_status_fits_crd(cluster)
        columns = printer_columns(cluster)
        assert columns["Phase"] == "Running" and columns["Step"] == 400 and columns["Restarts"] == 0
        assert columns["Progress"] == "40.0" and columns["Loss"] == st["progress"]["loss"]

        # one hook Job per (checkpoint, hook); argv substituted, output read-only
        hook_name = hook_job_name("sdxl-style", "eval", 250)
        hook = await eventually(lambda: jobs(cluster).get(hook_name), "hook job")
        container = hook["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["python", "-m", "eval", "--checkpoint", "/workspace/output/checkpoint-250",
                                        "--step", "250"]
        await eventually(lambda: status(cluster)["hooks"] == [
            {"checkpointStep": 250, "hook": "eval", "job": hook_name, "result": "Running"}], "hook running")
        await cluster.client.patch("Job", NS, hook_name, {"status": {"conditions": [
            {"type": "Complete", "status": "True"}], "succeeded": 1}}, subresource="status")
        await eventually(lambda: status(cluster)["hooks"][0]["result"] == "Succeeded", "hook succeeded")

        # preemption -> new pod resuming from the latest checkpoint, counted as a restart
        await set_pod_status(cluster, "sdxl-style-t0", evicted())
        resumed = await eventually(lambda: pods(cluster).get("sdxl-style-t1"), "resumed pod t1")
        assert resumed["spec"]["containers"][0]["args"][-2:] == ["--resume_from_checkpoint", "latest"]
        await eventually(lambda: status(cluster).get("restarts") == 1, "restart counted")
        assert status(cluster)["phase"] == "Restarting"
        assert_status_fits_crd(cluster)
        await eventually(lambda: "Preempted" in {e["reason"] for e in events(cluster)}, "Preempted event")

        # second checkpoint while the resumed pod trains
        await set_pod_status(cluster, "sdxl-style-t1", running())
        trainer.status = TrainerStatus(state=TrainerState.TRAINING, step=600, max_steps=1000,
                                       checkpoints=(checkpoint(250), checkpoint(500)))
        await eventually(lambda: hook_job_name("sdxl-style", "eval", 500) in jobs(cluster), "second hook job")

        # success
        trainer.status = TrainerStatus(state=TrainerState.FINISHED, step=1000, max_steps=1000,
                                       checkpoints=(checkpoint(250), checkpoint(500)))
        await set_pod_status(cluster, "sdxl-style-t1", terminated(0))
        await eventually(lambda: status(cluster).get("phase") == "Succeeded", "Succeeded")
        st = status(cluster)
        assert st["completionTime"] and condition(cluster, "Succeeded")["status"] == "True"
        assert condition(cluster, "Ready")["status"] == "True" and st["progress"]["percent"] == "100.0"
        assert_status_fits_crd(cluster)
        assert set(pods(cluster)) == {"sdxl-style-t0", "sdxl-style-t1"}
        # A finished job without TTL is not polled any more (only watch events wake it up).
        await eventually(lambda: (NS, "sdxl-style") not in reconciler.polled, "polling stopped")
        # Every transition was announced on the object.
        await eventually(lambda: {"TrainerPending", "Caching", "Training", "Preempted", "Completed"}
                         <= {e["reason"] for e in events(cluster)}, "an event per transition")

        # The operator's metrics endpoint reports what happened.
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{reconciler.metrics_port}/metrics") as resp:
                text = await resp.text()
        assert re.search(r'^kubetuner_trainingjobs\{phase="Succeeded"\} 1\.0$', text, re.M)
        assert re.search(r"^kubetuner_trainer_restarts_total 1\.0$", text, re.M)
        assert re.search(r'^kubetuner_hook_jobs_total\{result="Succeeded"\} 1\.0$', text, re.M)
        assert re.search(r"^kubetuner_reconcile_duration_seconds_count [1-9]", text, re.M)


async def test_checkpoint_named_only_by_the_termination_message_gets_its_hook_job(cluster: Cluster) -> None:
    async with FakeTrainer() as trainer:
        await cluster.start_operator()
        await create(cluster, make_trainingjob(metricsPort=trainer.port))
        await eventually(lambda: "sdxl-style-t0" in pods(cluster), "trainer pod t0")
        trainer.status = TrainerStatus(state=TrainerState.TRAINING, step=300, max_steps=500,
                                       checkpoints=(checkpoint(250),))
        await set_pod_status(cluster, "sdxl-style-t0", running())
        await eventually(lambda: hook_job_name("sdxl-style", "eval", 250) in jobs(cluster), "hook job of a poll")
        await eventually(lambda: status(cluster).get("progress", {}).get("step") == 300, "polled progress")
        polls = trainer.hits

        # The trainer saves checkpoint 500 and exits before the next poll: only its message names it.
        final = TrainerStatus(state=TrainerState.FINISHED, step=500, max_steps=500, epoch=4, loss=0.0375,
                              checkpoints=(checkpoint(250), checkpoint(500)))
        pod_status = terminated(0, termination_message(final))
        pod_status["containerStatuses"][0]["state"]["terminated"]["reason"] = "Completed"
        await set_pod_status(cluster, "sdxl-style-t0", pod_status)

        hook = await eventually(lambda: jobs(cluster).get(hook_job_name("sdxl-style", "eval", 500)), "final hook job")
        assert "/workspace/output/checkpoint-500" in hook["spec"]["template"]["spec"]["containers"][0]["command"]
        await eventually(lambda: status(cluster).get("phase") == "Succeeded", "Succeeded")
        st = status(cluster)
        assert st["progress"]["step"] == 500 and st["progress"]["loss"] == "0.0375"
        assert st["checkpoints"]["latestStep"] == 500
        await eventually(lambda: [(h["checkpointStep"], h["result"]) for h in status(cluster)["hooks"]]
                         == [(250, "Running"), (500, "Running")], "both hooks running")
        assert_status_fits_crd(cluster)
        assert all(p["status"]["phase"] == "Succeeded" for p in pods(cluster).values())
        assert trainer.hits >= polls  # the fake trainer never served checkpoint 500
        await cluster.nudge("sdxl-style", 2)  # replays create nothing twice
        created = [(plural, name) for plural, _, name in cluster.server.created]
        assert len(created) == len(set(created)), created


async def test_config_error_fails_without_retry(cluster: Cluster) -> None:
    await cluster.start_operator()
    await create(cluster, make_trainingjob(hooks=None))
    await eventually(lambda: "sdxl-style-t0" in pods(cluster), "trainer pod")
    await set_pod_status(cluster, "sdxl-style-t0", terminated(78, "learning_rate: must be >= 0 (got -1)"))
    await eventually(lambda: status(cluster).get("phase") == "Failed", "Failed")
    failed = condition(cluster, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "ConfigError"
    assert "learning_rate: must be >= 0" in status(cluster)["message"]
    assert_status_fits_crd(cluster)
    await cluster.nudge("sdxl-style", 4)  # more reconciles change nothing
    assert set(pods(cluster)) == {"sdxl-style-t0"} and status(cluster)["restarts"] == 0
    assert [name for plural, _, name in cluster.server.created if plural == "pods"] == ["sdxl-style-t0"]


async def test_backoff_limit_and_crash(cluster: Cluster) -> None:
    await cluster.start_operator()
    await create(cluster, make_trainingjob(hooks=None, runPolicy={"backoffLimit": 1}))
    await eventually(lambda: "sdxl-style-t0" in pods(cluster), "t0")
    await set_pod_status(cluster, "sdxl-style-t0", terminated(75))
    await eventually(lambda: "sdxl-style-t1" in pods(cluster), "t1 after exit 75")
    await set_pod_status(cluster, "sdxl-style-t1", terminated(1))
    await eventually(lambda: status(cluster).get("phase") == "Failed", "Failed")
    assert condition(cluster, "Failed")["reason"] == "BackoffLimitExceeded"
    await cluster.nudge("sdxl-style", 3)
    assert set(pods(cluster)) == {"sdxl-style-t0", "sdxl-style-t1"}


async def test_suspend_and_resume(cluster: Cluster) -> None:
    await cluster.start_operator()
    await create(cluster, make_trainingjob(hooks=None))
    await eventually(lambda: "sdxl-style-t0" in pods(cluster), "t0")
    await set_pod_status(cluster, "sdxl-style-t0", running())
    await eventually(lambda: status(cluster).get("phase") == "Running", "Running")

    await patch_spec(cluster, "sdxl-style", {"runPolicy": {"suspend": True}})
    await eventually(lambda: status(cluster).get("phase") == "Suspended", "Suspended")
    await eventually(lambda: not pods(cluster), "trainer pod deleted")
    assert condition(cluster, "Suspended")["status"] == "True"
    assert condition(cluster, "Suspended")["observedGeneration"] == 2
    pvcs = {p["metadata"]["name"] for p in cluster.server.live("v1/persistentvolumeclaims", NS)}
    assert pvcs == {"sdxl-style-output", "sdxl-style-latents"}  # caches and outputs kept

    await patch_spec(cluster, "sdxl-style", {"runPolicy": {"suspend": False}})
    resumed = await eventually(lambda: pods(cluster).get("sdxl-style-t1"), "resumed pod")
    assert resumed["spec"]["containers"][0]["args"][-2:] == ["--resume_from_checkpoint", "latest"]
    await eventually(lambda: status(cluster).get("phase") == "Pending", "Pending again")
    assert status(cluster)["restarts"] == 0  # a suspension is not a failure


async def test_delete_removes_owned_children_only(cluster: Cluster) -> None:
    await cluster.start_operator()
    # A user-managed, shared model cache: referenced, never owned.
    await cluster.client.create({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                 "metadata": {"name": "hf-models", "namespace": NS},
                                 "spec": {"accessModes": ["ReadWriteMany"],
                                          "resources": {"requests": {"storage": "1Ti"}}}})
    await create(cluster, make_trainingjob(hooks=None))
    await eventually(lambda: "sdxl-style-t0" in pods(cluster), "t0")
    await cluster.client.delete("TrainingJob", NS, "sdxl-style")
    await eventually(lambda: not pods(cluster), "pods collected")
    assert {p["metadata"]["name"] for p in cluster.server.live("v1/persistentvolumeclaims", NS)} == {"hf-models"}
    await eventually(lambda: ("team-a", "sdxl-style") not in cluster.reconciler.polled, "operator forgot the job")


async def test_operator_restart_never_duplicates(cluster: Cluster) -> None:
    async with FakeTrainer() as trainer:
        await cluster.start_operator()
        await create(cluster, make_trainingjob(metricsPort=trainer.port))
        await eventually(lambda: "sdxl-style-t0" in pods(cluster), "t0")
        await set_pod_status(cluster, "sdxl-style-t0", running())
        trainer.status = TrainerStatus(state=TrainerState.TRAINING, step=300, max_steps=1000,
                                       checkpoints=(checkpoint(100), checkpoint(200), checkpoint(300)))
        await eventually(lambda: len(status(cluster).get("hooks", [])) == 3, "hooks recorded")
        await cluster.stop_operator()

        # While the operator is down: the pod is preempted.
        await set_pod_status(cluster, "sdxl-style-t0", evicted())
        for _ in range(2):  # restart twice: the second run must find nothing left to do
            await cluster.start_operator()
            await eventually(lambda: "sdxl-style-t1" in pods(cluster), "t1")
            await cluster.nudge("sdxl-style", 3)
            await cluster.stop_operator()

        created = [(plural, name) for plural, _, name in cluster.server.created]
        assert len(created) == len(set(created)), created
        assert set(pods(cluster)) == {"sdxl-style-t0", "sdxl-style-t1"}
        assert status(cluster)["restarts"] == 1
        hook_jobs = [n for n in jobs(cluster) if n.startswith("sdxl-style-eval-")]
        assert len(hook_jobs) == 2  # maxConcurrent 2, none finished yet
        assert sorted(h["result"] for h in status(cluster)["hooks"]) == ["Pending", "Running", "Running"]


async def test_multinode_indexed_job(cluster: Cluster) -> None:
    await cluster.start_operator()
    await create(cluster, make_trainingjob(nodes=2, hooks=None,
                                           caches={"latents": {"size": "10Gi", "accessModes": ["ReadWriteMany"]}},
                                           output={"pvc": {"size": "10Gi", "accessModes": ["ReadWriteMany"]}}))
    indexed = await eventually(lambda: jobs(cluster).get("sdxl-style-t0"), "indexed job")
    assert indexed["spec"]["completionMode"] == "Indexed" and indexed["spec"]["completions"] == 2
    svc = await eventually(lambda: cluster.server.get("v1/services", NS, "sdxl-style-nodes"), "headless service")
    assert svc["spec"]["clusterIP"] == "None"
    await cluster.client.patch("Job", NS, "sdxl-style-t0", {"status": {"active": 2, "startTime":
                                                                         "2026-01-01T00:00:00Z"}}, subresource="status")
    # Simulate the Job controller: node pods (labels from the template) run; node 1 exits 78, then
    # the Job controller stops node 0 (143).
    template = indexed["spec"]["template"]
    for index in range(2):
        await cluster.client.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": f"sdxl-style-t0-{index}-abcde", "namespace": NS, "labels": template["metadata"]["labels"],
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}}, "spec": template["spec"]})
        await set_pod_status(cluster, f"sdxl-style-t0-{index}-abcde", running())
    for index in (1, 0):
        await set_pod_status(cluster, f"sdxl-style-t0-{index}-abcde", terminated(78 if index else 143))
    await cluster.client.patch("Job", NS, "sdxl-style-t0", {"status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}}, subresource="status")
    await eventually(lambda: status(cluster).get("phase") == "Failed", "Failed")
    assert condition(cluster, "Failed")["reason"] == "ConfigError"
    assert set(jobs(cluster)) == {"sdxl-style-t0"}


async def test_kueue_queued_job_is_never_unsuspended(cluster: Cluster) -> None:
    await cluster.start_operator()
    await create(cluster, make_trainingjob(nodes=2, hooks=None, queueName="gpu-queue",
                                           caches=None, output={"pvc": {"existingClaim": "results"}}))
    indexed = await eventually(lambda: jobs(cluster).get("sdxl-style-t0"), "indexed job")
    assert indexed["spec"]["suspend"] is True
    assert indexed["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    await eventually(lambda: condition(cluster, "Ready").get("reason") == "Queued", "queued")
    await cluster.nudge("sdxl-style", 3)
    assert jobs(cluster)["sdxl-style-t0"]["spec"]["suspend"] is True
    assert status(cluster)["phase"] == "Pending" and "gpu-queue" in status(cluster)["message"]


async def test_deadline_and_ttl(cluster: Cluster) -> None:
    await cluster.start_operator()
    await create(cluster, make_trainingjob(hooks=None, runPolicy={"activeDeadlineSeconds": 3600,
                                                                   "ttlSecondsAfterFinished": 600}))
    await eventually(lambda: "sdxl-style-t0" in pods(cluster), "t0")
    await set_pod_status(cluster, "sdxl-style-t0", running())
    await eventually(lambda: status(cluster).get("phase") == "Running", "Running")
    cluster.clock.advance(3599)
    await cluster.reconciles(2)
    assert status(cluster)["phase"] == "Running"
    cluster.clock.advance(2)
    await eventually(lambda: status(cluster).get("phase") == "Failed", "deadline exceeded")
    assert condition(cluster, "Failed")["reason"] == "DeadlineExceeded"
    await eventually(lambda: not pods(cluster), "trainer pod deleted")
    cluster.clock.advance(599)
    await cluster.reconciles(2)
    assert cluster.server.get(TJ, NS, "sdxl-style") is not None
    cluster.clock.advance(2)
    await eventually(lambda: cluster.server.get(TJ, NS, "sdxl-style") is None, "deleted after TTL")


async def test_config_the_trainer_refuses_fails_before_any_pod(cluster: Cluster) -> None:
    # Without the admission webhook, the reconciler runs the same checks before creating children.
    await cluster.start_operator()
    await create(cluster, make_trainingjob(config={UNBUILT_OPTION: True, "max_train_steps": 10}))
    await eventually(lambda: status(cluster).get("phase") == "Failed", "Failed")
    assert condition(cluster, "Failed")["reason"] == "InvalidConfig"
    assert f"spec.config.{UNBUILT_OPTION}" in status(cluster)["message"]
    await eventually(lambda: "InvalidConfig" in {e["reason"] for e in events(cluster)}, "InvalidConfig event")
    assert not pods(cluster) and not cluster.server.live("v1/persistentvolumeclaims", NS)


async def test_invalid_spec_is_reported(cluster: Cluster) -> None:
    await cluster.start_operator()
    await create(cluster, make_trainingjob(config={"output_dir": "/elsewhere"}))
    await eventually(lambda: status(cluster).get("phase") == "Failed", "Failed")
    assert condition(cluster, "Failed")["reason"] == "InvalidSpec"
    assert "spec.config.output_dir" in status(cluster)["message"]
    await eventually(lambda: "InvalidSpec" in {e["reason"] for e in events(cluster)}, "InvalidSpec event")
    assert not pods(cluster)
    # Fixing the spec (a new generation) lets the job start.
    await patch_spec(cluster, "sdxl-style", {"config": {"output_dir": None, "learning_rate": 1e-4,
                                                        "optimizer": "adamw_bf16", "max_train_steps": 100}})
    await eventually(lambda: "sdxl-style-t0" in pods(cluster), "trainer pod after the fix")
    await eventually(lambda: status(cluster).get("phase") == "Pending", "Pending")
    assert condition(cluster, "Failed")["status"] == "False" and status(cluster)["observedGeneration"] == 2


async def test_kubetuner_operator_command_with_kubeconfig(cluster: Cluster, tmp_path: Any) -> None:
    """``kubetuner operator`` as a user runs it: a separate process, logged in through a kubeconfig."""
    import asyncio
    import signal
    import socket
    import sys

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: emu\n"
        f"clusters: [{{name: emu, cluster: {{server: '{cluster.url}'}}}}]\n"
        "users: [{name: me, user: {token: not-a-real-token}}]\n"
        "contexts: [{name: emu, context: {cluster: emu, user: me}}]\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        health_port = sock.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kubetuner_operator.cli", "operator", "--kubeconfig", str(kubeconfig),
        "--namespace", NS, "--health-port", str(health_port), "--metrics-port", "0", "--poll-interval", "0.5",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await create(cluster, make_trainingjob(hooks=None))
        await eventually(lambda: "sdxl-style-t0" in pods(cluster), "trainer pod created by the CLI operator",
                         timeout=60)
        await eventually(lambda: status(cluster).get("phase") == "Pending", "status written")

        async def healthy() -> bool:
            try:
                async with aiohttp.ClientSession() as session:
                    async with session.get(f"http://127.0.0.1:{health_port}/healthz") as resp:
                        return resp.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(healthy, "liveness endpoint")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, output.decode()[-3000:]
    assert b"not-a-real-token" not in output


async def _serve(handler: Any) -> tuple[Any, int]:
    from aiohttp import web

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def test_trainer_client_is_bounded_and_tolerant() -> None:
    from aiohttp import web

    from kubetuner_operator.trainer_client import TrainerClient

    answers = [web.Response(status=503), web.Response(text="{not json"),
               web.Response(text=TrainerStatus(step=7, max_steps=10).to_json())]
    calls = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(request.path)
        return answers.pop(0) if len(answers) > 1 else answers[0]

    runner, port = await _serve(handler)
    client = TrainerClient(timeout=1.0, retries=2, backoff=0.01)
    try:
        # 503 is retried; a malformed document is not (retrying cannot fix it).
        assert await client.fetch("127.0.0.1", port) is None and calls == ["/status", "/status"]
        assert (await client.fetch("127.0.0.1", port)).step == 7
        await runner.cleanup()
        assert await client.fetch("127.0.0.1", port) is None  # nobody listening: None after 3 tries
    finally:
        await client.close()
        await runner.cleanup()


async def test_kube_api_retries_transient_errors_only() -> None:
    from aiohttp import web

    from kubetuner_operator.kube_api import ApiError, KubeApi

    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        if request.path.endswith("/flaky") and len([s for s in seen if s.endswith("/flaky")]) < 3:
            return web.json_response({"reason": "ServiceUnavailable", "message": "etcd leader changed"}, status=503)
        if request.path.endswith("/invalid"):
            return web.json_response({"reason": "Invalid", "message": "spec.containers: Required value"}, status=422)
        if request.path.endswith("/gone"):
            return web.json_response({"reason": "NotFound", "message": "not found"}, status=404)
        return web.json_response({"metadata": {"name": request.path.rsplit("/", 1)[-1]}})

    runner, port = await _serve(handler)
    async with aiohttp.ClientSession() as session:
        api = KubeApi(f"http://127.0.0.1:{port}", session, retries=4, backoff=0.01)
        try:
            assert (await api.get("Pod", NS, "flaky"))["metadata"]["name"] == "flaky"
            assert len([s for s in seen if s.endswith("/flaky")]) == 3
            assert await api.get("Pod", NS, "gone") is None
            assert await api.delete("Pod", NS, "gone") is False
            before = len(seen)
            try:
                await api.patch("Pod", NS, "invalid", {"spec": {}})
            except ApiError as exc:
                assert exc.status == 422 and "spec.containers: Required value" in str(exc)
            else:
                raise AssertionError("422 must raise")
            assert len(seen) == before + 1  # not retried
        finally:
            await runner.cleanup()


async def test_lost_create_responses_never_duplicate_children(cluster: Cluster) -> None:
    """A create that succeeded server-side but whose answer was lost is retried and adopted (409)."""
    lost = {"pods": 1, "jobs": 2, "persistentvolumeclaims": 1}
    cluster.server.lose_create_responses.update(lost)
    async with FakeTrainer() as trainer:
        await cluster.start_operator()
        await create(cluster, make_trainingjob(metricsPort=trainer.port))
        await eventually(lambda: "sdxl-style-t0" in pods(cluster), "t0")
        await set_pod_status(cluster, "sdxl-style-t0", running())
        trainer.status = TrainerStatus(state=TrainerState.TRAINING, step=200, max_steps=1000,
                                       checkpoints=(checkpoint(100), checkpoint(200)))
        await eventually(lambda: [h["result"] for h in status(cluster).get("hooks", [])] == ["Running", "Running"],
                         "both hook jobs adopted")
    assert cluster.server.lose_create_responses == dict.fromkeys(lost, 0)  # every failure was exercised
    created = [(plural, name) for plural, _, name in cluster.server.created if plural != "events"]
    assert len(created) == len(set(created)), created
    assert sorted(n for p, n in created if p == "jobs") == sorted(
        hook_job_name("sdxl-style", "eval", s) for s in (100, 200))
