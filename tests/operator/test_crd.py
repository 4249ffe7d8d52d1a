"""The generated TrainingJob CRD: up to date, valid, structural, and it validates like the API server."""

from __future__ import annotations

import copy
import io
import json
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes_validate import utils as kv_utils

from kubetuner_operator import cli
from kubetuner_operator.crd import apply_defaults, build_crd, trainingjob_openapi_schema, validate_trainingjob
from kubetuner_operator.crd.datasets import dataset_schema
from kubetuner_operator.crd.structural import structural_problems
from kubetuner_operator.owned_options import OWNED_OPTIONS
from kubetuner_trainer.data.dataset_config import OPERATOR_FIELDS, parse_dataset_config
from kubetuner_trainer.data.settings import DataSettings
from kubetuner_trainer.options import get_registry

ROOT = Path(__file__).resolve().parents[2]
CHECKED_IN = ROOT / "crds" / "trainingjobs.kubetuner.dev.yaml"
NEWEST = kv_utils.latest_version()


def minimal() -> dict[str, Any]:
    return {
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


def crd_schema() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_checked_in_crd_matches_the_generator():
    generated = cli_output([])
    assert CHECKED_IN.read_text(encoding="utf-8") == generated, (
        "crds/trainingjobs.kubetuner.dev.yaml is out of date: run `kubetuner crd > crds/trainingjobs.kubetuner.dev.yaml`"
    )


def cli_output(extra: list[str]) -> str:
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert cli.main(["crd", *extra]) == 0
    return buffer.getvalue()


def test_printing_the_crd_and_defaulting_need_neither_torch_nor_cel():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from kubetuner_operator import crd_cli\n"
        "from kubetuner_operator.crd.defaults import apply_defaults\n"
        "crd_cli.render(); apply_defaults({'spec': {}})\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'celpy', 'diffusers', 'kopf'}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_cli_prints_yaml_and_json_of_the_same_crd():
    assert yaml.safe_load(cli_output([])) == build_crd()
    assert json.loads(cli_output(["--output", "json"])) == build_crd()


@pytest.mark.parametrize("version", ["1.28", NEWEST])
def test_crd_is_a_valid_v1_customresourcedefinition(version):
    assert kubernetes_validate.validate(build_crd(), version, strict=True)


def test_strict_crd_validation_notices_a_misspelt_schema_keyword():
    crd = build_crd()
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["maxitems"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(crd, "1.28", strict=True)


def test_crd_schema_is_structural():
    assert structural_problems(trainingjob_openapi_schema()) == []


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": "object", "properties": {"a": {"description": "untyped"}}}, "a: must specify type"),
        ({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}},
                                                 "additionalProperties": False}}},
         "mutually exclusive"),
        ({"type": "object", "properties": {"q": {"x-kubernetes-int-or-string": True,
                                                 "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string"}]}}},
         "anyOf[0] must not set type"),
        ({"type": "object", "properties": {"metadata": {"type": "object", "properties": {
            "labels": {"type": "object"}}}}}, "metadata.labels: only name and generateName"),
        ({"type": "object", "properties": {"l": {"type": "array", "x-kubernetes-list-type": "map",
                                                 "x-kubernetes-list-map-keys": ["id"],
                                                 "items": {"type": "object", "properties": {
                                                     "id": {"type": "string"}}}}}},
         "must be required or have a default"),
        ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "default": 0}}},
         "default is invalid"),
        ({"type": "object", "properties": {"s": {"type": "string", "x-kubernetes-validations": [
            {"rule": "self.size( > 1", "message": "m"}]}}}, "does not compile"),
        ({"type": "object", "properties": {"l": {"type": "array", "uniqueItems": True,
                                                 "items": {"type": "string"}}}}, "uniqueItems"),
        ({"type": "object", "properties": {"l": {"type": "array", "items": {
            "type": "object", "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "m"}]}}}},
         "cannot be correlated"),
    ],
)
def test_structural_checker_rejects_what_the_api_server_rejects(schema, expected):
    problems = structural_problems(schema)
    assert any(expected in p for p in problems), problems


def test_names_subresources_and_printer_columns():
    crd = build_crd()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "trainingjobs.kubetuner.dev"
    assert spec["group"] == "kubetuner.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["tj"] and spec["names"]["categories"] == ["kubetuner"]
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase"
    assert columns["Progress"] == ".status.progress.percent"
    assert columns["Step"] == ".status.progress.step"
    assert columns["Loss"] == ".status.progress.loss"
    assert columns["Restarts"] == ".status.restarts"
    assert columns["Age"] == ".metadata.creationTimestamp"
    assert not any("conditions" in path for path in columns.values())


def test_printer_columns_point_at_declared_fields():
    schema = crd_schema()
    for column in build_crd()["spec"]["versions"][0]["additionalPrinterColumns"]:
        node = schema
        for part in column["jsonPath"].lstrip(".").split("."):
            if part == "metadata":
                node = {"properties": {"creationTimestamp": {"type": "string"}}}
                continue
            node = node["properties"][part]
        expected = {"integer": "integer", "string": "string"}.get(node["type"], node["type"])
        assert column["type"] in (expected, "date"), column


def test_crd_fits_the_last_applied_annotation_of_kubectl_apply():
    # kubectl apply (client side) stores the whole object in an annotation limited to 256 KiB.
    assert len(json.dumps(build_crd(), separators=(",", ":"))) < 262144


def test_config_schema_follows_the_option_registry():
    config = crd_schema()["properties"]["spec"]["properties"]["config"]
    registry = get_registry()
    for option in registry:
        node = config["properties"][option.name]
        if option.name in OWNED_OPTIONS:
            continue
        if option.type == "json":
            assert node.get("x-kubernetes-preserve-unknown-fields") is True
        else:
            assert node["type"] == {"bool": "boolean", "int": "integer", "float": "number", "str": "string"}[
                option.type]
        if option.choices is not None and not option.multiple:
            assert node["enum"] == list(option.choices)
    assert set(config["properties"]) == {o.name for o in registry} | OWNED_OPTIONS
    assert "additionalProperties" not in config
    family = crd_schema()["properties"]["spec"]["properties"]["model"]["properties"]["family"]
    assert family["enum"] == list(registry.get("model_family").choices)


def test_minimal_job_is_accepted_and_defaulted():
    job = minimal()
    assert validate_trainingjob(job) == []
    filled = apply_defaults(job)
    spec = filled["spec"]
    assert "image" not in spec  # the operator's --trainer-image, not a schema default
    assert spec["model"]["type"] == "lora"
    assert spec["resources"] == {"gpus": 1, "gpuResourceName": "nvidia.com/gpu", "sharedMemory": "8Gi"}
    assert spec["nodes"] == 1 and spec["metricsPort"] == 9400
    assert spec["runPolicy"] == {"backoffLimit": 3, "suspend": False}
    assert spec["datasets"][0]["dataset_type"] == "image"
    assert "hooks" not in spec and "caches" not in spec
    assert job["spec"].get("image") is None, "apply_defaults must not modify its argument"


def test_defaults_keep_explicit_values_and_replace_nulls():
    job = minimal()
    job["spec"]["resources"] = {"gpus": 0, "sharedMemory": None}
    job["spec"]["hooks"] = {"postCheckpoint": [{"name": "eval", "image": "busybox", "command": ["true"]}]}
    spec = apply_defaults(job)["spec"]
    assert spec["resources"]["gpus"] == 0
    assert spec["resources"]["sharedMemory"] == "8Gi"
    assert spec["hooks"]["maxConcurrent"] == 2
    assert spec["hooks"]["postCheckpoint"][0]["backoffLimit"] == 1


def test_model_and_output_are_fixed_after_creation_but_config_is_not():
    stored = minimal()
    update = copy.deepcopy(stored)
    update["spec"]["config"]["learning_rate"] = 5e-5
    update["spec"]["model"]["type"] = "lora"  # the stored default, written out: no change
    update["spec"]["runPolicy"] = {"suspend": True}
    assert validate_trainingjob(update, old=stored) == []
    moved = copy.deepcopy(update)
    update["spec"]["model"]["source"] = {"hub": {"id": "other/model"}}
    problems = validate_trainingjob(update, old=stored)
    assert any(p.startswith("spec.model: ") and "cannot change" in p for p in problems), problems
    moved["spec"]["output"] = {"s3": {"bucket": "elsewhere"}}
    problems = validate_trainingjob(moved, old=stored)
    assert any(p.startswith("spec.output: ") and "cannot change" in p for p in problems), problems
    assert validate_trainingjob(update) == [], "transition rules must not run on create"


def test_output_cannot_be_swapped_by_removing_it_first():
    stored = minimal()
    removed = copy.deepcopy(stored)
    del removed["spec"]["output"]
    assert any(p.startswith("spec.output: ") and "cannot change" in p
               for p in validate_trainingjob(removed, old=stored))
    # Had the removal been stored, adding another claim would be refused too.
    elsewhere = copy.deepcopy(removed)
    elsewhere["spec"]["output"] = {"pvc": {"existingClaim": "other"}}
    assert any(p.startswith("spec.output: ") and "cannot change" in p
               for p in validate_trainingjob(elsewhere, old=removed))


def test_unknown_fields_are_pruned_without_strict_field_validation():
    job = minimal()
    job["spec"]["config"]["not_an_option"] = 1
    assert validate_trainingjob(job, strict=False) == []
    assert any("not_an_option" in p for p in validate_trainingjob(job))


def test_status_written_by_the_operator_validates():
    job = minimal()
    job["status"] = {
        "phase": "Running", "observedGeneration": 2, "restarts": 1, "message": "training",
        "conditions": [{"type": "Ready", "status": "False", "reason": "Training", "message": "step 10",
                        "lastTransitionTime": "2026-11-26T10:00:00Z", "observedGeneration": 2}],
        "progress": {"step": 10, "maxSteps": 100, "epoch": 0, "percent": "10.0", "loss": "0.1234",
                     "samplesPerSecond": "3.2", "eta": "5m"},
        "checkpoints": {"latestStep": 0, "latestPath": "", "latestTime": ""},
        "hooks": [{"checkpointStep": 250, "hook": "eval", "job": "tiny-eval-250", "result": "Succeeded"}],
        "startTime": "2026-11-26T09:00:00Z", "completionTime": None,
        "kopf": {"progress": {"anything": {"retries": 1}}},
    }
    assert validate_trainingjob(job) == []
    job["status"]["phase"] = "Exploded"
    job["status"]["conditions"][0]["status"] = "Maybe"
    problems = validate_trainingjob(job)
    assert any(p.startswith("status.phase: Unsupported value") for p in problems), problems
    assert any(p.startswith("status.conditions[0].status: Unsupported value") for p in problems), problems


def _set(path: str, value: Any):
    """A mutation that sets a dotted path (list indexes as numbers) in the job."""

    def mutate(job: dict[str, Any]) -> None:
        parts = path.split(".")
        node: Any = job
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _delete(path: str):
    def mutate(job: dict[str, Any]) -> None:
        parts = path.split(".")
        node: Any = job
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[parts[-1]]

    return mutate


def _add_dataset(entry: dict[str, Any]):
    def mutate(job: dict[str, Any]) -> None:
        job["spec"]["datasets"].append(entry)

    return mutate


def _hooks(*hooks: dict[str, Any]):
    return _set("spec.hooks", {"postCheckpoint": list(hooks)})


HOOK = {"name": "eval", "image": "ghcr.io/acme/eval:1", "command": ["python", "-m", "eval"]}
AWS = {"id": "s3set", "type": "aws", "aws_bucket_name": "bucket"}

# (case id, mutation, field path the message must name, fragment of the message)
BAD_JOBS = [
    ("unknown-option", _set("spec.config.learning_rat", 1e-4), "spec.config.learning_rat",
     "did you mean learning_rate"),
    ("alias-instead-of-name", _set("spec.config.checkpointing_steps", 100), "spec.config.checkpointing_steps",
     "write checkpoint_step_interval"),
    ("bad-optimizer", _set("spec.config.optimizer", "adamw"), "spec.config.optimizer", "supported values"),
    ("bad-lr-scheduler", _set("spec.config.lr_scheduler", "cosine_annealing"), "spec.config.lr_scheduler",
     "\"cosine\""),
    ("bad-model-family", _set("spec.model.family", "sdxl-turbo"), "spec.model.family", "\"sd1x\""),
    ("bad-model-type", _set("spec.model.type", "dora"), "spec.model.type", "\"lora\""),
    ("int-option-as-string", _set("spec.config.train_batch_size", "4"), "spec.config.train_batch_size",
     "must be of type integer"),
    ("float-option-as-string", _set("spec.config.learning_rate", "1e-4"), "spec.config.learning_rate",
     "must be of type number"),
    ("bool-option-as-string", _set("spec.config.use_ema", "yes"), "spec.config.use_ema", "must be of type boolean"),
    ("negative-learning-rate", _set("spec.config.learning_rate", -0.1), "spec.config.learning_rate",
     "greater than or equal to 0"),
    ("zero-batch-size", _set("spec.config.train_batch_size", 0), "spec.config.train_batch_size",
     "greater than or equal to 1"),
    ("bad-report-to-list", _set("spec.config.report_to", "tensorboard,mlflow"), "spec.config.report_to",
     "should match"),
    ("owned-output-dir", _set("spec.config.output_dir", "/out"), "spec.config.output_dir", "spec.output"),
    ("owned-model-family", _set("spec.config.model_family", "sdxl"), "spec.config.model_family",
     "spec.model.family"),
    ("owned-num-processes", _set("spec.config.num_processes", 2), "spec.config.num_processes", "spec.nodes"),
    ("negative-gpus", _set("spec.resources.gpus", -1), "spec.resources.gpus", "greater than or equal to 0"),
    ("gpus-as-string", _set("spec.resources.gpus", "one"), "spec.resources.gpus", "must be of type integer"),
    ("zero-nodes", _set("spec.nodes", 0), "spec.nodes", "greater than or equal to 1"),
    ("multi-node-without-gpus", lambda j: (j["spec"].update(nodes=2, resources={"gpus": 0}),
                                           j["spec"].update(output={"s3": {"bucket": "out"}})),
     "spec", "nodes > 1 needs at least one GPU"),
    ("multi-node-rwo-output", _set("spec.nodes", 2), "spec", "output.pvc: with nodes > 1"),
    ("bad-memory-quantity", _set("spec.resources.memory", "64 GB"), "spec.resources.memory", "should match"),
    ("negative-cpu", _set("spec.resources.cpu", -2), "spec.resources.cpu", "greater than or equal to 0"),
    ("bad-gpu-resource-name", _set("spec.resources.gpuResourceName", "nvidia gpu"),
     "spec.resources.gpuResourceName", "should match"),
    ("missing-datasets", _delete("spec.datasets"), "spec.datasets", "Required value"),
    ("empty-datasets", _set("spec.datasets", []), "spec.datasets", "must have at least 1 items"),
    ("duplicate-dataset-ids", _add_dataset({"id": "images", "type": "local", "instance_data_dir": "/d"}),
     "spec.datasets[1]", "Duplicate value"),
    ("dataset-without-type", _delete("spec.datasets.0.type"), "spec.datasets[0].type", "Required value"),
    ("dataset-type-csv", _set("spec.datasets.0.type", "csv"), "spec.datasets[0].type", "\"aws\""),
    ("aws-without-bucket", _add_dataset({"id": "s3set", "type": "aws", "aws_data_prefix": "x/"}),
     "spec.datasets[1].aws_bucket_name", "needs aws_bucket_name"),
    ("local-without-folder", _set("spec.datasets.0", {"id": "images", "type": "local"}), "spec.datasets[0]",
     "needs pvc (a claim to mount) or instance_data_dir"),
    ("inline-secret-key", _add_dataset({**AWS, "aws_secret_access_key": "hunter2"}), "spec.datasets[1]",
     "credentialsSecret"),
    ("inline-access-key-id", _add_dataset({**AWS, "aws_access_key_id": "AKIA0000"}), "spec.datasets[1]",
     "must not be written inline"),
    ("aws-fields-on-local", _set("spec.datasets.0.aws_bucket_name", "bucket"), "spec.datasets[0]",
     "only apply to datasets of type aws"),
    ("pvc-and-instance-dir", _set("spec.datasets.0.instance_data_dir", "/data"), "spec.datasets[0]",
     "replaces instance_data_dir"),
    ("parquet-without-block", _set("spec.datasets.0.caption_strategy", "parquet"), "spec",
     "a dataset fails: caption_strategy parquet needs the parquet block"),
    ("inherited-instance-prompt-missing", _set("spec.config.caption_strategy", "instance_prompt"), "spec.config",
     "caption_strategy instance_prompt needs instance_prompt"),
    ("dataset-instance-prompt-missing", _set("spec.datasets.0.caption_strategy", "instanceprompt"), "spec",
     "a dataset fails: caption_strategy instanceprompt needs instance_prompt"),
    ("inherited-resolution-type", _set("spec.config.resolution_type", "area"), "spec.config", "megapixels"),
    ("bad-caption-strategy", _set("spec.datasets.0.caption_strategy", "wd14"), "spec.datasets[0].caption_strategy",
     "\"textfile\""),
    ("bad-dataset-id", _set("spec.datasets.0.id", "my images"), "spec.datasets[0].id", "should match"),
    ("dangling-text-embeds", _set("spec.datasets.0.text_embeds", "nope"), "spec.datasets",
     "text_embeds must name the id"),
    ("only-text-embeds", _set("spec.datasets", [{"id": "te", "type": "local", "dataset_type": "text_embeds"}]),
     "spec.datasets", "at least one enabled image or video dataset"),
    ("image-size-without-downsample", _set("spec.datasets.0.maximum_image_size", 2048), "spec",
     "a dataset fails: maximum_image_size needs target_downsample_size"),
    ("operator-cache-dir", _set("spec.datasets.0.cache_dir_vae", "/cache"), "spec.datasets[0]",
     "set by the operator"),
    ("pixel-resolution-in-megapixels", lambda j: j["spec"]["datasets"][0].update(resolution=1.0,
                                                                               resolution_type="pixel_area"),
     "spec", "a dataset fails: resolution is in megapixels for resolution_type area"),
    ("conditioning-dataset-alone", _set("spec.datasets.0.dataset_type", "conditioning"),
     "spec.datasets", "at least one enabled image or video dataset is needed"),
    ("bad-skip-discovery", _set("spec.datasets.0.skip_file_discovery", "vae latents"),
     "spec.datasets[0].skip_file_discovery", "should match"),
    ("upscale-threshold-above-one", _set("spec.datasets.0.max_upscale_threshold", 2),
     "spec.datasets[0].max_upscale_threshold", "less than or equal to 1"),
    ("hub-and-s3-source", _set("spec.model.source.s3", {"uri": "s3://models/sdxl/"}), "spec.model.source",
     "exactly one of hub, s3 or pvc"),
    ("no-source", _set("spec.model.source", {}), "spec.model.source", "exactly one of hub, s3 or pvc"),
    ("bad-s3-uri", _set("spec.model.source", {"s3": {"uri": "https://models/sdxl"}}), "spec.model.source.s3.uri",
     "should match"),
    ("absolute-claim-path", _set("spec.model.source", {"pvc": {"claimName": "m", "path": "/etc"}}),
     "spec.model.source.pvc.path", "relative"),
    ("existing-claim-and-size", _set("spec.output.pvc", {"existingClaim": "out", "size": "10Gi"}),
     "spec.output.pvc", "exactly one of existingClaim"),
    ("volume-without-either", _set("spec.caches", {"latents": {"storageClassName": "fast"}}),
     "spec.caches.latents", "exactly one of existingClaim"),
    ("bad-access-mode", _set("spec.output.pvc.accessModes", ["ReadWriteSome"]), "spec.output.pvc.accessModes[0]",
     "\"ReadWriteMany\""),
    ("output-without-target", _set("spec.output", {}), "spec.output", "needs pvc, s3 or both"),
    ("bad-hook-name", _hooks({**HOOK, "name": "Eval_Step"}), "spec.hooks.postCheckpoint[0].name", "should match"),
    ("duplicate-hook-names", _hooks(HOOK, HOOK), "spec.hooks.postCheckpoint[1]", "Duplicate value"),
    ("hook-command-string", _hooks({**HOOK, "command": "python -m eval"}), "spec.hooks.postCheckpoint[0].command",
     "must be of type array"),
    ("hook-without-image", _hooks({k: v for k, v in HOOK.items() if k != "image"}),
     "spec.hooks.postCheckpoint[0].image", "Required value"),
    ("hook-negative-backoff", _hooks({**HOOK, "backoffLimit": -1}), "spec.hooks.postCheckpoint[0].backoffLimit",
     "greater than or equal to 0"),
    ("zero-max-concurrent", _set("spec.hooks", {"maxConcurrent": 0}), "spec.hooks.maxConcurrent",
     "greater than or equal to 1"),
    ("inline-secret-env-value", _set("spec.secrets", {"env": [{"name": "WANDB_API_KEY", "value": "abc"}]}),
     "spec.secrets.env[0].value", "unknown field"),
    ("reserved-env-name", _set("spec.secrets", {"env": [{"name": "KUBETUNER_X",
                                                         "secretKeyRef": {"name": "s", "key": "k"}}]}),
     "spec.secrets.env[0]", "reserved"),
    ("negative-backoff-limit", _set("spec.runPolicy", {"backoffLimit": -1}), "spec.runPolicy.backoffLimit",
     "greater than or equal to 0"),
    ("suspend-as-string", _set("spec.runPolicy", {"suspend": "true"}), "spec.runPolicy.suspend",
     "must be of type boolean"),
    ("privileged-metrics-port", _set("spec.metricsPort", 80), "spec.metricsPort", "greater than or equal to 1024"),
    ("bad-toleration-effect", _set("spec.podTemplate", {"tolerations": [{"key": "gpu", "effect": "NoRun"}]}),
     "spec.podTemplate.tolerations[0].effect", "\"NoSchedule\""),
    ("reserved-pod-label", _set("spec.podTemplate", {"labels": {"kueue.x-k8s.io/queue-name": "q"}}),
     "spec.podTemplate.labels", "set by the operator"),
    ("bad-label-value", _set("spec.podTemplate", {"labels": {"team": "a b"}}), "spec.podTemplate.labels.team",
     "should match"),
    ("exists-toleration-with-value", _set("spec.podTemplate", {"tolerations": [{"operator": "Exists",
                                                                                 "value": "x"}]}),
     "spec.podTemplate.tolerations[0]", "value must be empty"),
    ("long-queue-name", _set("spec.queueName", "q" * 64), "spec.queueName", "Too long"),
    ("bad-pull-policy", _set("spec.imagePullPolicy", "Sometimes"), "spec.imagePullPolicy", "\"IfNotPresent\""),
    ("unknown-spec-field", _set("spec.gpus", 1), "spec.gpus", "unknown field"),
    ("long-name", _set("metadata.name", "x" * 60), "metadata.name", "Too long"),
    ("wrong-kind", _set("kind", "TrainJob"), "kind", "TrainingJob"),
]


def test_table_has_enough_cases():
    assert len(BAD_JOBS) >= 30
    assert len({case[0] for case in BAD_JOBS}) == len(BAD_JOBS)


@pytest.mark.parametrize(("mutate", "field", "fragment"), [c[1:] for c in BAD_JOBS], ids=[c[0] for c in BAD_JOBS])
def test_bad_trainingjob_is_rejected_naming_the_field(mutate, field, fragment):
    job = copy.deepcopy(minimal())
    mutate(job)
    problems = validate_trainingjob(job)
    assert problems, "accepted a bad TrainingJob"
    assert any(p.startswith(f"{field}:") and fragment in p for p in problems), problems


def test_cli_validates_manifests(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(minimal()), encoding="utf-8")
    bad_job = minimal()
    bad_job["spec"]["resources"] = {"gpus": -1}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all([minimal(), bad_job]), encoding="utf-8")
    assert cli.main(["crd", "--validate", str(good)]) == 0
    assert capsys.readouterr().out.strip().endswith("tiny: ok")
    assert cli.main(["crd", "--validate", str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{bad} [1] tiny: spec.resources.gpus: Invalid value: -1" in out
    assert f"{bad} [0] tiny: ok" in out


def test_manifests_are_read_like_kubectl_reads_them():
    from kubetuner_operator.crd.manifests import load_manifests

    (job,) = load_manifests(yaml.safe_dump(minimal()).replace("learning_rate: 0.0001", "learning_rate: 1e-4"))
    assert job["spec"]["config"]["learning_rate"] == 1e-4
    assert validate_trainingjob(job) == []
    (plain,) = load_manifests("a: 1.5e+3\nb: '1e-4'\nc: 1_000\nd: e5\nversion: 1.0\n")
    assert plain == {"a": 1500.0, "b": "1e-4", "c": 1000, "d": "e5", "version": 1.0}


# --- Random damage to valid TrainingJobs: the validator reports problems as text and never crashes. ---

BASE = yaml.safe_load((ROOT / "examples" / "sdxl-lora-hub-s3.yaml").read_text(encoding="utf-8"))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            found.extend(paths(child, (*prefix, key)))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found.extend(paths(child, (*prefix, index)))
    return found


ALL_PATHS = paths(BASE)


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(ALL_PATHS), st.one_of(st.just("<delete>"), json_values)),
                min_size=1, max_size=3))
