"""admission.validate_all: what kubetuner refuses at apply time, shared by the webhook, the reconciler,
``kubetuner crd --validate`` and ``kubetuner run``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from operator_helpers import UNBUILT_OPTION

from kubetuner_operator import cli
from kubetuner_operator.admission import (
    ANNOTATIONS_MAX_BYTES,
    MAX_DEPTH,
    MAX_NODES,
    TenancyPolicy,
    annotations_size,
    credential_kind,
    policy_problems,
    validate_all,
)
from kubetuner_operator.builders import build_trainer_pod
from kubetuner_operator.local_run import RunError, validate_manifest
from kubetuner_operator.spec import parse_training_job


def job(**spec: Any) -> dict[str, Any]:
    obj = {
        "apiVersion": "kubetuner.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "tiny", "namespace": "default"},
        "spec": {
            "model": {"family": "sdxl", "source": {"hub": {"id": "stabilityai/stable-diffusion-xl-base-1.0"}}},
            "config": {"optimizer": "adamw_bf16", "learning_rate": 1e-4, "max_train_steps": 100},
            "datasets": [{"id": "images", "type": "local", "pvc": {"claimName": "data"}}],
            "output": {"pvc": {"size": "10Gi"}},
        },
    }
    obj["spec"].update(copy.deepcopy(spec))
    return obj


def config(**options: Any) -> dict[str, Any]:
    obj = job()
    obj["spec"]["config"].update(options)
    return obj


def hook(**fields: Any) -> dict[str, Any]:
    entry = {"name": "eval", "image": "ghcr.io/acme/eval:1", "command": ["python", "eval.py"], **fields}
    return job(hooks={"postCheckpoint": [entry]})


def pod_template(**fields: Any) -> dict[str, Any]:
    return job(podTemplate=fields)


def test_a_plain_job_is_accepted():
    assert validate_all(job()) == []


REFUSED = [
    # What the trainer refuses, found before any pod exists (field path of the TrainingJob).
    ("unbuilt-feature", lambda o: o["spec"]["config"].update({UNBUILT_OPTION: True}),
     f"spec.config.{UNBUILT_OPTION}", "does not implement it yet"),
    ("no-steps-no-epochs", lambda o: o["spec"]["config"].update(max_train_steps=0, num_train_epochs=0),
     "spec.config.max_train_steps", "num_train_epochs"),
    ("dataset-field", lambda o: o["spec"]["datasets"][0].update(crop=True, crop_aspect="closest",
                                                                  crop_aspect_buckets=[1.0], crop_style="random",
                                                                  resolution_type="area", resolution=2000.0),
     "spec", "megapixels"),
    # The evaluation split (data.eval_split): judged on the dataset list alone, no data read.
    ("eval-dataset-unknown", lambda o: o["spec"]["config"].update(eval_dataset_id="held-out"),
     "spec.config.eval_dataset_id", "names no enabled image dataset"),
    ("eval-dataset-only-one", lambda o: o["spec"]["config"].update(eval_dataset_id="images"),
     "spec.config.eval_dataset_id", "nothing would be left to train on"),
    # Integers beyond int64 and deep nesting: messages, never a traceback.
    ("int64-deadline", lambda o: o["spec"].update(runPolicy={"activeDeadlineSeconds": 10**20}),
     "spec.runPolicy.activeDeadlineSeconds", "64-bit integer"),
    ("int64-steps", lambda o: o["spec"]["config"].update(max_train_steps=2**64), "spec.config.max_train_steps",
     "64-bit integer"),
    # Names the API server (or the child's create) would refuse.
    ("generate-name-upper", lambda o: o["metadata"].update(name=None, generateName="Bad_Name-"),
     "metadata.generateName", "should match"),
    ("generate-name-long", lambda o: o["metadata"].update(name=None, generateName="a" * 50),
     "metadata.generateName", "Too long"),
    ("no-name", lambda o: o["metadata"].pop("name"), "metadata.name", "name or generateName"),
    ("priority-class", lambda o: o["spec"].update(podTemplate={"priorityClassName": "High Priority"}),
     "spec.podTemplate.priorityClassName", "should match"),
    ("service-account", lambda o: o["spec"].update(podTemplate={"serviceAccountName": "Bad_SA"}),
     "spec.podTemplate.serviceAccountName", "should match"),
    ("storage-class", lambda o: o["spec"]["output"]["pvc"].update(storageClassName="Fast SSD"),
     "spec.output.pvc.storageClassName", "should match"),
    ("node-selector-key", lambda o: o["spec"].update(podTemplate={"nodeSelector": {"bad key": "x"}}),
     "spec.podTemplate.nodeSelector", "bad key"),
    ("label-key", lambda o: o["spec"].update(podTemplate={"labels": {"Example.com/x": "y"}}),
     "spec.podTemplate.labels", "DNS-1123"),
    ("resource-name", lambda o: o["spec"].update(hooks={"postCheckpoint": [{
        "name": "eval", "image": "i", "command": ["x"], "resources": {"limits": {"bad key": "1"}}}]}),
     "spec.hooks.postCheckpoint[0].resources.limits", "resource name"),
    ("negative-quantity", lambda o: o["spec"].update(resources={"cpu": "-2"}), "spec.resources.cpu",
     "should match"),
    # podTemplate.affinity is the upstream corev1.Affinity: typos and free objects are refused.
    ("affinity-typo", lambda o: o["spec"].update(podTemplate={"affinity": {"nodeAfinity": {}}}),
     "spec.podTemplate.affinity.nodeAfinity", "unknown field"),
    ("affinity-free", lambda o: o["spec"].update(podTemplate={"affinity": {"foo": "bar"}}),
     "spec.podTemplate.affinity.foo", "unknown field"),
    ("affinity-weight", lambda o: o["spec"].update(podTemplate={"affinity": {"podAntiAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": "high", "podAffinityTerm": {
            "topologyKey": "kubernetes.io/hostname"}}]}}}),
     "spec.podTemplate.affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].weight",
     "must be of type integer"),
    # Security-relevant annotations.
    ("apparmor", lambda o: o["spec"].update(podTemplate={"annotations": {
        "container.apparmor.security.beta.kubernetes.io/trainer": "unconfined"}}), "spec.podTemplate.annotations",
     "AppArmor"),
    ("seccomp", lambda o: o["spec"].update(podTemplate={"annotations": {
        "seccomp.security.alpha.kubernetes.io/pod": "unconfined"}}), "spec.podTemplate.annotations", "seccomp"),
    # Literal credentials in any option, hook env value or argument.
    ("publishing-keys", lambda o: o["spec"]["config"].update(publishing_config=[
        {"provider": "s3", "bucket": "b", "access_key": "AKIAIOSFODNN7EXAMPLE", "secret_key": "x"}]),
     "spec.config.publishing_config[0].access_key", "literal credential"),
    ("webhook-api-key", lambda o: o["spec"]["config"].update(webhook_config={
        "webhook_type": "raw", "callback_url": "https://hooks.example/x", "api_key": "k"}),
     "spec.config.webhook_config.api_key", "api_key_env"),
    ("webhook-auth-header", lambda o: o["spec"]["config"].update(webhook_config={
        "webhook_type": "raw", "callback_url": "https://hooks.example/x", "headers": {"Authorization": "Bearer x"}}),
     "spec.config.webhook_config.headers.Authorization", "literal credential"),
    ("token-in-prompt", lambda o: o["spec"]["config"].update(
        validation_prompt="a cat hf_abcdefghijklmnopqrstuvwxyz0123456789"), "spec.config.validation_prompt",
     "Hugging Face token"),
    ("token-in-env", lambda o: o["spec"].update(hooks={"postCheckpoint": [{
        "name": "eval", "image": "i", "command": ["x"],
        "env": [{"name": "UPLOAD", "value": "ghp_" + "a" * 36}]}]}), "spec.hooks.postCheckpoint[0].env[0].value",
     "GitHub token"),
    ("url-password-in-arg", lambda o: o["spec"].update(hooks={"postCheckpoint": [{
        "name": "eval", "image": "i", "command": ["curl", "https://user:hunter2@example.com/x"]}]}),
     "spec.hooks.postCheckpoint[0].command[1]", "password in a URL"),
]


@pytest.mark.parametrize(("mutate", "field", "fragment"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_naming_the_field(mutate, field, fragment):
    obj = job()
    mutate(obj)
    problems = validate_all(obj)
    assert any(p.startswith(f"{field}:") and fragment in p for p in problems), problems


ACCEPTED = [
    # The credential heuristic judges values, not names.
    ("tokenizers-parallelism", lambda o: o["spec"].update(hooks={"postCheckpoint": [{
        "name": "eval", "image": "i", "command": ["x"],
        "env": [{"name": "TOKENIZERS_PARALLELISM", "value": "false"}, {"name": "SECRET_NAME", "value": "hf"}]}]})),
    ("eval-dataset-held-out", lambda o: (o["spec"]["config"].update(eval_dataset_id="held-out"),
                                         o["spec"]["datasets"].append({"id": "held-out", "type": "local",
                                                                       "pvc": {"claimName": "data"}}))),
    ("signed-quantity", lambda o: o["spec"].update(resources={"cpu": "+2", "memory": "+64Gi"})),
    ("generate-name", lambda o: o["metadata"].update(name=None, generateName="style-")),
    ("publishing-env-indirection", lambda o: o["spec"]["config"].update(publishing_config=[
        {"provider": "s3", "bucket": "b", "access_key_env": "PUB_KEY", "secret_key_env": "PUB_SECRET"}])),
    ("webhook-env-indirection", lambda o: o["spec"]["config"].update(webhook_config={
        "webhook_type": "raw", "callback_url": "https://hooks.example/x", "api_key_env": "HOOK_KEY"})),
    ("node-affinity", lambda o: o["spec"].update(podTemplate={"affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]}]}]}}}})),
    ("qualified-keys", lambda o: o["spec"].update(podTemplate={
        "nodeSelector": {"node.kubernetes.io/instance-type": "p5"},
        "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}})),
]


@pytest.mark.parametrize("mutate", [c[1] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_accepted(mutate):
    obj = job()
    mutate(obj)
    assert validate_all(obj) == []


def test_credential_formats():
    assert credential_kind("AKIAIOSFODNN7EXAMPLE") == "an AWS access key id"
    assert credential_kind("-----BEGIN OPENSSH PRIVATE KEY-----") == "a private key"
    assert credential_kind("a photo of sks dog, high quality") is None
    assert credential_kind("s3://bucket/prefix/") is None


def test_deep_nesting_gets_a_message_everywhere(tmp_path: Path, capsys):
    deep: dict[str, Any] = {}
    cursor = deep
    for _ in range(1200):
        cursor["a"] = {}
        cursor = cursor["a"]
    obj = config(lycoris_config=deep)
    (problem,) = validate_all(obj)
    assert problem.startswith("spec.config.lycoris_config") and f"more than {MAX_DEPTH} levels" in problem
    path = tmp_path / "deep.yaml"
    path.write_text("[" * 1200 + "]" * 1200, encoding="utf-8")
    assert cli.main(["crd", "--validate", str(path)]) == 1
    out = capsys.readouterr().out  # the YAML reader's recursion limit or our depth check, never a traceback
    assert "nested too deeply" in out or f"nested more than {MAX_DEPTH} levels" in out, out


def test_huge_integers_in_yaml_get_a_message(tmp_path: Path, capsys):
    obj = job(runPolicy={"activeDeadlineSeconds": 100000000000000000000})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(obj), encoding="utf-8")
    assert cli.main(["crd", "--validate", str(path)]) == 1
    assert "spec.runPolicy.activeDeadlineSeconds: Invalid value: 100000000000000000000" in capsys.readouterr().out


def test_rendered_files_must_fit_the_pods_annotations():
    big = {"first": {"factor": "x" * 140_000}, "second": {"factor": "y" * 140_000}}
    obj = config(lycoris_config=big)
    size = annotations_size(build_trainer_pod(parse_training_job(obj), 0, resume=False)["metadata"]["annotations"])
    assert size > ANNOTATIONS_MAX_BYTES
    problems = validate_all(obj)
    assert any(p.startswith("spec.config: Too long") and str(size) in p for p in problems), problems
    small = config(lycoris_config={"layer": {"factor": "x" * 1000}})
    assert not any("Too long" in p for p in validate_all(small))


def test_tenancy_policy_limits_images_and_service_accounts():
    policy = TenancyPolicy(allowed_images=("registry.internal/",), allowed_service_accounts=("trainer",))
    obj = job(image="docker.io/evil/miner:1", podTemplate={"serviceAccountName": "admin"},
              hooks={"postCheckpoint": [{"name": "eval", "image": "registry.internal/eval:1", "command": ["x"]}]})
    problems = validate_all(obj, policy=policy)
    assert any(p.startswith("spec.image: Forbidden") for p in problems), problems
    assert any(p.startswith("spec.podTemplate.serviceAccountName: Forbidden") for p in problems), problems
    assert not any("postCheckpoint" in p for p in problems)
    allowed = job(image="registry.internal/trainer:1", podTemplate={"serviceAccountName": "trainer"})
    assert validate_all(allowed, policy=policy) == []
    assert validate_all(obj) == policy_problems(obj) == []  # no policy: anything goes
    env = TenancyPolicy.from_env({"KUBETUNER_ALLOWED_IMAGES": "a/, b/", "KUBETUNER_ALLOWED_SERVICE_ACCOUNTS": ""})
    assert env == TenancyPolicy(allowed_images=("a/", "b/"))


def test_crd_validate_and_run_agree(tmp_path: Path, capsys):
    obj = config(**{UNBUILT_OPTION: True})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(obj), encoding="utf-8")
    assert cli.main(["crd", "--validate", str(path)]) == 1
    out = capsys.readouterr().out
    with pytest.raises(RunError) as raised:
        validate_manifest(obj)
    for problem in validate_all(obj):
        assert problem in out and problem in str(raised.value)


def test_upstream_corev1_schemas_are_a_fresh_extraction_of_kubernetes_validates():
    from kubetuner_operator.crd import upstream

    checked_in = upstream._generated()
    version = checked_in["source"].split(" v", 1)[1].removesuffix("-local")
    assert checked_in == upstream.generate(version), (
        "operator/kubetuner_operator/crd/upstream_schemas.json is stale: "
        "python -m kubetuner_operator.crd.upstream --write")
    affinity = upstream.upstream("Affinity")
    assert set(affinity["properties"]) == {"nodeAffinity", "podAffinity", "podAntiAffinity"}


def test_a_yaml_alias_bomb_gets_a_message(tmp_path: Path, capsys):
    aliases = ["      a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    aliases += [f"      a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10**9 leaves
    text = "\n".join([
        "apiVersion: kubetuner.dev/v1alpha1", "kind: TrainingJob", "metadata: {name: tiny, namespace: default}",
        "spec:", "  model: {family: sdxl, source: {hub: {id: a/b}}}",
        "  config:", "    optimizer: adamw_bf16", "    max_train_steps: 100", "    lycoris_config:", *aliases,
        "  datasets: [{id: images, type: local, pvc: {claimName: data}}]", "  output: {pvc: {size: 10Gi}}", ""])
    path = tmp_path / "bomb.yaml"
    path.write_text(text, encoding="utf-8")
    assert cli.main(["crd", "--validate", str(path)]) == 1
    assert f"more than {MAX_NODES} values" in capsys.readouterr().out


LEAVES = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
          | st.text(max_size=16))
VALUES = st.recursive(LEAVES, lambda children: st.lists(children, max_size=3)
                      | st.dictionaries(st.text(max_size=8), children, max_size=3), max_leaves=8)
SPEC_KEYS = ["model", "config", "datasets", "output", "resources", "nodes", "hooks", "secrets", "runPolicy",
             "podTemplate", "caches", "image", "metricsPort", "queueName"]


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(SPEC_KEYS), VALUES), min_size=1, max_size=3),
       st.integers(0, 300))
def test_any_input_gets_messages_never_a_traceback(replacements, depth):
    obj = job()
    nested: Any = "leaf"
    for _ in range(depth):
        nested = {"n": nested}
    obj["spec"]["config"]["lycoris_config"] = nested
    for key, value in replacements:
        obj["spec"][key] = value
    problems = validate_all(obj)
    assert isinstance(problems, list) and all(isinstance(p, str) and ": " in p for p in problems)


def test_admission_stays_torch_free():
    """The webhook answers within its timeout because validation never imports torch (eval split included)."""
    import subprocess
    import sys

    program = ("import sys; from kubetuner_operator.admission import validate_all; "
               f"problems = validate_all({config(eval_dataset_id='held-out')!r}); "
               "assert problems and 'torch' not in sys.modules, (problems, 'torch' in sys.modules)")
    subprocess.run([sys.executable, "-c", program], check=True)
