"""Placeholder substitution for hook and script commands (argv only, never a shell).

A command is split into argv first (``shlex`` when given as one string, as the spec's
``--post_checkpoint_script`` is), then ``{name}`` placeholders are replaced inside each
argument. A substituted value containing spaces or ``;`` therefore stays inside its one
argument and is never interpreted by a shell. Unknown placeholders are left as written.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

#: the placeholders filled from an option, placeholder -> option (SimpleTuner's script placeholders);
#: trainer scripts, cluster hook Jobs and local hooks all use this one table
OPTION_PLACEHOLDERS: Mapping[str, str] = {
    "tracker_run_name": "tracker_run_name",
    "tracker_project_name": "tracker_project_name",
    "model_family": "model_family",
    "model_type": "model_type",
    "lora_type": "lora_type",
    "huggingface_path": "hub_model_id",
}
#: the prefix of the options every script may also use as placeholders (``{validation_prompt}``, ...)
VALIDATION_PREFIX = "validation_"


def placeholder_values(options: Mapping[str, Any], *, global_step: int,
                       local_checkpoint_path: str | Path | None = None,
                       remote_checkpoint_path: str | None = None) -> dict[str, Any]:
    """Every placeholder of a hook or script command, filled for one checkpoint.

    ``options`` maps option names to values (a config's resolved options, or a TrainingJob's
    ``spec.config`` plus its family and type); an option missing from it takes the catalog default,
    and an option without one becomes ``""``. Every ``validation_*`` option given is a placeholder too.
    """
    values: dict[str, Any] = {k: v for k, v in options.items() if k.startswith(VALIDATION_PREFIX)}
    values.update({name: _option_value(options, option) for name, option in OPTION_PLACEHOLDERS.items()})
    values.update(local_checkpoint_path=str(local_checkpoint_path) if local_checkpoint_path else "",
                  global_step=global_step, remote_checkpoint_path=remote_checkpoint_path or "")
    return values


def _option_value(options: Mapping[str, Any], name: str) -> Any:
    value = options.get(name)
    if value is None:
        from .options import get_registry

        value = get_registry().get(name).default
    return "" if value is None else value


def split_command(command: str | Sequence[str]) -> list[str]:
    """A command string is split POSIX-style; a list is taken as argv unchanged."""
    if isinstance(command, str):
        return shlex.split(command)
    return [str(part) for part in command]


def placeholders_in(command: str | Sequence[str]) -> set[str]:
    """The placeholder names a command uses."""
    return {m.group(1) for arg in split_command(command) for m in PLACEHOLDER.finditer(arg)}


def substitute_text(text: str, values: Mapping[str, Any]) -> str:
    """Replace the ``{name}`` placeholders of one string whose name is in ``values``; others stay."""
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), text)


def substitute_argv(command: str | Sequence[str], values: Mapping[str, Any]) -> list[str]:
    """Split, then substitute ``{name}`` in each argument; ``None`` becomes an empty string."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            return match.group(0)
        value = values[name]
        return "" if value is None else str(value)

    return [PLACEHOLDER.sub(replace, arg) for arg in split_command(command)]
