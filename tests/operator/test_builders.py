"""Builders: every generated child validates against the upstream schemas and is safe by construction."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from operator_helpers import TRAININGJOB_UID, make_trainingjob, mounted_files, trainer_files

from kubetuner_operator.builders import (
    build_headless_service,
    build_hook_job,
    build_indexed_job,
    build_network_policy,
    build_pvcs,
    build_trainer_pod,
    hook_job_name,
)
from kubetuner_operator.builders.model_fetch import FETCH_PROGRAM
from kubetuner_operator.builders.network_policy import NetworkPolicySettings
from kubetuner_operator.spec import SpecError, parse_training_job
from kubetuner_operator.trainer_config import POD_PATHS, render_trainer_files

K8S_VERSIONS = ["1.28", kubernetes_validate.latest_version()]
#: the operator's own pods and a Prometheus, as the chart configures them
NETWORK = NetworkPolicySettings((
    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubetuner-system"}},
     "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kubetuner", "app.kubernetes.io/instance": "kt"}}},
    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}))

SPEC_MATRIX: dict[str, dict[str, Any]] = {
    "single-hub": {},
    "multinode": {"nodes": 4, "resources": {"gpus": 8, "gpuResourceName": "nvidia.com/gpu"}},
    "s3-model": {"model": {"family": "flux", "type": "full", "source": {"s3": {
        "uri": "s3://models/flux/", "endpointUrl": "http://minio:9000", "region": "us-east-1",
        "credentialsSecret": {"name": "model-creds"}}}}},
    "pvc-model-new-claims": {"model": {"family": "sd3", "source": {"pvc": {"claimName": "models", "path": "sd3"}}},
                             "caches": {"models": {"size": "200Gi", "accessModes": ["ReadWriteMany"],
                                                   "storageClassName": "nfs"},
                                        "latents": {"existingClaim": "latents"}},
                             "output": {"pvc": {"existingClaim": "results"}}},
    "queued-cpu-no-hooks": {"queueName": "gpu-queue", "resources": {"gpus": 0}, "hooks": None, "caches": None},
    "queued-multinode": {"queueName": "gpu-queue", "nodes": 2},
    "pod-template": {"podTemplate": {
        "nodeSelector": {"gpu": "h100"}, "priorityClassName": "training", "serviceAccountName": "trainer",
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
        "imagePullSecrets": [{"name": "regcred"}], "annotations": {"team": "a"},
        "labels": {"cost-center": "42", "kubetuner.dev/job": "spoofed"}}},
    "output-s3": {"output": {"pvc": {"size": "10Gi"}, "s3": {"bucket": "results", "prefix": "runs/",
                                                         "credentialsSecret": {"name": "out-creds"}}}},
}


def all_children(obj: dict[str, Any]) -> list[dict[str, Any]]:
    job = parse_training_job(obj)
    children = [*build_pvcs(job), build_network_policy(job, NETWORK)]
    if job.nodes > 1:
        children += [build_headless_service(job), build_indexed_job(job, 0, resume=False),
                     build_indexed_job(job, 2, resume=True)]
    else:
        children += [build_trainer_pod(job, 0, resume=False), build_trainer_pod(job, 3, resume=True)]
    children += [build_hook_job(job, hook, 250, "/workspace/output/checkpoint-250") for hook in job.hooks]
    return children


def pod_specs(child: dict[str, Any]) -> list[dict[str, Any]]:
    if child["kind"] == "Pod":
        return [child["spec"]]
    if child["kind"] == "Job":
        return [child["spec"]["template"]["spec"]]
    return []


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("case", sorted(SPEC_MATRIX))
def test_children_validate_strictly(case: str, version: str) -> None:
    for child in all_children(make_trainingjob(**SPEC_MATRIX[case])):
        kubernetes_validate.validate(child, version, strict=True)


@pytest.mark.parametrize("case", sorted(SPEC_MATRIX))
def test_children_are_labelled_and_owned(case: str) -> None:
    for child in all_children(make_trainingjob(**SPEC_MATRIX[case])):
        meta = child["metadata"]
        assert meta["labels"]["kubetuner.dev/job"] == "sdxl-style"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "kubetuner-operator"
        assert len(meta["name"]) <= 63
        [ref] = meta["ownerReferences"]
        assert ref == {"apiVersion": "kubetuner.dev/v1alpha1", "kind": "TrainingJob", "name": "sdxl-style",
                       "uid": TRAININGJOB_UID, "controller": True, "blockOwnerDeletion": True}


@pytest.mark.parametrize("case", sorted(SPEC_MATRIX))
def test_pods_meet_restricted_pod_security(case: str) -> None:
    for child in all_children(make_trainingjob(**SPEC_MATRIX[case])):
        for spec in pod_specs(child):
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert spec["restartPolicy"] == "Never"
            assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
            for vol in spec["volumes"]:
                assert "hostPath" not in vol
            for container in spec["containers"] + spec.get("initContainers", []):
                sc = container["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False
                assert sc["capabilities"] == {"drop": ["ALL"]}
                assert sc.get("privileged") is not True
                assert sc["runAsNonRoot"] is True
                assert sc["readOnlyRootFilesystem"] is True
                # A read-only root needs a writable /tmp.
                assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])


SECRET_VALUES = ["hunter2-secret-value", "AKIAEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG"]


def test_secret_values_never_reach_the_config_files_or_env() -> None:
    # Inline credentials are refused with the field named.
    bad = make_trainingjob()
    bad["spec"]["datasets"][0]["aws_secret_access_key"] = SECRET_VALUES[2]
    with pytest.raises(SpecError, match=r"spec\.datasets\[0\]\.aws_secret_access_key"):
        parse_training_job(bad)
    bad = make_trainingjob(secrets={"env": [{"name": "TOKEN", "value": SECRET_VALUES[0]}]})
    with pytest.raises(SpecError, match=r"spec\.secrets\.env\[0\].*secretKeyRef"):
        parse_training_job(bad)

    for case in SPEC_MATRIX:
        for child in all_children(make_trainingjob(**SPEC_MATRIX[case])):
            text = json.dumps(child)
            assert not any(value in text for value in SECRET_VALUES)
            if child["kind"] == "Pod":
                files = json.dumps(mounted_files(child))
                assert "credentialsSecret" not in files and "aws_access_key" not in files
            for spec in pod_specs(child):
                for container in spec["containers"] + spec.get("initContainers", []):
                    for env in container["env"]:
                        secretish = any(w in env["name"] for w in ("TOKEN", "SECRET", "KEY"))
                        if secretish:
                            assert "value" not in env and "secretKeyRef" in env["valueFrom"], env


def test_secret_env_references() -> None:
    pod = build_trainer_pod(parse_training_job(make_trainingjob(**SPEC_MATRIX["output-s3"])), 0, resume=False)
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "wandb", "key": "api-key"}
    # docs/trainingjob.md: dataset id upper-cased, non-alphanumerics replaced by "_".
    assert env["KUBETUNER_DATASET_STYLE_IMAGES_AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}
    assert env["KUBETUNER_DATASET_STYLE_IMAGES_AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["key"] == \
        "AWS_SECRET_ACCESS_KEY"
    assert env["KUBETUNER_OUTPUT_AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "out-creds"
    assert "KUBETUNER_DATASET_LOCAL_SET_AWS_ACCESS_KEY_ID" not in env


def test_tracker_keys_reach_the_trainer_only_as_secret_references() -> None:
    tracker_secrets = {"env": [
        {"name": "WANDB_API_KEY", "secretKeyRef": {"name": "trackers", "key": "wandb"}},
        {"name": "COMET_API_KEY", "secretKeyRef": {"name": "trackers", "key": "comet"}}]}
    job = make_trainingjob(secrets=tracker_secrets,
                           config={"report_to": "wandb,comet_ml", "tracker_project_name": "styles"})
    spec = parse_training_job(job)
    env = {e["name"]: e for e in build_trainer_pod(spec, 0, resume=False)["spec"]["containers"][0]["env"]}
    assert env["WANDB_API_KEY"] == {"name": "WANDB_API_KEY",
                                    "valueFrom": {"secretKeyRef": {"name": "trackers", "key": "wandb"}}}
    assert env["COMET_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "trackers", "key": "comet"}}
    files = trainer_files(spec)
    config = json.loads(files["config.json"])
    assert (config["report_to"], config["tracker_project_name"]) == ("wandb,comet_ml", "styles")
    assert "API_KEY" not in json.dumps(files) and "trackers" not in json.dumps(files)


@pytest.mark.parametrize("nodes", [1, 2])
def test_the_pod_carries_trainer_files_with_mounted_paths(nodes: int) -> None:
    job = parse_training_job(make_trainingjob(nodes=nodes))
    pod = build_trainer_pod(job, 0, resume=False) if nodes == 1 else \
        {"kind": "Pod", **build_indexed_job(job, 0, resume=False)["spec"]["template"]}
    files = mounted_files(pod)
    (mount,) = [m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == "config"]
    assert mount == {"name": "config", "mountPath": POD_PATHS.config_dir, "readOnly": True}
    assert {f"{POD_PATHS.config_dir}/{name}" for name in files} == {POD_PATHS.config_file,
                                                                    f"{POD_PATHS.config_dir}/multidatabackend.json"}
    config = json.loads(files["config.json"])
    backends = json.loads(files["multidatabackend.json"])
    assert config["model_family"] == "sdxl" and config["model_type"] == "lora"
    assert config["pretrained_model_name_or_path"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert config["variant"] == "fp16" and "revision" not in config
    assert config["output_dir"] == POD_PATHS.output_dir
    assert config["data_backend_config"] == "/etc/kubetuner/multidatabackend.json"
    assert config["learning_rate"] == 1e-4 and config["max_train_steps"] == 2000
    assert config["metrics_port"] == 9400 and config["num_processes"] == nodes
    assert "resume_from_checkpoint" not in config  # resume is a per-attempt command-line flag
    by_id = {b["id"]: b for b in backends}
    assert by_id["local.set"]["instance_data_dir"] == "/workspace/datasets/local.set"  # user path rewritten
    assert by_id["style-images"]["aws_bucket_name"] == "training-data"
    assert "credentialsSecret" not in by_id["style-images"] and "pvc" not in by_id["local.set"]
    assert by_id["style-images"]["cache_dir_vae"].startswith(POD_PATHS.data_cache_dir)
    [text_embeds] = [b for b in backends if b.get("dataset_type") == "text_embeds"]
    assert text_embeds["default"] is True and text_embeds["cache_dir"].startswith(POD_PATHS.data_cache_dir)


def test_operator_owned_option_in_config_is_refused() -> None:
    obj = make_trainingjob(config={"output_dir": "/elsewhere", "learning_rate": 1e-4})
    with pytest.raises(SpecError, match=r"spec\.config\.output_dir.*set by the operator"):
        parse_training_job(obj)


def test_model_sources_set_the_pretrained_path_and_mounts() -> None:
    pvc_job = parse_training_job(make_trainingjob(**SPEC_MATRIX["pvc-model-new-claims"]))
    config = json.loads(trainer_files(pvc_job)["config.json"])
    assert config["pretrained_model_name_or_path"] == POD_PATHS.model_dir
    pod = build_trainer_pod(pvc_job, 0, resume=False)
    [mount] = [m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == "model"]
    assert mount == {"name": "model", "mountPath": POD_PATHS.model_dir, "readOnly": True, "subPath": "sd3"}

    s3_job = parse_training_job(make_trainingjob(**SPEC_MATRIX["s3-model"]))
    config = json.loads(trainer_files(s3_job)["config.json"])
    assert config["pretrained_model_name_or_path"] == "/workspace/cache/models/s3/models/flux"
    [init] = build_trainer_pod(s3_job, 0, resume=False)["spec"]["initContainers"]
    assert init["command"] == ["python", "-c", FETCH_PROGRAM, "s3://models/flux/", config["pretrained_model_name_or_path"]]
    assert {e["name"] for e in init["env"] if "valueFrom" in e} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_volume_ownership() -> None:
    job = parse_training_job(make_trainingjob(**SPEC_MATRIX["pvc-model-new-claims"]))
    pvcs = {p["metadata"]["name"]: p for p in build_pvcs(job)}
    # Only the claim to be created is built; existing claims are referenced, never owned.
    assert set(pvcs) == {"sdxl-style-models"}
    assert pvcs["sdxl-style-models"]["spec"] == {"accessModes": ["ReadWriteMany"], "storageClassName": "nfs",
                                                 "resources": {"requests": {"storage": "200Gi"}}}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in build_trainer_pod(job, 0, resume=False)["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims["output"] == "results" and claims["data-cache"] == "latents"
    assert claims["model-cache"] == "sdxl-style-models"

    default = parse_training_job(make_trainingjob())
    assert {p["metadata"]["name"] for p in build_pvcs(default)} == {"sdxl-style-output", "sdxl-style-latents"}


def test_trainer_pod_details() -> None:
    job = parse_training_job(make_trainingjob(**SPEC_MATRIX["pod-template"]))
    first = build_trainer_pod(job, 0, resume=False)
    resumed = build_trainer_pod(job, 1, resume=True)
    container = first["spec"]["containers"][0]
    assert container["command"] == ["kubetuner-train"]
    assert container["args"] == ["--config", "/etc/kubetuner/config.json"]
    assert resumed["spec"]["containers"][0]["args"][-2:] == ["--resume_from_checkpoint", "latest"]
    assert first["metadata"]["name"] != resumed["metadata"]["name"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in first["spec"]["tolerations"]
    assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in first["spec"]["tolerations"]
    [shm] = [v for v in first["spec"]["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert container["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    annotations = first["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9400"
    assert annotations["team"] == "a"
    labels = first["metadata"]["labels"]
    assert labels["cost-center"] == "42" and labels["kubetuner.dev/job"] == "sdxl-style"  # not spoofable
    assert first["spec"]["priorityClassName"] == "training" and first["spec"]["serviceAccountName"] == "trainer"
    assert first["spec"]["nodeSelector"] == {"gpu": "h100"}
    assert "kueue.x-k8s.io/queue-name" not in labels
    queued = build_trainer_pod(parse_training_job(make_trainingjob(queueName="q1")), 0, resume=False)
    assert queued["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "q1"


def test_multinode_job_and_rendezvous() -> None:
    job = parse_training_job(make_trainingjob(**SPEC_MATRIX["queued-multinode"]))
    indexed = build_indexed_job(job, 1, resume=True)
    svc = build_headless_service(job)
    spec = indexed["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 2
    assert spec["backoffLimit"] == 0 and spec["suspend"] is True  # Kueue admits it
    assert indexed["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    pod_spec = spec["template"]["spec"]
    assert pod_spec["subdomain"] == svc["metadata"]["name"] and svc["spec"]["clusterIP"] == "None"
    env = {e["name"]: e for e in pod_spec["containers"][0]["env"]}
    assert env["MASTER_ADDR"]["value"] == f"{indexed['metadata']['name']}-0.{svc['metadata']['name']}"
    assert env["NUM_NODES"]["value"] == "2" and env["NPROC_PER_NODE"]["value"] == "1"
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    # Every pod runs the trainer, which starts its local ranks itself (exit codes preserved);
    # tests/operator/test_multinode.py covers the layouts in detail.
    assert pod_spec["containers"][0]["command"] == ["kubetuner-train"]
    wide = build_indexed_job(parse_training_job(make_trainingjob(**SPEC_MATRIX["multinode"])), 0, resume=True)
    container = wide["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["kubetuner-train"]
    wide_env = {e["name"]: e for e in container["env"]}
    assert wide_env["NUM_NODES"]["value"] == "4" and wide_env["NPROC_PER_NODE"]["value"] == "8"
    assert "RANK" not in wide_env and "WORLD_SIZE" not in wide_env
    # The Service selects exactly the trainer pods of this job.
    template_labels = spec["template"]["metadata"]["labels"]
    assert all(template_labels[k] == v for k, v in svc["spec"]["selector"].items())
    unqueued = build_indexed_job(parse_training_job(make_trainingjob(nodes=2)), 0, resume=False)
    assert "suspend" not in unqueued["spec"]


def test_hook_job_argv_and_names() -> None:
    job = parse_training_job(make_trainingjob())
    [hook] = job.hooks
    path = "/workspace/output/checkpoint-250; rm -rf /"
    built = build_hook_job(job, hook, 250, path)
    container = built["spec"]["template"]["spec"]["containers"][0]
    # Substituted per argument: the hostile path stays one argv element, no shell involved.
    assert container["command"] == ["python", "-m", "eval", "--checkpoint", path, "--step", "250"]
    assert {"name": "MODE", "value": "quick"} in container["env"]
    assert built["spec"]["backoffLimit"] == 1 and container["resources"] == {"limits": {"cpu": "2"}}
    [out] = [m for m in container["volumeMounts"] if m["name"] == "output"]
    assert out["readOnly"] is True
    [vol] = [v for v in built["spec"]["template"]["spec"]["volumes"] if v["name"] == "output"]
    assert vol["persistentVolumeClaim"] == {"claimName": "sdxl-style-output", "readOnly": True}
    # Deterministic and distinct per (job, hook, step); always a valid label even for long names.
    assert hook_job_name("a", "eval", 250) == hook_job_name("a", "eval", 250)
    assert len({hook_job_name("a", "eval", 250), hook_job_name("a", "eval", 500), hook_job_name("b", "eval", 250),
                hook_job_name("a", "eval2", 250)}) == 4
    long = hook_job_name("x" * 63, "y" * 63, 10**9)
    assert len(long) <= 63 and long != hook_job_name("x" * 63, "y" * 63, 10**9 + 1)


EXAMPLES = sorted(p for p in (Path(__file__).resolve().parents[2] / "examples").rglob("*.yaml"))


def _trainingjobs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    return [d for d in docs if d.get("kind") == "TrainingJob"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_repository_examples_build_valid_children(path: Path) -> None:
    """The shipped example manifests (with schema defaults applied) turn into valid children."""
    manifests = _trainingjobs(path)
    if not manifests:
        pytest.skip(f"{path.name} holds no TrainingJob")
    for manifest in manifests:
        manifest.setdefault("metadata", {}).update(uid=TRAININGJOB_UID, generation=1)
        manifest["metadata"].setdefault("namespace", "default")
        children = all_children(manifest)
        assert children
        for child in children:
            kubernetes_validate.validate(child, K8S_VERSIONS[-1], strict=True)


@pytest.fixture
def moto_endpoint() -> Any:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_model_fetch_program_downloads_an_s3_prefix_once(moto_endpoint: str, tmp_path: Path) -> None:
    """The init container's program, run as the pod runs it, against an S3 server over HTTP."""
    import os
    import subprocess
    import sys

    import boto3

    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_ENDPOINT_URL": moto_endpoint, "AWS_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket="models")
    files = {"flux/model_index.json": b'{"_class_name": "FluxPipeline"}', "flux/unet/weights.bin": b"\x00" * 1024,
             "flux-other/ignored.txt": b"not under the prefix", "flux/unet/": b""}
    for key, body in files.items():
        s3.put_object(Bucket="models", Key=key, Body=body)
    job = parse_training_job(make_trainingjob(**SPEC_MATRIX["s3-model"]))
    [init] = build_trainer_pod(job, 0, resume=False)["spec"]["initContainers"]
    target = tmp_path / "cache" / "flux"
    argv = [sys.executable, *init["command"][1:-1], str(target)]

    first = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "fetched 2 file(s)" in first.stdout
    assert (target / "model_index.json").read_bytes() == files["flux/model_index.json"]
    assert (target / "unet" / "weights.bin").stat().st_size == 1024
    assert sorted(p.name for p in target.rglob("*") if p.is_file()) == ["model_index.json", "weights.bin"]
    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "fetched 0 file(s)" in second.stdout  # shared cache: no re-download

    missing = subprocess.run([sys.executable, "-c", FETCH_PROGRAM, "s3://models/absent/", str(tmp_path / "x")],
                             env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "no objects under s3://models/absent/" in missing.stderr


@pytest.mark.parametrize("case", ["single-hub", "multinode", "output-s3", "pod-template", "queued-cpu-no-hooks"])
def test_trainer_accepts_the_generated_files(case: str) -> None:
    """config.json and multidatabackend.json load through the trainer's own validators."""
    from kubetuner_trainer.config import TrainerConfig
    from kubetuner_trainer.data.dataset_config import load_dataset_config

    job = parse_training_job(make_trainingjob(**SPEC_MATRIX[case]))
    files = trainer_files(job)
    config = TrainerConfig.from_mapping(json.loads(files["config.json"]))
    assert config.model_family == "sdxl" and config.output_dir == POD_PATHS.output_dir
    assert config.num_processes == max(1, job.resources.gpus) * job.nodes
    datasets = load_dataset_config(json.loads(files["multidatabackend.json"]))
    assert {e.id for e in datasets.entries} == {"style-images", "local.set", "kubetuner-text-embeds"}
    resumed = TrainerConfig.from_mapping(render_trainer_files(job, POD_PATHS, resume=True).config_json)
    assert resumed.resume_from_checkpoint == "latest"


def test_pod_command_line_and_env_as_the_trainer_reads_them(tmp_path: Path) -> None:
    """The resumed pod's args and plain env, with its config volume's files, through the trainer's loader."""
    from kubetuner_trainer.config import load_config
    from kubetuner_trainer.data.credentials import credential_env_prefix

    job = parse_training_job(make_trainingjob())
    for ds in job.datasets:
        assert ds.env_prefix == credential_env_prefix(ds.id)
    for key, text in trainer_files(job).items():
        (tmp_path / key).write_text(text)
    container = build_trainer_pod(job, 1, resume=True)["spec"]["containers"][0]
    args = [str(tmp_path / "config.json") if a == POD_PATHS.config_file else a for a in container["args"]]
    plain_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    cfg = load_config(args, environ=plain_env)
    assert cfg.resume_from_checkpoint == "latest" and cfg.model_family == "sdxl"
    assert cfg.source("resume_from_checkpoint") == "cli" and cfg.source("learning_rate").startswith("file:")
    assert cfg.env.job_id == "team-a/sdxl-style"


def test_output_s3_becomes_a_secret_free_publishing_target(monkeypatch) -> None:
    from kubetuner_trainer.runtime.publishing import parse_publishing_config

    job = parse_training_job(make_trainingjob(**SPEC_MATRIX["output-s3"]))
    config = json.loads(trainer_files(job)["config.json"])
    (target,) = config["publishing_config"]
    assert target["provider"] == "s3" and target["bucket"] == job.output_s3.bucket
    assert target["access_key_env"] == "KUBETUNER_OUTPUT_AWS_ACCESS_KEY_ID"
    assert "access_key" not in target and "secret_key" not in target
    # The trainer resolves the named variables, which the pod gets from the Secret.
    monkeypatch.setenv("KUBETUNER_OUTPUT_AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("KUBETUNER_OUTPUT_AWS_SECRET_ACCESS_KEY", "s3cr3t")
    (resolved,) = parse_publishing_config(config["publishing_config"])
    assert (resolved.access_key, resolved.secret_key) == ("AKIDEXAMPLE", "s3cr3t")
    monkeypatch.delenv("KUBETUNER_OUTPUT_AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ValueError, match="secret_key_env names"):
        parse_publishing_config(config["publishing_config"])


def test_pod_grace_period_outlasts_the_trainer_stop_budget() -> None:
    default = build_trainer_pod(parse_training_job(make_trainingjob()), 0, resume=False)
    custom = build_trainer_pod(
        parse_training_job(make_trainingjob(config={"optimizer": "adamw_bf16", "stop_grace_seconds": 600})),
        0,
        resume=False,
    )
    assert default["spec"]["terminationGracePeriodSeconds"] > 120
    assert custom["spec"]["terminationGracePeriodSeconds"] > 600


def test_hook_jobs_and_trainer_scripts_fill_the_same_placeholders() -> None:
    """One placeholder table: a cluster hook sees what a trainer script sees, plus where it runs."""
    from kubetuner_operator.builders.hook_job import placeholder_values as hook_values
    from kubetuner_trainer.config import TrainerConfig
    from kubetuner_trainer.runtime.scripts import placeholder_values as script_values

    job = parse_training_job(make_trainingjob(config={"validation_prompt": "a cat", "tracker_run_name": "r1"}))
    path = "/workspace/output/checkpoint-250"
    cluster = hook_values(job, 250, path)
    cfg = TrainerConfig.from_mapping({**job.config, "model_family": job.model.family,
                                      "model_type": job.model.type, "output_dir": "/tmp/out"}, require=False)
    trainer = script_values(cfg, global_step=250, local_checkpoint_path=path)
    shared = set(cluster) & set(trainer)
    assert {"global_step", "lora_type", "model_family", "tracker_run_name", "validation_prompt"} <= shared
    assert {k: cluster[k] for k in shared - {"validation_prompt"} if not k.startswith("validation_")} == {
        k: trainer[k] for k in shared - {"validation_prompt"} if not k.startswith("validation_")}
    assert cluster["validation_prompt"] == trainer["validation_prompt"] == "a cat"
    assert cluster["lora_type"] == "standard"  # the catalog default, not a second copy of it
    assert set(cluster) - set(trainer) == {"output_dir", "job_name", "namespace"}
