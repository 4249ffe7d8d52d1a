"""Multi-node jobs as JobSets: the built JobSet passes the JobSet CRD's schema (fixture) with its
Job template valid as a batch/v1 Job, follows the naming rules of JobSet's admission webhook, and
its nodes meet at the hostname JobSet gives node 0; the real operator runs them against kmock
serving the JobSet API, and falls back to an Indexed Job + headless Service where it is absent."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kmock
import kubernetes_validate
import pytest
import yaml
from operator_helpers import (
    NS,
    TJ,
    VERBS,
    Cluster,
    condition,
    create,
    emulated_cluster,
    eventually,
    evicted,
    jobs,
    make_trainingjob,
    running,
    set_pod_status,
    status,
    terminated,
)
from test_multinode import LAYOUTS, _pod_env

from kubetuner_operator.builders import build_jobset, jobset_name
from kubetuner_operator.builders.jobset import JOBSET_API_VERSION, REPLICATED_JOB
from kubetuner_operator.crd.validation import validate_value
from kubetuner_operator.spec import parse_training_job
from kubetuner_operator.trainer_config import POD_PATHS, render_trainer_files
from kubetuner_trainer.launcher import node_placement

SCHEMA = yaml.safe_load((Path(__file__).parent / "fixtures" / "jobset-v1alpha2-schema.yaml").read_text())
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def job_name(jobset: dict[str, Any], replicated: dict[str, Any], index: int) -> str:
    """JobSet's name for the ``index``-th Job of a replicated job: ``<jobset>-<replicatedJob>-<index>``."""
    return f"{jobset['metadata']['name']}-{replicated['name']}-{index}"


def jobset_problems(jobset: dict[str, Any], version: str) -> list[str]:
    """What the API server (CRD schema) and JobSet's admission webhook would refuse."""
    problems = validate_value(copy.deepcopy(jobset), SCHEMA, strict=True)
    subdomain = (jobset["spec"].get("network") or {}).get("subdomain") or jobset["metadata"]["name"]
    for replicated in jobset["spec"]["replicatedJobs"]:
        spec = replicated["template"]["spec"]
        as_job = {"apiVersion": "batch/v1", "kind": "Job", "spec": spec,
                  "metadata": {**replicated["template"].get("metadata", {}),
                               "name": job_name(jobset, replicated, 0), "namespace": NS}}
        kubernetes_validate.validate(as_job, version, strict=True)  # raises on any problem
        longest_job = job_name(jobset, replicated, replicated.get("replicas", 1) - 1)
        longest_pod = f"{longest_job}-{spec.get('completions', 1) - 1}-abcde"
        for name in (longest_job, longest_pod, subdomain, replicated.get("groupName", "default")):
            if len(name) > 63 or not DNS1035.match(name):
                problems.append(f"{name!r} is not a DNS-1035 label of at most 63 characters")
    return problems


def _job(nodes: int, gpus: int, **spec: Any):
    return parse_training_job(make_trainingjob(nodes=nodes, resources={"gpus": gpus,
                                                                       "gpuResourceName": "nvidia.com/gpu"}, **spec))


@pytest.mark.parametrize("version", ["1.28", kubernetes_validate.latest_version()])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("queue", [None, "gpu-queue"])
def test_jobset_passes_the_crd_schema_and_jobset_admission(layout: str, version: str, queue: str | None) -> None:
    job = _job(*LAYOUTS[layout], queueName=queue)
    for attempt, resume in ((0, False), (3, True)):
        built = build_jobset(job, attempt, resume=resume)
        assert built["apiVersion"] == JOBSET_API_VERSION and jobset_problems(built, version) == []
        assert built["spec"].get("suspend") is (True if queue else None)


@pytest.mark.parametrize("name", ["a" * 63, "7-" + "b" * 60, "x" * 40 + "." + "y" * 100])
def test_long_and_digit_first_names_stay_valid(name: str) -> None:
    job = parse_training_job(make_trainingjob(name=name, nodes=256))
    built = build_jobset(job, 12, resume=True)
    assert jobset_problems(built, kubernetes_validate.latest_version()) == []
    assert jobset_name(job, 12) != jobset_name(job, 13)


