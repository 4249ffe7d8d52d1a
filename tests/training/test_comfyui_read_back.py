"""A ComfyUI-format LoRA file kubetuner wrote (a checkpoint with ``--lora_format comfyui``) reads back into the
attached adapters bit for bit, for the families whose ComfyUI names diffusers' loaders cannot read back (Cosmos'
original names, Lumina 2's fused qkv)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from kubetuner_trainer.models import load_family
from kubetuner_trainer.training.lora import from_comfyui
from kubetuner_trainer.training.trainable import build_trainable

CASES = {"lumina2": {"aspect_bucket_alignment": 16, "peft_lora_target_modules": '["to_q", "to_k", "to_v", "to_out.0", '
                                                                                '"linear_1", "norm1.linear"]'},
         "cosmos2image": {"tokenizer_max_length": 24}}


@pytest.mark.parametrize("family_name", sorted(CASES))
def test_a_comfyui_checkpoint_loads_back_exactly(make_cfg, tmp_path, family_name):
    cfg = make_cfg(family_name, lora_format="comfyui", lora_rank=2, lora_alpha=3, **CASES[family_name])
    trainable = build_trainable(load_family(cfg, weight_dtype=torch.float32), cfg)
    trainable.attach()
    trained = [p for m in trainable.modules.values() for p in m.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trained:
            p.add_(torch.randn_like(p))
    saved = [p.detach().clone() for p in trained]
    trainable.save(tmp_path / "ck", title="t")
    assert all(k.startswith("diffusion_model.") for k in load_file(str(tmp_path / "ck" / "pytorch_lora_weights.safetensors")))
    with torch.no_grad():
        for p in trained:
            p.zero_()
    trainable.load(tmp_path / "ck")  # what a resume does
    assert all(torch.equal(a, b) for a, b in zip(saved, trained, strict=True))
    # a file whose alphas are not these adapters' is not read as ours (its weights would need rescaling)
    tensors = load_file(str(tmp_path / "ck" / "pytorch_lora_weights.safetensors"))
    assert from_comfyui(trainable.family, trainable.modules, tensors) is not None
    tensors.update({k: v * 2 for k, v in tensors.items() if k.endswith(".alpha")})
    assert from_comfyui(trainable.family, trainable.modules, tensors) is None
