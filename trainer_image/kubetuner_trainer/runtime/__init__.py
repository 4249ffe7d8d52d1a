"""The trainer runtime: everything around the training loop that reports, calls out and stops cleanly.

``with build_runtime(cfg) as events:`` starts what the config asks for — the metrics/status
HTTP server, trackers, webhooks, publishing, signal handlers — and hands the loop a
:class:`~kubetuner_trainer.events.TrainingEvents`. Leaving the block waits for the final
uploads and scripts and stops everything again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..config import MISSING, ConfigError, Problem
from ..config.trainer_config import redact
from ..contract import CheckpointInfo, ExitCode, TrainerState
from ..events import StepReport
from ..termination import write_termination_message
from . import webhooks as wh
from ._options import all_options, env_value, option
from .clip_evaluation import clip_evaluation_requested
from .metrics import TrainerMetrics
from .publishing import (
    HubUploader,
    Publisher,
    PublishingConfigError,
    S3Uploader,
    default_repo_name,
    model_card,
    parse_publishing_config,
)
from .scripts import POST_CHECKPOINT, POST_UPLOAD, ScriptRunner, check_command, command_of, placeholder_values
from .server import StatusServer
from .signals import StopSignal, _hard_exit
from .status import StatusTracker
from .trackers import (
    ProgressLogger,
    TrackerError,
    build_trackers,
    check_trackers,
    configure_logging,
    selected_trackers,
)
from .validation import ValidationConfigError, Validator, check_validation_config

__all__ = ["Runtime", "Validator", "build_runtime", "check_runtime_config", "preflight_problems"]

log = logging.getLogger(__name__)

# How long teardown waits for background scripts before terminating them.
SCRIPT_WAIT_SECONDS = 600.0
# How long a hard exit (second signal, spent grace budget) waits for the termination message.
TERMINATION_WRITE_SECONDS = 2.0


def check_runtime_config(cfg: Any) -> list[Problem]:
    """Every problem with the runtime's options, without starting anything."""
    problems: list[Problem] = []
    try:
        wh.parse_webhook_config(option(cfg, "webhook_config"))
    except wh.WebhookConfigError as error:
        problems.append(Problem("webhook_config", MISSING, str(error)))  # value may hold an API key
    try:
        parse_publishing_config(option(cfg, "publishing_config"))
    except PublishingConfigError as error:
        problems.append(Problem("publishing_config", MISSING, str(error)))
    report_to = option(cfg, "report_to")
    try:
        check_trackers(selected_trackers(report_to))
    except TrackerError as error:
        problems.append(Problem("report_to", report_to, str(error)))
    for name in ("post_checkpoint_script", "post_upload_script", "validation_external_script"):
        command = command_of(cfg, name)
        if command is not None:
            message = check_command(name, command)
            if message:
                problems.append(Problem(name, command, message))
    if option(cfg, "validation_method") == "external-script" and command_of(cfg, "validation_external_script") is None:
        problems.append(Problem("validation_external_script", MISSING,
                                "is required when --validation_method=external-script"))
    for name, message in check_validation_config(cfg):
        problems.append(Problem(name, option(cfg, name, MISSING), message))
    level = env_value(cfg, "log_level", "INFO")
    if not isinstance(logging.getLevelName(str(level).upper()), int):
        problems.append(Problem("SIMPLETUNER_LOG_LEVEL", level,
                                "is not a log level; use DEBUG, INFO, WARNING, ERROR or CRITICAL"))
    if option(cfg, "push_checkpoints_to_hub") and not option(cfg, "push_to_hub"):
        problems.append(Problem("push_checkpoints_to_hub", True, "needs --push_to_hub"))
    return problems


def preflight_problems(cfg: Any) -> list[Problem]:
    """The runtime's part of ``kubetuner_trainer.training.preflight`` (same as :func:`check_runtime_config`)."""
    return check_runtime_config(cfg)


