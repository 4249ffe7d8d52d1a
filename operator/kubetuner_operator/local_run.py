"""``kubetuner run job.yaml``: run a TrainingJob end to end on this machine, no cluster needed.

The manifest goes through the same steps as in a cluster: validation against the CRD schema,
the operator's spec view, the operator's translation into the trainer's ``config.json`` and
``multidatabackend.json`` (with local directories instead of mount points), the trainer
started as ``kubetuner-train``, its ``/status`` polled, and restarts handled by the same
exit-code contract (75 → resume from the latest checkpoint, 78 → permanent failure).

PersistentVolumeClaims map to local directories with ``--volume CLAIM=DIR``. Secrets are read
from ``Secret`` documents in the same file(s) (``--secrets FILE`` for more), never written to disk.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import posixpath
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubetuner_trainer.contract import (
    CHECKPOINT_COMPLETE_MARKER,
    CHECKPOINT_PREFIX,
    STATUS_PATH,
    ExitCode,
    TrainerStatus,
)
from kubetuner_trainer.placeholders import substitute_argv

from .spec import KIND, DatasetSpec, SpecError, TrainingJobSpec, parse_training_job
from .trainer_config import MountPaths, render_trainer_files

POLL_SECONDS = 2.0


class RunError(Exception):
    """The manifest or the local set-up cannot be used (exit code 78)."""


@dataclass(frozen=True)
class LocalPaths(MountPaths):
    """Mount points replaced by directories of this machine; PVC claims resolved via ``volumes``."""

    volumes: Mapping[str, str] = field(default_factory=dict)
    model_claim: tuple[str, str] | None = None

    def claim_dir(self, claim: str, sub: str = "") -> str:
        if claim not in self.volumes:
            raise RunError(f"PVC {claim!r} has no local directory; pass --volume {claim}=/some/dir")
        return posixpath.join(self.volumes[claim], sub) if sub else self.volumes[claim]

    def dataset_dir(self, dataset: DatasetSpec) -> str:
        assert dataset.pvc is not None
        return self.claim_dir(dataset.pvc.claim_name, dataset.pvc.path)


def load_documents(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every mapping document of the files, read the way kubectl reads YAML (``1e-4`` is a number)."""
    from .crd.manifests import load_manifest_file

    docs: list[dict[str, Any]] = []
    for path in paths:
        try:
            docs.extend(d for d in load_manifest_file(path) if isinstance(d, dict))
        except (OSError, yaml.YAMLError) as error:
            raise RunError(f"cannot read {path}: {error}") from None
    return docs