def test_the_schema_check_notices_mistakes() -> None:
    built = build_jobset(_job(2, 1), 0, resume=False)
    typo = copy.deepcopy(built)
    typo["spec"]["failurePolicy"]["maxRestart"] = 0
    wrong = copy.deepcopy(built)
    wrong["spec"]["successPolicy"]["operator"] = "Every"
    missing = copy.deepcopy(built)
    del missing["spec"]["replicatedJobs"][0]["template"]
    for broken, fragment in ((typo, "maxRestart"), (wrong, "Every"), (missing, "template")):
        assert any(fragment in p for p in validate_value(broken, SCHEMA, strict=True))
    bad_template = copy.deepcopy(built)
    bad_template["spec"]["replicatedJobs"][0]["template"]["spec"]["completion"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        jobset_problems(bad_template, "1.28")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_nodes_meet_at_the_hostname_jobset_gives_node_0(layout: str) -> None:
    nodes, gpus = LAYOUTS[layout]
    job = _job(nodes, gpus)
    built = build_jobset(job, 1, resume=False)
    (replicated,) = built["spec"]["replicatedJobs"]
    assert replicated["name"] == REPLICATED_JOB and replicated["replicas"] == 1
    node_job = replicated["template"]["spec"]
    assert node_job["completions"] == node_job["parallelism"] == nodes and node_job["backoffLimit"] == 0
    assert built["spec"]["failurePolicy"] == {"maxRestarts": 0}  # the operator restarts the group
    assert built["spec"]["network"]["enableDNSHostnames"] is True
    total = render_trainer_files(job, POD_PATHS, resume=False).config_json["num_processes"]
    as_indexed = {"spec": {"template": node_job["template"]}}
    for index in range(nodes):
        placement = node_placement(total, _pod_env(as_indexed, index))
        assert placement is not None and placement.node_rank == index and placement.world_size == total
        # Indexed Job pods are named <job>-<index> in the JobSet's subdomain (its name by default)
        assert placement.master_addr == f"{job_name(built, replicated, 0)}-0.{built['metadata']['name']}"
    assert node_job["template"]["spec"]["subdomain"] == built["metadata"]["name"]


# ---------------------------------------------------------------- the operator, against kmock

JOBSETS = "jobset.x-k8s.io/v1alpha2/jobsets"


def serve_jobsets(cluster: Cluster) -> None:
    """Install the JobSet API in the emulator (as the JobSet CRD does), before the operator starts."""
    cluster.server.resources[JOBSETS] = kmock.ResourceInfo(kind="JobSet", singular="jobset", namespaced=True,
                                                           subresources={"status"}, verbs=VERBS)


def jobsets(cluster: Cluster) -> dict[str, dict[str, Any]]:
    return {j["metadata"]["name"]: j for j in cluster.server.live(JOBSETS, NS)}


async def start_nodes(cluster: Cluster, jobset: dict[str, Any]) -> list[str]:
    """What the JobSet and Job controllers do: one pod per node from the template, all Running."""
    (replicated,) = jobset["spec"]["replicatedJobs"]
    template = replicated["template"]["spec"]["template"]
    names = []
    for index in range(replicated["template"]["spec"]["completions"]):
        name = f"{job_name(jobset, replicated, 0)}-{index}-x"
        await cluster.client.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": name, "namespace": NS, "labels": template["metadata"]["labels"],
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}}, "spec": template["spec"]})
        await set_pod_status(cluster, name, running())
        names.append(name)
    return names


async def set_jobset_condition(cluster: Cluster, name: str, ctype: str) -> None:
    await cluster.client.patch("JobSet", NS, name, {"status": {"conditions": [
        {"type": ctype, "status": "True", "reason": "Test", "message": "", "lastTransitionTime":
         "2026-01-01T00:00:00Z"}]}}, subresource="status")


MULTINODE = {"nodes": 2, "hooks": None, "caches": {"latents": {"size": "10Gi", "accessModes": ["ReadWriteMany"]}},
             "output": {"pvc": {"size": "10Gi", "accessModes": ["ReadWriteMany"]}}}


