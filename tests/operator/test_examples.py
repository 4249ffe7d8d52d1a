"""The TrainingJob manifests under examples/ are accepted by the schema the API server uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetuner_operator.crd import apply_defaults, validate_trainingjob
from kubetuner_operator.crd.manifests import load_manifest_file
from kubetuner_trainer.options import get_registry

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (ROOT / "examples").rglob("*.yaml") if "setup" not in p.parts)
SETUP = sorted((ROOT / "examples").rglob("setup/*.yaml"))  # plain Kubernetes objects an example needs


def load(path: Path) -> dict:
    documents = load_manifest_file(path)
    assert len(documents) == 1, f"{path} should hold one TrainingJob"
    return documents[0]


def test_examples_exist():
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("path", EXAMPLES, ids=[str(p.relative_to(ROOT)) for p in EXAMPLES])
def test_example_is_accepted(path):
    job = load(path)
    assert job["kind"] == "TrainingJob"
    assert validate_trainingjob(job) == []
    # Defaulting is idempotent: what the API server stores validates again unchanged.
    stored = apply_defaults(job)
    assert validate_trainingjob(stored) == []
    assert apply_defaults(stored) == stored


@pytest.mark.parametrize("path", EXAMPLES, ids=[str(p.relative_to(ROOT)) for p in EXAMPLES])
def test_example_config_values_parse_as_trainer_options(path):
    # The CRD and the trainer's own parser agree on every value the examples use.
    registry = get_registry()
    for name, value in load(path)["spec"]["config"].items():
        option = registry.get(name)
        assert option.name == name
        assert option.parse(value) == value


def test_examples_cover_the_main_features():
    specs = [load(path)["spec"] for path in EXAMPLES]
    sources = {next(iter(spec["model"]["source"])) for spec in specs}
    assert sources == {"hub", "s3", "pvc"}
    assert any(spec.get("nodes", 1) > 1 for spec in specs)
    assert any(spec.get("queueName") and spec.get("runPolicy", {}).get("suspend") for spec in specs)
    assert any(spec.get("hooks", {}).get("postCheckpoint") for spec in specs)
    assert any(d["type"] == "aws" and "credentialsSecret" in d for spec in specs for d in spec["datasets"])
    assert {spec["model"]["type"] for spec in specs} == {"lora", "full"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[str(p.relative_to(ROOT)) for p in EXAMPLES])
def test_example_datasets_are_accepted_by_the_trainer(path):
    # The dataset list as the operator hands it to the trainer: operator fields dropped, claim folders and
    # caches filled in, a default text-embeds entry added when the job has none.
    from dataclasses import fields

    from kubetuner_trainer.data.dataset_config import OPERATOR_FIELDS, parse_dataset_config
    from kubetuner_trainer.data.settings import DataSettings

    spec = apply_defaults(load(path))["spec"]
    written = []
    for entry in spec["datasets"]:
        item = {k: v for k, v in entry.items() if k not in OPERATOR_FIELDS}
        if "pvc" in entry:
            item["instance_data_dir"] = f"/workspace/datasets/{entry['id']}"
        key = "cache_dir" if entry["dataset_type"] != "image" else "cache_dir_vae"
        item[key] = f"/workspace/cache/data/{entry['id']}"
        written.append(item)
    if not any(e["dataset_type"] == "text_embeds" for e in written):
        written.append({"id": "kubetuner-text-embeds", "type": "local", "dataset_type": "text_embeds",
                        "default": True, "cache_dir": "/workspace/cache/data/text"})
    names = {f.name for f in fields(DataSettings)}
    settings = DataSettings(**{k: v for k, v in spec["config"].items() if k in names})
    config = parse_dataset_config(written, settings)
    assert {e.id for e in config.entries} >= {d["id"] for d in spec["datasets"]}


@pytest.mark.parametrize("path", EXAMPLES, ids=[str(p.relative_to(ROOT)) for p in EXAMPLES])
def test_example_uses_a_model_family_and_optimizer_the_trainer_implements(path):
    spec = load(path)["spec"]
    registry = get_registry()
    for option, value in (("model_family", spec["model"]["family"]), ("optimizer", spec["config"]["optimizer"])):
        implemented = registry.get(option).implemented_choices
        assert implemented is None or value in implemented, f"{option}={value} is not implemented by the trainer"


@pytest.mark.parametrize("path", SETUP, ids=[str(p.relative_to(ROOT)) for p in SETUP])
def test_setup_manifests_validate_strictly(path):
    import kubernetes_validate
    import yaml

    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert documents
    for document in documents:
        assert kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def test_cluster_quickstart_uses_what_its_setup_creates():
    """The first cluster example: the setup's claim holds the model and images; no GPU; default image."""
    import yaml

    from kubetuner_operator.builders.common import pod_security_context

    job = load(ROOT / "examples" / "cluster" / "quickstart.yaml")
    setup = list(yaml.safe_load_all((ROOT / "examples" / "cluster" / "setup" / "quickstart-data.yaml").read_text()))
    (claim,) = [d["metadata"]["name"] for d in setup if d["kind"] == "PersistentVolumeClaim"]
    assert "storageClassName" not in setup[0]["spec"]  # the cluster's default StorageClass
    (setup_job,) = [d for d in setup if d["kind"] == "Job"]
    pod = setup_job["spec"]["template"]["spec"]
    script = pod["containers"][0]["args"][0]
    assert job["spec"]["model"]["source"]["pvc"] == {"claimName": claim, "path": "tiny-sd1x"}
    assert f"model {job['spec']['model']['family']} /data/tiny-sd1x" in script
    assert job["spec"]["datasets"][0]["pvc"] == {"claimName": claim, "path": "shapes"} and "/data/shapes" in script
    assert job["spec"]["resources"]["gpus"] == 0 and "image" not in job["spec"]
    assert pod["securityContext"]["runAsUser"] == pod_security_context()["runAsUser"]  # files the trainer can read