#: options SimpleTuner 3.1.6 declares but never reads (nothing in its trainer uses them): accepted, warned
UNAPPLIED = {
    "validation_torch_compile": "validation renders are not compiled (SimpleTuner 3.1.6 never applies it "
                                "either); --dynamo_* compiles the model, validation included",
    "enable_watermark": "renders are not watermarked (SimpleTuner 3.1.6 never applies it either)",
}


def preflight_warnings(cfg: Any) -> list[Problem]:
    """Runtime options set to no effect: ``num_eval_images`` caps the renders the CLIP evaluation scores
    (``--evaluation_type clip``) and counts the dataset samples edit models validate on; the CLIP evaluation
    scores nothing when validation renders nothing; :data:`UNAPPLIED`."""
    warnings = []
    is_set = getattr(cfg, "is_set", None)
    clip = clip_evaluation_requested(cfg)
    if callable(is_set) and is_set("num_eval_images") and not clip and not _dataset_samples(cfg):
        warnings.append(Problem("num_eval_images", option(cfg, "num_eval_images"),
                                "has no effect without --evaluation_type clip"))
    if clip and not _renders(cfg):
        warnings.append(Problem("evaluation_type", "clip",
                                "has no effect: validation renders no images (set --validation_prompt, leave "
                                "--validation_disable off and --validation_method simpletuner-local)"))
    warnings += [Problem(name, True, f"has no effect: {why}") for name, why in UNAPPLIED.items() if option(cfg, name)]
    return warnings


def _dataset_samples(cfg: Any) -> bool:
    """Whether validation renders dataset samples (edit models), ``--num_eval_images`` per dataset."""
    from ..data import family_requires_conditioning

    return family_requires_conditioning(cfg)


def _renders(cfg: Any) -> bool:
    try:
        return Validator(cfg).renders
    except ValidationConfigError:
        return True  # reported by check_runtime_config


