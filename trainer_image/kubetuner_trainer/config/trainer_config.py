"""The validated, resolved trainer configuration: every option with a value and a source."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..options import Option, Registry, ValueProblem, get_registry
from .errors import MISSING, ConfigError, Problem

DEFAULT = "default"
SECRET_HINTS = ("secret", "token", "password", "api_key", "apikey", "access_key", "authorization")


@dataclass(frozen=True)
class EnvSettings:
    """Settings that SimpleTuner reads from the environment (``config.env``), not from options."""

    log_level: str = "INFO"
    job_id: str | None = None
    accelerate_extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Layer:
    """Raw values from one place (a file, the environment, the command line)."""

    source: str
    values: Mapping[str, Any]
    seen_as: Mapping[str, str] = field(default_factory=dict)  # canonical -> key as the user wrote it


class TrainerConfig:
    """Resolved values for every option. Attribute access: ``cfg.learning_rate``."""

    __slots__ = ("_registry", "_sources", "_values", "env")

    def __init__(self, values: dict[str, Any], sources: dict[str, str], env: EnvSettings, registry: Registry):
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_sources", sources)
        object.__setattr__(self, "env", env)
        object.__setattr__(self, "_registry", registry)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            hint = self._registry.suggest(name)
            suffix = f"; did you mean {hint!r}?" if hint else ""
            raise AttributeError(f"no trainer option named {name!r}{suffix}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("TrainerConfig is immutable; use cfg.replace(...)")

    def __getitem__(self, key: str) -> Any:
        name = self._registry.canonical(key)
        if name is None:
            raise KeyError(key)
        return self._values[name]

    def __contains__(self, key: object) -> bool:
        return key in self._registry

    def __repr__(self) -> str:
        set_items = {k: v for k, v in self._values.items() if self._sources[k] != DEFAULT}
        return f"TrainerConfig({redact(set_items)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrainerConfig) and self._values == other._values and self.env == other.env

    __hash__ = None  # type: ignore[assignment]

    @property
    def registry(self) -> Registry:
        return self._registry

    def get(self, key: str, default: Any = None) -> Any:
        name = self._registry.canonical(key)
        return self._values.get(name, default) if name else default

    def is_set(self, key: str) -> bool:
        """True when the value came from the user (file, env or CLI), not from the default."""
        return self.source(key) != DEFAULT

    def source(self, key: str) -> str:
        name = self._registry.canonical(key)
        if name is None:
            raise KeyError(key)
        return self._sources[name]

    def to_dict(self, *, only_set: bool = False) -> dict[str, Any]:
        """Plain values by canonical name; JSON-serialisable. Unset (None) options are left out."""
        return {
            name: value
            for name, value in self._values.items()
            if value is not None and (not only_set or self._sources[name] != DEFAULT)
        }

    def to_json(self, *, only_set: bool = True) -> str:
        return json.dumps(self.to_dict(only_set=only_set), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> TrainerConfig:
        """A new, re-validated config with some values changed (source ``override``)."""
        layers = [
            Layer("previous", {k: v for k, v in self._values.items() if self._sources[k] != DEFAULT}),
            Layer("override", changes),
        ]
        merged = resolve(layers, registry=self._registry, env=self.env, require=False)
        sources = dict(merged._sources)
        for name, src in self._sources.items():
            if sources.get(name) == "previous":
                sources[name] = src
        object.__setattr__(merged, "_sources", sources)
        return merged

    @classmethod
    def from_mapping(
        cls,
        values: Mapping[str, Any],
        *,
        require: bool = True,
        env: EnvSettings | None = None,
        registry: Registry | None = None,
        source: str = "mapping",
    ) -> TrainerConfig:
        """Validate a dict of option values (keys with or without ``--``, aliases allowed)."""
        return resolve([Layer(source, values)], registry=registry, env=env or EnvSettings(), require=require)


def redact(value: Any, key: str = "") -> Any:
    """Replace values of secret-looking keys (recursively) with ``***`` for display."""
    if key and any(hint in key.lower().replace("-", "_") for hint in SECRET_HINTS) and value not in (None, ""):
        return "***"
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _implementation_problem(option: Option, value: Any) -> Problem | None:
    """Refuse a value that asks for something kubetuner has not built (``Option.is_inert`` values pass)."""
    if option.is_inert(value):
        return None
    if not option.implemented:
        accepted = [v for v in (option.default, option.simpletuner_default) if v is not None]
        return Problem(
            option.name,
            value,
            "is a valid SimpleTuner option but kubetuner does not implement it yet; remove it"
            + (f" or set it to {' or '.join(dict.fromkeys(map(repr, accepted)))}" if accepted else ""),
        )
    if option.implemented_choices is not None:
        items = value.split(",") if option.multiple and isinstance(value, str) else [value]
        missing = [v for v in items if v not in option.implemented_choices and not option.is_inert(v)]
        if missing:
            supported = ", ".join(sorted(str(c) for c in option.implemented_choices))
            return Problem(
                option.name,
                value,
                f"{missing[0]!r} is valid in SimpleTuner but kubetuner implements only: {supported}",
            )
    return None


def resolve(
    layers: Iterable[Layer],
    *,
    registry: Registry | None = None,
    env: EnvSettings | None = None,
    require: bool = True,
    check_rules: bool = True,
) -> TrainerConfig:
    """Merge layers (lowest precedence first) over the defaults; raise ConfigError with every problem."""
    registry = registry or get_registry()
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    problems: list[Problem] = []
    for layer in layers:
        seen_in_layer: dict[str, str] = {}
        for raw_key, raw_value in layer.values.items():
            key = str(raw_key)
            name = registry.canonical(key)
            if name is None:
                hint = registry.suggest(key)
                message = f"unknown option (from {layer.source})" + (f"; did you mean --{hint}?" if hint else "")
                problems.append(Problem(key.lstrip("-"), MISSING, message))
                continue
            if name in seen_in_layer:
                problems.append(
                    Problem(name, raw_value, f"given twice in {layer.source} (as {seen_in_layer[name]!r} and {key!r})")
                )
                continue
            seen_in_layer[name] = key
            option = registry.get(name)
            try:
                values[name] = option.parse(raw_value)
            except ValueProblem as error:
                if option.is_inert(raw_value):
                    values[name] = raw_value  # SimpleTuner's own default (e.g. a path it ships): asks for nothing
                else:
                    problems.append(Problem(name, raw_value, f"{error} (from {layer.source})"))
                    continue
            sources[name] = layer.source
    for option in registry:
        if values.get(option.name) is None:  # unset, or written as null/false-for-text: the default
            values[option.name] = option.default
            sources[option.name] = DEFAULT
    bad_options = {p.option for p in problems}
    for option in registry:
        value = values[option.name]
        if require and option.required and value is None and option.name not in bad_options:
            problems.append(Problem(option.name, MISSING, "is required"))
        if sources[option.name] != DEFAULT:
            issue = _implementation_problem(option, value)
            if issue:
                problems.append(issue)
    if check_rules:
        from .rules import check_rules as run_rules

        problems.extend(p for p in run_rules(values, complete=require) if p.option not in bad_options)
    if problems:
        raise ConfigError(problems)
    return TrainerConfig(values, sources, env or EnvSettings(), registry)
