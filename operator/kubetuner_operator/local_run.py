"""``kubetuner run job.yaml``: run a TrainingJob end to end on this machine, no cluster needed.

The manifest goes through the same steps as in a cluster: validation against the CRD schema,
the operator's spec view, the operator's translation into the trainer's ``config.json`` and
``multidatabackend.json`` (with local directories instead of mount points), the trainer
started as ``kubetuner-train``, its ``/status`` polled, and restarts handled by the same
exit-code contract (75 → resume from the latest checkpoint, 78 → permanent failure).

PersistentVolumeClaims map to local directories with ``--volume CLAIM=DIR``. Secrets are read
from ``Secret`` documents in the same file(s) (``--secrets FILE`` for more), never written to disk.

Like a pod, a run leaves what happened in its workdir: ``status.yaml`` (phase, reason, step, loss,
duration, weights, checkpoints, hooks), ``trainer.log`` (the trainer's whole output) and the trainer's
termination message. Ctrl-C stops the trainer after a checkpoint; running the same command again
resumes from it (``--fresh`` starts over, keeping the old output aside). One run per workdir at a time.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import posixpath
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubetuner_trainer.contract import (
    STATUS_PATH,
    ExitCode,
    TrainerStatus,
    complete_checkpoints,
    validation_renders,
)
from kubetuner_trainer.files import writable_problem
from kubetuner_trainer.placeholders import substitute_argv
from kubetuner_trainer.termination import TERMINATION_LOG_ENV, read_termination_message

from .builders.hook_job import placeholder_values
from .spec import KIND, DatasetSpec, SpecError, TrainingJobSpec, parse_training_job
from .trainer_config import MountPaths, render_trainer_files

POLL_SECONDS = 2.0
STATUS_FILE = "status.yaml"
TRAINER_LOG = "trainer.log"
TERMINATION_FILE = "termination-message"
LOCK_FILE = ".kubetuner-run.lock"
INTERRUPTED_EXIT = 130  # the shell's code for a command ended by Ctrl-C
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Trainer log lines the runner replaces with its own progress display (they stay in trainer.log).
PROGRESS_LOGGER = " kubetuner_trainer.progress: "


class RunError(Exception):
    """The manifest or the local set-up cannot be used (exit code 78)."""


class WorkdirBusy(RunError):
    """Another ``kubetuner run`` holds the workdir."""


class WorkdirLock:
    """An exclusive lock on a workdir (``flock``, released by the kernel when the process ends)."""

    def __init__(self, workdir: Path):
        self.path = workdir / LOCK_FILE
        self._handle: Any = None

    def acquire(self) -> None:
        """Take the lock or raise ``WorkdirBusy`` naming the PID that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise WorkdirBusy(f"workdir {self.path.parent} in use by PID {holder} (another kubetuner run); "
                              "wait for it, or pass --workdir DIR") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


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
        except yaml.MarkedYAMLError as error:
            mark = error.problem_mark or error.context_mark
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            raise RunError(f"{where}: YAML syntax error: {error.problem or error.context}") from None
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


# The pod's settings that mean something else on this machine.
LOCAL_DROPPED_ENV = frozenset({"HOME"})  # keep the user's own HOME (pods get /tmp)


def trainer_environment(job: TrainingJobSpec, secrets: Mapping[str, Mapping[str, str]],
                        paths: MountPaths | None = None) -> dict[str, str]:
    """The trainer pod's environment (``builders.trainer_pod.trainer_env``) resolved on this machine.

    Plain values are taken as they are (with ``paths`` for the directories); Secret references are
    looked up in the local ``Secret`` documents. Raises ``RunError`` naming a missing Secret key.
    """
    from .builders.trainer_pod import trainer_env

    env: dict[str, str] = {}
    for item in trainer_env(job, paths or LocalPaths()):
        name = str(item["name"])
        if name in LOCAL_DROPPED_ENV:
            continue
        if "value" in item:
            env[name] = str(item["value"])
            continue
        ref = (item.get("valueFrom") or {}).get("secretKeyRef") or {}
        env[name] = _secret(secrets, str(ref.get("name", "")), str(ref.get("key", "")), f"environment variable {name}")
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