def test_validator_survives_random_damage(mutations):
    job = copy.deepcopy(BASE)
    for path, replacement in mutations:
        node: Any = job
        try:
            for part in path[:-1]:
                node = node[part]
            if replacement == "<delete>":
                del node[path[-1]]
            else:
                node[path[-1]] = replacement
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
    problems = validate_trainingjob(job)
    assert isinstance(problems, list) and all(isinstance(p, str) and ": " in p for p in problems)
    assert validate_trainingjob(job) == problems
    if not problems:
        stored = apply_defaults(job)
        assert validate_trainingjob(stored) == []
        assert apply_defaults(stored) == stored


# --- What the CRD accepts, the trainer accepts: values that pass the API server's checks must not fail
# later inside the trainer pod (exit code 78 after the pod was scheduled). ---

JOB = {
    "apiVersion": "kubetuner.dev/v1alpha1",
    "kind": "TrainingJob",
    "metadata": {"name": "agree"},
    "spec": {
        "model": {"family": "sdxl", "source": {"hub": {"id": "org/model"}}},
        "config": {"optimizer": "adamw_bf16"},
        "datasets": [],
    },
}

optional_fields: dict[str, st.SearchStrategy[Any]] = {
    "resolution": st.sampled_from([0.25, 1.0, 63, 64, 512, 1024]),
    "resolution_type": st.sampled_from(["pixel", "pixel_area", "area"]),
    "minimum_image_size": st.sampled_from([0, 256, 0.5]),
    "maximum_image_size": st.sampled_from([1536, 2048, 1.5]),
    "target_downsample_size": st.sampled_from([1024, 1280, 1.0, 4096]),
    "max_upscale_threshold": st.floats(0.05, 1.0),
    "minimum_aspect_ratio": st.sampled_from([0.5, 1.0, 2.0]),
    "maximum_aspect_ratio": st.sampled_from([0.75, 1.5, 3.0]),
    "crop": st.booleans(),
    "crop_style": st.sampled_from(["random", "center", "corner"]),
    "crop_aspect": st.sampled_from(["square", "preserve", "closest", "random"]),
    "crop_aspect_buckets": st.lists(st.sampled_from([0.75, 1.0, 1.33]), min_size=1, max_size=3),
    "caption_strategy": st.sampled_from(["filename", "textfile", "instanceprompt", "instance_prompt", "parquet"]),
    "instance_prompt": st.sampled_from(["a photo of sks", "x"]),
    "prepend_instance_prompt": st.booleans(),
    "only_instance_prompt": st.booleans(),
    "caption_filter_list": st.lists(st.sampled_from(["a photo of", "^the "]), max_size=2),
    "parquet": st.fixed_dictionaries({"path": st.just("captions.parquet")},
                                     optional={"caption_column": st.just("text"),
                                               "fallback_caption_column": st.just("alt"),
                                               "identifier_includes_extension": st.booleans()}),
    "repeats": st.integers(0, 3),
    "probability": st.sampled_from([0, 0.5, 1]),
    "max_num_samples": st.integers(1, 100),
    "is_regularisation_data": st.booleans(),
    "skip_file_discovery": st.sampled_from(["vae", "aspect,text", "vae, metadata"]),
    "preserve_data_backend_cache": st.booleans(),
    "scan_for_errors": st.booleans(),
}


