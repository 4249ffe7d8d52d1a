"""Shared test setup: the repository root and the spec folder."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def spec_dir() -> Path | None:
    """The shared SimpleTuner option spec, when the workspace provides it."""
    candidates = [os.environ.get("KUBETUNER_SPEC_DIR"), REPO_ROOT.parent / "shared" / "spec", REPO_ROOT / "shared" / "spec"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "simpletuner-options.ja.md").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Callable[[str], Path]:
    """``tiny_model("sdxl")`` → a diffusers folder saved with ``save_pretrained`` (built once per session);
    ``tiny_model("sdxl", "refiner-1.0")`` builds a flavour whose layout differs."""
    from kubetuner_trainer.tiny import build_tiny_model

    built: dict[tuple[str, str | None], Path] = {}

    def get(family: str, flavour: str | None = None) -> Path:
        if (family, flavour) not in built:
            built[family, flavour] = build_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"),
                                                      flavour=flavour)
        return built[family, flavour]

    return get


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: model tests run in parallel (xdist) next to other suites on few cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """In-process trainer runs fix accelerate's process-wide state (mixed precision, which now defaults
    to bf16 as in SimpleTuner); reset it after each test so no test inherits another's."""
    yield
    import sys

    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(True)
