"""bench/operator_scale.py runs end to end with a few jobs and prints its table (no timing asserts)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_runs_jobs_to_success_and_counts_requests(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_operator_scale", REPO / "bench" / "operator_scale.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_operator_scale", bench)
    spec.loader.exec_module(bench)
    out = tmp_path / "table.txt"
    assert bench.main(["--jobs", "3", "--concurrency", "3", "--timeout", "120", "--network-policy",
                       "--output", str(out)]) == 0
    rows = dict(line.rsplit(None, 1) for line in out.read_text().splitlines()[1:])
    assert rows["TrainingJobs Succeeded"] == "3" and rows["trainer pods created"] == "3"
    assert float(rows["  create pods"]) == 1.0  # exactly one trainer pod per job
    assert float(rows["  create networkpolicies"]) == 1.0 and rows["per-job NetworkPolicy"] == "on"
    assert float(rows["operator API requests per job"]) > 0
    assert "create-to-pod p95" in capsys.readouterr().out
