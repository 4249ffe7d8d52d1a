"""Experiment trackers (``--report_to``), the log progress line and ``SIMPLETUNER_LOG_LEVEL``."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..events import StepReport
from .webhooks import format_seconds

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "comet_ml")
# Python package that each tracker needs, and the pip name to install it.
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                    "comet_ml": ("comet_ml", "comet-ml")}
# The API key variable each online tracker reads itself, and how to switch it to offline logging.
TRACKER_CREDENTIALS = {"wandb": ("WANDB_API_KEY", "WANDB_MODE=offline"),
                       "comet_ml": ("COMET_API_KEY", "COMET_START_ONLINE=false")}
# Validation outputs with these suffixes are logged as videos, everything else as images.
VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".mov")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
BAR_WIDTH = 20


class TrackerError(ValueError):
    """A requested tracker cannot be used; the message says how to fix it."""


def selected_trackers(report_to: str | list[str] | None) -> list[str]:
    """Expand ``--report_to`` (comma-separated, ``all``, ``none``) into tracker names."""
    if report_to is None:
        return []
    items = report_to if isinstance(report_to, list) else str(report_to).split(",")
    names: list[str] = []
    for item in (i.strip() for i in items):
        if not item or item == "none":
            continue
        if item == "all":
            names.extend(TRACKERS)
        elif item in TRACKERS:
            names.append(item)
        else:
            raise TrackerError(f"report_to: {item!r} is not one of {', '.join((*TRACKERS, 'all', 'none'))}")
    return list(dict.fromkeys(names))


def check_trackers(names: list[str], environ: Mapping[str, str] | None = None) -> None:
    """Fail early, naming the package to install or the credential to provide.

    Credentials come only from the environment (in a pod: ``spec.secrets.env`` Secret references):
    ``WANDB_API_KEY`` unless ``WANDB_MODE`` is offline/disabled, ``COMET_API_KEY`` unless
    ``COMET_START_ONLINE`` is false. Raises :class:`TrackerError`.
    """
    env = os.environ if environ is None else environ
    for name in names:
        module, pip_name = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise TrackerError(
                f"report_to={name} needs the Python package {pip_name!r}, which is not installed in this "
                f"image; install it (pip install {pip_name}) or remove {name} from --report_to"
            )
        key, offline_hint = TRACKER_CREDENTIALS.get(name, (None, ""))
        if key and not env.get(key) and not tracker_offline(name, env):
            raise TrackerError(
                f"report_to={name} needs {key} in the environment (in a TrainingJob: spec.secrets.env with a "
                f"secretKeyRef), or {offline_hint} to log offline"
            )


def tracker_offline(name: str, environ: Mapping[str, str]) -> bool:
    """Whether the tracker's own environment variable puts it in offline (or disabled) mode."""
    if name == "wandb":
        return environ.get("WANDB_MODE", "").strip().lower() in ("offline", "disabled", "dryrun")
    if name == "comet_ml":
        return environ.get("COMET_START_ONLINE", "").strip().lower() in ("0", "false", "no", "off")
    return True


def configure_logging(level: str | int | None, output_dir: str | Path | None = None) -> int:
    """Apply ``SIMPLETUNER_LOG_LEVEL`` to the trainer's loggers; DEBUG also writes ``debug.log``.

    Adds a stderr handler only when the root logger has none (the CLI may already have one).
    Returns the numeric level.
    """
    numeric = level if isinstance(level, int) else logging.getLevelName(str(level or "INFO").upper())
    if not isinstance(numeric, int):
        raise TrackerError(
            f"SIMPLETUNER_LOG_LEVEL={level!r} is not a log level; use DEBUG, INFO, WARNING, ERROR or CRITICAL"
        )
    logger = logging.getLogger("kubetuner_trainer")
    logger.setLevel(numeric)
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
        root.setLevel(min(root.level or logging.WARNING, numeric))
    if numeric <= logging.DEBUG and output_dir is not None:
        path = Path(output_dir) / "debug.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in logger.handlers):
            file_handler = logging.FileHandler(path, encoding="utf-8")
            file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
            logger.addHandler(file_handler)
    return numeric


