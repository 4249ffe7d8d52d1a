"""bench/tread_step.py runs end to end on tiny models and prints one row per family (no timing asserts)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_prints_plain_and_routed_step_times(tmp_path, capsys, monkeypatch, tiny_model):
    spec = importlib.util.spec_from_file_location("bench_tread_step", REPO / "bench" / "tread_step.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_tread_step", bench)
    spec.loader.exec_module(bench)
    out = tmp_path / "table.txt"
    routes = '{"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": -1}]}'
    assert bench.main(["--family", "wan", "--resolution", "32", "--frames", "1", "--layers", "2", "--heads", "2",
                       "--steps", "1", "--warmup", "0", "--routes", routes, "--model", str(tiny_model("wan")), "--output", str(out)]) == 0
    rows = [line.split() for line in out.read_text().splitlines()[1:]]
    assert [(r[0], r[3], r[4]) for r in rows] == [("wan", "2", "0.5@0-1")]
    assert all(float(r[5]) > 0 and float(r[6]) > 0 for r in rows)
    assert capsys.readouterr().out.strip() == out.read_text().strip()