async def test_multinode_runs_as_a_jobset_and_restarts_the_group_once() -> None:
    async with emulated_cluster() as cluster:
        serve_jobsets(cluster)
        await cluster.start_operator()
        await create(cluster, make_trainingjob(**MULTINODE))
        job = parse_training_job(cluster.server.get(TJ, NS, "sdxl-style"))
        t0 = await eventually(lambda: jobsets(cluster).get(jobset_name(job, 0)), "JobSet of attempt 0")
        assert t0 == {**build_jobset(job, 0, resume=False), "metadata": t0["metadata"], **(
            {"status": t0["status"]} if "status" in t0 else {})}
        assert t0["metadata"]["ownerReferences"][0]["uid"] == job.uid
        assert jobset_problems(t0, kubernetes_validate.latest_version()) == []
        assert jobs(cluster) == {} and cluster.server.get("v1/services", NS, "sdxl-style-nodes") is None

        nodes = await start_nodes(cluster, t0)
        await eventually(lambda: status(cluster).get("phase") == "Running", "Running")

        # Node 1 is evicted: the node Job fails (backoffLimit 0), so the JobSet fails (maxRestarts 0).
        await set_pod_status(cluster, nodes[1], evicted())
        await set_pod_status(cluster, nodes[0], terminated(143))
        await set_jobset_condition(cluster, t0["metadata"]["name"], "Failed")
        await eventually(lambda: status(cluster).get("restarts") == 1, "one restart for the group")
        assert condition(cluster, "Ready").get("reason") in ("Preempted", "TrainerPending", "Restarting")
        for pod in nodes:  # the garbage collector removes the failed attempt's pods
            await cluster.client.delete("Pod", NS, pod)
        t1 = await eventually(lambda: jobsets(cluster).get(jobset_name(job, 1)), "JobSet of attempt 1")
        args = t1["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[-2:] == ["--resume_from_checkpoint", "latest"]

        for pod in await start_nodes(cluster, t1):
            await set_pod_status(cluster, pod, terminated(0))
        await set_jobset_condition(cluster, t1["metadata"]["name"], "Completed")
        await eventually(lambda: status(cluster).get("phase") == "Succeeded", "Succeeded")
        assert status(cluster)["restarts"] == 1 and jobs(cluster) == {}
        assert cluster.server.requests["create jobsets"] == 2


async def test_without_the_jobset_api_multinode_falls_back_to_an_indexed_job(cluster: Cluster) -> None:
    await cluster.start_operator()
    await create(cluster, make_trainingjob(**MULTINODE))
    await eventually(lambda: jobs(cluster).get("sdxl-style-t0"), "Indexed Job t0")
    await eventually(lambda: cluster.server.get("v1/services", NS, "sdxl-style-nodes"), "headless Service")
    assert cluster.server.requests["create jobsets"] == 0 and cluster.server.requests["list jobsets"] == 0


def test_an_attempt_keeps_its_kind_when_the_jobset_api_appears() -> None:
    """Replay safety: a restarted operator that now finds JobSet never starts a second group for an
    attempt whose Indexed Job exists; the next attempt is a JobSet."""
    from datetime import UTC, datetime

    from kubetuner_operator.builders import build_headless_service, build_indexed_job, build_pvcs
    from kubetuner_operator.reconcile import Counters, Observed, plan

    job = _job(2, 1)
    indexed = build_indexed_job(job, 0, resume=False)
    existing = frozenset((o["kind"], o["metadata"]["name"]) for o in [build_headless_service(job), *build_pvcs(job)])
    now = datetime(2026, 3, 1, tzinfo=UTC)
    first = plan(job, counters=Counters(), observed=Observed(trainer_jobs=[indexed], existing=existing),
                 trainer=None, previous_status=None, now=now, jobset=True)
    assert first.create == [] and first.delete == []
    failed = {**indexed, "status": {"conditions": [{"type": "Failed", "status": "True"}]}}
    pods = [{"metadata": {"name": f"n{i}", "labels": indexed["spec"]["template"]["metadata"]["labels"]},
             "status": {"phase": "Failed", "reason": "Evicted"}} for i in range(2)]
    retry = plan(job, counters=Counters(), observed=Observed(pods=pods, trainer_jobs=[failed], existing=existing),
                 trainer=None, previous_status=first.status, now=now, jobset=True)
    assert [(o["kind"], o["metadata"]["name"]) for o in retry.create] == [("JobSet", jobset_name(job, 1))]
    assert retry.counters == Counters(1, 1)
