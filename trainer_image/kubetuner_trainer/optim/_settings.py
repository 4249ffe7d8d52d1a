"""Reading optimizer/schedule/EMA options from a resolved trainer config.

``cfg`` is a ``kubetuner_trainer.config.TrainerConfig`` (every option resolved, defaults
filled in). Many catalog options default to "unset" (None); the values below are what an unset
option means here (SimpleTuner's documented defaults).
"""

from __future__ import annotations

from typing import Any

FALLBACK_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-4,
    "optimizer_config": None,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "optimizer_beta1": None,
    "optimizer_beta2": None,
    "adam_weight_decay": 1e-2,
    "adam_epsilon": 1e-8,
    "prodigy_steps": None,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 0,
    "lr_end": 4e-7,
    "lr_power": 0.8,
    "lr_num_cycles": 1,
    "lr_scale": False,
    "lr_scale_sqrt": False,
    "train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "num_processes": 1,
    "seed": None,
    "use_ema": False,
    "ema_device": "cpu",
    "ema_cpu_only": False,
    "ema_foreach_disable": False,
    "ema_update_interval": 1,
    "ema_decay": 0.995,
}


def setting(cfg: Any, name: str) -> Any:
    """The resolved value of option ``name``; an unset (None) option gets its documented default."""
    try:
        value = getattr(cfg, name)
    except (AttributeError, KeyError):
        if name in FALLBACK_DEFAULTS:
            return FALLBACK_DEFAULTS[name]
        raise
    if value is None:
        return FALLBACK_DEFAULTS.get(name)
    return value


def explicitly_set(cfg: Any, name: str) -> bool:
    """Whether the user gave ``name`` (file, env or CLI) rather than leaving the default."""
    is_set = getattr(cfg, "is_set", None)
    if callable(is_set):
        try:
            return bool(is_set(name))
        except (KeyError, AttributeError):
            return False
    return hasattr(cfg, name)
