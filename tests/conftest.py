"""Shared test setup: the repository root and the spec folder."""

from __future__ import annotations

import os
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
