"""The trainer's data pipeline: datasets on disk and S3, captions, aspect buckets, caches, sampler.

Entry point: ``build_training_data(cfg, encoders, rank=, world_size=)``. Importing this package is cheap;
torch-heavy modules load when the pipeline is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .batch import Batch
    from .cache import Encoders
    from .pipeline import TrainingData, build_training_data

__all__ = ["Batch", "Encoders", "TrainingData", "build_training_data", "preflight_problems"]


def preflight_problems(cfg: Any) -> list:
    """Problems with the data options and the dataset list, dataset locations that do not exist and
    cache folders that cannot be written.

    Reads no image: the dataset list, then one stat (local) or one listing request (S3) per dataset.
    """
    from kubetuner_trainer.config.errors import ConfigError

    from .dataset_config import load_dataset_config
    from .eval_split import split_eval_problems
    from .locations import cache_location_problems, location_problems
    from .settings import settings_from_config

    try:
        settings = settings_from_config(cfg)
        if settings.data_backend_config:
            config = load_dataset_config(settings.data_backend_config, settings)
            return (split_eval_problems(cfg, config) or family_conditioning_problems(cfg, config)
                    or location_problems(config, settings) + cache_location_problems(config, settings))
    except ConfigError as error:
        return list(error.problems)
    return []


def family_requires_conditioning(cfg: Any) -> bool:
    """Whether the configured family and flavour train on conditioning inputs (``ModelFamily.requires_conditioning``;
    validation then renders ``--num_eval_images`` dataset samples). False when the family is unset or not built."""
    from kubetuner_trainer.models.registry import family_class, implemented_families

    name = getattr(cfg, "model_family", None)
    return name in implemented_families() and family_class(name).requires_conditioning(cfg)


def family_conditioning_problems(cfg: Any, config: Any) -> list:
    """The model family's rules on conditioning datasets (``ModelFamily.requires_conditioning`` and
    ``conditioning_types``); none when the family is unset or not built."""
    from kubetuner_trainer.models.registry import family_class, implemented_families

    from .conditioning import conditioning_problems

    name = getattr(cfg, "model_family", None)
    if name not in implemented_families():
        return []
    family = family_class(name).for_flavour(getattr(cfg, "model_flavour", None))
    if getattr(cfg, "validation_using_datasets", False) and not family.requires_conditioning(cfg) \
            and family.img2img_pipeline_class is None:
        from kubetuner_trainer.config.errors import Problem

        able = sorted(f for f in implemented_families() if family_class(f).img2img_pipeline_class)
        return [Problem("validation_using_datasets", True, f"renders through an image-to-image pipeline, which "
                        f"model_family {name} does not have; families that have one: {', '.join(able)}")]
    return conditioning_problems(config, family.requires_conditioning(cfg), family.conditioning_types(cfg), name,
                                 getattr(cfg, "model_flavour", None), getattr(cfg, "eval_dataset_id", None))


def __getattr__(name: str) -> Any:
    if name == "Batch":
        from .batch import Batch

        return Batch
    if name == "Encoders":
        from .cache import Encoders

        return Encoders
    if name in ("TrainingData", "build_training_data"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
