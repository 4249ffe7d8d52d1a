"""Reading options from a config without depending on which options the catalog holds yet."""

from __future__ import annotations

from typing import Any


def option(cfg: Any, name: str, default: Any = None) -> Any:
    """The resolved value of ``name``, or ``default`` when the option is unknown or unset."""
    try:
        value = cfg[name]
    except (KeyError, TypeError, AttributeError):
        value = getattr(cfg, name, None)
    return default if value is None else value


def env_value(cfg: Any, name: str, default: Any = None) -> Any:
    """A value of ``cfg.env`` (``log_level``, ``job_id``), or ``default``."""
    env = getattr(cfg, "env", None)
    if env is None:
        return default
    value = env.get(name) if isinstance(env, dict) else getattr(env, name, None)
    return default if value is None else value


def all_options(cfg: Any) -> dict[str, Any]:
    """Every resolved option as a plain dict (empty when the config cannot list them)."""
    to_dict = getattr(cfg, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    if isinstance(cfg, dict):
        return dict(cfg)
    return dict(vars(cfg)) if hasattr(cfg, "__dict__") else {}
