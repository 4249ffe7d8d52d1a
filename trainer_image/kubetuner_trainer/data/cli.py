"""``kubetuner data inspect CONFIG.json``: check datasets before spending GPU hours."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from kubetuner_trainer.config.errors import ConfigError
from kubetuner_trainer.options import ValueProblem, normalize_key, parse_bool

from .settings import DataSettings

# DataSettings fields that make no sense on this command line.
_HIDDEN = {"data_backend_config", "output_dir"}


def _parser_type(annotation: Any) -> Any:
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    base = next(a for a in args if a is not type(None))
    return {"bool": bool, "int": int, "float": float, "str": str}.get(getattr(base, "__name__", ""), str)


def _bool_arg(text: str) -> bool:
    try:
        return parse_bool(text)
    except ValueProblem as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    inspect = sub.add_parser("inspect", help="Discover every dataset and report files, skips, buckets, captions.",
                             description="Discover every dataset of a dataset list (multidatabackend.json) "
                             "without encoding anything, and report what training would use.")
    inspect.add_argument("dataset_config", metavar="CONFIG.json|JOB.yaml",
                         help="the dataset list, or a TrainingJob manifest (its datasets and batch size are used)")
    inspect.add_argument("--volume", action="append", default=[], metavar="CLAIM=DIR",
                         help="with a TrainingJob: a local directory for a PersistentVolumeClaim (repeatable)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.add_argument("--config", metavar="FILE", help="trainer options (JSON) to take defaults from")
    inspect.add_argument("--headers-only", action="store_true",
                         help="read image headers only (fast); files damaged after their header then count as "
                         "usable although training will leave them out")
    inspect.add_argument("--verify", action="store_true",
                         help="decode every usable image as training does (the default; kept for old scripts)")
    group = inspect.add_argument_group("trainer options that shape the data")
    hints = typing.get_type_hints(DataSettings)
    for f in fields(DataSettings):
        if f.name in _HIDDEN:
            continue
        kind = _parser_type(hints[f.name])
        if kind is bool:
            group.add_argument(f"--{f.name}", nargs="?", const=True, type=_bool_arg, default=None, metavar="BOOL")
        else:
            group.add_argument(f"--{f.name}", type=kind, default=None, metavar=f.name.upper())


def _file_options(path: str) -> dict[str, Any]:
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: trainer options must be a JSON object")
    return {normalize_key(k): v for k, v in raw.items()}


def _is_manifest(path: str) -> bool:
    return path.lower().endswith((".yaml", ".yml"))


def _from_training_job(args: argparse.Namespace, scratch: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(trainer options, environment) of a TrainingJob manifest, translated as ``kubetuner run`` would.

    The dataset list is written to ``scratch``; S3 credentials come from the manifest's Secret documents.
    Raises ``ConfigError``-like ``ValueError`` with the manifest's problem.
    """
    from kubetuner_operator.local_run import RunError, build_run
    from kubetuner_operator.trainer_config import render_trainer_files

    try:
        run = build_run(argparse.Namespace(manifest=Path(args.dataset_config), name=None, workdir=None,
                                           volume=list(args.volume), secrets=[], run_hooks=False))
        files = render_trainer_files(run.job, run.paths, resume=False)
    except RunError as error:
        raise ValueError(str(error)) from None
    datasets = scratch / "multidatabackend.json"
    datasets.write_text(json.dumps(files.databackend_json))
    values = {normalize_key(k): v for k, v in files.config_json.items()}
    values.pop("cache_dir", None)  # inspecting leaves the job's caches alone
    values["data_backend_config"] = str(datasets)
    return values, run.env


def main(args: argparse.Namespace) -> int:
    import os
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kubetuner-inspect-") as scratch:
        environ = dict(os.environ)
        try:
            if _is_manifest(args.dataset_config):
                values, job_env = _from_training_job(args, Path(scratch))
                environ.update(job_env)
            else:
                values = {"data_backend_config": args.dataset_config}
        except ValueError as error:
            print(f"kubetuner data inspect: {error}", file=sys.stderr)
            return 2
        return _inspect(args, values, environ)


@contextlib.contextmanager
def _report_only():
    """Keep the data pipeline's warnings out of the terminal while inspecting: the report lists each one."""
    logger = logging.getLogger(__package__)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _inspect(args: argparse.Namespace, job_values: dict[str, Any], environ: dict[str, str]) -> int:
    from .inspect import format_report, inspect_datasets, to_json
    from .prepare import DataError
    from .settings import settings_from_config

    values: dict[str, Any] = {k: v for k, v in job_values.items() if k != "data_backend_config"}
    values.update(_file_options(args.config) if args.config else {})
    values.update({f.name: getattr(args, f.name) for f in fields(DataSettings)
                   if f.name not in _HIDDEN and getattr(args, f.name, None) is not None})
    values["data_backend_config"] = job_values["data_backend_config"]
    try:
        settings = settings_from_config(values)
        # With an explicit --cache_dir the metadata cache is read and updated, as the trainer would.
        with _report_only():
            report = inspect_datasets(settings, environ=environ, use_metadata_cache=bool(values.get("cache_dir")),
                                      verify=not args.headers_only)
    except ConfigError as error:
        print(f"kubetuner data inspect: {error}", file=sys.stderr)
        return 2
    except (DataError, ValueError, OSError) as error:
        print(f"kubetuner data inspect: {error}", file=sys.stderr)
        return 1
    print(to_json(report) if args.json else format_report(report))
    return 0 if report["ok"] else 1