# Trainer-wide options the data pipeline falls back to (spec.config -> DataSettings). A global
# caption_strategy parquet is left out: the pipeline also applies it to text-embeds entries (reported).
global_fields: dict[str, st.SearchStrategy[Any]] = {
    "resolution": st.sampled_from([1.0, 512.0, 1024.0]),
    "resolution_type": st.sampled_from(["pixel", "pixel_area", "area"]),
    "caption_strategy": st.sampled_from(["filename", "textfile", "instance_prompt", "instanceprompt"]),
    "instance_prompt": st.just("a photo of sks"),
    "only_instance_prompt": st.booleans(),
    "maximum_image_size": st.sampled_from([1536.0, 2048.0]),
    "target_downsample_size": st.sampled_from([1024.0, 4096.0]),
}


@st.composite
def global_options(draw) -> dict[str, Any]:
    chosen = draw(st.lists(st.sampled_from(sorted(global_fields)), unique=True, max_size=4))
    return {name: draw(global_fields[name]) for name in chosen}


@st.composite
def image_entries(draw) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": draw(st.sampled_from(["photos", "set-2", "a.b"]))}
    if draw(st.booleans()):
        entry.update(type="local", pvc={"claimName": "data", "path": "images"})
    else:
        entry.update(type="aws", aws_bucket_name="bucket", credentialsSecret={"name": "s3"},
                     aws_data_prefix=draw(st.sampled_from(["", "images/"])))
    chosen = draw(st.lists(st.sampled_from(sorted(optional_fields)), unique=True, max_size=8))
    for name in chosen:
        entry[name] = draw(optional_fields[name])
    return entry