def progress_line(report: StepReport, eta_seconds: float | None) -> str:
    """A one-line progress bar for the logs: ``step 30/100 [######--------------] 30% ...``."""
    parts = []
    if report.max_steps > 0:
        done = min(1.0, report.step / report.max_steps)
        filled = int(round(done * BAR_WIDTH))
        parts.append(f"step {report.step}/{report.max_steps} [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] "
                     f"{done * 100:3.0f}%")
    else:
        parts.append(f"step {report.step}")
    epochs = f"/{report.max_epochs}" if report.max_epochs else ""
    parts.append(f"epoch {report.epoch}{epochs}")
    parts.append(f"loss {report.loss:.4f}")
    if report.learning_rates:
        parts.append("lr " + ",".join(f"{v:.3g}" for v in report.learning_rates.values()))
    if report.samples_per_second is not None:
        parts.append(f"{report.samples_per_second:.2f} samples/s")
    if report.seconds_per_step is not None:
        parts.append(f"{report.seconds_per_step:.2f} s/step")
    if eta_seconds is not None:
        parts.append(f"eta {format_seconds(eta_seconds)}")
    return " | ".join(parts)


class ProgressLogger:
    """Logs a progress line about every 1% of the run (every step at DEBUG)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger("kubetuner_trainer.progress")

    def step(self, report: StepReport, eta_seconds: float | None) -> None:
        every = max(1, report.max_steps // 100) if report.max_steps > 0 else 10
        important = report.step % every == 0 or report.step == report.max_steps or report.step == 1
        level = logging.INFO if important else logging.DEBUG
        if self._log.isEnabledFor(level):
            self._log.log(level, "%s", progress_line(report, eta_seconds))


def report_scalars(report: StepReport) -> dict[str, float]:
    """The scalars of one step under the tag names every tracker uses.

    ``train/loss``, ``train/loss_<component>``, ``eval/loss[/<dataset>]``, ``train/learning_rate/<group>``,
    and throughput/grad-norm/epoch values when the report has them.
    """
    scalars = {"train/loss": float(report.loss)}
    for name, value in report.loss_components.items():
        if name == "eval_loss" or name.startswith("eval_loss/"):
            scalars["eval/loss" + name[len("eval_loss"):]] = float(value)  # eval/loss, eval/loss/<dataset>
        else:
            scalars[f"train/loss_{name}"] = float(value)
    for group, value in report.learning_rates.items():
        scalars[f"train/learning_rate/{group}"] = float(value)
    for tag, value in (("train/samples_per_second", report.samples_per_second),
                       ("train/seconds_per_step", report.seconds_per_step),
                       ("train/data_wait_seconds", report.data_wait_seconds),
                       ("train/grad_norm", report.grad_norm),
                       ("train/epoch", report.epoch)):
        if value is not None:
            scalars[tag] = float(value)
    return scalars


def is_video(path: str | Path) -> bool:
    """Whether a validation output is a video (by file suffix)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


