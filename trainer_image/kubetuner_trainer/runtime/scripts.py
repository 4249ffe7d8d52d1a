"""User scripts run by the trainer: post-checkpoint, post-upload and external validation.

Commands are split into argv first and placeholders substituted per argument
(:func:`kubetuner_trainer.placeholders.substitute_argv`); nothing ever goes through a shell.
A failing script is logged and counted; training continues.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..contract import complete_checkpoints
from ..placeholders import placeholder_values as shared_placeholder_values
from ..placeholders import split_command, substitute_argv
from ._options import all_options, option

log = logging.getLogger(__name__)

POST_CHECKPOINT = "post_checkpoint"
POST_UPLOAD = "post_upload"
VALIDATION = "validation"


def latest_checkpoint_dir(output_dir: str | Path) -> Path | None:
    """The complete ``checkpoint-<step>`` folder under ``output_dir`` with the highest step."""
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def placeholder_values(cfg: Any, *, global_step: int, local_checkpoint_path: str | Path | None = None,
                       remote_checkpoint_path: str | None = None) -> dict[str, Any]:
    """Every placeholder a trainer script may use, resolved for this moment of the run
    (the one table: :func:`kubetuner_trainer.placeholders.placeholder_values`)."""
    return shared_placeholder_values(all_options(cfg), global_step=global_step,
                                     local_checkpoint_path=local_checkpoint_path,
                                     remote_checkpoint_path=remote_checkpoint_path)


class ScriptRunner:
    """Starts user scripts, in the background or waiting, and keeps track of the running ones."""

    def __init__(self, metrics: Any = None) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._processes: set[subprocess.Popen[bytes]] = set()

    def run(
        self,
        kind: str,
        command: str | list[str],
        values: Mapping[str, Any],
        *,
        background: bool = True,
        check: bool = True,
    ) -> int | None:
        """Run ``command``; returns its exit code when waited for, ``None`` in the background.

        ``check=False`` (fire-and-forget external validation) does not judge the exit code.
        """
        try:
            argv = substitute_argv(command, values)
        except ValueError as error:  # unbalanced quotes in the command string
            log.error("%s script %r cannot be split into arguments: %s", kind, command, error)
            self._count(kind, "failed")
            return None
        if not argv:
            return None
        if not background:
            return self._execute(kind, argv, check)
        thread = threading.Thread(
            target=self._execute, args=(kind, argv, check), name=f"kubetuner-{kind}-script", daemon=True
        )
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()
        return None

    def wait_all(self, timeout: float | None = None) -> bool:
        """Wait for background scripts; after ``timeout`` seconds the rest are terminated."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(left)
        with self._lock:
            leftovers = list(self._processes)
        for process in leftovers:
            log.warning("script %s still running at exit; terminating it", process.args[0])
            process.terminate()
        return not leftovers

    def _execute(self, kind: str, argv: list[str], check: bool) -> int | None:
        log.info("running %s script: %s", kind, argv[0])
        log.debug("%s script argv: %r", kind, argv)
        try:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)  # never a shell
        except OSError as error:
            log.error("%s script %s could not start: %s", kind, argv[0], error)
            self._count(kind, "failed")
            return None
        with self._lock:
            self._processes.add(process)
        try:
            code = process.wait()
        finally:
            with self._lock:
                self._processes.discard(process)
        if check and code != 0:
            log.error("%s script %s exited with code %s; training continues", kind, argv[0], code)
            self._count(kind, "failed")
        else:
            self._count(kind, "ok")
        return code

    def _count(self, kind: str, result: str) -> None:
        if self._metrics is not None:
            self._metrics.script_runs.labels(script=kind, result=result).inc()


def command_of(cfg: Any, name: str) -> str | None:
    """The command configured in option ``name``, or None (blank means unset)."""
    value = option(cfg, name)
    if value is None:
        return None
    if isinstance(value, str) and not value.strip():
        return None
    return value


def check_command(name: str, command: str | list[str]) -> str | None:
    """A problem message when the command cannot be split into argv, else None."""
    try:
        if not split_command(command):
            return f"{name} is empty"
    except ValueError as error:
        return f"{name} cannot be split into arguments ({error}); check the quoting"
    return None