def secret_values(docs: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """``{secret name: {key: value}}`` from Secret documents (``data`` is base64, ``stringData`` plain)."""
    secrets: dict[str, dict[str, str]] = {}
    for doc in docs:
        if doc.get("kind") != "Secret":
            continue
        name = doc.get("metadata", {}).get("name", "")
        values = {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}
        values.update({k: str(v) for k, v in (doc.get("stringData") or {}).items()})
        secrets[name] = values
    return secrets


def pick_job(docs: list[dict[str, Any]], name: str | None) -> dict[str, Any]:
    jobs = [d for d in docs if d.get("kind") == KIND]
    if name:
        jobs = [d for d in jobs if d.get("metadata", {}).get("name") == name]
    if len(jobs) != 1:
        found = [d.get("metadata", {}).get("name") for d in docs if d.get("kind") == KIND]
        raise RunError(f"expected exactly one TrainingJob{f' named {name!r}' if name else ''}; found {found}")
    return jobs[0]


def validate_manifest(obj: dict[str, Any]) -> dict[str, Any]:
    """Validate like the API server with kubetuner's admission webhook would (schema, CEL, the trainer's own
    config checks) and return the object with defaults applied."""
    from .admission import validate_all
    from .crd.defaults import apply_defaults

    problems = validate_all(obj)
    if problems:
        raise RunError("the TrainingJob is invalid:\n" + "\n".join(f"  - {p}" for p in problems))
    return apply_defaults(obj)


def _secret(secrets: Mapping[str, Mapping[str, str]], name: str, key: str, purpose: str) -> str:
    try:
        return secrets[name][key]
    except KeyError:
        raise RunError(
            f"{purpose} needs key {key!r} of Secret {name!r}; add the Secret document to the manifest "
            "or pass it with --secrets FILE"
        ) from None


def trainer_environment(job: TrainingJobSpec, secrets: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """Environment variables the pod would get from Secrets, resolved from local Secret documents."""
    env: dict[str, str] = {}
    if job.hf_token is not None:
        env["HF_TOKEN"] = _secret(secrets, job.hf_token.name, job.hf_token.key, "spec.secrets.huggingFaceToken")
    for dataset in job.datasets:
        if dataset.credentials is not None:
            creds = dataset.credentials
            purpose = f"dataset {dataset.id!r} credentialsSecret"
            env[dataset.env_prefix + "AWS_ACCESS_KEY_ID"] = _secret(secrets, creds.name, creds.access_key_id_key, purpose)
            env[dataset.env_prefix + "AWS_SECRET_ACCESS_KEY"] = _secret(
                secrets, creds.name, creds.secret_access_key_key, purpose
            )
    for item in job.secret_env:
        ref = item.get("secretKeyRef") or {}
        env[item["name"]] = _secret(secrets, ref.get("name", ""), ref.get("key", ""), f"spec.secrets.env {item['name']}")
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_status(port: int) -> TrainerStatus | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{STATUS_PATH}", timeout=2) as response:
            return TrainerStatus.from_json(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def progress_line(status: TrainerStatus) -> str:
    parts = [f"state={status.state}", f"step={status.step}/{status.max_steps or '?'}", f"epoch={status.epoch}"]
    if status.loss is not None:
        parts.append(f"loss={status.loss:.4f}")
    if status.samples_per_second:
        parts.append(f"samples/s={status.samples_per_second:.2f}")
    if status.eta_seconds is not None:
        parts.append(f"eta={status.eta_seconds:.0f}s")
    return "  ".join(parts)


@dataclass
class LocalRun:
    """One TrainingJob run on this machine."""

    job: TrainingJobSpec
    workdir: Path
    paths: LocalPaths
    env: dict[str, str]
    run_hooks: bool = False
    restarts: int = 0
    seen_checkpoints: set[int] = field(default_factory=set)
    hook_results: list[dict[str, Any]] = field(default_factory=list)

    def write_files(self, *, resume: bool, port: int) -> Path:
        files = render_trainer_files(self.job, self.paths, resume=resume)
        config = dict(files.config_json, metrics_port=port, metrics_host="127.0.0.1")
        config_dir = Path(self.paths.config_dir)
        config_dir.mkdir(parents=True, exist_ok=True)
        (config_dir / "multidatabackend.json").write_text(json.dumps(files.databackend_json, indent=2))
        config_path = config_dir / "config.json"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
        return config_path

    def run_hooks_for(self, step: int, path: str) -> None:
        for hook in self.job.hooks:
            values = {
                "local_checkpoint_path": path,
                "global_step": step,
                "model_family": self.job.model.family,
                "model_type": self.job.model.type,
                "tracker_run_name": self.job.config.get("tracker_run_name", ""),
                "tracker_project_name": self.job.config.get("tracker_project_name", ""),
            }
            argv = substitute_argv(list(hook.command), values)
            if not self.run_hooks:
                print(f"[kubetuner] hook {hook.name!r} for step {step} skipped locally (image {hook.image}); "
                      "--run-hooks runs its command on this machine", flush=True)
                continue
            env = dict(os.environ)
            env.update({e["name"]: str(e.get("value", "")) for e in hook.env if "value" in e})
            result = subprocess.run(argv, env=env, check=False)
            outcome = "Succeeded" if result.returncode == 0 else "Failed"
            self.hook_results.append({"checkpointStep": step, "hook": hook.name, "result": outcome})
            print(f"[kubetuner] hook {hook.name!r} for step {step}: {outcome}", flush=True)

    def attempt(self, *, resume: bool) -> int:
        port = free_port()
        config_path = self.write_files(resume=resume, port=port)
        env = dict(os.environ)
        env.update(self.env)
        env.setdefault("HF_HOME", self.paths.model_cache_dir)
        command = [sys.executable, "-m", "kubetuner_trainer.cli", "--config", str(config_path)]
        process = subprocess.Popen(command, env=env)
        last_line = ""
        while process.poll() is None:
            status = read_status(port)
            if status is not None:
                line = progress_line(status)
                if line != last_line:
                    print(f"[kubetuner] {line}", flush=True)
                    last_line = line
                self.note_checkpoints(status)
            try:
                process.wait(timeout=POLL_SECONDS)
            except subprocess.TimeoutExpired:
                pass
        self.scan_checkpoints()
        return process.returncode

    def note_checkpoints(self, status: TrainerStatus) -> None:
        for checkpoint in status.checkpoints:
            if checkpoint.complete and checkpoint.step not in self.seen_checkpoints:
                self.seen_checkpoints.add(checkpoint.step)
                self.run_hooks_for(checkpoint.step, checkpoint.path)

    def scan_checkpoints(self) -> None:
        """Checkpoints written after the last poll (e.g. the final one) still get their hooks."""
        for directory in sorted(Path(self.paths.output_dir).glob(f"{CHECKPOINT_PREFIX}*")):
            match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", directory.name)
            complete = (directory / CHECKPOINT_COMPLETE_MARKER).is_file()
            if match and complete and int(match.group(1)) not in self.seen_checkpoints:
                self.seen_checkpoints.add(int(match.group(1)))
                self.run_hooks_for(int(match.group(1)), str(directory))

    def write_status(self, phase: str, message: str) -> None:
        status = {
            "phase": phase,
            "message": message,
            "restarts": self.restarts,
            "checkpoints": sorted(self.seen_checkpoints),
            "hooks": self.hook_results,
        }
        (self.workdir / "status.json").write_text(json.dumps(status, indent=2))

    def run(self) -> int:
        resume = False
        while True:
            code = self.attempt(resume=resume)
            if code == ExitCode.SUCCESS:
                self.write_status("Succeeded", ExitCode.describe(code))
                print(f"[kubetuner] Succeeded; model and checkpoints in {self.paths.output_dir}", flush=True)
                return 0
            if code == ExitCode.CONFIG_ERROR:
                self.write_status("Failed", ExitCode.describe(code))
                print("[kubetuner] Failed: the trainer rejected its configuration (see above)", flush=True)
                return int(ExitCode.CONFIG_ERROR)
            if self.restarts >= self.job.run_policy.backoff_limit:
                self.write_status("Failed", f"{ExitCode.describe(code)}; backoffLimit reached")
                print(f"[kubetuner] Failed: {ExitCode.describe(code)}; backoffLimit reached", flush=True)
                return code or 1
            self.restarts += 1
            resume = True
            self.write_status("Restarting", ExitCode.describe(code))
            print(f"[kubetuner] {ExitCode.describe(code)}; restart {self.restarts} resumes from the latest checkpoint",
                  flush=True)


def build_run(args: argparse.Namespace) -> LocalRun:
    docs = load_documents([args.manifest, *args.secrets])
    obj = validate_manifest(pick_job(docs, args.name))
    try:
        job = parse_training_job(obj)
    except SpecError as error:
        raise RunError(str(error)) from None
    volumes = {}
    for item in args.volume:
        claim, sep, directory = item.partition("=")
        if not sep or not claim or not directory:
            raise RunError(f"--volume {item!r}: expected CLAIM=DIR")
        volumes[claim] = str(Path(directory).resolve())
    workdir = (args.workdir or Path("runs") / job.name).resolve()
    source = job.model.source
    model_dir = ""
    if source.kind == "pvc":
        model_dir = LocalPaths(volumes=volumes).claim_dir(source.pvc_claim, source.pvc_path)
    paths = LocalPaths(
        config_dir=str(workdir / "config"),
        output_dir=str(workdir / "output"),
        model_cache_dir=str(workdir / "cache" / "models"),
        data_cache_dir=str(workdir / "cache" / "data"),
        model_dir=model_dir or str(workdir / "model"),
        datasets_dir=str(workdir / "datasets"),
        volumes=volumes,
    )
    for dataset in job.datasets:
        if dataset.pvc is not None:
            paths.dataset_dir(dataset)  # fail early when a claim has no directory
    env = trainer_environment(job, secret_values(docs))
    workdir.mkdir(parents=True, exist_ok=True)
    return LocalRun(job=job, workdir=workdir, paths=paths, env=env, run_hooks=args.run_hooks)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", type=Path, help="YAML file with a TrainingJob (and optionally its Secrets)")
    parser.add_argument("--name", help="which TrainingJob, when the file holds several")
    parser.add_argument("--workdir", type=Path, help="where config, caches and output go (default: runs/<name>)")
    parser.add_argument("--volume", action="append", default=[], metavar="CLAIM=DIR",
                        help="use a local directory for a PersistentVolumeClaim (repeatable)")
    parser.add_argument("--secrets", action="append", default=[], type=Path, metavar="FILE",
                        help="another YAML file with Secret documents (repeatable)")
    parser.add_argument("--run-hooks", action="store_true",
                        help="run postCheckpoint hook commands on this machine (their images are not used)")


def main(args: argparse.Namespace) -> int:
    try:
        run = build_run(args)
    except RunError as error:
        print(f"kubetuner run: {error}", file=sys.stderr)
        return int(ExitCode.CONFIG_ERROR)
    print(f"[kubetuner] running TrainingJob {run.job.name!r} in {run.workdir}", flush=True)
    return run.run()
