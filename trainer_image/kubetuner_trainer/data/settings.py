"""The global (trainer-wide) options the data pipeline reads, gathered in one place.

Everything else in this package takes a ``DataSettings``; only ``settings_from_config`` knows how
the trainer's configuration object is shaped, so the config API can change in one spot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from kubetuner_trainer.config.errors import ConfigError, Problem


@dataclass(frozen=True)
class DataSettings:
    """Trainer-wide data options with the trainer's defaults."""

    data_backend_config: str | None = None
    model_family: str | None = None  # fills {model_family} in dataset entries
    resolution: float = 1024
    resolution_type: str = "pixel_area"
    caption_strategy: str = "filename"
    instance_prompt: str | None = None
    prepend_instance_prompt: bool = False
    only_instance_prompt: bool = False
    parquet_caption_column: str | None = None
    parquet_filename_column: str | None = None
    data_backend_sampling: str = "auto-weighting"
    allow_dataset_oversubscription: bool = False
    disable_bucket_pruning: bool = False
    aspect_bucket_alignment: int = 64
    aspect_bucket_rounding: int | None = None
    minimum_image_size: float | None = None
    maximum_image_size: float | None = None
    target_downsample_size: float | None = None
    max_upscale_threshold: float | None = None
    compress_disk_cache: bool = False
    vae_cache_scan_behaviour: str = "recreate"
    vae_cache_ondemand: bool = False
    vae_batch_size: int = 4
    dataloader_prefetch: bool = False
    dataloader_prefetch_qlen: int = 10
    delete_problematic_images: bool = False
    ignore_missing_files: bool = False
    caption_dropout_probability: float = 0.0
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    num_processes: int = 1
    seed: int = 0
    cache_dir: str | None = None
    cache_dir_vae: str | None = None
    cache_dir_text: str | None = None
    output_dir: str | None = None
    skip_file_discovery: str = ""
    preserve_data_backend_cache: bool = False
    aws_max_pool_connections: int = 128
    max_workers: int = 32
    write_batch_size: int = 64
    metadata_update_interval: float = 60.0
    debug_aspect_buckets: bool = False  # the four logging options: see debug_logging.py
    debug_dataset_loader: bool = False
    print_filenames: bool = False
    print_sampler_statistics: bool = False

    @property
    def effective_batch_size(self) -> int:
        """Samples consumed by one optimizer step across all processes."""
        return self.train_batch_size * self.num_processes * self.gradient_accumulation_steps

    @property
    def cache_root(self) -> str:
        """Local folder for metadata and default caches."""
        if self.cache_dir:
            return self.cache_dir
        if self.output_dir:
            return f"{self.output_dir.rstrip('/')}/cache"
        return "cache"

    def skips(self, stage: str) -> bool:
        """Whether ``--skip_file_discovery`` names ``stage`` (aspect, vae, text, metadata)."""
        return stage in {s.strip() for s in (self.skip_file_discovery or "").split(",") if s.strip()}


_NAMES = tuple(f.name for f in fields(DataSettings))

CHOICES: dict[str, tuple[Any, ...]] = {
    "resolution_type": ("pixel", "pixel_area", "area"),
    "caption_strategy": ("filename", "textfile", "instanceprompt", "instance_prompt", "parquet"),
    "data_backend_sampling": ("auto-weighting", "uniform"),
    "vae_cache_scan_behaviour": ("recreate", "sync"),
    "aspect_bucket_alignment": (8, 16, 24, 32, 64),
}
_POSITIVE = ("train_batch_size", "gradient_accumulation_steps", "num_processes", "vae_batch_size",
             "dataloader_prefetch_qlen", "aws_max_pool_connections", "max_workers", "write_batch_size", "resolution",
             "metadata_update_interval")


def check_settings(settings: DataSettings) -> list[Problem]:
    """Problems with the global data options (the trainer's config validates them too)."""
    problems = []
    for name, allowed in CHOICES.items():
        value = getattr(settings, name)
        if value not in allowed:
            problems.append(Problem(name, value, f"is not one of the allowed values: {', '.join(map(str, allowed))}"))
    for name in _POSITIVE:
        if getattr(settings, name) <= 0:
            problems.append(Problem(name, getattr(settings, name), "must be positive"))
    if not 0 <= settings.caption_dropout_probability <= 1:
        problems.append(Problem("caption_dropout_probability", settings.caption_dropout_probability,
                                "must be between 0 and 1"))
    return problems


def _read(cfg: Any, name: str) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name)
    try:
        return getattr(cfg, name)
    except (AttributeError, KeyError):
        return None


def settings_from_config(cfg: Any) -> DataSettings:
    """Build ``DataSettings`` from a ``TrainerConfig`` (or any mapping of option values).

    Options that are unset (``None``) or unknown to the config keep the data pipeline's default.
    Raises ``ConfigError`` for values outside what the pipeline accepts.
    """
    values = {}
    for name in _NAMES:
        value = _read(cfg, name)
        if value is not None:
            values[name] = value
    settings = DataSettings(**values)
    problems = check_settings(settings)
    if problems:
        raise ConfigError(problems)
    return settings
