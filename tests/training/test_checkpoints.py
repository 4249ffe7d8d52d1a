"""Checkpoint folders: atomic write, integrity, resume discovery, pruning, metadata."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.models import family_class
from kubetuner_trainer.training import checkpoints as ckpt
from kubetuner_trainer.training.lora import parse_target_modules, to_comfyui


def _write(out, step, kind="interval"):
    def write(folder):
        torch.save({"step": step}, folder / "optimizer.pt")
        (folder / ckpt.STATE_FILE).write_text(ckpt.TrainingState(global_step=step, kind=kind).to_json())
    return ckpt.run_atomic(out, step, write)


def test_latest_skips_incomplete_and_corrupt_checkpoints(tmp_path, caplog):
    for step in (2, 4, 6, 8):
        _write(tmp_path, step)
    assert ckpt.find_resume_checkpoint(tmp_path, "latest").name == "checkpoint-8"
    (tmp_path / "checkpoint-8" / "COMPLETE").unlink()  # write interrupted before the marker
    data = bytearray((tmp_path / "checkpoint-6" / "optimizer.pt").read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    (tmp_path / "checkpoint-6" / "optimizer.pt").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        found = ckpt.find_resume_checkpoint(tmp_path, "latest")
    assert found.name == "checkpoint-4"
    assert "checkpoint-8" in caplog.text and "no completion marker" in caplog.text
    assert "checkpoint-6" in caplog.text and "sha256" in caplog.text
    (tmp_path / "checkpoint-4" / "optimizer.pt").unlink()
    assert "missing" in ckpt.verify_checkpoint(tmp_path / "checkpoint-4")
    assert ckpt.find_resume_checkpoint(tmp_path, "latest").name == "checkpoint-2"


def test_explicit_resume_path_must_be_intact(tmp_path):
    _write(tmp_path, 3)
    assert ckpt.find_resume_checkpoint(tmp_path, "checkpoint-3") == tmp_path / "checkpoint-3"
    assert ckpt.find_resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-3")) == tmp_path / "checkpoint-3"
    (tmp_path / "checkpoint-3" / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match="checkpoint-3 cannot be used: its manifest does not match"):
        ckpt.find_resume_checkpoint(tmp_path, "checkpoint-3")
    with pytest.raises(ConfigError, match="not a checkpoint folder"):
        ckpt.find_resume_checkpoint(tmp_path, "checkpoint-99")
    assert ckpt.find_resume_checkpoint(tmp_path / "empty", "latest") is None
    assert ckpt.find_resume_checkpoint(tmp_path, None) is None


def test_atomic_write_leaves_no_partial_folder_when_writing_fails(tmp_path):
    def boom(folder):
        (folder / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError):
        ckpt.run_atomic(tmp_path, 5, boom)
    assert not (tmp_path / "checkpoint-5").exists()
    _write(tmp_path, 5)  # a retry replaces the leftover temp folder
    assert ckpt.verify_checkpoint(tmp_path / "checkpoint-5") is None
    manifest = json.loads((tmp_path / "checkpoint-5" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"optimizer.pt", "training_state.json"}


def test_pruning_keeps_the_newest_per_kind(tmp_path):
    for step, kind in ((1, "rolling"), (2, "interval"), (3, "rolling"), (4, "interval"), (5, "rolling"),
                       (6, "interval")):
        _write(tmp_path, step, kind)
    ckpt.prune_checkpoints(tmp_path, total_limit=2, rolling_limit=1)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 5, 6]


def test_due_kind():
    assert ckpt.due_kind(10, step_interval=5, rolling_interval=2) == "interval"
    assert ckpt.due_kind(4, step_interval=5, rolling_interval=2) == "rolling"
    assert ckpt.due_kind(3, step_interval=5, rolling_interval=2) is None
    assert ckpt.due_kind(3, step_interval=None, rolling_interval=None) is None


def test_env_expansion_in_modelspec_comment(caplog):
    assert ckpt.expand_env("by {env:WHO} on {env:WHERE}", {"WHO": "ann", "WHERE": "k8s"}) == "by ann on k8s"
    with caplog.at_level(logging.WARNING):
        assert ckpt.expand_env("x{env:NOPE}y", {}) == "xy"
    assert "NOPE" in caplog.text


def test_comfyui_key_conversion():
    sd = {"unet": {"down_blocks.0.attn.to_q.lora_A.weight": torch.ones(2, 4),
                   "down_blocks.0.attn.to_q.lora_B.weight": torch.zeros(4, 2)},
          "text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 4),
                           "text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(4, 2)}}
    out = to_comfyui(family_class("sd1x"), sd, {"unet": 4.0, "text_encoder": 2.0})
    assert set(out) == {
        "lora_unet_down_blocks_0_attn_to_q.lora_down.weight", "lora_unet_down_blocks_0_attn_to_q.lora_up.weight",
        "lora_unet_down_blocks_0_attn_to_q.alpha",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha",
    }
    assert float(out["lora_unet_down_blocks_0_attn_to_q.alpha"]) == 4.0
    with pytest.raises(ValueError, match="unexpected LoRA key"):
        to_comfyui(family_class("sd1x"), {"unet": {"weird.weight": torch.ones(1)}}, {"unet": 1.0})


def test_target_module_parsing():
    assert parse_target_modules(None, ("to_q",)) == ["to_q"]
    assert parse_target_modules('["to_k", "to_v"]', ()) == ["to_k", "to_v"]
    assert parse_target_modules("to_k, to_v", ()) == ["to_k", "to_v"]
    assert parse_target_modules(["proj_in"], ()) == ["proj_in"]
    with pytest.raises(ValueError, match="peft_lora_target_modules must be a list"):
        parse_target_modules([1, 2], ())
