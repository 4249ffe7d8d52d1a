"""The global (trainer-wide) options the data pipeline reads, gathered in one place.

Everything else in this package takes a ``DataSettings``; only ``settings_from_config`` knows how
the trainer's configuration object is shaped, so the config API can change in one spot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from kubetuner_trainer.config.errors import ConfigError, Problem
from kubetuner_trainer.options import get_registry


def _default(name: str) -> Any:
    """The catalog's default of option ``name``."""
    return get_registry().get(name).default


@dataclass(frozen=True)
class DataSettings:
    """Trainer-wide data options; each default is the option catalog's (the one home of defaults)."""

    data_backend_config: str | None = _default("data_backend_config")
    model_family: str | None = _default("model_family")  # fills {model_family} in dataset entries
    resolution: float = _default("resolution")
    resolution_type: str = _default("resolution_type")
    caption_strategy: str = _default("caption_strategy")
    instance_prompt: str | None = _default("instance_prompt")
    prepend_instance_prompt: bool = _default("prepend_instance_prompt")
    only_instance_prompt: bool = _default("only_instance_prompt")
    parquet_caption_column: str | None = _default("parquet_caption_column")
    parquet_filename_column: str | None = _default("parquet_filename_column")
    data_backend_sampling: str = _default("data_backend_sampling")
    conditioning_multidataset_sampling: str = _default("conditioning_multidataset_sampling")
    allow_dataset_oversubscription: bool = _default("allow_dataset_oversubscription")
    disable_bucket_pruning: bool = _default("disable_bucket_pruning")
    aspect_bucket_alignment: int = _default("aspect_bucket_alignment")
    aspect_bucket_rounding: int | None = _default("aspect_bucket_rounding")
    minimum_image_size: float | None = _default("minimum_image_size")
    maximum_image_size: float | None = _default("maximum_image_size")
    target_downsample_size: float | None = _default("target_downsample_size")
    max_upscale_threshold: float | None = _default("max_upscale_threshold")
    compress_disk_cache: bool = _default("compress_disk_cache")
    vae_cache_scan_behaviour: str = _default("vae_cache_scan_behaviour")
    vae_cache_ondemand: bool = _default("vae_cache_ondemand")
    vae_batch_size: int = _default("vae_batch_size")
    dataloader_prefetch: bool = _default("dataloader_prefetch")
    dataloader_prefetch_qlen: int = _default("dataloader_prefetch_qlen")
    delete_problematic_images: bool = _default("delete_problematic_images")
    ignore_missing_files: bool = _default("ignore_missing_files")
    caption_dropout_probability: float = _default("caption_dropout_probability")
    train_batch_size: int = _default("train_batch_size")
    gradient_accumulation_steps: int = _default("gradient_accumulation_steps")
    num_processes: int = _default("num_processes")
    seed: int = _default("seed")
    framerate: int | None = _default("framerate")  # video clips are resampled to it (data/video.py)
    cache_dir: str | None = _default("cache_dir")
    cache_dir_vae: str | None = _default("cache_dir_vae")
    cache_dir_text: str | None = _default("cache_dir_text")
    output_dir: str | None = _default("output_dir")
    skip_file_discovery: str = _default("skip_file_discovery")
    preserve_data_backend_cache: bool = _default("preserve_data_backend_cache")
    aws_max_pool_connections: int = _default("aws_max_pool_connections")
    max_workers: int = _default("max_workers")
    write_batch_size: int = _default("write_batch_size")
    metadata_update_interval: float = _default("metadata_update_interval")
    debug_aspect_buckets: bool = _default("debug_aspect_buckets")  # the four logging options: see debug_logging.py
    debug_dataset_loader: bool = _default("debug_dataset_loader")
    print_filenames: bool = _default("print_filenames")
    print_sampler_statistics: bool = _default("print_sampler_statistics")

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
    "conditioning_multidataset_sampling": ("combined", "random"),
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
