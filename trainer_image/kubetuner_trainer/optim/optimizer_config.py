"""Strict parsing of ``--optimizer_config`` ("key=value,key2=value2") into keyword arguments.

Values are Python-like literals: integers, floats (``1e-3``), booleans (``true``/``false``),
``none``, tuples (``betas=(0.9,0.99)``) and, only where the optimizer's own default is a
string, bare words. Nothing is evaluated; a value that fits none of these is refused.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping
from typing import Any

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_INTEGER = re.compile(r"^[+-]?\d+$")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TRUE = {"true", "yes", "on"}
_FALSE = {"false", "no", "off"}
_NONE = {"none", "null"}


class OptimizerConfigError(ValueError):
    """``--optimizer_config`` does not parse or names a key the optimizer does not take."""


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside parentheses or brackets."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
            if depth < 0:
                raise OptimizerConfigError(f"optimizer_config {text!r}: unbalanced {char!r}")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise OptimizerConfigError(f"optimizer_config {text!r}: unbalanced parentheses")
    parts.append("".join(current))
    return parts


def parse_scalar(text: str) -> Any:
    """One literal: number, bool, None, tuple of literals; anything else stays a ``str``."""
    word = text.strip()
    if not word:
        raise OptimizerConfigError("empty value")
    lowered = word.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    if lowered in _NONE:
        return None
    if lowered in {"inf", "+inf", "infinity"}:
        return math.inf
    if _INTEGER.match(word):
        return int(word)
    if _NUMBER.match(word):
        return float(word)
    if word[0] in "([":
        closing = ")" if word[0] == "(" else "]"
        if word[-1] != closing:
            raise OptimizerConfigError(f"{word!r}: a tuple must end with {closing!r}")
        inner = word[1:-1].strip()
        if not inner:
            return ()
        items = _split_top_level(inner)
        if items and not items[-1].strip():
            items = items[:-1]  # trailing comma: "(0.9,)"
        return tuple(parse_scalar(item) for item in items)
    return word


def parse_optimizer_config(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``"d_coef=0.1,betas=(0.9,0.99)"`` → ``{"d_coef": 0.1, "betas": (0.9, 0.99)}``.

    A mapping (e.g. from a JSON config) is accepted as-is, with string values parsed the
    same way. Raises OptimizerConfigError naming the bad entry.
    """
    if text is None:
        return {}
    if isinstance(text, Mapping):
        result = {}
        for key, value in text.items():
            _check_key(str(key), str(text))
            result[str(key)] = parse_scalar(value) if isinstance(value, str) else value
        return result
    result = {}
    for entry in _split_top_level(text):
        entry = entry.strip()
        if not entry:
            continue
        if "=" not in entry:
            raise OptimizerConfigError(
                f"optimizer_config entry {entry!r} has no '='; write key=value pairs separated by commas"
            )
        key, raw = (part.strip() for part in entry.split("=", 1))
        _check_key(key, text)
        if key in result:
            raise OptimizerConfigError(f"optimizer_config sets {key!r} twice")
        try:
            result[key] = parse_scalar(raw)
        except OptimizerConfigError as error:
            raise OptimizerConfigError(f"optimizer_config {key}: {error}") from None
    return result


def _check_key(key: str, text: str) -> None:
    if not _KEY.match(key):
        raise OptimizerConfigError(f"optimizer_config {text!r}: {key!r} is not a valid key name")


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, tuple):
        return f"a tuple of {len(value)} values"
    if isinstance(value, str):
        return "a word"
    return type(value).__name__


def _fits(value: Any, default: Any) -> bool:
    """Whether a parsed value may replace ``default`` (the optimizer's own default)."""
    if default is inspect.Parameter.empty or default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int | float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, tuple):
        return (
            isinstance(value, tuple)
            and len(value) == len(default)
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        )
    if isinstance(default, str):
        return isinstance(value, str)
    return True


def check_against(
    optimizer: str,
    overrides: Mapping[str, Any],
    defaults: Mapping[str, Any],
    integer_keys: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Refuse keys the optimizer does not take and values whose kind differs from its default.

    ``defaults`` maps every accepted keyword to the optimizer's own default
    (``inspect.Parameter.empty`` when it has none). Returns the overrides with ints
    widened to floats where the default is a float.
    """
    allowed = sorted(defaults)
    checked: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in defaults:
            raise OptimizerConfigError(
                f"optimizer_config key {key!r} is not accepted by optimizer {optimizer!r}; "
                f"allowed keys: {', '.join(allowed)}"
            )
        default = defaults[key]
        if isinstance(value, str) and not isinstance(default, str):
            raise OptimizerConfigError(
                f"optimizer_config {key}={value!r} for {optimizer!r}: not a number, boolean, none or tuple"
            )
        if not _fits(value, default):
            raise OptimizerConfigError(
                f"optimizer_config {key}={value!r} for {optimizer!r}: expected {_describe(default)} "
                f"like the default {default!r}, got {_describe(value)}"
            )
        if key in integer_keys and isinstance(value, float):
            if not value.is_integer():
                raise OptimizerConfigError(f"optimizer_config {key}={value!r} for {optimizer!r}: expected an integer")
            value = int(value)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(default, tuple):
            value = tuple(float(v) for v in value)
        checked[key] = value
    return checked
