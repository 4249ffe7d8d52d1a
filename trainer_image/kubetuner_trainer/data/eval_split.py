"""Which dataset entries are held out of training for evaluation, and the checks of that choice.

Torch-free (the admission webhook runs :func:`split_eval_problems` on the dataset list it parses);
:mod:`.evaluation` builds the fixed evaluation batches from these ids.
"""

from __future__ import annotations

from typing import Any

from kubetuner_trainer.config.errors import Problem

from .dataset_config import DatasetConfig


def held_out_ids(config: DatasetConfig, evaluated: list[str]) -> set[str]:
    """Datasets kept out of training: every ``eval`` entry and the ones evaluated on."""
    return {e.id for e in config.image_datasets if e.dataset_type == "eval"} | set(evaluated)


def eval_dataset_ids(cfg: Any, config: DatasetConfig) -> tuple[list[str], list[Problem]]:
    """The ids of the datasets to evaluate on, and problems with ``--eval_dataset_id``."""
    wanted = getattr(cfg, "eval_dataset_id", None)
    if not wanted:
        return [e.id for e in config.image_datasets if e.dataset_type == "eval"], []
    known = [e.id for e in config.image_datasets]
    if wanted not in known:
        listed = ", ".join(known) or "none"
        return [], [Problem("eval_dataset_id", wanted,
                            f"names no enabled image dataset in data_backend_config; known ids: {listed}")]
    if config.by_id(wanted).dataset_type == "image" and \
            [e.id for e in config.image_datasets if e.dataset_type == "image"] == [wanted]:
        return [], [Problem("eval_dataset_id", wanted,
                            "is the only image dataset, so nothing would be left to train on; add a "
                            "training dataset or unset eval_dataset_id")]
    return [wanted], []


def split_eval_problems(cfg: Any, config: DatasetConfig) -> list[Problem]:
    """Problems with the evaluation options against a parsed dataset list (for preflight)."""
    return eval_dataset_ids(cfg, config)[1]
