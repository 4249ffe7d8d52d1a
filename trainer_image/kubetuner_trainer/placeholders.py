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
from typing import Any

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


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
