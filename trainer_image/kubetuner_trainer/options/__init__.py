"""Trainer options: the single source of truth for the CLI, config files, CRD schema and docs."""

from .model import Option, ValueProblem, parse_bool, parse_json_value
from .registry import Registry, get_registry, normalize_key

__all__ = [
    "Option",
    "Registry",
    "ValueProblem",
    "get_registry",
    "normalize_key",
    "parse_bool",
    "parse_json_value",
]
