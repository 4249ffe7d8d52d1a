"""The collective timeout: parsed from the environment, and it really ends a rank whose peer never comes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest

from kubetuner_trainer.collectives import (
    COLLECTIVE_TIMEOUT_ENV,
    DEFAULT_COLLECTIVE_TIMEOUT_SECONDS,
    collective_timeout,
)


def test_default_and_override() -> None:
    assert collective_timeout({}) == timedelta(seconds=DEFAULT_COLLECTIVE_TIMEOUT_SECONDS)
    assert collective_timeout({COLLECTIVE_TIMEOUT_ENV: "90"}) == timedelta(seconds=90)


@pytest.mark.parametrize("raw", ["0", "-5", "soon"])
def test_invalid_values_name_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match=COLLECTIVE_TIMEOUT_ENV):
        collective_timeout({COLLECTIVE_TIMEOUT_ENV: raw})


def test_a_rank_whose_peer_is_lost_fails_within_the_bound(tmp_path, unused_tcp_port) -> None:
    """Rank 0 of 2 with no rank 1 (a lost node): the Accelerator the trainer builds raises, not hangs."""
    script = textwrap.dedent("""
        from accelerate import Accelerator
        from kubetuner_trainer.collectives import process_group_kwargs
        try:
            Accelerator(cpu=True, kwargs_handlers=process_group_kwargs())
        except Exception as exc:
            print("ENDED", type(exc).__name__)
            raise SystemExit(1)
        print("JOINED")
    """)
    env = {**__import__("os").environ, COLLECTIVE_TIMEOUT_ENV: "2", "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(unused_tcp_port)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "ENDED" in proc.stdout, proc.stdout + proc.stderr[-2000:]
