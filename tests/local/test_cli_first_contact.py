"""The command lines' first impressions: versions, piping into ``head``, no cluster credentials."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

from kubetuner_operator.main import missing_credentials


def _run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, **kwargs)


def test_both_commands_print_their_version():
    expected = version("kubetuner")
    assert _run("-m", "kubetuner_operator.cli", "--version").stdout == f"kubetuner {expected}\n"
    assert _run("-m", "kubetuner_trainer.cli", "--version").stdout == f"kubetuner-train {expected}\n"


def test_output_piped_into_a_reader_that_stops_early_ends_quietly():
    for module in ("kubetuner_operator.cli", "kubetuner_trainer.cli"):
        argv = [sys.executable, "-m", module, *(["crd"] if module.startswith("kubetuner_operator") else ["--help"])]
        producer = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert producer.stdout.read(10)  # like `head -c 10`: read a little, then close the pipe
        producer.stdout.close()
        err = producer.stderr.read().decode()
        assert producer.wait(timeout=120) == 0, err
        assert "BrokenPipeError" not in err and "Traceback" not in err


def test_operator_without_credentials_says_so_in_one_line(tmp_path):
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = _run("-m", "kubetuner_operator.cli", "operator", env={**env, "PYTHONPATH": ":".join(sys.path)})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kubetuner operator: no cluster credentials")
    assert str(tmp_path / ".kube" / "config") in lines[0]
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    assert missing_credentials({"KUBECONFIG": str(kubeconfig)}) is None
    token = tmp_path / "token"
    token.write_text("t")
    assert missing_credentials({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "HOME": str(tmp_path)}, token=token) is None


def test_tiny_builder_refuses_an_unknown_flavour_with_the_allowed_ones(tmp_path, capsys):
    import pytest

    from kubetuner_trainer.tiny import main

    with pytest.raises(SystemExit) as stop:
        main(["model", "wan", str(tmp_path / "m"), "--flavour", "turbo-9000"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--flavour" in err and "turbo-9000" in err and "i2v-14b-2.1" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()
