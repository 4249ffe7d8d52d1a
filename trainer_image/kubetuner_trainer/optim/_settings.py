"""Reading optimizer/schedule/EMA options from a resolved trainer config.

``cfg`` is a ``kubetuner_trainer.config.TrainerConfig`` (every option resolved, defaults
filled in from the option catalog, the one home of every default). Plain objects used in
tests may lack options; those read the catalog's default too.
"""

from __future__ import annotations

from typing import Any

from ..options import get_registry


def setting(cfg: Any, name: str) -> Any:
    """The resolved value of option ``name``; the catalog's default when ``cfg`` lacks it or it is unset."""
    try:
        value = getattr(cfg, name)
    except (AttributeError, KeyError):
        value = None
    return get_registry().get(name).default if value is None else value


def asks_for_something(cfg: Any, name: str) -> bool:
    """Whether the user gave ``name`` a value other than its default (kubetuner's or SimpleTuner's).

    SimpleTuner's tools write every default out; a default written out asks for nothing, so it
    never earns a "has no effect" warning.
    """
    return explicitly_set(cfg, name) and not get_registry().get(name).is_inert(setting(cfg, name))


def explicitly_set(cfg: Any, name: str) -> bool:
    """Whether the user gave ``name`` (file, env or CLI) rather than leaving the default."""
    is_set = getattr(cfg, "is_set", None)
    if callable(is_set):
        try:
            return bool(is_set(name))
        except (KeyError, AttributeError):
            return False
    return hasattr(cfg, name)
