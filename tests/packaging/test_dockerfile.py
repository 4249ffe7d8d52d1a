"""The Dockerfile, read with dockerfile-parse: stages, users, copied paths and layer order."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml
from dockerfile_parse import DockerfileParser

from kubetuner_operator.builders.common import pod_security_context
from kubetuner_operator.images import OPERATOR_REPOSITORY, TAG, TRAINER_REPOSITORY
from kubetuner_trainer.contract import DEFAULT_METRICS_PORT

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kubetuner"
SOURCE = ("operator/", "trainer_image/")


def stages() -> dict[str, list[dict]]:
    """Instructions per stage name (``FROM x AS name``), comments dropped."""
    out: dict[str, list[dict]] = {}
    current = None
    for item in DockerfileParser(path=str(ROOT / "Dockerfile")).structure:
        if item["instruction"] == "FROM":
            current = item["value"].split()[-1]
            out[current] = []
        if current is not None and item["instruction"] != "COMMENT":
            out[current].append(item)
    return out


def values(stage: list[dict], instruction: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == instruction]


def test_stages_and_their_users_match_the_chart_and_the_trainer_pod() -> None:
    s = stages()
    assert list(s) == ["base", "operator", "trainer"]
    assert all(values(s[name], "FROM") == ["base AS " + name] for name in ("operator", "trainer"))
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    chart_uid = next(line.split(":")[1].strip() for line in deployment.splitlines() if "runAsUser:" in line)
    assert values(s["operator"], "USER") == [f"{chart_uid}:{chart_uid}"]
    pod = pod_security_context()
    assert values(s["trainer"], "USER") == [f"{pod['runAsUser']}:{pod['runAsGroup']}"]


def test_entrypoints_are_installed_scripts_and_ports_are_the_served_ones() -> None:
    s = stages()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name in ("operator", "trainer"):
        (entrypoint,) = values(s[name], "ENTRYPOINT")
        assert yaml.safe_load(entrypoint)[0] in scripts
    chart = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values(s["operator"], "EXPOSE") == [f"{chart['health']['port']} {chart['metrics']['port']}"]
    assert values(s["trainer"], "EXPOSE") == [str(DEFAULT_METRICS_PORT)]


def test_every_copied_path_exists() -> None:
    for stage in stages().values():
        for value in values(stage, "COPY"):
            *sources, _ = value.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"


def test_dependency_layers_come_before_the_source() -> None:
    s = stages()
    assert not any(src in v for v in values(s["base"], "COPY") for src in SOURCE)
    for name in ("operator", "trainer"):
        kinds = [("deps" if "-r requirements.txt" in i["value"] else "source" if any(src in i["value"] for src in SOURCE)
                  else "") for i in s[name] if i["instruction"] in ("RUN", "COPY")]
        kinds = [k for k in kinds if k]
        assert kinds[0] == "deps" and "deps" not in kinds[kinds.index("source"):], kinds
        installs = [v for v in values(s[name], "RUN") if "pip install" in v]
        assert all("-c constraints.txt" in v or "--no-deps" in v for v in installs), installs


def test_image_names_are_the_ones_the_chart_and_the_operator_use() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert f"-t {OPERATOR_REPOSITORY}:{TAG} ." in text and f"-t {TRAINER_REPOSITORY}:{TAG} ." in text
    chart = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart["image"]["repository"] == OPERATOR_REPOSITORY
    assert chart["trainerImage"]["repository"] == TRAINER_REPOSITORY
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"] == TAG
