"""Graceful stop: the first signal asks the loop to stop, a second one exits at once."""

from __future__ import annotations

import os
import signal
import threading

from runtime_helpers import step_report

from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.runtime import build_runtime
from kubetuner_trainer.runtime.signals import StopSignal


def test_sigterm_requests_a_stop_and_a_second_signal_exits_now():
    exits: list[int] = []
    stop = StopSignal(grace_seconds=30, exit_now=exits.append)
    assert stop.install()
    try:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(10) and stop.requested() and "SIGTERM" in stop.reason
        assert exits == []
        assert 0 < stop.seconds_left() <= 30
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == [128 + signal.SIGINT]
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) is not stop.handle


def test_runtime_installs_and_restores_handlers(cfg_factory):
    before = signal.getsignal(signal.SIGTERM)
    with build_runtime(cfg_factory(), bind_port=None) as rt:
        assert signal.getsignal(signal.SIGTERM) == rt.stop.handle
        rt.step(step_report(1))
        assert not rt.stop_requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert rt.stop.wait(10)
        assert rt.stop_requested()
    assert signal.getsignal(signal.SIGTERM) == before


def test_grace_budget_forces_the_exit_when_the_loop_hangs(cfg_factory):
    exits: list[int] = []
    fired = threading.Event()
    with build_runtime(cfg_factory(stop_grace_seconds=0.2), install_signals=False) as rt:
        rt.stop.exit_now = lambda code: (exits.append(code), fired.set())
        rt.stop.request("test")  # ... and the "loop" never checkpoints nor returns
        assert fired.wait(30)
    assert exits == [ExitCode.INTERRUPTED]


def test_no_exit_when_the_loop_finishes_within_the_budget(cfg_factory):
    exits: list[int] = []
    with build_runtime(cfg_factory(stop_grace_seconds=3600), install_signals=False) as rt:
        rt.stop.exit_now = exits.append
        rt.stop.request("test")
    assert rt._closed.is_set() and exits == []
