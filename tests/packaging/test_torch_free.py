"""The operator image has no torch: everything it imports must work without it."""

from __future__ import annotations

import subprocess
import sys

import pytest

TORCH_FREE_MODULES = [
    "kubetuner_trainer.options",
    "kubetuner_trainer.options.schema",
    "kubetuner_trainer.config",
    "kubetuner_trainer.contract",
    "kubetuner_trainer.events",
    "kubetuner_trainer.placeholders",
    "kubetuner_operator.cli",
    "kubetuner_operator.crd.schema",
    "kubetuner_operator.crd.validation",
    "kubetuner_operator.crd_cli",
    "kubetuner_operator.spec",
    "kubetuner_operator.trainer_config",
    "kubetuner_operator.builders.trainer_pod",
    "kubetuner_operator.builders.multinode",
    "kubetuner_operator.builders.hook_job",
    "kubetuner_operator.status",
    "kubetuner_operator.reconcile",
    "kubetuner_operator.handlers",
    "kubetuner_operator.main",
    "kubetuner_operator.local_run",
]

BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "diffusers", "transformers", "accelerate", "peft"}:
            raise ImportError(f"{name} is not available in the operator image")
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("module", TORCH_FREE_MODULES)
def test_module_imports_without_the_torch_stack(module):
    code = BLOCK + f"import {module}\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_block_really_blocks():
    code = BLOCK + "import kubetuner_trainer.training.loop\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "not available in the operator image" in result.stderr


def test_kubetuner_crd_runs_without_torch():
    code = BLOCK + "from kubetuner_operator.cli import main\nraise SystemExit(main(['crd']))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kind: CustomResourceDefinition" in result.stdout