def as_the_operator_writes_it(entry: dict[str, Any]) -> dict[str, Any]:
    """The entry in multidatabackend.json: operator fields removed, mounted folder and caches filled in."""
    written = {k: v for k, v in entry.items() if k not in OPERATOR_FIELDS}
    if "pvc" in entry:
        written["instance_data_dir"] = "/workspace/datasets/" + entry["id"]
    written["cache_dir_vae"] = "/workspace/cache/data/vae/" + entry["id"]
    return written


USER_TEXT_EMBEDS = {"id": "own-text", "type": "local", "dataset_type": "text_embeds", "default": True}
TEXT_EMBEDS = {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True,
               "cache_dir": "/workspace/cache/data/text"}


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(image_entries(), global_options(), st.booleans())
def test_dataset_entries_the_crd_accepts_are_accepted_by_the_trainer(entry, options, own_text_embeds):
    job = copy.deepcopy(JOB)
    job["spec"]["config"].update(options)
    job["spec"]["datasets"] = [entry] + ([USER_TEXT_EMBEDS] if own_text_embeds else [])
    if validate_trainingjob(job):
        return  # refused at apply time: nothing reaches the trainer
    written = [as_the_operator_writes_it(entry)]
    written.append({**USER_TEXT_EMBEDS, "cache_dir": "/workspace/cache/data/text/own"} if own_text_embeds
                   else TEXT_EMBEDS)
    parse_dataset_config(written, DataSettings(**options))


