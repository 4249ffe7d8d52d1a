"""Experiment trackers (``--report_to``), the log progress line and ``SIMPLETUNER_LOG_LEVEL``."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

from ..events import StepReport
from .webhooks import format_seconds

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "comet_ml")
# Python package that each tracker needs, and the pip name to install it.
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                    "comet_ml": ("comet_ml", "comet-ml")}
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


def check_trackers(names: list[str]) -> None:
    """Fail early, naming the package to install, when a tracker's package is missing."""
    for name in names:
        module, pip_name = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise TrackerError(
                f"report_to={name} needs the Python package {pip_name!r}, which is not installed in this "
                f"image; install it (pip install {pip_name}) or remove {name} from --report_to"
            )
    unsupported = [n for n in names if n != "tensorboard"]
    if unsupported:
        raise TrackerError(
            f"report_to={unsupported[0]} is not supported by kubetuner yet; use tensorboard or none"
        )


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


class TensorBoardTracker:
    """Writes scalars and validation images as TensorBoard event files under ``logging_dir``."""

    def __init__(self, logging_dir: str | Path, run_name: str | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # heavy import, only when asked for

        self.log_dir = Path(logging_dir) / (run_name or "")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def step(self, report: StepReport) -> None:
        w, s = self._writer, report.step
        w.add_scalar("train/loss", report.loss, s)
        for name, value in report.loss_components.items():
            if name == "eval_loss" or name.startswith("eval_loss/"):
                w.add_scalar("eval/loss" + name[len("eval_loss"):], value, s)  # eval/loss, eval/loss/<dataset>
            else:
                w.add_scalar(f"train/loss_{name}", value, s)
        for group, value in report.learning_rates.items():
            w.add_scalar(f"train/learning_rate/{group}", value, s)
        for tag, value in (("train/samples_per_second", report.samples_per_second),
                           ("train/seconds_per_step", report.seconds_per_step),
                           ("train/data_wait_seconds", report.data_wait_seconds),
                           ("train/grad_norm", report.grad_norm),
                           ("train/epoch", report.epoch)):
            if value is not None:
                w.add_scalar(tag, value, s)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._writer.add_scalar(tag, value, step)

    def validation(self, step: int, images: list[Path]) -> None:
        import numpy as np
        from PIL import Image

        for path in images:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
            self._writer.add_image(f"validation/{Path(path).stem}", array, step, dataformats="HWC")

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def build_trackers(names: list[str], *, logging_dir: str | Path, run_name: str | None) -> list[Any]:
    """Start the selected trackers (call :func:`check_trackers` first)."""
    trackers: list[Any] = []
    if "tensorboard" in names:
        trackers.append(TensorBoardTracker(logging_dir, run_name))
        log.info("tensorboard event files go to %s", trackers[-1].log_dir)
    return trackers