class ProgressDisplay:
    """The run's progress: a live bar redrawn in place on a terminal, one line per change otherwise."""

    def __init__(self, stream: Any = None):
        self.stream = stream or sys.stdout
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = ""
        self._drawn = False

    def show(self, status: TrainerStatus) -> None:
        line = progress_line(status)
        if line == self._last:
            return
        self._last = line
        if self.live:
            self.stream.write("\r\x1b[K" + _bar(status) + " " + line)
            self._drawn = True
        else:
            self.stream.write(f"[kubetuner] {line}\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of other output; the bar is redrawn below it on the next update."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self._drawn = False
            self._last = ""
        self.stream.write(text if text.endswith("\n") else text + "\n")
        self.stream.flush()


def _bar(status: TrainerStatus, width: int = 24) -> str:
    if not status.max_steps:
        return "[" + " " * width + "]"
    filled = min(width, int(width * status.step / status.max_steps))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def one_line(text: str) -> str:
    """A multi-line reason (e.g. a list of configuration problems) as one line."""
    parts = [part.strip().removeprefix("- ") for part in text.strip().splitlines() if part.strip()]
    return "; ".join(parts)


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
    display: ProgressDisplay = field(default_factory=ProgressDisplay)
    final: TrainerStatus | None = None
    started: float = field(default_factory=time.monotonic)
    _stopping: bool = False
    _process: subprocess.Popen | None = None

    def write_files(self, *, resume: bool, port: int) -> Path:
        files = render_trainer_files(self.job, self.paths, resume=resume)
        config = dict(files.config_json, metrics_port=port, metrics_host="127.0.0.1")
        config_dir = Path(self.paths.config_dir)
        config_dir.mkdir(parents=True, exist_ok=True)
        (config_dir / "multidatabackend.json").write_text(json.dumps(files.databackend_json, indent=2))
        config_path = config_dir / "config.json"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
        return config_path

    def say(self, text: str) -> None:
        self.display.message(f"[kubetuner] {text}")

    def run_hooks_for(self, step: int, path: str) -> None:
        for hook in self.job.hooks:
            # the cluster's hook Jobs fill the same table
            argv = substitute_argv(list(hook.command), placeholder_values(self.job, step, path, self.paths))
            if not self.run_hooks:
                self.say(f"hook {hook.name!r} for step {step} skipped locally (image {hook.image}); "
                         "--run-hooks runs its command on this machine")
                continue
            env = dict(os.environ)
            env.update({e["name"]: str(e.get("value", "")) for e in hook.env if "value" in e})
            result = subprocess.run(argv, env=env, check=False, capture_output=True, text=True)
            outcome = "Succeeded" if result.returncode == 0 else "Failed"
            self.hook_results.append({"checkpointStep": step, "hook": hook.name, "result": outcome})
            for line in (result.stdout + result.stderr).splitlines():
                self.display.message(f"  {hook.name}: {line}")
            self.say(f"hook {hook.name!r} for step {step}: {outcome}")

    def _pump(self, stream: Any, log_file: Any) -> None:
        """Copy the trainer's output to trainer.log, and to the terminal except its progress lines."""
        for raw in iter(stream.readline, b""):
            log_file.write(raw)
            log_file.flush()
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            if PROGRESS_LOGGER not in line:
                self.display.message(line)

    def attempt(self, *, resume: bool) -> int:
        port = free_port()
        config_path = self.write_files(resume=resume, port=port)
        termination = self.workdir / TERMINATION_FILE
        termination.unlink(missing_ok=True)
        env = dict(os.environ)
        env.update(self.env)
        env[TERMINATION_LOG_ENV] = str(termination)  # the pod's path is the kubelet's
        command = [sys.executable, "-m", "kubetuner_trainer.cli", "--config", str(config_path)]
        with open(self.workdir / TRAINER_LOG, "ab") as log_file:
            # Its own session: Ctrl-C reaches only this runner, which asks the trainer to stop (SIGTERM,
            # the contract's stop signal) exactly once, as the kubelet would.
            process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            self._process = process
            if self._stopping:  # Ctrl-C came while the trainer was being started
                process.send_signal(signal.SIGTERM)
            pump = threading.Thread(target=self._pump, args=(process.stdout, log_file), daemon=True)
            pump.start()
            while process.poll() is None:
                status = read_status(port)
                if status is not None:
                    self.display.show(status)
                    self.note_checkpoints(status)
                try:
                    process.wait(timeout=POLL_SECONDS)
                except subprocess.TimeoutExpired:
                    pass
            self._process = None
            pump.join(timeout=10)
        self.final = read_termination_message(termination) or self.final
        if self.final is not None:
            self.note_checkpoints(self.final)
        self.scan_checkpoints()
        return process.returncode

    def on_interrupt(self, signum: int = signal.SIGINT, frame: Any = None) -> None:
        """Ctrl-C (or SIGTERM/SIGHUP): ask the trainer to checkpoint and stop (SIGTERM, once); a second one kills it."""
        process = self._process
        if not self._stopping:
            self._stopping = True
            self.say("stopping: the trainer writes a checkpoint, then exits (Ctrl-C again to abort without one)")
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        elif process is not None and process.poll() is None:
            self.say("aborting without a checkpoint")
            process.kill()

    def note_checkpoints(self, status: TrainerStatus) -> None:
        for checkpoint in status.checkpoints:
            if checkpoint.complete and checkpoint.step not in self.seen_checkpoints:
                self.seen_checkpoints.add(checkpoint.step)
                self.run_hooks_for(checkpoint.step, checkpoint.path)

    def scan_checkpoints(self) -> None:
        """Checkpoints written after the last poll (e.g. the final one) still get their hooks."""
        for step, directory in complete_checkpoints(self.paths.output_dir):
            if step not in self.seen_checkpoints:
                self.seen_checkpoints.add(step)
                self.run_hooks_for(step, str(directory))

    def latest_step(self) -> int:
        found = complete_checkpoints(self.paths.output_dir)
        return found[-1][0] if found else 0

    def write_status(self, phase: str, reason: str) -> dict[str, Any]:
        """Write ``status.yaml``: what a user (or a script) wants to know after the run."""
        final = self.final
        output = Path(self.paths.output_dir)
        weights = sorted(str(p) for p in output.glob("*.safetensors")) if phase == "Succeeded" else []
        status = {
            "phase": phase,
            "reason": reason,
            "step": final.step if final else self.latest_step(),
            "maxSteps": final.max_steps if final else None,
            "loss": final.loss if final else None,
            "durationSeconds": round(time.monotonic() - self.started, 1),
            "restarts": self.restarts,
            "output": str(output),
            "weights": weights,
            "checkpoints": [str(p) for _, p in complete_checkpoints(output)],
            "validationImages": [str(p) for p in validation_renders(output)],
            "tensorboard": str(Path(self.paths.logging_dir)) if Path(self.paths.logging_dir).is_dir() else None,
            "trainerLog": str(self.workdir / TRAINER_LOG),
            "hooks": self.hook_results,
        }
        (self.workdir / STATUS_FILE).write_text(yaml.safe_dump(status, sort_keys=False))
        return status

    def reason(self, code: int) -> str:
        """The trainer's own one-line reason (termination message), else what the exit code means."""
        message = self.final.message if self.final is not None else ""
        return one_line(message) if message and code != ExitCode.SUCCESS else ExitCode.describe(code)

    def run(self, *, resume: bool) -> int:
        """Attempts until success, a permanent failure, Ctrl-C, or ``backoffLimit``; returns the exit code."""
        # The trainer runs in its own session, so a closed terminal (SIGHUP) or a SIGTERM to this runner
        # must reach it the same way Ctrl-C does: stop after a checkpoint, never orphan it.
        previous = {sig: signal.signal(sig, self.on_interrupt) for sig in STOP_SIGNALS}
        try:
            return self._attempts(resume=resume)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _attempts(self, *, resume: bool) -> int:
        while True:
            code = self.attempt(resume=resume)
            if code == ExitCode.SUCCESS:
                self.write_status("Succeeded", ExitCode.describe(code))
                self.say(f"Succeeded; model and checkpoints in {self.paths.output_dir}; "
                         f"summary in {self.workdir / STATUS_FILE}")
                return 0
            if code == ExitCode.CONFIG_ERROR:
                reason = self.reason(code)
                self.write_status("Failed", reason)
                self.say(f"Failed: {reason}")
                return int(ExitCode.CONFIG_ERROR)
            if self._stopping:
                step = self.latest_step()
                self.write_status("Interrupted", f"stopped by Ctrl-C at step {step}")
                self.say(f"interrupted at step {step}; run the same command to resume")
                return INTERRUPTED_EXIT
            if self.restarts >= self.job.run_policy.backoff_limit:
                reason = f"{self.reason(code)} (backoffLimit {self.job.run_policy.backoff_limit} reached)"
                self.write_status("Failed", reason)
                self.say(f"Failed: {reason}")
                return code or 1
            self.restarts += 1
            resume = True
            self.write_status("Restarting", self.reason(code))
            self.say(f"{self.reason(code)}; restart {self.restarts} resumes from the latest checkpoint")


def local_paths(job: TrainingJobSpec, workdir: Path, volumes: Mapping[str, str]) -> LocalPaths:
    """Directories of this machine for every volume of the job (``spec.output.pvc`` and caches included)."""
    claims = LocalPaths(volumes=volumes)

    def volume_dir(volume: Any, default: Path) -> str:
        if volume is not None and volume.existing_claim:
            return claims.claim_dir(volume.existing_claim)
        return str(default)

    source = job.model.source
    model_dir = claims.claim_dir(source.pvc_claim, source.pvc_path) if source.kind == "pvc" else ""
    paths = LocalPaths(
        config_dir=str(workdir / "config"),
        output_dir=volume_dir(job.output_pvc, workdir / "output"),
        model_cache_dir=volume_dir(job.model_cache, workdir / "cache" / "models"),
        data_cache_dir=volume_dir(job.data_cache, workdir / "cache" / "data"),
        model_dir=model_dir or str(workdir / "model"),
        datasets_dir=str(workdir / "datasets"),
        volumes=volumes,
    )
    for dataset in job.datasets:
        if dataset.pvc is not None:
            paths.dataset_dir(dataset)  # fail early when a claim has no directory
    return paths


def used_claims(job: TrainingJobSpec) -> set[str]:
    """Every PersistentVolumeClaim name the job mounts."""
    claims = {d.pvc.claim_name for d in job.datasets if d.pvc is not None}
    if job.model.source.kind == "pvc":
        claims.add(job.model.source.pvc_claim)
    claims.update(v.existing_claim for v in (job.output_pvc, job.model_cache, job.data_cache)
                  if v is not None and v.existing_claim)
    return claims


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
    paths = local_paths(job, workdir, volumes)
    unused = sorted(set(volumes) - used_claims(job))
    for claim in unused:
        print(f"[kubetuner] warning: --volume {claim}={volumes[claim]} is not used by this TrainingJob "
              f"(it mounts: {', '.join(sorted(used_claims(job))) or 'no claims'})", file=sys.stderr, flush=True)
    env = trainer_environment(job, secret_values(docs), paths)
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
    parser.add_argument("--fresh", action="store_true",
                        help="start from step 0 instead of resuming from the workdir's latest checkpoint "
                        "(the previous output is moved aside, not deleted)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate and translate the manifest, print the trainer's config.json and "
                        "multidatabackend.json, and start nothing")


def dry_run(run: LocalRun) -> int:
    files = render_trainer_files(run.job, run.paths, resume=False)
    print(f"# {run.paths.config_file}")
    print(json.dumps(files.config_json, indent=2, sort_keys=True))
    print(f"# {run.paths.databackend_file}")
    print(json.dumps(files.databackend_json, indent=2))
    return 0


def _set_aside(output_dir: Path) -> Path | None:
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return None
    target = output_dir.with_name(f"{output_dir.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
    output_dir.rename(target)
    return target


def unwritable(run: LocalRun) -> str | None:
    """Why the workdir, output or cache folders of a run cannot be written (the first one), or None."""
    paths = run.paths
    for name, folder in (("workdir", str(run.workdir)), ("output folder", paths.output_dir),
                         ("data cache", paths.data_cache_dir), ("model cache", paths.model_cache_dir)):
        why = writable_problem(folder)
        if why:
            return f"{name} {folder}: {why}"
    return None


def main(args: argparse.Namespace) -> int:
    try:
        run = build_run(args)
    except RunError as error:
        print(f"kubetuner run: {error}", file=sys.stderr)
        return int(ExitCode.CONFIG_ERROR)
    if getattr(args, "dry_run", False):
        return dry_run(run)
    if (why := unwritable(run)):
        print(f"kubetuner run: {why}", file=sys.stderr)
        return int(ExitCode.CONFIG_ERROR)
    lock = WorkdirLock(run.workdir)
    try:
        lock.acquire()
    except WorkdirBusy as error:
        print(f"kubetuner run: {error}", file=sys.stderr)
        return 1
    try:
        resume = True
        if getattr(args, "fresh", False):
            moved = _set_aside(Path(run.paths.output_dir))
            if moved is not None:
                run.say(f"--fresh: the previous output is now in {moved}")
        elif (step := run.latest_step()):
            run.say(f"resuming from the checkpoint at step {step} in {run.paths.output_dir} "
                    "(--fresh starts over)")
        run.say(f"running TrainingJob {run.job.name!r} in {run.workdir}; trainer log: {run.workdir / TRAINER_LOG}")
        return run.run(resume=resume)
    finally:
        lock.release()