def test_pipeline_fallbacks_are_the_ones_the_rules_assume():
    from kubetuner_operator.crd.dataset_rules import PIPELINE_FALLBACKS

    defaults = DataSettings()
    for name, value in PIPELINE_FALLBACKS.items():
        assert getattr(defaults, name) == value, name


def test_the_generator_reaches_both_outcomes():
    # Guard against a generator that only ever produces accepted (or only rejected) entries.
    accepted = rejected = 0

    @settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(image_entries(), global_options())
    def count(entry, options):
        nonlocal accepted, rejected
        job = copy.deepcopy(JOB)
        job["spec"]["config"].update(options)
        job["spec"]["datasets"] = [entry]
        if validate_trainingjob(job):
            rejected += 1
        else:
            accepted += 1

    count()
    assert accepted > 20 and rejected > 20, (accepted, rejected)


def test_every_dataset_field_of_the_crd_is_known_to_the_trainer():
    from kubetuner_trainer.data import dataset_config

    crd_fields = set(dataset_schema()["properties"])
    forbidden = {"aws_session_token", "cache_dir", "cache_dir_vae", "aws_access_key_id", "aws_secret_access_key"}
    expanded = {"conditioning"}  # turned into generated entries by dataset_config.expand_generated
    unknown = crd_fields - set(dataset_config._FIELDS) - OPERATOR_FIELDS - forbidden - expanded
    assert unknown == set()


