"""Multi-node builders: every pod runs ``kubetuner-train`` itself with the rendezvous environment.

The environment is checked against the trainer's own reader of it
(:func:`kubetuner_trainer.launcher.node_placement`), so operator and trainer agree on ranks.
"""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest
from operator_helpers import make_trainingjob

from kubetuner_operator.builders import build_headless_service, build_indexed_job
from kubetuner_operator.builders.multinode import COMPLETION_INDEX_ANNOTATION
from kubetuner_operator.spec import parse_training_job
from kubetuner_operator.trainer_config import POD_PATHS, render_trainer_files
from kubetuner_trainer.launcher import node_placement, rank_environment

K8S_VERSIONS = ["1.28", kubernetes_validate.latest_version()]
LAYOUTS = {  # name: (nodes, gpus per node)
    "2x1-gpu": (2, 1),
    "4x8-gpu": (4, 8),
    "3x-cpu": (3, 0),
}


def _job(nodes: int, gpus: int):
    return parse_training_job(make_trainingjob(nodes=nodes, resources={"gpus": gpus,
                                                                       "gpuResourceName": "nvidia.com/gpu"}))


def _container(indexed: dict[str, Any]) -> dict[str, Any]:
    (container,) = indexed["spec"]["template"]["spec"]["containers"]
    return container


def _pod_env(indexed: dict[str, Any], index: int) -> dict[str, str]:
    """The container environment as the kubelet resolves it in the pod with completion ``index``."""
    annotations = {COMPLETION_INDEX_ANNOTATION: str(index)}
    env: dict[str, str] = {}
    for var in _container(indexed)["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "fieldRef" in var.get("valueFrom", {}):
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            prefix = "metadata.annotations['"
            assert path.startswith(prefix) and path.endswith("']"), path
            env[var["name"]] = annotations[path[len(prefix):-2]]
    return env


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("resume", [False, True])
def test_indexed_job_and_service_validate_strictly(layout: str, version: str, resume: bool) -> None:
    job = _job(*LAYOUTS[layout])
    kubernetes_validate.validate(build_indexed_job(job, 1, resume=resume), version, strict=True)
    kubernetes_validate.validate(build_headless_service(job), version, strict=True)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_pod_runs_the_trainer_directly(layout: str) -> None:
    job = _job(*LAYOUTS[layout])
    container = _container(build_indexed_job(job, 0, resume=True))
    assert container["command"] == ["kubetuner-train"]  # not torchrun: exit codes 75/78 reach the pod
    assert container["args"] == ["--config", POD_PATHS.config_file, "--resume_from_checkpoint", "latest"]
    assert "torchrun" not in json.dumps(container)
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names))
    # the launcher derives every rank itself; fixed RANK/WORLD_SIZE would make it skip that
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"} & set(names)
    assert _container(build_indexed_job(job, 0, resume=False))["args"] == ["--config", POD_PATHS.config_file]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_trainer_reads_one_rank_per_process_of_every_node(layout: str) -> None:
    nodes, gpus = LAYOUTS[layout]
    job = _job(nodes, gpus)
    indexed = build_indexed_job(job, 2, resume=False)
    svc = build_headless_service(job)
    total = render_trainer_files(job, POD_PATHS, resume=False).config_json["num_processes"]
    ranks: list[int] = []
    for index in range(nodes):
        env = _pod_env(indexed, index)
        placement = node_placement(total, env)
        assert placement is not None and placement.node_rank == index
        assert placement.per_node == max(1, gpus) and placement.world_size == total
        # node 0's stable name: <job name>-0 in the Service's subdomain; the Service exposes the port
        assert placement.master_addr == f"{indexed['metadata']['name']}-0.{svc['metadata']['name']}"
        assert indexed["spec"]["template"]["spec"]["subdomain"] == svc["metadata"]["name"]
        assert [p["port"] for p in svc["spec"]["ports"]] == [placement.master_port]
        ranks += [int(rank_environment(r, placement.per_node, placement)["RANK"]) for r in range(placement.per_node)]
    assert sorted(ranks) == list(range(total))


def test_the_service_reaches_the_pods_before_they_are_ready() -> None:
    job = _job(2, 1)
    svc = build_headless_service(job)
    template = build_indexed_job(job, 0, resume=False)["spec"]["template"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert all(template["metadata"]["labels"][k] == v for k, v in svc["spec"]["selector"].items())
