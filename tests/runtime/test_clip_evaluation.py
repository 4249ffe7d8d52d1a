"""CLIP-score evaluation of validation renders (--evaluation_type clip) with a tiny real CLIP model."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.runtime import build_runtime, preflight_warnings
from kubetuner_trainer.runtime.clip_evaluation import ClipScorer, load_scorer, summarize
from kubetuner_trainer.runtime.metrics import TrainerMetrics
from kubetuner_trainer.runtime.validation import Validator
from kubetuner_trainer.train import build_validator

FAST = {"validation_num_inference_steps": 2, "validation_resolution": "32", "validation_prompt": "a red cube"}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    from kubetuner_trainer.models.tiny import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "clip")


@pytest.fixture(scope="module")
def scorer(tiny_clip) -> ClipScorer:
    return ClipScorer.load(str(tiny_clip))


@pytest.fixture(scope="module")
def sd_pipeline(tiny_model):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_model("sd1x"), safety_checker=None)


def patterns() -> list[Image.Image]:
    red = Image.new("RGB", (40, 32), (220, 20, 20))
    stripes = Image.new("RGB", (32, 32), (0, 0, 0))
    stripes.paste((255, 255, 255), (0, 0, 32, 8))
    stripes.paste((30, 90, 250), (0, 16, 32, 24))
    return [red, stripes]


def test_score_is_clipped_scaled_cosine_of_the_projected_embeddings(scorer, tiny_clip):
    from transformers import CLIPModel

    prompts = ["a red cube", "blue and white stripes", "", "a very long prompt " * 30]
    images = patterns()
    pairs = [(i, p) for i in images for p in prompts]
    scores = scorer.score([i for i, _ in pairs], [p for _, p in pairs])
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    with torch.no_grad():
        text = scorer.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        prompt_features = model.get_text_features(**text).pooler_output
        pixel_values = scorer.image_processor(images=images, return_tensors="pt")["pixel_values"]
        image_features = model.get_image_features(pixel_values=pixel_values).pooler_output
    cosine = torch.nn.functional.cosine_similarity(image_features[:, None], prompt_features[None], dim=-1)
    expected = (100 * cosine).clamp(min=0).flatten()
    assert scores == pytest.approx(expected.tolist(), abs=1e-3)
    assert all(0 <= s <= 100 for s in scores)
    assert len({round(s, 3) for s in scores}) > 3, "the score depends on the prompt and the image"
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer.score(images, prompts[:1])


def test_summary_has_simpletuners_keys_and_a_mean_per_prompt():
    summary = summarize({"a": [10.0, 20.0], "b": [30.0], "empty": []})
    assert summary == pytest.approx({"clip/mean": 22.5, "clip/min": 15.0, "clip/max": 30.0, "clip/std": 7.5,
                                     "clip/prompt/a": 15.0, "clip/prompt/b": 30.0})
    assert summarize({}) == {}


def test_validation_renders_are_scored_and_reported(cfg_factory, scorer, sd_pipeline, receiver, tmp_path):
    class Tracker:  # what every tracker (TensorBoard, W&B, Comet) is handed
        def __init__(self):
            self.scalars = {}

        def validation(self, step, images):
            pass

        def scalar(self, tag, value, step):
            self.scalars[tag] = (value, step)

        def close(self):
            pass

    cfg = cfg_factory(**FAST, evaluation_type="clip", validation_disable_unconditional=False,
                      webhook_config={"webhook_type": "raw", "callback_url": receiver.url})
    tracker = Tracker()
    with build_runtime(cfg, install_signals=False) as rt:
        rt.trackers.append(tracker)
        validator = Validator(cfg, scorer=scorer)
        images = validator.run_and_report(4, rt, lambda: sd_pipeline)
        scores = validator.last_scores
        exposition = rt.metrics.exposition().decode()
    assert [p.name for p in images] == ["unconditional-32x32-0.png", "validation-32x32-0.png"]
    index = json.loads((images[0].parent / "index.json").read_text())
    expected = {e["file"]: scorer.score([Image.open(images[0].parent / e["file"])], [e["prompt"]])[0] for e in index}
    assert {e["file"]: e["clip_score"] for e in index} == pytest.approx(expected, abs=1e-3)
    assert scores["clip/prompt/validation"] == pytest.approx(expected["validation-32x32-0.png"], abs=1e-3)
    assert scores["clip/mean"] == pytest.approx(sum(expected.values()) / 2, abs=1e-3)
    assert f'kubetuner_trainer_validation_clip_score{{prompt="validation"}} {scores["clip/prompt/validation"]}' \
        in exposition
    assert f"kubetuner_trainer_validation_clip_score_mean {scores['clip/mean']}" in exposition
    event = next(r.json() for r in receiver.requests if r.json()["type"] == "training.validation")
    assert event["data"]["scores"]["clip/mean"] == pytest.approx(scores["clip/mean"], abs=1e-3)
    assert "CLIP score" in event["message"]
    assert tracker.scalars == {tag: (value, 4) for tag, value in scores.items()}
    assert {"clip/mean", "clip/min", "clip/max", "clip/std", "clip/prompt/unconditional"} <= set(scores)


class PatternPipeline:
    """Stands in for a diffusers pipeline: each call returns the next test pattern."""

    def __init__(self):
        self.calls = 0

    def __call__(self, **kwargs):
        from types import SimpleNamespace

        self.calls += 1
        return SimpleNamespace(images=[patterns()[self.calls % 2]])


def test_num_eval_images_caps_the_scored_renders(cfg_factory, scorer, tmp_path):
    cfg = cfg_factory(**FAST, evaluation_type="clip", num_eval_images=3, num_validation_images=2,
                      user_prompt_library=str(_library(tmp_path)))
    validator = Validator(cfg, scorer=scorer)
    images = validator.run(2, PatternPipeline)
    index = json.loads((images[0].parent / "index.json").read_text())
    assert len(index) == 4 and ["clip_score" in e for e in index] == [True, True, True, False]
    tree = [e["clip_score"] for e in index if e["prompt"] == "a tree" and "clip_score" in e]
    assert validator.last_scores["clip/prompt/tree"] == pytest.approx(tree[0], abs=1e-3)


def _library(tmp_path: Path) -> Path:
    library = tmp_path / "prompts.json"
    library.write_text(json.dumps({"tree": "a tree"}))
    return library


def test_the_unconditional_render_is_off_by_default_and_never_for_video(cfg_factory):
    assert list(Validator(cfg_factory(**FAST))._rendered_prompts()) == ["validation"]
    on = cfg_factory(**FAST, validation_disable_unconditional=False)
    assert Validator(on)._rendered_prompts() == {"unconditional": "", "validation": "a red cube"}

    class Video:
        is_video = True

    assert list(Validator(on, Video())._rendered_prompts()) == ["validation"]


def test_the_evaluation_model_loads_at_start_on_the_main_process_only(cfg_factory, tiny_clip, tmp_path):
    cfg = cfg_factory(**FAST, evaluation_type="clip", pretrained_evaluation_model_name_or_path=str(tiny_clip))
    assert isinstance(build_validator(cfg, None).scorer, ClipScorer)
    assert build_validator(cfg, None, main_process=False).scorer is None
    assert build_validator(cfg_factory(**FAST), None).scorer is None
    assert load_scorer(cfg_factory(**FAST)) is None
    missing = cfg_factory(**FAST, evaluation_type="clip", pretrained_evaluation_model_name_or_path=str(tmp_path / "no"))
    with pytest.raises(ConfigError, match="pretrained_evaluation_model_name_or_path.*no such folder"):
        build_validator(missing, None)
    assert build_validator(cfg_factory(evaluation_type="clip", validation_disable=True,
                                       pretrained_evaluation_model_name_or_path=str(tmp_path / "no")),
                           None).scorer is None  # nothing is rendered, nothing loaded


def test_a_folder_without_a_clip_model_is_a_config_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as info:
        ClipScorer.load(str(tmp_path / "empty"))
    problem = info.value.problems[0]
    assert problem.option == "pretrained_evaluation_model_name_or_path" and "CLIPModel" in problem.message


def test_an_unreachable_hub_model_is_a_config_error(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="could not be reached") as info:
        ClipScorer.load("openai/clip-vit-large-patch14-336")
    assert info.value.problems[0].option == "pretrained_evaluation_model_name_or_path"


def test_warnings_name_what_has_no_effect(cfg_factory):
    def warned(**values):
        return {p.option for p in preflight_warnings(cfg_factory(**values))}

    assert warned(num_eval_images=3) == {"num_eval_images"}
    assert warned(**FAST, num_eval_images=3, evaluation_type="clip") == set()
    assert warned(evaluation_type="clip") == {"evaluation_type"}  # no prompt: nothing to score
    assert warned(**FAST, evaluation_type="clip", validation_method="external-script",
                  validation_external_script="true") == {"evaluation_type"}
    assert warned(validation_torch_compile=True, enable_watermark=True) == {"validation_torch_compile",
                                                                              "enable_watermark"}
    assert warned(validation_torch_compile=False, enable_watermark=False) == set()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_exposition_with_clip_scores_passes_promtool():
    metrics = TrainerMetrics()
    metrics.observe_validation(2.0, 2, summarize({"validation": [31.5], "tree": [12.25, 14.0]}))
    metrics.observe_validation(2.0, 1, summarize({"validation": [30.0]}))
    text = metrics.exposition()
    assert b'prompt="tree"' not in text  # a prompt of an earlier round is gone
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, check=False)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result


def test_benchmark_keeps_the_base_render_and_shows_it_beside_later_ones(cfg_factory, tmp_path):
    from kubetuner_trainer.contract import benchmark_folder

    cfg = cfg_factory(**FAST, disable_benchmark=False)
    validator = Validator(cfg)
    assert validator.due_on_startup()
    base = validator.run(0, PatternPipeline)  # the start-up round of a fresh run: the base model
    assert [p.name for p in base] == ["validation-32x32-0.png"]
    assert (benchmark_folder(cfg.output_dir) / "validation-32x32-0.png").is_file()
    assert not validator.due_on_startup()  # kept once per output folder (a resumed run reuses it)
    pipeline = PatternPipeline()
    pipeline.calls = 1  # the next render is the other pattern
    (shown,) = validator.run(2, lambda: pipeline)
    assert shown.name == "validation-32x32-0-benchmark.png"
    with Image.open(shown) as both, Image.open(base[0]) as left, Image.open(shown.with_name(
            "validation-32x32-0.png")) as right:
        assert both.size == (left.width + 5 + right.width, 32)
        assert list(both.crop((0, 0, left.width, 32)).getdata()) == list(left.convert("RGB").getdata())
        assert list(both.crop((left.width + 5, 0, both.width, 32)).getdata()) == list(right.convert("RGB").getdata())
        assert list(left.getdata()) != list(right.getdata())
    (entry,) = json.loads((shown.parent / "index.json").read_text())
    assert entry["file"] == "validation-32x32-0.png" and entry["benchmark"] == shown.name
    off = Validator(cfg_factory(**FAST))  # kubetuner's default: no benchmark
    assert not off.due_on_startup()


def test_flux_real_cfg_warns_that_no_cfg_until_timestep_is_not_built(cfg_factory):
    from kubetuner_trainer.models.families.flux import FluxFamily

    def warned(**values):
        return {p.option for p in FluxFamily.config_warnings(cfg_factory(model_family="flux", **values))}

    assert warned(validation_guidance_real=3.0) == {"validation_guidance_real"}
    assert warned() == set() and warned(validation_guidance_real=3.0, validation_negative_prompt="") == set()


def test_worker_processes_forward_scores_only_when_there_are_some(monkeypatch):
    import queue
    import signal
    import threading

    from kubetuner_trainer.launcher import QueueEvents

    monkeypatch.setattr(signal, "signal", lambda *args: None)  # leave this process's handlers alone
    sent = queue.Queue()
    events = QueueEvents(sent, threading.Event(), forward=True)
    events.validation(2, [], seconds=1.0)
    events.validation(4, [], seconds=1.0, scores={"clip/mean": 20.0})
    assert sent.get_nowait() == ("validation", (2, []), {"seconds": 1.0})
    assert sent.get_nowait() == ("validation", (4, []), {"seconds": 1.0, "scores": {"clip/mean": 20.0}})
