"""Operator scale benchmark: N TrainingJobs through their whole happy path against the API emulator.

The operator runs as a separate process (``kubetuner operator`` with a kubeconfig pointing at
the emulator), exactly as a user would run it from a laptop; its RSS is sampled with psutil.
Create-to-pod latency is measured from the moment the TrainingJob create returned to the moment
the emulator accepted the trainer pod's create. Then every trainer pod is marked Succeeded (as
the kubelet would) and the benchmark waits for every TrainingJob to report Succeeded: the API
requests the operator made over that whole path, divided by N, are its requests per job.

    python bench/operator_scale.py [--jobs 500] [--concurrency 50] [--network-policy] [--output bench/results/x.txt]

``--network-policy`` runs the operator as the chart does by default: one NetworkPolicy per job.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "operator"))
from operator_helpers import BUILTIN_RESOURCES, ApiServer, make_trainingjob, register_crd, terminated

from kubetuner_operator.builders.network_policy import NETWORK_POLICY_ENV
from kubetuner_operator.kube_api import KubeApi

NS = "bench"
# Requests only the benchmark makes (the operator never creates TrainingJobs nor writes pod status).
BENCH_REQUESTS = ("create trainingjobs", "update pods")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _kubeconfig(path: Path, url: str) -> None:
    path.write_text(
        f"apiVersion: v1\nkind: Config\ncurrent-context: emu\nclusters: [{{name: emu, cluster: "
        f"{{server: '{url}'}}}}]\nusers: [{{name: me, user: {{token: bench}}}}]\n"
        "contexts: [{name: emu, context: {cluster: emu, user: me}}]\n")


async def _wait(probe: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def bench(jobs: int, concurrency: int, timeout: float, network_policy: bool = False) -> dict[str, Any]:
    async with ApiServer() as server, kmock.Server(server) as http:
        for name, info in BUILTIN_RESOURCES.items():
            server.resources[name] = info
        register_crd(server)
        url = str(http.url).rstrip("/")
        with tempfile.TemporaryDirectory() as tmp:
            kubeconfig = Path(tmp) / "kubeconfig"
            _kubeconfig(kubeconfig, url)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "kubetuner_operator.cli", "operator", "--kubeconfig", str(kubeconfig),
                "--health-port", "0", "--metrics-port", "0", "--poll-interval", "30", "--log-level", "WARNING",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                env={**os.environ, **({NETWORK_POLICY_ENV: '{"metricsFrom": []}'} if network_policy else {})})
            try:
                return {**await _measure(server, url, proc, jobs, concurrency, timeout),
                        "network_policy": network_policy}
            finally:
                if proc.returncode is None:
                    proc.terminate()
                    await proc.wait()


async def _measure(server: ApiServer, url: str, proc: Any, jobs: int, concurrency: int,
                   timeout: float) -> dict[str, Any]:
    ps = psutil.Process(proc.pid)
    peak = 0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, ps.memory_info().rss)
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))
    client = KubeApi(url, session)
    semaphore = asyncio.Semaphore(concurrency)
    names = [f"job-{i:04d}" for i in range(jobs)]
    created_at: dict[str, float] = {}
    # Let the operator start its watches first: not part of the measurement.
    await _wait(lambda: server.requests["watch trainingjobs"] > 0, 30)
    await asyncio.sleep(1)
    rss_idle, cpu_idle = ps.memory_info().rss, sum(ps.cpu_times()[:2])
    requests_idle = Counter(server.requests)

    async def create(name: str) -> None:
        obj = make_trainingjob(name=name, namespace=NS, hooks=None)
        obj["metadata"] = {"name": name, "namespace": NS}
        async with semaphore:
            await client.create(obj)
        created_at[name] = time.monotonic()

    start = time.monotonic()
    await asyncio.gather(*(create(name) for name in names))
    created = time.monotonic()
    want = {("pods", NS, f"{name}-t0"): name for name in names}
    await _wait(lambda: all(key in server.created_at for key in want), timeout)
    all_pods = time.monotonic()
    latencies = [server.created_at[key] - created_at[name] for key, name in want.items() if key in server.created_at]

    async def succeed(key: tuple[str, str, str]) -> None:
        async with semaphore:
            await client.patch("Pod", NS, key[2], {"status": terminated(0)}, subresource="status")

    await asyncio.gather(*(succeed(key) for key in want if key in server.created_at))

    def finished() -> int:
        return sum((server.get("kubetuner.dev/v1alpha1/trainingjobs", NS, name) or {}).get("status", {})
                   .get("phase") == "Succeeded" for name in names)

    await _wait(lambda: finished() == jobs, timeout)
    done = time.monotonic()
    succeeded = finished()
    sampler.cancel()
    operator_cpu = sum(ps.cpu_times()[:2]) - cpu_idle
    await session.close()
    by_kind = Counter({k: v - requests_idle[k] for k, v in server.requests.items()
                       if k not in BENCH_REQUESTS and v > requests_idle[k]})
    return {
        "jobs": jobs, "pods": len(latencies), "succeeded": succeeded, "create_s": created - start,
        "all_pods_s": all_pods - start, "all_succeeded_s": done - start,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p95_ms": 1000 * percentile(latencies, 95) if latencies else float("nan"),
        "max_ms": 1000 * max(latencies) if latencies else float("nan"),
        "rss_idle_mib": rss_idle / 2**20, "rss_peak_mib": peak / 2**20,
        "operator_cpu_s": operator_cpu, "emulator_cpu_s": sum(psutil.Process().cpu_times()[:2]),
        "requests": by_kind,
    }


def report(r: dict[str, Any]) -> str:
    """The results table (one line per figure, then the operator's requests per job by verb and kind)."""
    jobs = r["jobs"]
    rows = [
        f"operator scale benchmark ({os.cpu_count()} CPUs, kmock emulator over HTTP, operator in a subprocess)",
        f"{'TrainingJobs':<34}{jobs:>12d}",
        f"{'per-job NetworkPolicy':<34}{'on' if r['network_policy'] else 'off':>12}",
        f"{'trainer pods created':<34}{r['pods']:>12d}",
        f"{'TrainingJobs Succeeded':<34}{r['succeeded']:>12d}",
        f"{'time to create all jobs':<34}{r['create_s']:>11.2f}s",
        f"{'time until all pods':<34}{r['all_pods_s']:>11.2f}s",
        f"{'time until all Succeeded':<34}{r['all_succeeded_s']:>11.2f}s",
        f"{'create-to-pod p50':<34}{r['p50_ms']:>10.0f}ms",
        f"{'create-to-pod p95':<34}{r['p95_ms']:>10.0f}ms",
        f"{'create-to-pod max':<34}{r['max_ms']:>10.0f}ms",
        f"{'operator RSS before jobs':<34}{r['rss_idle_mib']:>9.1f}MiB",
        f"{'operator peak RSS':<34}{r['rss_peak_mib']:>9.1f}MiB",
        f"{'operator CPU time (jobs only)':<34}{r['operator_cpu_s']:>11.1f}s",
        f"{'operator CPU per job':<34}{1000 * r['operator_cpu_s'] / jobs:>10.1f}ms",
        f"{'emulator + client CPU time':<34}{r['emulator_cpu_s']:>11.1f}s",
        f"{'load average (1 min)':<34}{os.getloadavg()[0]:>12.1f}",
        f"{'operator API requests per job':<34}{sum(r['requests'].values()) / jobs:>12.2f}",
    ]
    rows += [f"  {kind:<32}{count / jobs:>12.2f}" for kind, count in sorted(r["requests"].items())]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=50, help="parallel creates / pod status writes")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for each phase")
    parser.add_argument("--output", type=Path, help="also write the table to this file")
    parser.add_argument("--network-policy", action="store_true", help="one NetworkPolicy per job (chart default)")
    args = parser.parse_args(argv)
    result = asyncio.run(bench(args.jobs, args.concurrency, args.timeout, args.network_policy))
    table = report(result)
    print(table)
    if args.output:
        args.output.write_text(table + "\n")
    return 0 if result["pods"] == result["succeeded"] == result["jobs"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
