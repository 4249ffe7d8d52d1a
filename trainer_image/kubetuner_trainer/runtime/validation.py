"""Validation renders: images from the family's diffusers pipeline, or an external script.

The loop asks :meth:`Validator.due` after each step (and at epoch ends) and calls
:meth:`Validator.run` (or :meth:`Validator.run_and_report`) with a factory that builds the
pipeline around the current weights — ``lambda: family.build_pipeline(denoiser=unwrapped_denoiser)``.
Images land in ``output_dir/validation/step-<n>/`` with an ``index.json`` describing each file
(prompt, seed, size, variant, and with ``--evaluation_type clip`` the render's CLIP score, see
:mod:`.clip_evaluation`). Unless ``--validation_disable_unconditional`` (kubetuner's default) or the family
renders video, an ``unconditional`` render of the empty prompt comes first, as in SimpleTuner.
With ``--disable_benchmark false`` the start-up round of a fresh run (the base model) is also kept in
``validation/benchmark/``; later image renders get a ``<name>-benchmark.png`` beside them, the base model's
render on the left and the step's on the right, and trackers and webhooks receive those (SimpleTuner's
layout, without its text labels). Video
families' pipelines return clips (``.frames``): each is written as
``<name>.mp4``, ``<name>.gif`` and its first frame ``<name>.png`` (the PNG is what trackers receive) at
the family's ``output_framerate``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..contract import VALIDATION_INDEX, TrainerState, benchmark_folder, validation_folder
from ..options.model import ValueProblem, parse_json_value
from ._options import option
from .scripts import VALIDATION, ScriptRunner, command_of, latest_checkpoint_dir, placeholder_values

log = logging.getLogger(__name__)

PipelineFactory = Callable[[], Any]

#: short name of the empty-prompt render (SimpleTuner's name for it)
UNCONDITIONAL = "unconditional"
#: white pixels between the base model's render and the step's in a benchmark comparison
BENCHMARK_GAP = 5

DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 7.5
DEFAULT_SEED = 42
#: --validation_using_datasets denoise strength: SimpleTuner 3.1.6 passes 0.2 (it has no option for it)
IMG2IMG_STRENGTH = 0.2
# A small built-in prompt library (--validation_prompt_library), covering subjects, styles and
# compositions that show over- or under-fitting quickly.
BUILTIN_PROMPTS = {
    "portrait": "a close-up portrait of an elderly fisherman, soft window light, detailed skin",
    "street": "a rainy city street at night with neon reflections on wet asphalt",
    "still_life": "a still life of pears and a copper jug on a wooden table, oil painting",
    "landscape": "a wide mountain valley at sunrise with mist over a winding river",
    "animal": "a red fox sitting in fresh snow, looking at the camera",
    "interior": "a sunlit reading room with tall shelves and a green velvet armchair",
    "typography": "a hand-painted shop sign that reads OPEN in bold letters",
    "sketch": "a pencil sketch of a lighthouse on a rocky coast",
}
# --validation_noise_scheduler → diffusers scheduler class name
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}


class ValidationConfigError(ValueError):
    """A validation option cannot be used; the message names the option."""


@dataclass(frozen=True)
class AdapterRun:
    """One set of extra LoRA adapters loaded for a validation pass (``--validation_adapter_*``)."""

    label: str
    paths: tuple[tuple[str, str, float], ...]  # (path or hub id[:weight_name], adapter name, strength)


def parse_resolutions(value: Any, fallback: int) -> list[tuple[int, int]]:
    """``--validation_resolution``: ``1024``, ``768x512`` (width x height), ``1.0`` (megapixels), comma lists.

    Sizes are rounded down to multiples of 8 pixels (the VAE's latent grid).
    """
    if value is None or str(value).strip() == "":
        return [(_round8(fallback), _round8(fallback))]
    sizes = []
    for item in (i.strip() for i in str(value).split(",")):
        if not item:
            continue
        match = re.fullmatch(r"(\d+)\s*[xX]\s*(\d+)", item)
        try:
            if match:
                width, height = int(match.group(1)), int(match.group(2))
            elif "." in item or float(item) <= 10:
                side = math.sqrt(float(item) * 1_000_000)
                width = height = int(side // 64 * 64)
            else:
                width = height = int(item)
        except ValueError:
            raise ValidationConfigError(
                f"validation_resolution: {item!r} is not a size; use 1024, 768x512 or 1.0 (megapixels)"
            ) from None
        if min(width, height) < 8:
            raise ValidationConfigError(f"validation_resolution: {item!r} is smaller than 8 pixels")
        sizes.append((_round8(width), _round8(height)))
    return list(dict.fromkeys(sizes))


def _round8(value: float) -> int:
    return max(8, int(value) // 8 * 8)


#: the options that give validation prompts (any of them set: the trainer renders validation images)
PROMPT_OPTIONS = ("validation_prompt", "validation_prompt_library", "user_prompt_library")


def load_prompts(cfg: Any) -> dict[str, str]:
    """Validation prompts by short name: ``--validation_prompt``, the built-in library, the user library."""
    prompts: dict[str, str] = {}
    single = option(cfg, "validation_prompt")
    if single:
        prompts["validation"] = str(single)
    if option(cfg, "validation_prompt_library"):
        prompts.update(BUILTIN_PROMPTS)
    library = option(cfg, "user_prompt_library")
    if library:
        path = Path(str(library))
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValidationConfigError(f"user_prompt_library: cannot read {path}: {error}") from None
        if not isinstance(data, dict):
            raise ValidationConfigError("user_prompt_library must be a JSON object of {short name: prompt}")
        for name, entry in data.items():
            text = entry.get("prompt") if isinstance(entry, dict) else entry
            if not isinstance(text, str) or not text:
                raise ValidationConfigError(f"user_prompt_library: entry {name!r} has no prompt text")
            prompts[_slug(str(name))] = text
    return prompts


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:48] or "prompt"


def _adapter_name(name: str) -> str:
    # prefixed: a bare name such as "half" would clash with torch.nn.Module attributes
    return "validation_" + _slug(name)


def parse_adapter_runs(cfg: Any) -> list[AdapterRun]:
    """The adapter passes: ``--validation_adapter_config`` entries, or the single ``--validation_adapter_path``."""
    config = option(cfg, "validation_adapter_config")
    if config is not None:
        try:
            parsed = parse_json_value(config)
        except ValueProblem as problem:
            raise ValidationConfigError(f"validation_adapter_config: {problem}") from None
        entries = parsed.get("runs") if isinstance(parsed, dict) else parsed
        if not isinstance(entries, list) or not entries:
            raise ValidationConfigError("validation_adapter_config must be a list of runs (or {\"runs\": [...]})")
        runs = []
        for index, entry in enumerate(entries):
            runs.append(_adapter_run(entry, f"validation_adapter_config[{index}]", index))
        return runs
    path = option(cfg, "validation_adapter_path")
    if not path:
        return []
    name = option(cfg, "validation_adapter_name") or "validation_adapter"
    strength = float(option(cfg, "validation_adapter_strength"))
    return [AdapterRun(label=_slug(name), paths=((str(path), _adapter_name(name), strength),))]


def _adapter_run(entry: Any, where: str, index: int) -> AdapterRun:
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict):
        raise ValidationConfigError(f"{where} must be an object or a path")
    strength = float(entry.get("strength", 1.0))
    items: list[tuple[str, str, float]] = []
    extra = entry.get("adapters", entry.get("paths", []))
    if entry.get("path"):
        items.append((str(entry["path"]), _adapter_name(entry.get("adapter_name") or f"adapter_{index}"), strength))
    for sub_index, sub in enumerate(extra if isinstance(extra, list) else [extra]):
        sub = {"path": sub} if isinstance(sub, str) else sub
        if not isinstance(sub, dict) or not sub.get("path"):
            raise ValidationConfigError(f"{where}.adapters[{sub_index}] needs a path")
        name = _adapter_name(sub.get("adapter_name") or f"adapter_{index}_{sub_index}")
        items.append((str(sub["path"]), name, float(sub.get("strength", strength))))
    if not items:
        raise ValidationConfigError(f"{where} needs a path (or adapters/paths)")
    label = _slug(entry.get("label") or items[0][1].removeprefix("validation_"))
    return AdapterRun(label=label, paths=tuple(items))


def check_validation_config(cfg: Any) -> list[tuple[str, str]]:
    """(option, message) for every validation option that cannot be used."""
    problems = []
    checks = (("validation_resolution", lambda: parse_resolutions(option(cfg, "validation_resolution"), 512)),
              ("user_prompt_library", lambda: load_prompts(cfg)),
              ("validation_adapter_config", lambda: parse_adapter_runs(cfg)))
    for name, check in checks:
        try:
            check()
        except ValidationConfigError as error:
            problems.append((name, str(error)))
    if option(cfg, "validation_noise_scheduler") == "perflow":
        problems.append(("validation_noise_scheduler",
                         "perflow is not supported; use one of " + ", ".join(SCHEDULERS)))
    return problems


class Validator:
    """Decides when to validate and renders the validation images."""

    def __init__(self, cfg: Any, family: Any = None, output_dir: str | Path | None = None, *,
                 scripts: ScriptRunner | None = None, scorer: Any = None) -> None:
        """``scorer``: a :class:`~.clip_evaluation.ClipScorer` scoring each render (``--evaluation_type clip``)."""
        self.cfg = cfg
        self.family = family  # the model family (``ModelFamily``), whose pipeline renders by default
        self.output_dir = Path(str(output_dir or option(cfg, "output_dir", ".")))
        self.scripts = scripts or ScriptRunner()
        self.disabled = bool(option(cfg, "validation_disable"))
        self.external = option(cfg, "validation_method") == "external-script"
        self.step_interval = option(cfg, "validation_step_interval")
        self._epoch_ends = 0
        self.epoch_interval = option(cfg, "validation_epoch_interval")
        self.prompts = load_prompts(cfg)
        self.scorer = scorer
        limit = option(cfg, "num_eval_images")
        self.score_limit = int(limit) if limit is not None else None
        self.last_scores: dict[str, float] = {}
        self._scores: dict[str, list[float]] = {}
        fallback = int(option(cfg, "resolution", 512) or 512)
        if fallback <= 10:  # megapixel-style --resolution
            fallback = int(math.sqrt(fallback * 1_000_000))
        self.resolutions = parse_resolutions(option(cfg, "validation_resolution"), fallback)
        self.adapter_runs = parse_adapter_runs(cfg)
        #: edit models render training samples with their conditioning images instead of the prompts
        requires = getattr(family, "requires_conditioning", None)
        edits = bool(callable(requires) and requires(cfg))
        #: --validation_using_datasets: image-to-image from the training images (SimpleTuner's strength 0.2)
        self.img2img = bool(option(cfg, "validation_using_datasets")) and not edits and family is not None
        self.uses_dataset_samples = edits or self.img2img
        self._samples: list[Any] | None = None
        self.adapter_mode = option(cfg, "validation_adapter_mode") or "adapter_only"
        # ema_validation defaults to "comparison" (SimpleTuner's default) but means nothing without --use_ema.
        self.ema_mode = (option(cfg, "ema_validation") or "none") if option(cfg, "use_ema") else "none"
        if option(cfg, "validation_noise_scheduler") == "perflow":
            raise ValidationConfigError("validation_noise_scheduler=perflow is not supported; use one of "
                                        + ", ".join(SCHEDULERS))

    @property
    def enabled(self) -> bool:
        return not self.disabled and (self.external or bool(self.prompts) or self.uses_dataset_samples)

    def dataset_samples(self) -> list[Any]:
        """The training samples validation renders with their conditioning images (``data.conditioning``):
        ``--num_eval_images`` per dataset (SimpleTuner's count, 4 when unset), found once."""
        if self._samples is None:
            from ..data.conditioning import validation_samples
            from ..options import get_registry

            count = option(self.cfg, "num_eval_images") or get_registry().get("num_eval_images").upstream.default
            self._samples = validation_samples(self.cfg, int(count), conditioning=not self.img2img)
        return self._samples

    @property
    def renders(self) -> bool:
        """Whether validation renders images itself (not disabled, not an external script, has prompts)."""
        return self.enabled and not self.external

    def _rendered_prompts(self) -> dict[str, str]:
        """The prompts of one round: the unconditional one first unless disabled (video families never)."""
        if option(self.cfg, "validation_disable_unconditional") or getattr(self.family, "is_video", False):
            return self.prompts
        return {UNCONDITIONAL: "", **self.prompts}

    def due(self, step: int, epoch_end: bool = False, epoch: int | None = None) -> bool:
        """Whether to validate after ``step`` (``epoch_end``: the step closed epoch ``epoch``)."""
        if not self.enabled:
            return False
        if self.step_interval and step > 0 and step % int(self.step_interval) == 0:
            return True
        if epoch_end:
            if epoch is None:  # the caller does not count epochs: count the epoch ends seen
                self._epoch_ends += 1
                epoch = self._epoch_ends
            if self.epoch_interval:
                return epoch % int(self.epoch_interval) == 0
        return False

    def due_on_startup(self) -> bool:
        """Whether to render before the first step of a fresh run (``--validation_on_startup``, or the benchmark)."""
        return self.enabled and (bool(option(self.cfg, "validation_on_startup")) or self._benchmark_due())

    def _benchmark_due(self) -> bool:
        return (self.renders and not option(self.cfg, "disable_benchmark")
                and not benchmark_folder(self.output_dir).exists())

    # --- running ------------------------------------------------------------------------

    def run_and_report(self, step: int, events: Any, pipeline_factory: PipelineFactory | None = None,
                       *, ema_pipeline_factory: PipelineFactory | None = None) -> list[Path]:
        """:meth:`run` between ``validating`` and ``training`` states, reporting the images to ``events``."""
        events.state(TrainerState.VALIDATING, f"validation at step {step}")
        started = time.monotonic()
        try:
            images = self.run(step, pipeline_factory, ema_pipeline_factory=ema_pipeline_factory)
        except Exception as error:
            log.exception("validation at step %d failed", step)
            events.error(f"validation at step {step} failed: {error}")
            images = []
            self.last_scores = {}
        seconds = time.monotonic() - started
        if self.last_scores:
            events.validation(step, images, seconds=seconds, scores=dict(self.last_scores))
        else:  # event sinks that predate CLIP scores take no scores argument
            events.validation(step, images, seconds=seconds)
        events.state(TrainerState.TRAINING)
        return images

    def run(self, step: int, pipeline_factory: PipelineFactory | None = None, *,
            ema_pipeline_factory: PipelineFactory | None = None) -> list[Path]:
        """Render the validation images for ``step``; returns the files written.

        With a scorer, :attr:`last_scores` holds the round's CLIP scores afterwards (see
        :func:`.clip_evaluation.summarize`): at most ``--num_eval_images`` renders are scored, in render order.
        """
        self.last_scores = {}
        self._scores = {}
        if self.disabled:
            return []
        if self.external:
            self._run_external(step)
            return []
        if not self.prompts and not self.uses_dataset_samples:
            return []
        factories: list[tuple[str, PipelineFactory]] = []
        if pipeline_factory is None and self.family is not None:
            pipeline_factory = self.family.build_pipeline
        if self.ema_mode in ("ema_only", "comparison") and ema_pipeline_factory is None:
            log.warning("ema_validation=%s but the loop gave no EMA weights; validating the live weights",
                        self.ema_mode)
        if pipeline_factory is not None and (self.ema_mode != "ema_only" or ema_pipeline_factory is None):
            factories.append(("", pipeline_factory))
        if ema_pipeline_factory is not None and self.ema_mode in ("ema_only", "comparison"):
            factories.append(("ema", ema_pipeline_factory))
        if not factories:
            raise ValidationConfigError("validation needs a pipeline factory or a model family")
        benchmarking = step == 0 and self._benchmark_due()
        folder = validation_folder(self.output_dir, step)
        folder.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        index: list[dict[str, Any]] = []
        seed = self._base_seed()
        for variant, factory in factories:
            pipeline = self._prepare(factory())
            if self.img2img:  # the same modules in the family's image-to-image pipeline
                import diffusers

                pipeline = getattr(diffusers, self.family.img2img_pipeline_class).from_pipe(pipeline)
            for adapter_label, run in self._adapter_passes():
                label = "-".join(p for p in (variant, adapter_label) if p)
                restore = self._load_adapters(pipeline, run) if run is not None else None
                try:
                    written += self._render(pipeline, folder, label, seed, index)
                finally:
                    if run is not None:
                        self._unload_adapters(pipeline, run, restore or [])
        if benchmarking:
            self._keep_benchmark(written)
        elif not option(self.cfg, "disable_benchmark"):
            written = self._with_benchmark(written, index)
        (folder / VALIDATION_INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
        log.info("validation at step %d: %d image(s) in %s", step, len(written), folder)
        if self.scorer is not None:
            from .clip_evaluation import MEAN, summarize

            self.last_scores = summarize(self._scores)
            if self.last_scores:
                log.info("CLIP score at step %d: mean %.2f over %d prompt(s)", step, self.last_scores[MEAN],
                         len(self._scores))
        return written

    def _base_seed(self) -> int:
        if option(self.cfg, "validation_randomize"):
            return random.randrange(2**31)
        seed = option(self.cfg, "validation_seed")
        if seed is None:
            seed = option(self.cfg, "seed", DEFAULT_SEED)
        return int(seed)

    def _adapter_passes(self) -> list[tuple[str, AdapterRun | None]]:
        if not self.adapter_runs or self.adapter_mode == "none":
            return [("", None)]
        passes: list[tuple[str, AdapterRun | None]] = []
        if self.adapter_mode == "comparison":
            passes.append(("base", None))
        passes += [(run.label, run) for run in self.adapter_runs]
        return passes

    def _prepare(self, pipeline: Any) -> Any:
        import diffusers

        name = option(self.cfg, "validation_noise_scheduler")
        if name and (self.family is None or self.family.swappable_validation_scheduler):
            scheduler_class = getattr(diffusers, SCHEDULERS[name])
            pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def _load_adapters(self, pipeline: Any, run: AdapterRun) -> list[str]:
        """Load and activate the run's adapters; returns the adapters active before (to restore)."""
        existing = list(pipeline.get_active_adapters()) if hasattr(pipeline, "get_active_adapters") else []
        names, weights = [], []
        for path, name, strength in run.paths:
            source, weight_name = _split_weight_name(path)
            kwargs = {"weight_name": weight_name} if weight_name else {}
            pipeline.load_lora_weights(source, adapter_name=name, **kwargs)
            names.append(name)
            weights.append(strength)
        # adapters being trained stay active at full strength next to the loaded ones
        pipeline.set_adapters(existing + names, [1.0] * len(existing) + weights)
        return existing

    def _unload_adapters(self, pipeline: Any, run: AdapterRun, restore: list[str]) -> None:
        pipeline.delete_adapters([name for _, name, _ in run.paths])
        if restore:
            pipeline.set_adapters(restore)

    def _render(self, pipeline: Any, folder: Path, label: str, seed: int, index: list[dict]) -> list[Path]:
        import torch

        steps = int(option(self.cfg, "validation_num_inference_steps", DEFAULT_STEPS))
        guidance = float(option(self.cfg, "validation_guidance", DEFAULT_GUIDANCE))
        negative = option(self.cfg, "validation_negative_prompt")
        rescale = option(self.cfg, "validation_guidance_rescale")
        count = int(option(self.cfg, "num_validation_images"))
        device = "cpu"
        if option(self.cfg, "validation_seed_source") == "gpu" and torch.cuda.is_available():
            device = "cuda"
        files = []
        inputs: list[tuple[str, str, Any]] = [(n, p, None) for n, p in self._rendered_prompts().items()]
        if self.uses_dataset_samples:  # SimpleTuner: dataset samples replace the prompts of edit models
            inputs = [(s.short_name, s.prompt, list(s.images)) for s in self.dataset_samples()]
        for short_name, prompt, images in inputs:
            # an input image keeps its size (SimpleTuner), several render at --validation_resolution
            sizes = [images[0].size] if images and len(images) == 1 else self.resolutions
            for width, height in sizes:
                for number in range(count):
                    image_seed = seed + number
                    kwargs: dict[str, Any] = dict(
                        prompt=prompt, width=width, height=height, num_inference_steps=steps,
                        guidance_scale=guidance, generator=torch.Generator(device).manual_seed(image_seed),
                    )
                    if images is not None:
                        kwargs["image"] = images[0] if len(images) == 1 else images
                    if self.img2img:
                        kwargs["strength"] = IMG2IMG_STRENGTH
                    if negative:
                        kwargs["negative_prompt"] = negative
                    if rescale:
                        kwargs["guidance_rescale"] = float(rescale)
                    if self.family is not None:
                        kwargs = self.family.pipeline_call_kwargs(kwargs)
                        if option(self.cfg, "controlnet"):
                            from ..models.controlnet import controlnet_call_kwargs

                            kwargs = controlnet_call_kwargs(self.family, kwargs)
                    with torch.no_grad():
                        output = pipeline(**kwargs)
                    stem = "-".join(p for p in (label, short_name, f"{width}x{height}", str(number)) if p)
                    path = folder / f"{stem}.png"
                    entry: dict[str, Any] = {"file": path.name, "prompt": prompt, "negative_prompt": negative,
                                             "seed": image_seed, "width": width, "height": height, "variant": label,
                                             "steps": steps, "guidance": guidance}
                    if getattr(output, "frames", None) is not None:
                        entry.update(self._save_clip(output.frames[0], folder, stem))
                    else:
                        output.images[0].save(path)
                    self._score(path, prompt, "-".join(p for p in (label, short_name) if p), entry)
                    files.append(path)
                    index.append(entry)
        return files

    def _keep_benchmark(self, renders: list[Path]) -> None:
        """Copy the base model's renders into the benchmark folder (written whole, then renamed into place)."""
        import shutil

        target = benchmark_folder(self.output_dir)
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for path in renders:
            shutil.copy2(path, partial / path.name)
        partial.rename(target)
        log.info("benchmark: %d base-model render(s) kept in %s", len(renders), target)

    def _with_benchmark(self, renders: list[Path], index: list[dict[str, Any]]) -> list[Path]:
        """Each image render that has a benchmark twin, replaced by ``<name>-benchmark.png`` = [base | render]."""
        from PIL import Image

        base_folder = benchmark_folder(self.output_dir)
        entries = {e["file"]: e for e in index}
        shown = []
        for path in renders:
            base = base_folder / path.name
            entry = entries.get(path.name, {})
            if not base.is_file() or "video" in entry:
                shown.append(path)
                continue
            with Image.open(base) as left, Image.open(path) as right:
                stitched = Image.new("RGB", (left.width + BENCHMARK_GAP + right.width, max(left.height, right.height)),
                                     "white")
                stitched.paste(left.convert("RGB"), (0, 0))
                stitched.paste(right.convert("RGB"), (left.width + BENCHMARK_GAP, 0))
            side_by_side = path.with_name(f"{path.stem}-benchmark.png")
            stitched.save(side_by_side)
            entry["benchmark"] = side_by_side.name
            shown.append(side_by_side)
        return shown

    def _score(self, path: Path, prompt: str, key: str, entry: dict[str, Any]) -> None:
        """CLIP-score the render at ``path`` (a clip's first frame) while under ``--num_eval_images``."""
        if self.scorer is None:
            return
        if self.score_limit is not None and sum(map(len, self._scores.values())) >= self.score_limit:
            return
        from PIL import Image

        with Image.open(path) as image:
            (score,) = self.scorer.score([image], [prompt])
        entry["clip_score"] = round(score, 4)
        self._scores.setdefault(key, []).append(score)

    def _save_clip(self, frames: Any, folder: Path, stem: str) -> dict[str, Any]:
        """Write a rendered clip (PIL frames) as MP4 + GIF + first-frame PNG; returns its index fields."""
        from ..data.video import DEFAULT_FRAMERATE, write_gif, write_mp4

        fps = self.family.output_framerate(self.cfg) if self.family is not None else float(
            option(self.cfg, "framerate") or DEFAULT_FRAMERATE)
        frames = list(frames)
        write_mp4(frames, folder / f"{stem}.mp4", fps)
        write_gif(frames, folder / f"{stem}.gif", fps)
        frames[0].save(folder / f"{stem}.png")
        return {"video": f"{stem}.mp4", "gif": f"{stem}.gif", "frames": len(frames), "fps": fps}

    def _run_external(self, step: int) -> None:
        command = command_of(self.cfg, "validation_external_script")
        if command is None:
            raise ValidationConfigError("validation_method=external-script needs --validation_external_script")
        latest = latest_checkpoint_dir(self.output_dir)
        if latest is None:
            log.warning("external validation at step %d: no checkpoint yet, {local_checkpoint_path} is empty", step)
        values = placeholder_values(self.cfg, global_step=step, local_checkpoint_path=latest)
        background = bool(option(self.cfg, "validation_external_background"))
        self.scripts.run(VALIDATION, command, values, background=background, check=not background)


def _split_weight_name(path: str) -> tuple[str, str | None]:
    """``org/repo:weights.safetensors`` → (``org/repo``, ``weights.safetensors``); local files stay whole."""
    if Path(path).exists():
        local = Path(path)
        return (str(local.parent), local.name) if local.is_file() else (str(local), None)
    if ":" in path and not re.match(r"^[A-Za-z]:\\", path):
        source, weight = path.rsplit(":", 1)
        return source, weight or None
    return path, None