class TensorBoardTracker:
    """Writes scalars and validation images as TensorBoard event files under ``logging_dir``."""

    def __init__(self, logging_dir: str | Path, run_name: str | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # heavy import, only when asked for

        self.log_dir = Path(logging_dir) / (run_name or "")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def step(self, report: StepReport) -> None:
        for tag, value in report_scalars(report).items():
            self._writer.add_scalar(tag, value, report.step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._writer.add_scalar(tag, value, step)

    def validation(self, step: int, images: list[Path]) -> None:
        import numpy as np
        from PIL import Image

        for path in images:
            if is_video(path):
                continue  # TensorBoard video summaries need moviepy; W&B and Comet take the file as is
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
            self._writer.add_image(f"validation/{Path(path).stem}", array, step, dataformats="HWC")

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    """Logs to a Weights & Biases run (``wandb`` reads ``WANDB_API_KEY``/``WANDB_MODE`` itself).

    The run lives under ``<logging_dir>/wandb``; offline runs stay there for ``wandb sync``.
    Runs of one job (restarts, resumes) share the group ``SIMPLETUNER_JOB_ID``.
    """

    def __init__(self, logging_dir: str | Path, *, project: str | None, run_name: str | None,
                 group: str | None, config: Mapping[str, Any], image_layout: str | None) -> None:
        import wandb  # heavy import, only when asked for

        self._wandb = wandb
        self.log_dir = Path(logging_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._layout = image_layout or "gallery"
        self._run = wandb.init(project=project, name=run_name, group=group, dir=str(self.log_dir),
                               config=dict(config), reinit="create_new")

    @property
    def run_dir(self) -> Path:
        """The run's folder (``<logging_dir>/wandb/<offline->run-<time>-<id>``)."""
        return Path(self._run.dir).parent

    def step(self, report: StepReport) -> None:
        self._run.log(report_scalars(report), step=report.step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._run.log({tag: value}, step=step)

    def validation(self, step: int, images: list[Path]) -> None:
        wandb = self._wandb
        media = [(Path(p).stem, wandb.Video(str(p)) if is_video(p) else wandb.Image(str(p), caption=Path(p).stem))
                 for p in images]
        if not media:
            return
        if self._layout == "table":
            self._run.log({"validation": wandb.Table(columns=["name", "media"], data=[list(m) for m in media])},
                          step=step)
        else:
            self._run.log({f"validation/{name}": item for name, item in media}, step=step)

    def flush(self) -> None:
        pass  # wandb writes in its own process

    def close(self) -> None:
        self._run.finish()
        # finish() can return before wandb's service has flushed the run file; teardown waits for it.
        self._wandb.teardown()


class CometTracker:
    """Logs to a Comet experiment (``comet_ml`` reads ``COMET_API_KEY``/``COMET_START_ONLINE`` itself).

    Offline experiments are archived under ``<logging_dir>/comet`` (or ``COMET_OFFLINE_DIRECTORY``)
    for ``comet upload``. Comet shows images in its own panel, so ``tracker_image_layout`` does not apply.
    """

    def __init__(self, logging_dir: str | Path, *, project: str | None, run_name: str | None,
                 config: Mapping[str, Any]) -> None:
        import comet_ml  # heavy import, only when asked for

        self.log_dir = Path(os.environ.get("COMET_OFFLINE_DIRECTORY") or Path(logging_dir) / "comet")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        settings = comet_ml.ExperimentConfig(
            name=run_name, offline_directory=str(self.log_dir), log_code=False, log_git_metadata=False,
            log_git_patch=False, log_env_details=False, display_summary_level=0)
        self._experiment = comet_ml.start(project_name=project, experiment_config=settings)
        self._experiment.log_parameters(dict(config))

    def step(self, report: StepReport) -> None:
        self._experiment.log_metrics(report_scalars(report), step=report.step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._experiment.log_metric(tag, value, step=step)

    def validation(self, step: int, images: list[Path]) -> None:
        for path in images:
            if is_video(path):
                self._experiment.log_video(str(path), name=Path(path).name, step=step)
            else:
                self._experiment.log_image(str(path), name=f"validation/{Path(path).stem}", step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._experiment.end()


def build_trackers(names: list[str], *, logging_dir: str | Path, run_name: str | None,
                   project: str | None = None, group: str | None = None,
                   config: Mapping[str, Any] | None = None, image_layout: str | None = None) -> list[Any]:
    """Start the selected trackers (call :func:`check_trackers` first).

    ``config`` is logged as the run's parameters; pass it redacted (no secrets).
    """
    trackers: list[Any] = []
    params = dict(config or {})
    try:
        if "tensorboard" in names:
            trackers.append(TensorBoardTracker(logging_dir, run_name))
            log.info("tensorboard event files go to %s", trackers[-1].log_dir)
        if "wandb" in names:
            trackers.append(WandbTracker(logging_dir, project=project, run_name=run_name, group=group,
                                         config=params, image_layout=image_layout))
            log.info("weights & biases run folder: %s", trackers[-1].run_dir)
        if "comet_ml" in names:
            trackers.append(CometTracker(logging_dir, project=project, run_name=run_name, config=params))
            log.info("comet experiment started (offline archives go to %s)", trackers[-1].log_dir)
    except BaseException:
        for tracker in trackers:
            tracker.close()
        raise
    return trackers
