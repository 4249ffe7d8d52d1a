"""``kubetuner-train`` on the example job logs only its own lines: no third-party start-up noise."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from kubetuner_operator.local_run import build_run
from kubetuner_trainer.tiny import build_tiny_dataset, build_tiny_sd1x

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "local" / "trainingjob.yaml"
OUR_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) kubetuner_trainer[.\w]*: ")


def test_example_start_up_prints_no_third_party_warnings(tmp_path):
    volumes = tmp_path / "volumes"
    build_tiny_sd1x(volumes / "models" / "tiny-sd1x")
    build_tiny_dataset(volumes / "datasets" / "shapes", count=4)
    run = build_run(argparse.Namespace(
        manifest=EXAMPLE, name=None, workdir=tmp_path / "work", secrets=[], run_hooks=False,
        volume=[f"models={volumes / 'models'}", f"datasets={volumes / 'datasets'}"]))
    config = run.write_files(resume=False, port=0)
    result = subprocess.run(
        [sys.executable, "-m", "kubetuner_trainer.cli", "--config", str(config), "--max_train_steps", "1",
         "--validation_step_interval", "1"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    foreign = [line for line in lines if not OUR_LINE.match(line)]
    assert lines and not foreign, "\n".join(foreign)
    # the example leaves something to look at: a TensorBoard loss curve and validation images
    output = Path(run.paths.output_dir)
    assert list((output / "logs").rglob("events.out.tfevents.*"))
    assert list((output / "validation").glob("step-*/*.png"))
