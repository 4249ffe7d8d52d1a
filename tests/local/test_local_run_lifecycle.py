"""``kubetuner run`` as a user meets it: Ctrl-C and rerun, a busy workdir, output volumes, dry runs."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_local_run import args, manifest

from kubetuner_operator.local_run import WorkdirLock, main
from kubetuner_trainer.contract import complete_checkpoints
from kubetuner_trainer.tiny import build_tiny_dataset, build_tiny_sd1x


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("volumes-lifecycle")
    build_tiny_sd1x(root / "models" / "tiny-sd1x")
    build_tiny_dataset(root / "datasets" / "shapes", count=8)
    return {"models": root / "models", "datasets": root / "datasets"}


def _command(path: Path, volumes: dict[str, Path], workdir: Path, *extra: str) -> list[str]:
    volume_args = [f"--volume={claim}={directory}" for claim, directory in volumes.items()]
    return [sys.executable, "-m", "kubetuner_operator.cli", "run", str(path), "--workdir", str(workdir),
            *volume_args, *extra]


def test_ctrl_c_checkpoints_says_how_to_resume_and_the_same_command_resumes(tmp_path, volumes):
    path = manifest(tmp_path, config={"max_train_steps": 6, "checkpoint_step_interval": 1})
    workdir = tmp_path / "work"
    command = _command(path, volumes, workdir)
    runner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = workdir / "output"
    while not complete_checkpoints(output):  # wait for the first checkpoint, an observable event
        assert runner.poll() is None, runner.stdout.read()
        time.sleep(0.1)
    runner.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
    out, _ = runner.communicate(timeout=300)
    status = yaml.safe_load((workdir / "status.yaml").read_text())
    assert runner.returncode == 130, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    step = status["step"]
    assert status["phase"] == "Interrupted" and 1 <= step < 6
    assert out.rstrip().endswith(f"interrupted at step {step}; run the same command to resume")
    assert complete_checkpoints(output)[-1][0] == step

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resuming from the checkpoint at step {step}" in rerun.stdout
    status = yaml.safe_load((workdir / "status.yaml").read_text())
    assert status["phase"] == "Succeeded" and status["step"] == 6
    assert f"resumed from checkpoint-{step} at step {step}" in (workdir / "trainer.log").read_text()

    fresh = subprocess.run([*command, "--fresh", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0 and (workdir / "output").is_dir()  # a dry run moves nothing


def test_a_second_run_in_the_same_workdir_is_refused_with_the_pid(tmp_path, volumes, capsys):
    workdir = tmp_path / "work"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, pathlib; sys.path[:0] = " + repr(sys.path) + "\n"
        "from kubetuner_operator.local_run import WorkdirLock\n"
        f"lock = WorkdirLock(pathlib.Path({str(workdir)!r})); lock.acquire(); print('held', flush=True)\n"
        "sys.stdin.read()")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(args(manifest(tmp_path), volumes, workdir)) == 1
        assert f"workdir {workdir} in use by PID {holder.pid}" in capsys.readouterr().err
    finally:
        holder.communicate("", timeout=30)
    lock = WorkdirLock(workdir)
    lock.acquire()  # released when its holder ended
    lock.release()


def test_output_pvc_is_written_and_unused_volumes_are_named(tmp_path, volumes, capsys):
    path = manifest(tmp_path, config={"max_train_steps": 1, "checkpoint_step_interval": 5})
    job = yaml.safe_load(path.read_text())
    job["spec"]["output"] = {"pvc": {"existingClaim": "results"}}
    path.write_text(yaml.safe_dump(job))
    results = tmp_path / "results"
    mapped = {**volumes, "results": results, "spare": tmp_path / "spare"}
    assert main(args(path, mapped, tmp_path / "work")) == 0
    assert (results / "pytorch_lora_weights.safetensors").is_file()
    # the README's "what next": the LoRA loads into diffusers as written there
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(volumes["models"] / "tiny-sd1x")
    pipe.load_lora_weights(results)
    assert pipe.get_list_adapters()
    status = yaml.safe_load((tmp_path / "work" / "status.yaml").read_text())
    assert status["output"] == str(results)
    err = capsys.readouterr().err
    assert f"--volume spare={tmp_path / 'spare'} is not used by this TrainingJob" in err
    assert "results=" not in err


def test_dry_run_prints_the_trainer_files_and_starts_nothing(tmp_path, volumes, capsys):
    ns = args(manifest(tmp_path), volumes, tmp_path / "work")
    ns.dry_run = True
    assert main(ns) == 0
    out = capsys.readouterr().out
    assert '"pretrained_model_name_or_path": "' + str(volumes["models"] / "tiny-sd1x") + '"' in out
    assert "multidatabackend.json" in out and '"id": "shapes"' in out
    assert not (tmp_path / "work" / "trainer.log").exists()


def test_yaml_syntax_error_names_file_and_line(tmp_path, volumes, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: kubetuner.dev/v1alpha1\nkind: TrainingJob\nspec:\n  model: [unclosed\n")
    assert main(args(bad, volumes, tmp_path / "work")) == 78
    err = capsys.readouterr().err
    assert f"{bad}:5:" in err and "YAML syntax error" in err and "Traceback" not in err


def test_data_inspect_reads_a_training_job(tmp_path, volumes, capsys):
    import json

    from kubetuner_operator.cli import main as kubetuner

    path = manifest(tmp_path, config={"train_batch_size": 3})
    volume_args = [f"--volume={claim}={directory}" for claim, directory in volumes.items()]
    code = kubetuner(["data", "inspect", str(path), *volume_args, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code in (0, 1) and report["effective_batch"]["train_batch_size"] == 3  # the job's batch size
    (dataset,) = report["datasets"]
    assert dataset["id"] == "shapes" and dataset["files_found"] == 8
    assert dataset["location"] == str(volumes["datasets"] / "shapes")
    assert not (Path.cwd() / "runs" / "local-test").exists()  # inspecting creates no workdir


def test_every_spec_field_and_enum_value_gets_a_did_you_mean(tmp_path, volumes, capsys):
    path = manifest(tmp_path)
    job = yaml.safe_load(path.read_text())
    job["spec"]["model"]["famly"] = job["spec"]["model"].pop("family")
    job["spec"]["datasets"][0]["caption_strategy"] = "textfiles"
    job["spec"]["resources"]["gpuz"] = 1
    path.write_text(yaml.safe_dump(job))
    assert main(args(path, volumes, tmp_path / "work")) == 78
    err = capsys.readouterr().err
    assert 'unknown field "spec.model.famly" (did you mean family?)' in err
    assert 'unknown field "spec.resources.gpuz" (did you mean gpus?)' in err
    assert 'Unsupported value: "textfiles" (did you mean "textfile"?)' in err


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_a_closed_terminal_or_sigterm_stops_the_trainer_like_ctrl_c(tmp_path, volumes, sig):
    """The trainer has its own session: the runner must pass a hang-up or SIGTERM on, never orphan it."""
    import os

    from kubetuner_operator.local_run import build_run

    run = build_run(args(manifest(tmp_path), volumes, tmp_path / "work"))
    run.workdir.mkdir(parents=True)
    trainer = ("import signal, sys; signal.signal(signal.SIGTERM, lambda *a: sys.exit(75)); "
               "print('ready', flush=True); signal.pause()")

    def attempt(*, resume: bool) -> int:
        process = subprocess.Popen([sys.executable, "-c", trainer], stdout=subprocess.PIPE, text=True,
                                   start_new_session=True)
        assert process.stdout.readline().strip() == "ready"
        run._process = process
        os.kill(os.getpid(), sig)  # delivered to this (the runner's) process only
        code = process.wait(timeout=60)
        run._process = None
        return code

    run.attempt = attempt
    assert run.run(resume=True) == 130
    assert yaml.safe_load((run.workdir / "status.yaml").read_text())["phase"] == "Interrupted"
    assert signal.getsignal(sig) != run.on_interrupt  # the previous handler is back
