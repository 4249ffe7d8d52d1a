"""Load a TrainerConfig the way SimpleTuner users expect.

Sources, lowest precedence first: option defaults < ``config.json``/``config.toml`` <
environment (``config.env`` file, then the process environment) < command-line flags.
"""

from __future__ import annotations

import json
import os
import shlex
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..options import Registry, get_registry, normalize_key
from .errors import MISSING, ConfigError, Problem
from .trainer_config import EnvSettings, Layer, TrainerConfig, resolve

# config.env variables that set trainer options.
ENV_OPTIONS: dict[str, str] = {
    "TRAINING_NUM_PROCESSES": "num_processes",
    "TRAINING_DYNAMO_BACKEND": "dynamo_backend",
}
CONFIG_ENV_VAR = "KUBETUNER_CONFIG"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass
class CommandLine:
    """What ``kubetuner-train`` was asked, before any option is interpreted."""

    config_path: str | None = None
    env_file: str | None = None
    print_config: str | None = None  # None, "text" or "json"
    help: bool = False
    values: dict[str, Any] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def parse_command_line(argv: Sequence[str], registry: Registry | None = None) -> CommandLine:
    """Split argv into our own flags and option values; never exits, collects problems."""
    registry = registry or get_registry()
    parsed = CommandLine()
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token in ("-h", "--help"):
            parsed.help = True
            continue
        if not token.startswith("--"):
            parsed.problems.append(Problem("<argument>", token, "unexpected value; options look like --name value"))
            continue
        key, has_value, inline = token[2:].partition("=")
        meta = normalize_key(key)
        if meta in ("config", "config_path", "env_file"):
            value = inline if has_value else (tokens[i] if i < len(tokens) else None)
            if not has_value and value is not None:
                i += 1
            if value is None:
                parsed.problems.append(Problem(meta, MISSING, "needs a file path"))
            elif meta == "env_file":
                parsed.env_file = value
            else:
                parsed.config_path = value
            continue
        if meta == "print_config":
            mode = inline if has_value else "text"
            if mode not in ("text", "json"):
                parsed.problems.append(Problem("print-config", mode, "allowed values: text, json"))
            parsed.print_config = mode
            continue
        name = registry.canonical(key)
        if name is None:
            hint = registry.suggest(key)
            parsed.problems.append(
                Problem(meta, MISSING, "unknown option (from command line)" + (f"; did you mean --{hint}?" if hint else ""))
            )
            if not has_value and i < len(tokens) and not tokens[i].startswith("--"):
                i += 1  # skip its value so it is not reported twice
            continue
        option = registry.get(name)
        if has_value:
            value: Any = inline
        elif option.type == "bool":
            # A bare flag means true; a following non-flag token is its value (parsed strictly).
            value = True
            if i < len(tokens) and not tokens[i].startswith("--"):
                value = tokens[i]
                i += 1
        elif i < len(tokens) and not tokens[i].startswith("--"):
            value = tokens[i]
            i += 1
        else:
            parsed.problems.append(Problem(name, MISSING, "needs a value"))
            continue
        if key in parsed.values or name in parsed.values:
            parsed.problems.append(Problem(name, value, "given twice on the command line"))
            continue
        parsed.values[key] = value
    return parsed


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``config.json`` or ``config.toml`` (by extension; JSON otherwise). Keys may keep their ``--``."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([Problem("config", str(path), f"cannot read the config file: {error.strerror}")]) from None
    try:
        data = tomllib.loads(text) if file.suffix.lower() == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigError([Problem("config", str(path), f"is not valid {file.suffix or 'JSON'}: {error}")]) from None
    if not isinstance(data, dict):
        raise ConfigError([Problem("config", str(path), "must hold an object of option names to values")])
    return data


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """A ``config.env`` file: ``[export ]NAME=value`` lines, shell-style quoting, ``#`` comments."""
    result: dict[str, str] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ConfigError([Problem("env_file", str(path), f"cannot read: {error.strerror}")]) from None
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        name, sep, rest = line.partition("=")
        if not sep or not name.strip().isidentifier():
            raise ConfigError([Problem("env_file", f"{path}:{number}", "expected NAME=value")])
        try:
            parts = shlex.split(rest, comments=True)
        except ValueError as error:
            raise ConfigError([Problem("env_file", f"{path}:{number}", f"bad quoting: {error}")]) from None
        result[name.strip()] = " ".join(parts)
    return result


def env_settings(env: Mapping[str, str]) -> tuple[EnvSettings, list[Problem]]:
    problems: list[Problem] = []
    level = env.get("SIMPLETUNER_LOG_LEVEL", "INFO").strip().upper() or "INFO"
    if level not in LOG_LEVELS:
        problems.append(Problem("SIMPLETUNER_LOG_LEVEL", level, f"allowed values: {', '.join(LOG_LEVELS)}"))
        level = "INFO"
    try:
        extra = tuple(shlex.split(env.get("ACCELERATE_EXTRA_ARGS", "")))
    except ValueError as error:
        problems.append(Problem("ACCELERATE_EXTRA_ARGS", env["ACCELERATE_EXTRA_ARGS"], f"bad quoting: {error}"))
        extra = ()
    settings = EnvSettings(log_level=level, job_id=env.get("SIMPLETUNER_JOB_ID") or None, accelerate_extra_args=extra)
    return settings, problems


def load_config(
    argv: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    *,
    registry: Registry | None = None,
    require: bool = True,
) -> TrainerConfig:
    """Resolve the trainer configuration from files, environment and command line."""
    registry = registry or get_registry()
    environ = dict(os.environ if environ is None else environ)
    command = parse_command_line(argv, registry)
    return load_from_command_line(command, environ, registry=registry, require=require)


def load_from_command_line(
    command: CommandLine, environ: Mapping[str, str], *, registry: Registry, require: bool = True
) -> TrainerConfig:
    problems = list(command.problems)
    layers: list[Layer] = []
    config_path = command.config_path or environ.get(CONFIG_ENV_VAR) or None
    if config_path:
        try:
            layers.append(Layer(f"file:{config_path}", read_config_file(config_path)))
        except ConfigError as error:
            problems.extend(error.problems)
    env_file = command.env_file
    if env_file is None and config_path:
        beside = Path(config_path).with_name("config.env")
        env_file = str(beside) if beside.is_file() else None
    merged_env: dict[str, str] = {}
    if env_file:
        try:
            merged_env.update(read_env_file(env_file))
        except ConfigError as error:
            problems.extend(error.problems)
    merged_env.update(environ)
    env_values = {
        option: merged_env[var]
        for var, option in ENV_OPTIONS.items()
        if var in merged_env and option in registry and merged_env[var] != ""
    }
    for var, option in ENV_OPTIONS.items():
        if option in env_values:
            source = "file" if var not in environ else "process"
            layers.append(Layer(f"env:{var}" + ("" if source == "process" else f" ({env_file})"), {option: env_values[option]}))
    layers.append(Layer("cli", command.values))
    settings, env_problems = env_settings(merged_env)
    problems.extend(env_problems)
    try:
        config = resolve(layers, registry=registry, env=settings, require=require)
    except ConfigError as error:
        problems.extend(error.problems)
        config = None
    if problems:
        raise ConfigError(problems)
    assert config is not None
    return config
