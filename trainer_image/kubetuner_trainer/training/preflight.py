"""Configuration checks that need the torch stack, run before anything is loaded.

``check(cfg)`` gathers the core problems below plus every area's ``preflight_problems(cfg)``
(``kubetuner_trainer.optim``, ``.data``, ``.runtime`` where they define one) and raises one
:class:`ConfigError` listing them all. ``all_warnings(cfg)`` gathers the areas'
``preflight_warnings(cfg)``: options that have no effect, which do not stop a start.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from ..config import ConfigError, Problem
from ..files import writable_problem

log = logging.getLogger(__name__)

AREAS = ("kubetuner_trainer.optim", "kubetuner_trainer.data", "kubetuner_trainer.runtime",
         "kubetuner_trainer.acceleration")


def core_problems(cfg: Any) -> list[Problem]:
    """Problems with the model, loop and checkpoint options."""
    from ..models import family_class, implemented_families

    problems: list[Problem] = []
    family = cfg.model_family
    try:
        cls = family_class(family)
    except ValueError:
        cls = None
        problems.append(Problem("model_family", family, f"is not supported; supported: "
                                                        f"{', '.join(implemented_families())}"))
    if cls is not None:
        problems += _family_problems(cls, cfg)
    if cfg.output_dir and (why := writable_problem(cfg.output_dir)):
        problems.append(Problem("output_dir", cfg.output_dir, why))
    location = cfg.pretrained_model_name_or_path
    if location and _looks_local(location) and not Path(location).exists():
        problems.append(Problem("pretrained_model_name_or_path", location, "no such file or folder"))
    from ..models.quantization import quantization_problems
    from .precision import precision_problems

    problems += precision_problems(cfg)
    problems += quantization_problems(cfg, cls)
    if not (cfg.max_train_steps or 0) > 0 and not (cfg.num_train_epochs or 0) > 0:
        problems.append(Problem("max_train_steps", cfg.max_train_steps,
                                "set max_train_steps or num_train_epochs to a positive number"))
    if cfg.ignore_final_epochs and not (cfg.max_train_steps or 0) > 0:
        problems.append(Problem("ignore_final_epochs", True, "needs max_train_steps to know when to stop"))
    if cfg.model_type == "full":
        if cfg.use_dora:
            problems.append(Problem("use_dora", True, "applies to model_type=lora only"))
        if cfg.lora_format == "comfyui":
            problems.append(Problem("lora_format", "comfyui", "applies to model_type=lora only"))
        if cfg.init_lora:
            problems.append(Problem("init_lora", cfg.init_lora, "applies to model_type=lora only"))
    if cfg.lora_init_type == "loftq":
        problems.append(Problem("lora_init_type", "loftq",
                                "is not supported (it quantizes the base model); "
                                "allowed: default, gaussian, olora, pissa"))
    if cfg.init_lora and _looks_local(cfg.init_lora) and not Path(cfg.init_lora).exists():
        problems.append(Problem("init_lora", cfg.init_lora, "no such LoRA file"))
    problems += _timestep_problems(cfg)
    if cfg.model_type == "lora" and cfg.lora_type == "lycoris":
        from .lycoris import lycoris_problems

        problems += [Problem(*problem) for problem in lycoris_problems(cfg)]
    if cfg.model_type == "lora" and cfg.peft_lora_mode == "singlora":
        from .singlora import singlora_problems

        problems += [Problem(*problem) for problem in singlora_problems(cfg)]
    if (cfg.loss_type or "l2") != "l2" and cfg.huber_c is not None and not 0 < cfg.huber_c <= 1:
        problems.append(Problem("huber_c", cfg.huber_c, "must be in (0, 1]"))
    if cfg.use_soft_min_snr and not cfg.snr_gamma:
        problems.append(Problem("use_soft_min_snr", True, "needs snr_gamma (the soft clamp's γ)"))
    if cfg.peft_lora_target_modules not in (None, "", []):
        from .lora import parse_target_modules

        try:
            parse_target_modules(cfg.peft_lora_target_modules, ())
        except ValueError as exc:
            problems.append(Problem("peft_lora_target_modules", cfg.peft_lora_target_modules, str(exc)))
    return problems


def _family_problems(cls: Any, cfg: Any) -> list[Problem]:
    """Options that must fit the chosen family: flavour, prediction type, denoiser location, its own rules."""
    from ..models.family import DENOISER_LOCATION_OPTIONS

    problems: list[Problem] = []
    family = cls.family
    if cfg.model_flavour and cfg.model_flavour not in cls.flavours:
        problems.append(Problem("model_flavour", cfg.model_flavour,
                                f"is not a {family} flavour; allowed: {', '.join(sorted(cls.flavours))}"))
    if cfg.prediction_type and cfg.prediction_type not in cls.prediction_types:
        problems.append(Problem("prediction_type", cfg.prediction_type,
                                f"is not supported by {family}; allowed: {', '.join(cls.prediction_types)}"))
    for denoiser, options in DENOISER_LOCATION_OPTIONS.items():
        if denoiser == cls.denoiser_name:
            continue
        for option in options:
            if _asks_for_something(cfg, option):
                problems.append(Problem(option, getattr(cfg, option),
                                        f"{family} has no {denoiser}; use "
                                        f"{' / '.join(DENOISER_LOCATION_OPTIONS[cls.denoiser_name])}"))
    if "flow_matching" in cls.prediction_types:
        from .objectives import flow_schedule_problems

        problems += flow_schedule_problems(cfg)
    from ..models.controlnet import controlnet_problems
    from .tread import tread_problems

    problems += tread_problems(cfg, cls)
    return problems + list(cls.config_problems(cfg)) + controlnet_problems(cls, cfg)


def _asks_for_something(cfg: Any, option: str) -> bool:
    """A value other than kubetuner's or SimpleTuner's default (which SimpleTuner's tools write out)."""
    from ..options import get_registry

    value = getattr(cfg, option, None)
    return bool(value) and not get_registry().get(option).is_inert(value)


#: options of the flow-matching timestep schedule (meaningless for the DDPM families)
FLOW_OPTIONS = ("flow_sigmoid_scale", "flow_use_uniform_schedule", "flow_use_beta_schedule",
                "flow_beta_schedule_alpha", "flow_beta_schedule_beta", "flow_schedule_shift",
                "flow_schedule_auto_shift", "flux_fast_schedule")


def _timestep_problems(cfg: Any) -> list[Problem]:
    from .timesteps import bias_weights, refiner_timestep_range

    problems = []
    if cfg.refiner_training:
        try:
            refiner_timestep_range(1000, float(cfg.refiner_training_strength),
                                   invert=bool(cfg.refiner_training_invert_schedule))
        except ValueError as exc:
            problems.append(Problem("refiner_training_strength", cfg.refiner_training_strength, str(exc)))
    strategy = cfg.timestep_bias_strategy
    if not strategy or strategy == "none":
        return problems

    try:
        bias_weights(1000, strategy,
                     multiplier=cfg.timestep_bias_multiplier,
                     portion=cfg.timestep_bias_portion,
                     begin=cfg.timestep_bias_begin,
                     end=cfg.timestep_bias_end)
    except ValueError as exc:
        problems.append(Problem("timestep_bias_strategy", strategy, str(exc)))
    return problems


def _looks_local(location: str) -> bool:
    return location.startswith(("/", "./", "../", "~")) or Path(location).suffix in (".safetensors", ".ckpt")


def all_problems(cfg: Any) -> list[Problem]:
    problems = core_problems(cfg)
    for module_name in AREAS:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            log.debug("preflight: %s not importable (%s)", module_name, exc)
            continue
        check = getattr(module, "preflight_problems", None)
        if callable(check):
            problems += list(check(cfg))
    return problems


def core_warnings(cfg: Any) -> list[Problem]:
    """Model options the chosen family ignores (SimpleTuner ignores them too: warned, not refused)."""
    from ..models import family_class

    try:
        cls = family_class(cfg.model_family)
    except ValueError:
        return []
    from ..models.controlnet import controlnet_warnings
    from ..models.quantization import quantization_warnings

    warnings = list(cls.config_warnings(cfg)) + quantization_warnings(cfg, cls) + controlnet_warnings(cfg)
    if "flow_matching" in cls.prediction_types:
        from .objectives import flow_schedule_warnings

        warnings += flow_schedule_warnings(cfg)
    else:
        warnings += [Problem(option, getattr(cfg, option), f"has no effect: {cls.family} trains with DDPM, not "
                                                           "flow matching")
                     for option in FLOW_OPTIONS
                     if hasattr(cfg, "is_set") and cfg.is_set(option) and _asks_for_something(cfg, option)]
    return warnings


def all_warnings(cfg: Any) -> list[Problem]:
    """Options that have no effect as configured: the family's and every area's ``preflight_warnings(cfg)``."""
    warnings: list[Problem] = core_warnings(cfg)
    for module_name in AREAS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found = getattr(module, "preflight_warnings", None)
        if callable(found):
            warnings += list(found(cfg))
    return warnings


def check(cfg: Any) -> None:
    """Raise :class:`ConfigError` with every problem found, or return quietly."""
    problems = all_problems(cfg)
    if problems:
        raise ConfigError(problems)
