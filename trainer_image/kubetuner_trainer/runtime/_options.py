"""Reading options from a config without depending on which options the catalog holds yet."""

from __future__ import annotations

from typing import Any

from ..options import get_registry
from ..options.model import ValueProblem, parse_json_value

_CATALOG: Any = object()


def option(cfg: Any, name: str, default: Any = _CATALOG) -> Any:
    """The resolved value of ``name``; when ``cfg`` lacks it or it is unset, ``default`` if given,
    else the option catalog's default (the one home of every default)."""
    try:
        value = cfg[name]
    except (KeyError, TypeError, AttributeError):
        value = getattr(cfg, name, None)
    if value is not None:
        return value
    if default is _CATALOG:
        return get_registry().get(name).default if name in get_registry() else None
    return default


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


def json_entries(value: Any, option_name: str, error: type[Exception]) -> list[Any]:
    """A JSON-valued option holding one object or a list of them, as a list (empty when unset).

    ``error`` is raised, naming ``option_name``, when the value does not parse or is not of that shape.
    """
    if value is None or value == "":
        return []
    try:
        parsed = parse_json_value(value)
    except ValueProblem as problem:
        raise error(f"{option_name}: {problem}") from None
    entries = [parsed] if isinstance(parsed, dict) else parsed
    if not isinstance(entries, list):
        raise error(f"{option_name} must be a JSON object or a list of objects")
    return entries
