"""bench/train_step.py runs end to end on a tiny model and prints both loops side by side (no timing asserts)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("family", "precision", "resolution"), [
    ("sdxl", "no_change", 64), ("flux", "no_change", 64), ("sdxl", "int8-quanto", 64),
    ("deepfloyd", "no_change", 16),  # pixel space (no VAE, uses_vae False): 16 px keeps its UNet grid small
    ("wan", "no_change", 128),  # the video row: 9-frame clips, [B, C, 3, h, w] latents
])
def test_bench_prints_both_loops_with_flops_and_ratio(tmp_path, capsys, monkeypatch, family, precision, resolution):
    spec = importlib.util.spec_from_file_location("bench_train_step", REPO / "bench" / "train_step.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_train_step", bench)
    spec.loader.exec_module(bench)
    out = tmp_path / "table.txt"
    monkeypatch.setattr(torch, "set_flush_denormal", lambda flag: True)  # keep this worker's float mode
    assert bench.main(["--family", family, "--resolution", str(resolution), "--frames", "9", "--batch", "2",
                       "--steps", "2", "--warmup", "1", "--repeats", "1", "--rank", "4", "--text-tokens", "16",
                       "--base-precision", precision, "--output", str(out)]) == 0
    rows = [line.split() for line in out.read_text().splitlines() if line.strip().startswith("2 ")]
    assert [r[1] for r in rows] == ["kubetuner", "reference"]
    ours, ref = rows
    assert float(ours[6]) == float(ref[6]) > 0  # same model FLOPs per step for both loops
    assert float(ours[8]) > 0  # the ours/ref ratio column
    printed = capsys.readouterr().out
    assert f"family={family}" in printed and f"base_precision={precision}" in printed
    assert ("frames=9" in printed) == (family == "wan")
