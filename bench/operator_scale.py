"""Operator scale benchmark: N TrainingJobs against the Kubernetes API emulator.

The operator runs as a separate process (``kubetuner operator`` with a kubeconfig pointing at
the emulator), exactly as a user would run it from a laptop; its RSS is sampled with psutil.
Create-to-pod latency is measured from the moment the TrainingJob create returned to the moment
the emulator accepted the trainer pod's create.

    python bench/operator_scale.py [--jobs 500] [--concurrency 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import kmock
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "operator"))
from conftest import BUILTIN_RESOURCES, ApiServer, make_trainingjob, register_crd

from kubetuner_operator.kube_api import KubeApi


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def bench(jobs: int, concurrency: int, timeout: float) -> dict[str, float]:
    async with ApiServer() as server, kmock.Server(server) as http:
        for name, info in BUILTIN_RESOURCES.items():
            server.resources[name] = info
        register_crd(server)
        url = str(http.url).rstrip("/")
        with tempfile.TemporaryDirectory() as tmp:
            kubeconfig = Path(tmp) / "kubeconfig"
            kubeconfig.write_text(
                f"apiVersion: v1\nkind: Config\ncurrent-context: emu\nclusters: [{{name: emu, cluster: "
                f"{{server: '{url}'}}}}]\nusers: [{{name: me, user: {{token: bench}}}}]\n"
                "contexts: [{name: emu, context: {cluster: emu, user: me}}]\n")
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "kubetuner_operator.cli", "operator", "--kubeconfig", str(kubeconfig),
                "--health-port", "0", "--metrics-port", "0", "--poll-interval", "30", "--log-level", "WARNING",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            ps = psutil.Process(proc.pid)
            peak = 0

            async def sample() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, ps.memory_info().rss)
                    await asyncio.sleep(0.05)

            sampler = asyncio.create_task(sample())
            session = aiohttp.ClientSession()
            client = KubeApi(url, session)
            created_at: dict[str, float] = {}
            semaphore = asyncio.Semaphore(concurrency)
            # Let the operator start its watches first: not part of the measurement.
            await asyncio.sleep(3)
            rss_idle = ps.memory_info().rss

            async def create(i: int) -> None:
                obj = make_trainingjob(name=f"job-{i:04d}", namespace="bench", hooks=None)
                obj["metadata"] = {"name": obj["metadata"]["name"], "namespace": "bench"}
                async with semaphore:
                    await client.create(obj)
                created_at[f"job-{i:04d}"] = time.monotonic()

            start = time.monotonic()
            await asyncio.gather(*(create(i) for i in range(jobs)))
            created = time.monotonic()
            deadline = start + timeout
            want = {("pods", "bench", f"{name}-t0"): name for name in created_at}
            while time.monotonic() < deadline and not all(key in server.created_at for key in want):
                await asyncio.sleep(0.05)
            done = time.monotonic()
            missing = [k for k in want if k not in server.created_at]
            latencies = [server.created_at[key] - created_at[name] for key, name in want.items()
                         if key in server.created_at]
            sampler.cancel()
            operator_cpu = sum(ps.cpu_times()[:2])
            proc.terminate()
            await proc.wait()
            await session.close()
    return {
        "jobs": jobs, "pods": jobs - len(missing), "create_s": created - start, "all_pods_s": done - start,
        "p50_ms": 1000 * statistics.median(latencies), "p95_ms": 1000 * percentile(latencies, 95),
        "max_ms": 1000 * max(latencies), "rss_idle_mib": rss_idle / 2**20, "rss_peak_mib": peak / 2**20,
        "operator_cpu_s": operator_cpu, "emulator_cpu_s": sum(psutil.Process().cpu_times()[:2]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=50, help="parallel TrainingJob creates")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    r = asyncio.run(bench(args.jobs, args.concurrency, args.timeout))
    print(f"operator scale benchmark ({os.cpu_count()} CPUs, kmock emulator over HTTP, operator in a subprocess)")
    print(f"{'TrainingJobs':<28}{r['jobs']:>12d}")
    print(f"{'trainer pods created':<28}{r['pods']:>12d}")
    print(f"{'time to create all jobs':<28}{r['create_s']:>11.2f}s")
    print(f"{'time until all pods':<28}{r['all_pods_s']:>11.2f}s")
    print(f"{'create-to-pod p50':<28}{r['p50_ms']:>10.0f}ms")
    print(f"{'create-to-pod p95':<28}{r['p95_ms']:>10.0f}ms")
    print(f"{'create-to-pod max':<28}{r['max_ms']:>10.0f}ms")
    print(f"{'operator RSS before jobs':<28}{r['rss_idle_mib']:>9.1f}MiB")
    print(f"{'operator peak RSS':<28}{r['rss_peak_mib']:>9.1f}MiB")
    print(f"{'operator CPU time':<28}{r['operator_cpu_s']:>11.1f}s")
    print(f"{'operator CPU per job':<28}{1000 * r['operator_cpu_s'] / r['jobs']:>10.1f}ms")
    print(f"{'emulator + client CPU time':<28}{r['emulator_cpu_s']:>11.1f}s")
    print(f"{'load average (1 min)':<28}{os.getloadavg()[0]:>12.1f}")
    return 0 if r["pods"] == r["jobs"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
