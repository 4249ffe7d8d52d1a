"""Configuration problems, reported all at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_REDACT_HINTS = ("secret", "token", "password", "api_key", "access_key")


def _shown(option: str, value: Any) -> str:
    if any(hint in option.lower() for hint in _REDACT_HINTS):
        return "'***'"
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the configuration: which option, what value, what is allowed."""

    option: str
    value: Any
    message: str

    def __str__(self) -> str:
        if self.value is _MISSING:
            return f"--{self.option}: {self.message}"
        return f"--{self.option}={_shown(self.option, self.value)}: {self.message}"


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()
MISSING = _MISSING


class ConfigError(Exception):
    """The configuration cannot be used. Permanent: retrying with the same input cannot help."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        count = len(self.problems)
        super().__init__(f"{count} configuration problem{'s' if count != 1 else ''}:\n{lines}")
