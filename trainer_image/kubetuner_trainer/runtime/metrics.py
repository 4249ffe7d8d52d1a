"""Prometheus metrics of one trainer process, in a registry of their own.

Every name starts with ``kubetuner_trainer_``; durations are seconds, sizes bytes, and
monotonic counts end in ``_total`` (Prometheus naming conventions, checked by
``promtool check metrics`` in the tests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info
from prometheus_client.exposition import generate_latest

from .. import __version__
from ..contract import CheckpointInfo, TrainerState
from ..events import StepReport
from .clip_evaluation import MEAN as CLIP_MEAN
from .clip_evaluation import PROMPT_PREFIX as CLIP_PROMPT_PREFIX

PREFIX = "kubetuner_trainer"

# Step times range from ~50 ms (tiny LoRA) to minutes (large full fine-tunes on many GPUs).
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0)
# Checkpoints and validations take seconds to many minutes.
SLOW_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# Loss components the loop reports for the evaluation datasets (see training/evaluation.py):
# "eval_loss" pooled over every evaluation sample, "eval_loss/<dataset id>" per dataset.
EVAL_LOSS = "eval_loss"


def eval_dataset_of(component: str) -> str | None:
    """The dataset id of a per-dataset evaluation loss component, else None."""
    prefix = f"{EVAL_LOSS}/"
    return component[len(prefix):] if component.startswith(prefix) else None


class TrainerMetrics:
    """The trainer's metrics; ``observe_*`` methods translate events into samples."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.info = Info(f"{PREFIX}_build", "Trainer version and the model being trained.", registry=r)
        self.info.info({"version": __version__})
        self.state = Enum(
            f"{PREFIX}_state", "Current trainer state (1 for the active state).",
            states=[str(s) for s in TrainerState], registry=r,
        )
        self.step = Gauge(f"{PREFIX}_step", "Last completed optimizer step (global step).", registry=r)
        self.max_steps = Gauge(f"{PREFIX}_max_steps", "Optimizer steps the run will take in total.", registry=r)
        self.epoch = Gauge(f"{PREFIX}_epoch", "Current epoch (1-based).", registry=r)
        self.loss = Gauge(
            f"{PREFIX}_loss", "Training loss of the last step; component 'total' is the optimized loss.",
            ["component"], registry=r,
        )
        self.eval_loss = Gauge(
            f"{PREFIX}_eval_loss", "Loss on the held-out evaluation datasets at the last evaluation.", registry=r,
        )
        self.eval_dataset_loss = Gauge(
            f"{PREFIX}_eval_dataset_loss", "Evaluation loss of each evaluation dataset at the last evaluation.",
            ["dataset"], registry=r,
        )
        self.learning_rate = Gauge(
            f"{PREFIX}_learning_rate", "Learning rate of each optimizer parameter group.",
            ["param_group"], registry=r,
        )
        self.samples_per_second = Gauge(
            f"{PREFIX}_samples_per_second", "Training throughput over the last step.", registry=r,
        )
        self.step_duration = Histogram(
            f"{PREFIX}_step_duration_seconds", "Wall time of one optimizer step.",
            buckets=STEP_BUCKETS, registry=r,
        )
        self.data_wait = Counter(
            f"{PREFIX}_data_wait_seconds", "Time the loop spent waiting for batches.", registry=r,
        )
        self.grad_norm = Gauge(
            f"{PREFIX}_grad_norm", "Gradient norm of the last step (before clipping).", registry=r,
        )
        self.gpu_memory_allocated = Gauge(
            f"{PREFIX}_gpu_memory_allocated_bytes", "CUDA memory allocated by tensors after the last step.",
            registry=r,
        )
        self.gpu_memory_peak = Gauge(
            f"{PREFIX}_gpu_memory_peak_bytes", "Peak CUDA memory allocated by tensors.", registry=r,
        )
        self.last_checkpoint_step = Gauge(
            f"{PREFIX}_last_checkpoint_step", "Step of the latest complete checkpoint.", registry=r,
        )
        self.last_checkpoint_time = Gauge(
            f"{PREFIX}_last_checkpoint_timestamp_seconds", "Unix time the latest complete checkpoint was saved.",
            registry=r,
        )
        self.checkpoint_duration = Histogram(
            f"{PREFIX}_checkpoint_save_duration_seconds", "Time to write one checkpoint.",
            buckets=SLOW_BUCKETS, registry=r,
        )
        self.validation_duration = Histogram(
            f"{PREFIX}_validation_duration_seconds", "Time one validation run took.",
            buckets=SLOW_BUCKETS, registry=r,
        )
        self.validation_images = Counter(
            f"{PREFIX}_validation_images", "Validation images generated.", registry=r,
        )
        self.clip_score = Gauge(
            f"{PREFIX}_validation_clip_score", "CLIP score (0-100) of each validation prompt's renders at the "
            "last validation (--evaluation_type clip), averaged over its scored images.", ["prompt"], registry=r,
        )
        self.clip_score_mean = Gauge(
            f"{PREFIX}_validation_clip_score_mean", "Mean CLIP score over the validation prompts at the last "
            "validation (--evaluation_type clip).", registry=r,
        )
        self.errors = Counter(f"{PREFIX}_errors", "Errors reported by the training loop.", registry=r)
        self.webhook_events = Counter(
            f"{PREFIX}_webhook_events", "Webhook deliveries by result (sent, failed, dropped).",
            ["result"], registry=r,
        )
        self.script_runs = Counter(
            f"{PREFIX}_script_runs", "User script runs by script kind and result (ok, failed).",
            ["script", "result"], registry=r,
        )
        self.uploads = Counter(
            f"{PREFIX}_uploads", "Uploads to publishing targets by target kind and result (ok, failed).",
            ["target", "result"], registry=r,
        )
        self.upload_duration = Histogram(
            f"{PREFIX}_upload_duration_seconds", "Time one upload to a publishing target took.",
            ["target"], buckets=SLOW_BUCKETS, registry=r,
        )
        self.state.state(str(TrainerState.STARTING))

    def describe_model(self, **labels: str) -> None:
        """Add model details (family, type, job id) to the build info metric."""
        self.info.info({"version": __version__, **{k: str(v) for k, v in labels.items() if v is not None}})

    def observe_state(self, state: TrainerState) -> None:
        self.state.state(str(TrainerState(state)))

    def observe_step(self, report: StepReport) -> None:
        self.step.set(report.step)
        if report.max_steps > 0:
            self.max_steps.set(report.max_steps)
        self.epoch.set(report.epoch)
        self.loss.labels(component="total").set(report.loss)
        for name, value in report.loss_components.items():
            if name == EVAL_LOSS:
                self.eval_loss.set(value)
            elif eval_dataset_of(name) is not None:
                self.eval_dataset_loss.labels(dataset=eval_dataset_of(name)).set(value)
            else:
                self.loss.labels(component=name).set(value)
        for group, value in report.learning_rates.items():
            self.learning_rate.labels(param_group=str(group)).set(value)
        if report.samples_per_second is not None:
            self.samples_per_second.set(report.samples_per_second)
        if report.seconds_per_step is not None:
            self.step_duration.observe(report.seconds_per_step)
        if report.data_wait_seconds is not None and report.data_wait_seconds > 0:
            self.data_wait.inc(report.data_wait_seconds)
        if report.grad_norm is not None:
            self.grad_norm.set(report.grad_norm)
        if report.gpu_memory_allocated_bytes is not None:
            self.gpu_memory_allocated.set(report.gpu_memory_allocated_bytes)
        if report.gpu_memory_peak_bytes is not None:
            self.gpu_memory_peak.set(report.gpu_memory_peak_bytes)

    def observe_checkpoint(self, info: CheckpointInfo, seconds: float, unix_time: float) -> None:
        self.checkpoint_duration.observe(seconds)
        if info.complete:
            self.last_checkpoint_step.set(info.step)
            self.last_checkpoint_time.set(unix_time)

    def observe_validation(self, seconds: float, images: int, scores: dict[str, float] | None = None) -> None:
        """One validation round: its duration, images and CLIP scores (``clip/mean``, ``clip/prompt/<name>``)."""
        self.validation_duration.observe(seconds)
        if images:
            self.validation_images.inc(images)
        if not scores:
            return
        self.clip_score.clear()  # prompts of an earlier round that are gone now
        for tag, value in scores.items():
            if tag.startswith(CLIP_PROMPT_PREFIX):
                self.clip_score.labels(prompt=tag[len(CLIP_PROMPT_PREFIX):]).set(value)
            elif tag == CLIP_MEAN:
                self.clip_score_mean.set(value)

    def observe_error(self) -> None:
        self.errors.inc()

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
