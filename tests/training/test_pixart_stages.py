"""PixArt Sigma's eDiffi-style stage experts (``900M-1024-v0.7-stage1``/``-stage2``): each trains one part of
the timestep schedule through the shared refiner range, as SimpleTuner 3.1.6 does."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from training_helpers import InMemoryData, train_in_process

from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.models import load_family
from kubetuner_trainer.models.families.pixart_sigma import expert_stage
from kubetuner_trainer.training import preflight

STAGE1, STAGE2 = "900M-1024-v0.7-stage1", "900M-1024-v0.7-stage2"
COMMON = {"aspect_bucket_alignment": 16, "lr_scheduler": "constant"}


def _drawn(objective, count: int = 400, batch: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    return torch.cat([objective.sample_timesteps(torch.zeros(batch, 1), gen) for _ in range(count // batch)])


def test_stage_experts_train_their_part_of_the_schedule(make_cfg):
    family = load_family(make_cfg("pixart_sigma", model_flavour=STAGE1, **COMMON))
    drawn = _drawn(family.objective)  # the high-noise expert: [int(1000 * 0.2), 1000)
    assert drawn.min() >= 200 and drawn.min() < 260 and drawn.max() > 940
    assert family.objective.eval_timesteps(4) == [300, 500, 700, 900]

    def objective(**overrides):  # the same loaded model under other options
        family.cfg = make_cfg("pixart_sigma", **COMMON, **overrides)
        return family.make_objective()

    drawn = _drawn(objective(model_flavour=STAGE2))  # the low-noise expert: [0, 200)
    assert drawn.min() < 40 and drawn.max() < 200 and drawn.max() > 160
    wider = _drawn(objective(model_flavour=STAGE1, refiner_training_strength=0.35))
    assert wider.min() >= 350 and wider.min() < 420
    # stage 2 takes --refiner_training_invert_schedule as given; stage 1 always takes the inverted range
    assert _drawn(objective(model_flavour=STAGE2, refiner_training_invert_schedule=True)).min() >= 200
    base = _drawn(objective())
    assert base.min() < 40 and base.max() > 940


def test_the_stage_is_found_as_simpletuner_finds_it():
    def cfg(flavour, path=None):
        return SimpleNamespace(model_flavour=flavour, pretrained_model_name_or_path=path)

    assert expert_stage(cfg(STAGE1)) == "stage1" and expert_stage(cfg(STAGE2, "/models/x")) == "stage2"
    # with a flavour named, the model path names the stage too; without one, SimpleTuner does not look
    assert expert_stage(cfg("900M-1024-v0.6", "/models/pixart-stage2")) == "stage2"
    assert expert_stage(cfg(None, "/models/pixart-stage2")) is None
    assert expert_stage(cfg("600M-1024", "/models/pixart")) is None


def test_stage_runs_are_logged_an_empty_range_is_refused_and_a_stage_trains(make_cfg, tmp_path):
    warnings = [w for w in preflight.all_warnings(make_cfg("pixart_sigma", model_flavour=STAGE2, **COMMON))
                if w.option == "model_flavour"]
    assert len(warnings) == 1 and "[0, 200)" in warnings[0].message and "alone" in warnings[0].message
    with pytest.raises(ConfigError, match="refiner_training_strength.*stage1"):
        preflight.check(make_cfg("pixart_sigma", model_flavour=STAGE1, refiner_training_strength=1.0, **COMMON))
    cfg = make_cfg("pixart_sigma", model_flavour=STAGE1, max_train_steps=2, **COMMON)
    result, family, _ = train_in_process(cfg, data_factory=lambda enc: InMemoryData(enc, count=2, batch_size=2))
    assert result.exit_code == ExitCode.SUCCESS and family.objective.sampler.low == 200
    assert all(torch.isfinite(torch.tensor(loss)) for loss in result.losses)
