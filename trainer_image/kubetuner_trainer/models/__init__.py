"""Model-family adapters: one module per family behind :class:`ModelAdapter`."""

from .base import AdapterEncoders, Components, ModelAdapter
from .registry import ADAPTERS, adapter_class, load_adapter

__all__ = ["ADAPTERS", "AdapterEncoders", "Components", "ModelAdapter", "adapter_class", "load_adapter"]
