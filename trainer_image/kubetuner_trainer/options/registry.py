"""The option registry: every trainer option, looked up by name or alias.

The catalog (``catalog.py``) says what each option is; the files in ``implemented/``
say which of them the trainer honours today. Each feature area owns one such file, so
flipping a flag never touches the catalog. A line ``name`` marks the whole option as
implemented, ``name=value`` marks only that choice. The implemented ``model_family`` choices
are the model registry's families (``models/registry.implemented_families``), never listed here.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from dataclasses import replace
from functools import cache
from importlib import resources

from .model import Option


def normalize_key(key: str) -> str:
    """``--learning-rate`` / ``--learning_rate`` / ``learning_rate`` → ``learning_rate``."""
    return key.strip().lstrip("-").replace("-", "_")


class Registry:
    """An ordered, immutable collection of options with alias lookup."""

    def __init__(self, options: Iterable[Option]):
        self._options: dict[str, Option] = {}
        self._lookup: dict[str, str] = {}
        for option in options:
            if option.name in self._options:
                raise ValueError(f"option {option.name!r} is declared twice")
            self._options[option.name] = option
            for key in (option.name, *option.aliases):
                if key in self._lookup:
                    raise ValueError(f"name {key!r} is used by two options")
                self._lookup[key] = option.name

    def __iter__(self) -> Iterator[Option]:
        return iter(self._options.values())

    def __len__(self) -> int:
        return len(self._options)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and normalize_key(key) in self._lookup

    def get(self, key: str) -> Option:
        """The option for a name or alias (leading dashes allowed); KeyError when unknown."""
        return self._options[self._lookup[normalize_key(key)]]

    def canonical(self, key: str) -> str | None:
        return self._lookup.get(normalize_key(key))

    def suggest(self, key: str) -> str | None:
        """The closest known option name, for "did you mean" messages."""
        matches = difflib.get_close_matches(normalize_key(key), list(self._lookup), n=1, cutoff=0.75)
        return self._lookup[matches[0]] if matches else None

    def groups(self) -> dict[str, list[Option]]:
        grouped: dict[str, list[Option]] = {}
        for option in self:
            grouped.setdefault(option.group, []).append(option)
        return grouped


def _implemented_marks() -> tuple[set[str], dict[str, set[str]]]:
    whole: set[str] = set()
    partial: dict[str, set[str]] = {}
    folder = resources.files(__package__) / "implemented"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".txt"):
            continue
        for raw in entry.read_text(encoding="utf-8").splitlines():
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if "=" in line:
                name, value = (part.strip() for part in line.split("=", 1))
                partial.setdefault(normalize_key(name), set()).add(value)
            else:
                whole.add(normalize_key(line))
    # the implemented model families come from the model registry (one module per family)
    from ..models.registry import implemented_families

    partial.setdefault("model_family", set()).update(implemented_families())
    return whole, partial


def build_registry(options: Iterable[Option]) -> Registry:
    """Attach the implemented marks to the catalog's options."""
    whole, partial = _implemented_marks()
    marked = []
    known = set()
    for option in options:
        known.add(option.name)
        if option.name in whole:
            option = replace(option, implemented=True)
        elif option.name in partial:
            values = partial[option.name]
            typed = {option.parse(v) for v in values}
            option = replace(option, implemented=True, implemented_choices=frozenset(typed))
        marked.append(option)
    unknown = (whole | set(partial)) - known
    if unknown:
        raise ValueError(f"implemented/*.txt names options the catalog lacks: {sorted(unknown)}")
    return Registry(marked)


@cache
def get_registry() -> Registry:
    """The process-wide registry (built once)."""
    from .catalog import OPTIONS

    return build_registry(OPTIONS)