class Runtime:
    """Implements :class:`~kubetuner_trainer.events.TrainingEvents` by fanning events out."""

    def __init__(self, cfg: Any, *, install_signals: bool = True, bind_port: int | None = None) -> None:
        problems = check_runtime_config(cfg)
        if problems:
            raise ConfigError(problems)
        self.cfg = cfg
        self.output_dir = Path(str(option(cfg, "output_dir", ".")))
        self.job_id = env_value(cfg, "job_id")
        self.metrics = TrainerMetrics()
        self.metrics.describe_model(model_family=option(cfg, "model_family"),
                                    model_type=option(cfg, "model_type"), job_id=self.job_id)
        self.status = StatusTracker(job_id=self.job_id)
        self.stop = StopSignal(grace_seconds=float(option(cfg, "stop_grace_seconds")),
                               exit_now=self._exit_now)
        self.scripts = ScriptRunner(self.metrics)
        self.progress = ProgressLogger()
        self.server: StatusServer | None = None
        self.webhooks: wh.WebhookDispatcher | None = None
        self.trackers: list[Any] = []
        self.publisher: Publisher | None = None
        self._install_signals = install_signals
        self._bind_port = bind_port
        self._closed = threading.Event()
        self._checkpoint_paths: dict[int, str] = {}
        self._final_published = False

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def url(self) -> str | None:
        """Base URL of the metrics/status server (``None`` when disabled)."""
        return self.server.url if self.server is not None else None

    def start(self) -> None:
        cfg = self.cfg
        configure_logging(env_value(cfg, "log_level", "INFO"), self.output_dir)
        port = self._bind_port if self._bind_port is not None else int(option(cfg, "metrics_port"))
        if port or self._bind_port is not None:
            self.server = StatusServer(host=str(option(cfg, "metrics_host")), port=port,
                                       status=self.status.snapshot, metrics=self.metrics.exposition)
            self.server.start()
        targets = wh.parse_webhook_config(option(cfg, "webhook_config"))
        if targets:
            self.webhooks = wh.WebhookDispatcher(
                targets, job_id=self.job_id, metrics=self.metrics,
                reporting_interval=float(option(cfg, "webhook_reporting_interval")),
            )
        logging_dir = Path(str(option(cfg, "logging_dir")))
        if not logging_dir.is_absolute():
            logging_dir = self.output_dir / logging_dir
        self.trackers = build_trackers(
            selected_trackers(option(cfg, "report_to")), logging_dir=logging_dir,
            run_name=option(cfg, "tracker_run_name"), project=option(cfg, "tracker_project_name"),
            group=self.job_id, config=redact(all_options(cfg)), image_layout=option(cfg, "tracker_image_layout"))
        self.publisher = self._build_publisher()
        if self._install_signals:
            self.stop.install()
        threading.Thread(target=self._grace_watchdog, name="kubetuner-stop-watchdog", daemon=True).start()
        self.state(TrainerState.STARTING, "runtime started")

    def _build_publisher(self) -> Publisher | None:
        cfg = self.cfg
        s3 = [S3Uploader(t) for t in parse_publishing_config(option(cfg, "publishing_config"))]
        hub = None
        if option(cfg, "push_to_hub"):
            hub = HubUploader(option(cfg, "hub_model_id") or default_repo_name(cfg),
                              private=bool(option(cfg, "model_card_private", False)),
                              endpoint=os.environ.get("HF_ENDPOINT") or None,
                              token=os.environ.get("HF_TOKEN") or None)
        publisher = Publisher(
            s3=s3, hub=hub, push_checkpoints_to_hub=bool(option(cfg, "push_checkpoints_to_hub")),
            background=bool(option(cfg, "push_to_hub_background")), output_dir=self.output_dir,
            on_uploaded=self._uploaded, on_failed=self.error, metrics=self.metrics,
        )
        return publisher if publisher.enabled else None

    def close(self, error: BaseException | None = None) -> None:
        if self._closed.is_set():
            return
        if error is not None and self.status.snapshot().state not in (TrainerState.FINISHED, TrainerState.FAILED):
            self.error(f"training stopped by {type(error).__name__}: {error}")
            self.state(TrainerState.FAILED, str(error))
        try:
            if self.publisher is not None:
                self.publisher.close()
            self.scripts.wait_all(SCRIPT_WAIT_SECONDS)
            if self.webhooks is not None:
                self.webhooks.maybe_send_status(self.status.snapshot(), force=True)
                self.webhooks.close()
            for tracker in self.trackers:
                tracker.close()
        finally:
            write_termination_message(self.status.snapshot())  # for the operator: see termination.py
            self._closed.set()
            if self._install_signals:
                self.stop.uninstall()
            if self.server is not None:
                self.server.stop()

    def _exit_now(self, code: int) -> None:
        """Exit at once (second signal, spent grace budget), leaving the termination message first.

        The write runs in a helper thread with a time limit: a signal handler runs in the main
        thread, which may be the one holding the status lock at that moment.
        """
        writer = threading.Thread(target=lambda: write_termination_message(self.status.snapshot()),
                                  name="kubetuner-termination-message", daemon=True)
        writer.start()
        writer.join(TERMINATION_WRITE_SECONDS)
        _hard_exit(code)

    def _grace_watchdog(self) -> None:
        """After a stop request, exit anyway once the grace budget (``--stop_grace_seconds``) is spent."""
        while not self._closed.is_set():
            if self.stop.wait(1.0):
                break
        budget = self.stop.grace_seconds
        if self._closed.is_set() or not budget:
            return
        if self._closed.wait(budget):
            return
        log.error("stop grace budget of %.0fs spent; exiting with code %d so the run resumes from its "
                  "latest complete checkpoint", budget, ExitCode.INTERRUPTED)
        self.stop.exit_now(int(ExitCode.INTERRUPTED))

    # --- TrainingEvents -------------------------------------------------------------------

    def stop_requested(self) -> bool:
        return self.stop.requested()

    def state(self, state: TrainerState, message: str = "") -> None:
        state = TrainerState(state)
        previous = self.status.snapshot().state
        self.status.state(state, message)
        self.metrics.observe_state(state)
        if state != previous or message:
            log.info("state: %s%s", state, f" ({message})" if message else "")
            if self.webhooks is not None:
                self.webhooks.send(wh.lifecycle_event(self.job_id, state, message))
        if state == TrainerState.FINISHED:
            self._publish_final()

    def step(self, report: StepReport) -> None:
        self.status.step(report)
        self.metrics.observe_step(report)
        snapshot = self.status.snapshot()
        self.progress.step(report, snapshot.eta_seconds)
        for tracker in self.trackers:
            tracker.step(report)
        if self.webhooks is not None:
            self.webhooks.maybe_send_status(snapshot, force=report.step == report.max_steps)

    def checkpoint(self, info: CheckpointInfo, *, seconds: float) -> None:
        self.status.checkpoint(info)
        self.metrics.observe_checkpoint(info, seconds, time.time())
        if self.webhooks is not None:
            self.webhooks.send(wh.checkpoint_event(self.job_id, info, seconds))
        if not info.complete:
            return
        self._checkpoint_paths[info.step] = info.path
        command = command_of(self.cfg, "post_checkpoint_script")
        if command is not None:
            values = placeholder_values(self.cfg, global_step=info.step, local_checkpoint_path=info.path)
            self.scripts.run(POST_CHECKPOINT, command, values, background=True)
        if self.publisher is not None:
            self.publisher.checkpoint(info.step, Path(info.path))
        elif command_of(self.cfg, "post_upload_script") is not None:
            self._uploaded("none", "", info.step)  # the hook runs even without remote targets

    def validation(self, step: int, images: list[Path], *, seconds: float,
                   scores: dict[str, float] | None = None) -> None:
        self.metrics.observe_validation(seconds, len(images), scores)
        for tracker in self.trackers:
            tracker.validation(step, images)
            for tag, value in (scores or {}).items():
                tracker.scalar(tag, value, step)
        if self.webhooks is not None and images:
            self.webhooks.send(wh.validation_event(self.job_id, step, images, seconds, scores))

    def error(self, message: str) -> None:
        log.error("%s", message)
        self.status.error(message)
        self.metrics.observe_error()
        if self.webhooks is not None:
            self.webhooks.send(wh.error_event(self.job_id, message))

    # --- publishing -----------------------------------------------------------------------

    def _publish_final(self) -> None:
        if self._final_published:
            return
        self._final_published = True
        if self.publisher is not None:
            repo = self.publisher.hub_repo_id
            self.publisher.final(self.output_dir, model_card(self.cfg, repo) if repo else None)
        elif command_of(self.cfg, "post_upload_script") is not None:
            self._uploaded("none", "", None)

    def _uploaded(self, target: str, uri: str, step: int | None) -> None:
        if self.webhooks is not None and uri:
            self.webhooks.send(wh.upload_event(self.job_id, target, uri, step))
        command = command_of(self.cfg, "post_upload_script")
        if command is None:
            return
        local = self._checkpoint_paths.get(step, "") if step is not None else str(self.output_dir)
        step_value = step if step is not None else self.status.snapshot().step
        values = placeholder_values(self.cfg, global_step=step_value, local_checkpoint_path=local,
                                    remote_checkpoint_path=uri)
        self.scripts.run(POST_UPLOAD, command, values, background=True)


@contextmanager
def build_runtime(cfg: Any, *, install_signals: bool = True, bind_port: int | None = None) -> Iterator[Runtime]:
    """Start the runtime for ``cfg``; on exit wait for uploads/scripts and stop everything.

    ``bind_port`` overrides ``--metrics_port`` (``0`` then means "any free port", for tests and
    embedding); ``install_signals=False`` leaves SIGTERM/SIGINT alone (not in the main thread).

    Raises :class:`~kubetuner_trainer.config.ConfigError` (exit code 78) when a runtime option
    is invalid or a requested tracker is not installed.
    """
    runtime = Runtime(cfg, install_signals=install_signals, bind_port=bind_port)
    try:
        runtime.start()
    except BaseException as error:
        runtime.close(error)
        raise
    try:
        yield runtime
    except SystemExit as exit_:
        runtime.close(None if exit_.code in (None, 0, ExitCode.INTERRUPTED) else exit_)
        raise
    except BaseException as error:
        runtime.close(error)
        raise
    else:
        runtime.close()
