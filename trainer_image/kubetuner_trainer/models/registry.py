"""The implemented model families: one module per family in ``models/families/``.

This is the single list of families. A module ``families/<name>.py`` exporting ``FAMILY`` (a
:class:`~kubetuner_trainer.models.family.ModelFamily` subclass whose ``family`` is ``<name>``)
makes ``--model_family <name>`` implemented: the option registry, the tiny-model builder, the
benchmark and preflight all read :func:`implemented_families`. Listing needs no torch (the
operator image imports the option registry); the classes are imported on first use.
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .family import ModelFamily

FAMILIES_PACKAGE = "kubetuner_trainer.models.families"


@cache
def implemented_families() -> tuple[str, ...]:
    """Names of the implemented families, sorted (module names under ``models/families/``)."""
    folder = resources.files(FAMILIES_PACKAGE)
    names = (entry.name[:-3] for entry in folder.iterdir() if entry.name.endswith(".py"))
    return tuple(sorted(n for n in names if not n.startswith("_")))


def family_class(family: str, flavour: str | None = None) -> type[ModelFamily]:
    """The family class; an unknown family or flavour raises ``ValueError`` naming the allowed values."""
    if family not in implemented_families():
        raise ValueError(
            f"model_family {family!r} is not supported; supported: {', '.join(implemented_families())}"
        )
    cls: type[ModelFamily] = importlib.import_module(f"{FAMILIES_PACKAGE}.{family}").FAMILY
    if flavour and flavour not in cls.flavours:
        raise ValueError(
            f"model_flavour {flavour!r} is not known for model_family {family}; "
            f"allowed: {', '.join(sorted(cls.flavours))}"
        )
    return cls


def load_family(cfg: Any, **kwargs: Any) -> ModelFamily:
    """Resolve the family class from the config and load the model (see ``ModelFamily.load``)."""
    return family_class(cfg.model_family, cfg.model_flavour).load(cfg, **kwargs)