def test_a_conditioning_pair_is_accepted_and_a_bad_link_is_refused():
    job = copy.deepcopy(JOB)
    image = {"id": "edits", "type": "local", "instance_data_dir": "/data/edits", "conditioning_data": ["sources"]}
    sources = {"id": "sources", "type": "local", "dataset_type": "conditioning", "instance_data_dir": "/data/src",
               "conditioning_type": "reference_strict"}
    job["spec"]["datasets"] = [image, sources]
    assert validate_trainingjob(job) == []
    generated = {**image, "id": "canny", "conditioning": [{"type": "canny", "low_threshold": 50}]}
    del generated["conditioning_data"]
    job["spec"]["datasets"] = [generated]
    assert validate_trainingjob(job) == []
    job["spec"]["datasets"] = [{**image, "conditioning_data": ["nowhere"]}, sources]
    assert any("conditioning_data must name ids" in str(p) for p in validate_trainingjob(job))


def test_config_choices_match_the_registry_parser():
    # Every enum value the CRD allows in spec.config parses as the trainer's option value.
    from kubetuner_operator.crd import trainingjob_openapi_schema

    config = trainingjob_openapi_schema()["properties"]["spec"]["properties"]["config"]["properties"]
    registry = get_registry()
    checked = 0
    for name, node in config.items():
        for value in node.get("enum", []):
            assert registry.get(name).parse(value) == value
            checked += 1
    assert checked > 100


def test_the_reference_trainingjob_in_the_docs_is_accepted_as_written():
    import re
    from pathlib import Path

    import yaml

    from kubetuner_operator.admission import validate_all

    text = (Path(__file__).parents[2] / "docs" / "trainingjob.md").read_text()
    block = re.search(r"```yaml\n(apiVersion: kubetuner.dev.*?)```", text, re.S)
    assert block, "docs/trainingjob.md lost its reference TrainingJob"
    job = yaml.safe_load(block.group(1))
    job.pop("status", None)  # written by the operator, shown for reference
    assert validate_all(job) == []
