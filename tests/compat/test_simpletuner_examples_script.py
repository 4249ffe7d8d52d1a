"""scripts/simpletuner_examples.py: SimpleTuner-layout example folders, paths swapped, classified."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "scripts" / "simpletuner_examples.py"


def _example(root: Path, name: str, config: dict) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "config.json").write_text(json.dumps(config))


def test_examples_are_swapped_and_classified(tmp_path):
    examples = tmp_path / "examples"
    examples.mkdir()
    # a Hub dataset, as SimpleTuner's examples ship them: the script swaps it for local images
    (examples / "multidatabackend-hub.json").write_text(json.dumps([
        {"id": "hub-pics", "type": "huggingface", "dataset_name": "someone/pictures", "metadata_backend": "huggingface",
         "caption_strategy": "instanceprompt", "instance_prompt": "a toy", "resolution": 512,
         "resolution_type": "pixel", "minimum_image_size": 0, "cache_dir_vae": "cache/vae/{model_family}/pics"}]))
    common = {"data_backend_config": "config/examples/multidatabackend-hub.json", "output_dir": "output/x",
              "model_type": "lora", "max_train_steps": 100, "train_batch_size": 1, "mixed_precision": "no", "lora_rank": 4}
    _example(examples, "sd1x.peft-lora", {**common, "model_family": "sd1x", "optimizer": "adamw_bf16"})
    _example(examples, "newer.peft-lora", {**common, "model_family": "flux2"})
    _example(examples, "broken.peft-lora", {**common, "model_family": "sd1x", "lr_scheduler": "cosine_with_warmup"})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # --print-config only (no weights read): training SimpleTuner-style configs is the corpus test's job
    done = subprocess.run([sys.executable, str(SCRIPT), "--examples", str(examples)],
                          capture_output=True, text=True, env=env, timeout=900)
    rows = {line.split()[0]: line.split()[2] for line in done.stdout.splitlines()[1:] if not line.startswith("totals")}
    assert rows == {"broken.peft-lora": "invalid", "newer.peft-lora": "unbuilt", "sd1x.peft-lora": "accepted"}, \
        done.stdout + done.stderr[-3000:]
    assert "totals: trained 0, accepted 1, unbuilt 1, invalid 1" in done.stdout
    assert done.returncode == 1  # an invalid example is a compatibility finding



def test_a_tiny_model_grows_enough_blocks_for_an_examples_tread_routes(tmp_path):
    import importlib.util

    from diffusers import AuraFlowTransformer2DModel

    from kubetuner_trainer.models.families.auraflow import tiny_auraflow_transformer_config
    from kubetuner_trainer.training.tread import parse_tread_config, resolve_routes

    spec = importlib.util.spec_from_file_location("simpletuner_examples_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    AuraFlowTransformer2DModel(**tiny_auraflow_transformer_config()).save_pretrained(tmp_path / "transformer")
    # SimpleTuner's Wan example: blocks 2 to 23, then 24 to the last but one
    routes = {"routes": [{"selection_ratio": 0.25, "start_layer_idx": 2, "end_layer_idx": 23},
                         {"selection_ratio": 0.1, "start_layer_idx": 24, "end_layer_idx": -2}]}
    script.deepen_for_routes(tmp_path, "auraflow", routes)
    grown = AuraFlowTransformer2DModel.from_pretrained(tmp_path / "transformer")
    blocks = len(grown.joint_transformer_blocks) + len(grown.single_transformer_blocks)
    assert (len(grown.joint_transformer_blocks), blocks) == (13, 26)  # the least that fits, grown alike
    resolve_routes(parse_tread_config(routes), blocks)
