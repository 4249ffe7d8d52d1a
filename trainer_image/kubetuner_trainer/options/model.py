"""The shape of one trainer option and the strict value parsers behind it."""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

OptionType = Literal["bool", "int", "float", "str", "json"]

TRUE_WORDS = frozenset({"true", "1", "yes", "on", "y", "t"})
FALSE_WORDS = frozenset({"false", "0", "no", "off", "n", "f"})


class ValueProblem(ValueError):
    """A single value does not fit its option; the message says what is allowed."""


class _Same:
    """Marker: SimpleTuner's default is the option's own ``default``."""

    def __repr__(self) -> str:
        return "SAME"


SAME: Any = _Same()


@dataclass(frozen=True)
class Upstream:
    """What SimpleTuner (release 3.1.6, its argument registry) does with an option.

    ``default`` is SimpleTuner's default when it differs from kubetuner's (``SAME`` otherwise),
    exactly as SimpleTuner's argument parser hands it out. ``off`` lists further values that mean
    "off / no effect" for kubetuner. Writing ``default`` or an ``off`` value is accepted even for
    an option or choice kubetuner has not built, because it asks for nothing kubetuner lacks.
    ``why`` says why kubetuner's default deliberately differs (shown in the docs). ``choices`` are
    values SimpleTuner accepts beyond the spec's (e.g. its newer model families): refused by name.
    """

    default: Any = SAME
    off: tuple[Any, ...] = ()
    why: str = ""
    #: further values SimpleTuner accepts that the option spec does not list (refused as not built yet)
    choices: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Option:
    """One trainer option, as promised to users by the SimpleTuner option language.

    ``default`` of ``None`` means "unset". ``choices`` lists allowed values (after type
    conversion); ``multiple`` allows a comma-separated list of choices. ``implemented``
    is filled in by the registry from ``options/implemented/*.txt``;
    ``implemented_choices`` narrows it to some choices only (e.g. model families).
    """

    name: str
    type: OptionType
    group: str
    help: str
    default: Any = None
    choices: tuple[Any, ...] | None = None
    aliases: tuple[str, ...] = ()
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    multiple: bool = False
    metavar: str | None = None
    implemented: bool = False
    implemented_choices: frozenset[Any] | None = field(default=None, compare=False)
    upstream: Upstream = Upstream()

    @property
    def simpletuner_default(self) -> Any:
        """SimpleTuner's default for this option (kubetuner's own when they agree)."""
        return self.default if self.upstream.default is SAME else self.upstream.default

    def is_inert(self, value: Any) -> bool:
        """True when ``value`` asks for nothing beyond what kubetuner does anyway.

        That is: unset, kubetuner's default, SimpleTuner's default, or one of the ``off`` values.
        Raw (unparsed) values are compared too, so that SimpleTuner's default of a JSON option
        (a path that need not exist) counts.
        """
        candidates = (None, self.default, self.simpletuner_default, *self.upstream.off)
        return any(_same_value(value, c) for c in candidates)

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    def parse(self, value: Any) -> Any:
        """Convert a raw value (from JSON, TOML, env or CLI) to this option's type.

        Raises ValueProblem with a message naming what is allowed. ``None`` stays ``None``
        (the option is unset), and so does what SimpleTuner reads as unset (``_means_unset``).
        """
        if value is None or self._means_unset(value):
            return None
        parsed = _PARSERS[self.type](self, value)
        if self.multiple and isinstance(parsed, str):
            parsed = ",".join(item.strip() for item in parsed.split(","))  # "vae, text" == "vae,text"
        self._check_choices(parsed)
        self._check_bounds(parsed)
        return parsed

    def _means_unset(self, value: Any) -> bool:
        """SimpleTuner's leniency: ``false`` for a non-boolean option, or an empty value where
        only choices or numbers fit, leaves the option unset (its JSON loader drops them)."""
        if self.type == "bool":
            return False
        if value is False or (isinstance(value, str) and value.strip().lower() == "false"):
            return True
        empty = isinstance(value, str) and not value.strip()
        return empty and (self.choices is not None or self.type in ("int", "float"))

    def _check_choices(self, value: Any) -> None:
        if self.choices is None:
            return
        items = value.split(",") if self.multiple and isinstance(value, str) else [value]
        bad = [v for v in items if v not in self.choices]
        if bad:
            allowed = ", ".join(str(c) for c in self.choices)
            if bad[0] in self.upstream.choices:
                raise ValueProblem(f"{bad[0]!r} is valid in SimpleTuner but kubetuner does not support it yet; "
                                   f"kubetuner knows: {allowed}")
            raise ValueProblem(f"{bad[0]!r} is not one of the allowed values: {allowed}")

    def _check_bounds(self, value: Any) -> None:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return
        if self.minimum is not None and value < self.minimum:
            raise ValueProblem(f"{value!r} is below the minimum {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise ValueProblem(f"{value!r} is above the maximum {self.maximum:g}")


def _same_value(value: Any, candidate: Any) -> bool:
    if isinstance(value, bool) != isinstance(candidate, bool):
        return False
    return value == candidate


def parse_bool(value: Any) -> bool:
    """Strict boolean: real booleans or the words true/false/yes/no/on/off/1/0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise ValueProblem(f"{value!r} is not a boolean; use true or false")


def _bool(_opt: Option, value: Any) -> bool:
    return parse_bool(value)


def _int(_opt: Option, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueProblem(f"{value!r} is a boolean, an integer is expected")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                number = math.nan
            if math.isfinite(number) and number.is_integer():
                return int(number)
    raise ValueProblem(f"{value!r} is not an integer")


def _float(_opt: Option, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueProblem(f"{value!r} is a boolean, a number is expected")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueProblem(f"{value!r} is not a number (e.g. 1e-4 or 0.0001)") from None
    else:
        raise ValueProblem(f"{value!r} is not a number")
    if not math.isfinite(number):
        raise ValueProblem(f"{value!r} is not a finite number")
    return number


def _str(_opt: Option, value: Any) -> str:
    if isinstance(value, bool):
        raise ValueProblem(f"{value!r} is a boolean, a string is expected")
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)  # "report_to": ["tensorboard", "wandb"]
    raise ValueProblem(f"{value!r} is not a string")


def parse_json_value(value: Any) -> Any:
    """A JSON-valued option: a dict/list, inline JSON (or a Python literal), or a path to a JSON file."""
    if isinstance(value, dict | list):
        return value
    if not isinstance(value, str):
        raise ValueProblem(f"{value!r} is neither inline JSON nor a path to a JSON file")
    text = value.strip()
    if text[:1] in "{[":
        try:
            return json.loads(text)
        except json.JSONDecodeError as json_error:
            try:
                parsed = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise ValueProblem(f"inline JSON does not parse: {json_error}") from None
            if isinstance(parsed, dict | list):
                return parsed
            raise ValueProblem("inline value is not a JSON object or list") from None
    path = Path(text).expanduser()
    if not path.is_file():
        raise ValueProblem(f"{text!r} is neither inline JSON nor an existing JSON file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueProblem(f"cannot read JSON from {text!r}: {error}") from None


def _json(_opt: Option, value: Any) -> Any:
    return parse_json_value(value)


_PARSERS = {"bool": _bool, "int": _int, "float": _float, "str": _str, "json": _json}
