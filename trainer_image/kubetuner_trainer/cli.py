"""``kubetuner-train``: the trainer's entry point inside the pod.

Exit codes follow :mod:`kubetuner_trainer.contract`: configuration errors exit 78 so the
operator never retries them.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from collections.abc import Sequence

from .config import ConfigError, TrainerConfig, redact
from .config.loader import load_from_command_line, parse_command_line
from .contract import ExitCode
from .logsetup import setup_logging
from .options import Registry, get_registry
from .termination import record_config_error

USAGE = "usage: kubetuner-train [--config FILE] [--env-file FILE] [--print-config[=json]] [--OPTION VALUE ...]"


def _group_titles() -> dict[str, str]:
    from .options import catalog

    return dict(getattr(catalog, "GROUP_TITLES", {}))


def _describe(option) -> str:
    if option.type == "bool":
        head = f"  --{option.name} [true|false]"
    elif option.choices is not None:
        shown = ",".join(str(c) for c in option.choices)
        head = f"  --{option.name} {{{shown}}}" + (" (comma-separated)" if option.multiple else "")
    else:
        head = f"  --{option.name} {option.metavar or option.type.upper()}"
    notes = []
    if option.aliases:
        notes.append("alias: " + ", ".join(f"--{a}" for a in option.aliases))
    if option.required:
        notes.append("required")
    if option.default is not None:
        notes.append(f"default: {option.default}")
    if not option.implemented:
        notes.append("not implemented yet")
    elif option.implemented_choices is not None:
        notes.append("implemented: " + ",".join(sorted(map(str, option.implemented_choices))))
    body = option.help + (f" [{'; '.join(notes)}]" if notes else "")
    return head + "\n" + textwrap.fill(body, width=100, initial_indent=" " * 8, subsequent_indent=" " * 8)


def render_help(registry: Registry) -> str:
    """Every option, by group, in the catalog's group order."""
    titles = _group_titles()
    groups = registry.groups()
    order = [g for g in titles if g in groups] + [g for g in groups if g not in titles]
    parts = [
        USAGE,
        "",
        "Train a diffusion model with SimpleTuner-compatible options. Options come from --config",
        "(config.json or config.toml), config.env / the environment, then the command line (highest).",
        "",
        "  --config FILE          config.json or config.toml (also $KUBETUNER_CONFIG)",
        "  --env-file FILE        config.env to read (default: config.env beside --config)",
        "  --print-config[=json]  run the start-up checks, show the resolved configuration and where each "
        "value came from, then exit",
    ]
    for group in order:
        parts += ["", f"{titles.get(group, group)}:"]
        parts += [_describe(option) for option in groups[group]]
    return "\n".join(parts) + "\n"


def render_config(config: TrainerConfig, mode: str) -> str:
    """The resolved configuration (secrets redacted) with each value's source."""
    set_values = {n: v for n, v in config.to_dict().items() if config.is_set(n)}
    if mode == "json":
        doc = {
            name: {"value": redact(value, name), "source": config.source(name)}
            for name, value in sorted(config.to_dict().items())
        }
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"
    lines = [f"{name} = {json.dumps(redact(value, name))}    # {config.source(name)}" for name, value in sorted(set_values.items())]
    others = len(config.to_dict()) - len(set_values)
    lines.append(f"# {others} more options at their defaults (--print-config=json lists all)")
    return "\n".join(lines) + "\n"


def version() -> str:
    """The installed kubetuner version (package metadata), else the source tree's ``__version__``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("kubetuner")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """``kubetuner-train``; output piped into a closed reader (``| head``) ends quietly."""
    try:
        return _main(argv)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


def _main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["--version"]:
        sys.stdout.write(f"kubetuner-train {version()}\n")
        return 0
    registry = get_registry()
    command = parse_command_line(arguments, registry)
    if command.help:
        sys.stdout.write(render_help(registry))
        return 0
    try:
        config = load_from_command_line(command, os.environ, registry=registry)
    except ConfigError as error:
        sys.stderr.write(f"kubetuner-train: {error}\n")
        record_config_error(str(error))
        return ExitCode.CONFIG_ERROR
    setup_logging(config.env.log_level)
    from .train import preflight, run  # torch is imported only past the option checks

    if command.print_config:
        # the start-up checks that need neither the model nor the data (options/docs.py says which come later)
        if preflight(config) is None:
            record_config_error(_preflight_problems(config))
            return ExitCode.CONFIG_ERROR
        sys.stdout.write(render_config(config, command.print_config))
        return 0
    code = int(run(config))
    if code == ExitCode.CONFIG_ERROR:
        record_config_error(_preflight_problems(config))
    return code


def _preflight_problems(config: TrainerConfig) -> str:
    """The preflight problems ``run`` logged before returning 78 (found again: cheap, reads no data).

    Empty when the configuration error came from later on; the runtime's final status then
    already carries its text.
    """
    from .training.preflight import check

    try:
        check(config)
    except ConfigError as error:
        return str(error)
    except Exception:  # only a message is at stake while exiting
        return ""
    return ""


if __name__ == "__main__":
    raise SystemExit(main())
