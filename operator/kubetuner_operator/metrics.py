"""Operator metrics (Prometheus) and the HTTP endpoint that serves them.

Each operator instance owns its :class:`CollectorRegistry`, so several operators (tests) can run
in one process without sharing counters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from .status import Phase


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs = Gauge("kubetuner_trainingjobs", "TrainingJobs by phase.", ["phase"], registry=self.registry)
        self.reconcile_seconds = Histogram(
            "kubetuner_reconcile_duration_seconds", "Time to reconcile one TrainingJob.", registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.reconcile_errors = Counter("kubetuner_reconcile_errors", "Reconciles that failed.",
                                        registry=self.registry)
        self.restarts = Counter("kubetuner_trainer_restarts", "Trainer restarts (preemption, resume, crash).",
                                registry=self.registry)
        self.hook_jobs = Counter("kubetuner_hook_jobs", "Hook Jobs by final result.", ["result"],
                                 registry=self.registry)
        self._phases: dict[tuple[str, str], str] = {}
        for phase in Phase:
            self.jobs.labels(phase=str(phase)).set(0)

    def set_phase(self, key: tuple[str, str], phase: str | None) -> None:
        """Track the phase of one job (None: the job is gone)."""
        if phase is None:
            self._phases.pop(key, None)
        else:
            self._phases[key] = phase
        counts = {str(p): 0 for p in Phase}
        for value in self._phases.values():
            counts[value] = counts.get(value, 0) + 1
        for name, count in counts.items():
            self.jobs.labels(phase=name).set(count)

    def hooks_finished(self, before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]]) -> None:
        old = {(h.get("checkpointStep"), h.get("hook")): h.get("result") for h in before}
        for hook in after:
            result = hook.get("result")
            if result in ("Succeeded", "Failed", "Unknown") and old.get((hook.get("checkpointStep"),
                                                                          hook.get("hook"))) != result:
                self.hook_jobs.labels(result=result).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def metrics_app(metrics: OperatorMetrics) -> web.Application:
    async def handle(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    return app


async def start_metrics_server(metrics: OperatorMetrics, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve ``/metrics``; returns the runner (for cleanup) and the bound port (port 0 picks one)."""
    runner = web.AppRunner(metrics_app(metrics), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, int(bound)
