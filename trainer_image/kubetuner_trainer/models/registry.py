"""``--model_family`` (+ ``--model_flavour``) → the adapter class for that family."""

from __future__ import annotations

from typing import Any

from .base import ModelAdapter
from .kolors import KolorsAdapter
from .sd1x import SD1xAdapter
from .sd2x import SD2xAdapter
from .sdxl import SDXLAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    cls.family: cls for cls in (SD1xAdapter, SD2xAdapter, SDXLAdapter, KolorsAdapter)
}


def adapter_class(family: str, flavour: str | None = None) -> type[ModelAdapter]:
    """The adapter for a family; an unknown family or flavour names the allowed values."""
    try:
        cls = ADAPTERS[family]
    except KeyError:
        raise ValueError(
            f"model_family {family!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        ) from None
    if flavour and flavour not in cls.flavours:
        raise ValueError(
            f"model_flavour {flavour!r} is not known for model_family {family}; "
            f"allowed: {', '.join(sorted(cls.flavours))}"
        )
    return cls


def load_adapter(cfg: Any, **kwargs: Any) -> ModelAdapter:
    """Resolve the adapter class from the config and load the model."""
    return adapter_class(cfg.model_family, cfg.model_flavour).load(cfg, **kwargs)
