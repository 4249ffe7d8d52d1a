"""Parse and validate the dataset list (SimpleTuner's ``multidatabackend.json``).

Every problem is collected and raised at once as a ``DatasetConfigError`` (a ``ConfigError``, so the
trainer exits with the "configuration error, do not retry" code). Each message names the entry id, the
field and what is allowed. Global defaults (``--resolution`` etc.) fill fields an entry leaves out.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetuner_trainer.config.errors import MISSING as MISSING_VALUE
from kubetuner_trainer.config.errors import ConfigError, Problem
from kubetuner_trainer.options import ValueProblem, parse_bool
from kubetuner_trainer.placeholders import substitute_text

from .settings import DataSettings

# "eval": images held out of training and used for the evaluation loss (see data/evaluation.py)
# "conditioning": images paired with a training dataset's images (see data/conditioning.py)
DATASET_TYPES = ("image", "video", "text_embeds", "image_embeds", "eval", "conditioning")
# entries whose files are read, bucketed and cached ("video": clips, see data/video.py)
IMAGE_DATASET_TYPES = ("image", "video", "eval")
TRAINING_DATASET_TYPES = ("image", "video")
# entries whose files are read from storage (conditioning images are read with their target's plan)
FILE_DATASET_TYPES = (*IMAGE_DATASET_TYPES, "conditioning")
PLANNED_DATASET_TYPES = ("audio",)
BACKEND_TYPES = ("local", "aws")
PLANNED_BACKEND_TYPES = ("csv", "huggingface")
RESOLUTION_TYPES = ("pixel", "pixel_area", "area")
CROP_STYLES = ("random", "center", "corner")
CROP_ASPECTS = ("square", "preserve", "closest", "random")
CAPTION_STRATEGIES = ("textfile", "filename", "instanceprompt", "parquet")
# SimpleTuner's metadata backends: "discovery" (and its older name "json") is what this trainer does.
METADATA_BACKENDS = ("discovery", "json")
# SimpleTuner's conditioning_type values (its sampler's list); unset behaves as reference_strict here
CONDITIONING_TYPES = ("reference_strict", "reference_loose", "controlnet", "mask", "segmentation")
DEFAULT_CONDITIONING_TYPE = "reference_strict"
# Values SimpleTuner accepts for a field that this trainer has not built yet ("not supported yet").
PLANNED_VALUES: dict[str, tuple[str, ...]] = {
    "type": PLANNED_BACKEND_TYPES,
    "dataset_type": PLANNED_DATASET_TYPES,
    "caption_strategy": ("huggingface", "csv"),
    "metadata_backend": ("parquet", "huggingface"),
}
# Placeholders SimpleTuner fills in every text value of a dataset entry (e.g. cache_dir_vae).
DATASET_PLACEHOLDERS = ("model_family",)
DISCOVERY_STAGES = ("aspect", "vae", "text", "metadata")
# Fields the operator adds to entries of a TrainingJob; they do not concern the trainer.
OPERATOR_FIELDS = frozenset({"credentialsSecret", "pvc"})
# SimpleTuner fields that users may paste but this trainer does not honour yet.
PLANNED_FIELDS = frozenset({
    "vae_cache_clear_each_epoch", "hash_filenames", "cache_file_suffix",
    "huggingface", "dataset_name", "csv_file", "csv_caption_column", "csv_cache_dir", "csv_url_column",
    "audio", "disable_validation", "write_batch_size",
    "caption_filter_list_regex", "prepend_instance_prompt_to_filename", "image_file_extensions",
})
SECRET_FIELDS = frozenset({"aws_secret_access_key", "aws_access_key_id"})


class DatasetConfigError(ConfigError):
    """The dataset list cannot be used; every problem is listed."""

    def __init__(self, problems: list[Problem]):
        super().__init__(problems)
        count = len(self.problems)
        lines = "\n".join(f"  - {_describe(p)}" for p in self.problems)
        self.args = (f"{count} dataset configuration problem{'s' if count != 1 else ''}:\n{lines}",)

    def __str__(self) -> str:
        return str(self.args[0])


def _describe(problem: Problem) -> str:
    if problem.value is MISSING_VALUE:
        return f"{problem.option}: {problem.message}"
    return f"{problem.option}={problem.value!r}: {problem.message}"


@dataclass(frozen=True)
class ParquetSpec:
    path: str
    filename_column: str = "id"
    caption_column: str = "caption"
    fallback_caption_column: str | None = None
    width_column: str | None = None
    height_column: str | None = None
    identifier_includes_extension: bool = False


@dataclass(frozen=True)
class VideoSpec:
    """SimpleTuner's ``video`` block of a ``dataset_type: video`` entry, defaults applied.

    ``num_frames``: frames per training clip (default 5 s at ``--framerate``, else 30 fps: SimpleTuner's);
    ``min_frames``: clips with fewer stored frames are left out (default ``num_frames``; never below it);
    ``max_frames``: clips with more are left out (default: no limit); ``is_i2v``: the clips train
    image-to-video (None: the family decides, e.g. Wan's i2v flavours and LTX-Video default to true).
    """

    num_frames: int
    min_frames: int
    max_frames: int | None = None
    is_i2v: bool | None = None


VIDEO_FIELDS = ("num_frames", "min_frames", "max_frames", "is_i2v")


@dataclass(frozen=True)
class DatasetEntry:
    """One validated dataset entry, with global defaults already applied."""

    id: str
    dataset_type: str = "image"
    type: str = "local"
    disabled: bool = False
    instance_data_dir: str | None = None
    aws_bucket_name: str | None = None
    aws_region_name: str | None = None
    aws_endpoint_url: str | None = None
    aws_access_key_id: str | None = field(default=None, repr=False)
    aws_secret_access_key: str | None = field(default=None, repr=False)
    aws_data_prefix: str = ""
    resolution: float = 1024
    resolution_type: str = "pixel_area"
    minimum_image_size: float | None = None
    maximum_image_size: float | None = None
    target_downsample_size: float | None = None
    max_upscale_threshold: float | None = None
    minimum_aspect_ratio: float | None = None
    maximum_aspect_ratio: float | None = None
    crop: bool = False
    crop_style: str = "random"
    crop_aspect: str = "square"
    crop_aspect_buckets: tuple[float, ...] = ()
    caption_strategy: str = "filename"
    instance_prompt: str | None = None
    prepend_instance_prompt: bool = False
    only_instance_prompt: bool = False
    caption_filter_list: tuple[str, ...] = ()
    parquet: ParquetSpec | None = None
    cache_dir_vae: str | None = None
    cache_dir: str | None = None
    text_embeds: str | None = None
    image_embeds: str | None = None
    default: bool = False
    repeats: int = 0
    repeats_set: bool = False
    probability: float = 1.0
    max_num_samples: int | None = None
    is_regularisation_data: bool = False
    skip_file_discovery: str = ""
    preserve_data_backend_cache: bool = False
    scan_for_errors: bool = False
    video: VideoSpec | None = None
    #: training entries: the ids of their conditioning datasets, in order (``conditioning_data``)
    conditioning_data: tuple[str, ...] = ()
    #: conditioning entries: how the image pairs with its target (``CONDITIONING_TYPES``)
    conditioning_type: str | None = None
    source_dataset_id: str | None = None
    #: generated conditioning entries: the ``conditioning`` block they come from (see data/generated.py)
    generator: dict[str, Any] | None = field(default=None, compare=False)

    def skips(self, stage: str) -> bool:
        return stage in {s.strip() for s in self.skip_file_discovery.split(",") if s.strip()}

    @property
    def location(self) -> str:
        """Where the data lives, for messages (never includes credentials)."""
        if self.type == "aws":
            return f"s3://{self.aws_bucket_name}/{self.aws_data_prefix}"
        return str(self.instance_data_dir)


@dataclass(frozen=True)
class DatasetConfig:
    entries: tuple[DatasetEntry, ...]

    @property
    def image_datasets(self) -> tuple[DatasetEntry, ...]:
        """Enabled entries of images: training datasets and evaluation (``dataset_type: eval``) ones."""
        return tuple(e for e in self.entries if e.dataset_type in IMAGE_DATASET_TYPES and not e.disabled)

    def conditioning_for(self, entry: DatasetEntry) -> tuple[DatasetEntry, ...]:
        """The enabled conditioning datasets linked to training dataset ``entry``, in link order."""
        linked = [self.by_id(i) for i in entry.conditioning_data]
        return tuple(e for e in linked if not e.disabled)

    @property
    def conditioning_datasets(self) -> tuple[DatasetEntry, ...]:
        return tuple(e for e in self.entries if e.dataset_type == "conditioning" and not e.disabled)

    def by_id(self, dataset_id: str) -> DatasetEntry:
        for entry in self.entries:
            if entry.id == dataset_id:
                return entry
        raise KeyError(dataset_id)

    def text_embeds_for(self, entry: DatasetEntry) -> DatasetEntry | None:
        """The ``text_embeds`` entry an image dataset writes its prompt embeddings to (or None)."""
        if entry.text_embeds:
            return self.by_id(entry.text_embeds)
        return _default_of(self.entries, "text_embeds")

    def image_embeds_for(self, entry: DatasetEntry) -> DatasetEntry | None:
        if entry.image_embeds:
            return self.by_id(entry.image_embeds)
        return None


def _default_of(entries: tuple[DatasetEntry, ...], kind: str) -> DatasetEntry | None:
    candidates = [e for e in entries if e.dataset_type == kind and not e.disabled]
    for entry in candidates:
        if entry.default:
            return entry
    return candidates[0] if len(candidates) == 1 else None


# field -> (kind, choices). kinds: str, bool, int, float, number, floats, strs, parquet
_FIELDS: dict[str, tuple[str, tuple[Any, ...] | None]] = {
    "id": ("str", None),
    "dataset_type": ("str", DATASET_TYPES),
    "type": ("str", BACKEND_TYPES),
    "disabled": ("bool", None),
    "disable": ("bool", None),
    "instance_data_dir": ("str", None),
    "aws_bucket_name": ("str", None),
    "aws_region_name": ("str", None),
    "aws_endpoint_url": ("str", None),
    "aws_access_key_id": ("str", None),
    "aws_secret_access_key": ("str", None),
    "aws_data_prefix": ("str", None),
    "resolution": ("number", None),
    "resolution_type": ("str", RESOLUTION_TYPES),
    "minimum_image_size": ("number", None),
    "maximum_image_size": ("number", None),
    "target_downsample_size": ("number", None),
    "max_upscale_threshold": ("number", None),
    "minimum_aspect_ratio": ("number", None),
    "maximum_aspect_ratio": ("number", None),
    "crop": ("bool", None),
    "crop_style": ("str", CROP_STYLES),
    "crop_aspect": ("str", CROP_ASPECTS),
    "crop_aspect_buckets": ("floats", None),
    "caption_strategy": ("str", CAPTION_STRATEGIES),
    "metadata_backend": ("str", METADATA_BACKENDS),
    "instance_prompt": ("str", None),
    "prepend_instance_prompt": ("bool", None),
    "only_instance_prompt": ("bool", None),
    "caption_filter_list": ("strs", None),
    "parquet": ("parquet", None),
    "cache_dir_vae": ("str", None),
    "cache_dir": ("str", None),
    "text_embeds": ("str", None),
    "image_embeds": ("str", None),
    "default": ("bool", None),
    "repeats": ("int", None),
    "probability": ("number", None),
    "max_num_samples": ("int", None),
    "is_regularisation_data": ("bool", None),
    "is_regularization_data": ("bool", None),
    "skip_file_discovery": ("str", None),
    "preserve_data_backend_cache": ("bool", None),
    "scan_for_errors": ("bool", None),
    "video": ("video", None),
    "conditioning_data": ("strs", None),
    "conditioning_type": ("str", CONDITIONING_TYPES),
    "source_dataset_id": ("str", None),
}
_PARQUET_FIELDS = ("path", "filename_column", "caption_column", "fallback_caption_column", "width_column",
                   "height_column", "identifier_includes_extension")


def load_dataset_config(source: str | Path | list[Any], settings: DataSettings | None = None) -> DatasetConfig:
    """Read the dataset list from a JSON file path, inline JSON text or an already-parsed list."""
    settings = settings or DataSettings()
    if isinstance(source, list):
        raw: Any = source
    else:
        text = str(source)
        if text.lstrip().startswith("["):
            raw = _parse_json(text, "inline JSON")
        else:
            path = Path(text).expanduser()
            if not path.is_file():
                raise DatasetConfigError([Problem("data_backend_config", text, "file not found")])
            raw = _parse_json(path.read_text(encoding="utf-8"), str(path))
    return parse_dataset_config(raw, settings)


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetConfigError([Problem("data_backend_config", where, f"is not valid JSON: {error}")]) from None


def parse_dataset_config(raw: Any, settings: DataSettings) -> DatasetConfig:
    """Validate a parsed dataset list; raise ``DatasetConfigError`` listing every problem."""
    problems: list[Problem] = []
    if not isinstance(raw, list) or not raw:
        raise DatasetConfigError([Problem("data_backend_config", MISSING_VALUE,
                                          "must be a non-empty JSON list of dataset entries")])
    entries: list[DatasetEntry] = []
    seen: set[str] = set()
    raw = expand_generated(fill_placeholders(raw, settings), settings, problems)
    for index, item in enumerate(raw):
        entry = _parse_entry(index, item, settings, problems)
        if entry is None:
            continue
        if entry.id in seen:
            problems.append(Problem(f"datasets[{entry.id}].id", entry.id, "is used by two entries; ids must be unique"))
        seen.add(entry.id)
        entries.append(entry)
    _check_references(entries, problems)
    if not problems and not any(e.dataset_type in TRAINING_DATASET_TYPES and not e.disabled for e in entries):
        problems.append(Problem("data_backend_config", MISSING_VALUE,
                                "has no enabled entry with dataset_type 'image' or 'video' to train on"))
    if problems:
        raise DatasetConfigError(problems)
    return DatasetConfig(tuple(entries))


def fill_placeholders(raw: Any, settings: DataSettings) -> Any:
    """Substitute ``{model_family}`` (``DATASET_PLACEHOLDERS``) in every text value, as SimpleTuner does.

    SimpleTuner's example dataset lists write ``cache_dir_vae: cache/vae/{model_family}/...``.
    A placeholder whose option is unset stays as written.
    """
    known = {name: getattr(settings, name) for name in DATASET_PLACEHOLDERS if getattr(settings, name) is not None}
    if isinstance(raw, str):
        return substitute_text(raw, known)
    if isinstance(raw, Mapping):
        return {key: fill_placeholders(value, settings) for key, value in raw.items()}
    if isinstance(raw, list):
        return [fill_placeholders(item, settings) for item in raw]
    return raw


# fields of a source entry a generated conditioning entry keeps (its geometry; SimpleTuner copies the entry)
_GENERATED_KEEPS = ("resolution", "resolution_type", "minimum_image_size", "maximum_image_size",
                    "target_downsample_size", "max_upscale_threshold", "minimum_aspect_ratio", "maximum_aspect_ratio",
                    "crop", "crop_style", "crop_aspect", "crop_aspect_buckets", "disabled", "disable", "repeats")
_GENERATOR_KEY = "__generator__"


def expand_generated(raw: Any, settings: DataSettings, problems: list[Problem]) -> Any:
    """Turn each entry's ``conditioning`` block (one object or a list) into generated conditioning entries.

    SimpleTuner's rules (its metadata duplicator): id ``<source>_conditioning_<type>``, files under the
    block's ``instance_data_dir`` or ``{cache_dir}/conditioning_data/<id>``, always local storage, latents in
    ``<source cache_dir_vae>/<id>`` (else the default VAE cache folder), ``conditioning_type`` from the block
    (default ``reference_strict``), and the source's ``conditioning_data`` becomes the generated ids.
    """
    from .generated import GENERATED_TYPES, PLANNED_GENERATED_TYPES, generated_id

    if not isinstance(raw, list):
        return raw
    out: list[Any] = []
    generated: list[Any] = []
    for item in raw:
        if not isinstance(item, Mapping) or "conditioning" not in item:
            out.append(item)
            continue
        item = dict(item)
        block = item.pop("conditioning")
        ident = item.get("id", "?")
        where = f"datasets[{ident}].conditioning"
        blocks = [block] if isinstance(block, Mapping) else block
        if not isinstance(blocks, list) or not blocks or not all(isinstance(b, Mapping) for b in blocks):
            problems.append(Problem(where, block, "must be an object (or a list of objects) with a 'type'"))
            out.append(item)
            continue
        ids = []
        for b in blocks:
            kind = b.get("type")
            if kind in PLANNED_GENERATED_TYPES:
                problems.append(Problem(f"{where}.type", kind, f"is valid in SimpleTuner but not supported yet by "
                                        f"this trainer ({PLANNED_GENERATED_TYPES[kind]}); supported: "
                                        f"{', '.join(sorted(set(GENERATED_TYPES.values())))}"))
                continue
            if kind not in GENERATED_TYPES:
                problems.append(Problem(f"{where}.type", kind if kind is not None else MISSING_VALUE,
                                        "must name a conditioning generator: "
                                        f"{', '.join(sorted(set(GENERATED_TYPES.values())))}"))
                continue
            gen_id = generated_id(str(ident), str(kind))
            entry: dict[str, Any] = {k: item[k] for k in _GENERATED_KEEPS if k in item}
            source_cache = item.get("cache_dir_vae") if item.get("type", "local") == "local" else None
            entry.update({
                "id": gen_id, "dataset_type": "conditioning", "type": "local", "source_dataset_id": ident,
                "instance_data_dir": b.get("instance_data_dir")
                or os.path.join(settings.cache_root, "conditioning_data", gen_id),
                "conditioning_type": b.get("conditioning_type", DEFAULT_CONDITIONING_TYPE),
                _GENERATOR_KEY: dict(b),
            })
            if isinstance(source_cache, str):
                entry["cache_dir_vae"] = os.path.join(source_cache, gen_id)
            generated.append(entry)
            ids.append(gen_id)
        item["conditioning_data"] = ids
        out.append(item)
    return out + generated


def _parse_entry(index: int, item: Any, settings: DataSettings, problems: list[Problem]) -> DatasetEntry | None:
    if not isinstance(item, Mapping):
        problems.append(Problem(f"datasets[{index}]", MISSING_VALUE, "must be a JSON object"))
        return None
    raw_id = item.get("id")
    if not isinstance(raw_id, str) or not raw_id.strip():
        problems.append(Problem(f"datasets[{index}].id", raw_id if raw_id is not None else MISSING_VALUE,
                                "is required: a non-empty string that stays stable across runs"))
        return None
    ident = raw_id
    where = f"datasets[{ident}]"
    values: dict[str, Any] = {}
    failed: set[str] = set()
    for key, value in item.items():
        if key in OPERATOR_FIELDS:
            continue
        if key == _GENERATOR_KEY:
            values["generator"] = value
            continue
        if key in PLANNED_FIELDS:
            problems.append(Problem(f"{where}.{key}", _shown(key, value), "is not supported yet by this trainer"))
            continue
        if key not in _FIELDS:
            hint = difflib.get_close_matches(key, list(_FIELDS), n=1, cutoff=0.7)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            problems.append(Problem(f"{where}.{key}", _shown(key, value), f"is not a known dataset field{extra}"))
            continue
        try:
            values[key] = _convert(key, value)
        except ValueProblem as error:
            failed.add(key)
            problems.append(Problem(f"{where}.{key}", _shown(key, value), str(error)))
    if "caption_strategy" in values and values["caption_strategy"] is None:
        values.pop("caption_strategy")
    # A wrong type/dataset_type makes the cross-field checks meaningless; report only the root cause.
    check = not failed & {"type", "dataset_type"}
    return _build_entry(ident, where, values, settings, problems if check else [])


def _shown(key: str, value: Any) -> Any:
    return "***" if key in SECRET_FIELDS else value


def _convert(key: str, value: Any) -> Any:
    kind, choices = _FIELDS[key]
    if value is None:
        return None
    if kind == "str":
        if not isinstance(value, str):
            raise ValueProblem(f"must be a string, got {type(value).__name__}")
        if key == "caption_strategy" and value == "instance_prompt":
            value = "instanceprompt"
        if value in PLANNED_VALUES.get(key, ()):
            raise ValueProblem(f"{key} {value!r} is valid in SimpleTuner but not supported yet by this trainer; "
                               f"supported: {', '.join(choices)}")
        if choices and value not in choices:
            raise ValueProblem(f"{value!r} is not one of the allowed values: {', '.join(choices)}")
        return value
    if kind == "bool":
        return parse_bool(value)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueProblem("must be an integer")
        try:
            return int(value)
        except ValueError:
            raise ValueProblem("must be an integer") from None
    if kind == "number":
        if isinstance(value, bool):
            raise ValueProblem("must be a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueProblem("must be a number") from None
    if kind == "floats":
        if not isinstance(value, list) or not value:
            raise ValueProblem("must be a non-empty list of aspect ratios (numbers, width / height)")
        try:
            out = tuple(float(v) for v in value if not isinstance(v, bool))
        except (TypeError, ValueError):
            raise ValueProblem("must be a list of numbers (width / height)") from None
        if len(out) != len(value) or any(v <= 0 for v in out):
            raise ValueProblem("must be a list of positive numbers (width / height)")
        return out
    if kind == "strs":
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ValueProblem("must be a list of strings (or a path to a text file of them)")
    if kind == "video":
        return _convert_video(value)
    if kind == "parquet":
        if not isinstance(value, Mapping):
            raise ValueProblem(f"must be an object with the keys {', '.join(_PARQUET_FIELDS)}")
        unknown = sorted(set(value) - set(_PARQUET_FIELDS))
        if unknown:
            raise ValueProblem(f"unknown key {unknown[0]!r}; allowed keys: {', '.join(_PARQUET_FIELDS)}")
        if not isinstance(value.get("path"), str):
            raise ValueProblem("needs 'path': the parquet file holding the captions")
        kwargs = {k: v for k, v in value.items() if v is not None}
        if "identifier_includes_extension" in kwargs:
            kwargs["identifier_includes_extension"] = parse_bool(kwargs["identifier_includes_extension"])
        return kwargs
    raise AssertionError(kind)


def _convert_video(value: Any) -> dict[str, Any]:
    """The ``video`` block's values, type-checked (defaults are applied in ``_video_spec``)."""
    if not isinstance(value, Mapping):
        raise ValueProblem(f"must be an object with the keys {', '.join(VIDEO_FIELDS)}")
    unknown = sorted(set(value) - set(VIDEO_FIELDS))
    if unknown:
        hint = difflib.get_close_matches(unknown[0], VIDEO_FIELDS, n=1, cutoff=0.6)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueProblem(f"unknown key {unknown[0]!r}{extra}; allowed keys: {', '.join(VIDEO_FIELDS)}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        if item is None:
            continue
        if key == "is_i2v":
            out[key] = parse_bool(item)
        elif isinstance(item, bool) or not isinstance(item, int) or item < 1:
            raise ValueProblem(f"{key} must be a whole number of frames, at least 1 (got {item!r})")
        else:
            out[key] = item
    return out


def _video_spec(block: dict[str, Any] | None, settings: DataSettings, where: str,
                problems: list[Problem]) -> VideoSpec:
    """SimpleTuner's defaults and rules for the ``video`` block (see :class:`VideoSpec`)."""
    from .video import DEFAULT_CLIP_SECONDS, DEFAULT_FRAMERATE

    block = dict(block or {})
    num = block.get("num_frames") or int((settings.framerate or DEFAULT_FRAMERATE) * DEFAULT_CLIP_SECONDS)
    minimum = block.get("min_frames", num)
    if minimum < num:
        problems.append(Problem(f"{where}.video.min_frames", minimum,
                                f"must be at least num_frames ({num}): a clip needs num_frames frames"))
    maximum = block.get("max_frames")
    if maximum is not None and maximum < minimum:
        problems.append(Problem(f"{where}.video.max_frames", maximum, f"must be at least min_frames ({minimum})"))
    return VideoSpec(num, minimum, maximum, block.get("is_i2v"))


def _build_entry(ident: str, where: str, values: dict[str, Any], settings: DataSettings,
                 problems: list[Problem]) -> DatasetEntry:
    def take(name: str, default: Any) -> Any:
        value = values.pop(name, None)
        return default if value is None else value

    values.pop("id", None)
    values.pop("metadata_backend", None)  # only the values meaning "discovery" get here: what this trainer does
    disabled = take("disabled", False) or take("disable", False)
    regularisation = take("is_regularisation_data", False) or take("is_regularization_data", False)
    repeats_set = values.get("repeats") is not None
    video_block = values.pop("video", None)
    if values.get("dataset_type") == "video":
        values["video"] = _video_spec(video_block, settings, where, problems)
    elif video_block is not None:
        problems.append(Problem(f"{where}.video", video_block, "is for entries with dataset_type 'video'"))
    if isinstance(values.get("parquet"), dict):
        spec = dict(values["parquet"])
        if settings.parquet_filename_column:
            spec.setdefault("filename_column", settings.parquet_filename_column)
        if settings.parquet_caption_column:
            spec.setdefault("caption_column", settings.parquet_caption_column)
        values["parquet"] = ParquetSpec(**spec)
    entry = DatasetEntry(
        id=ident,
        disabled=disabled,
        is_regularisation_data=regularisation,
        dataset_type=take("dataset_type", "image"),
        type=take("type", "local"),
        resolution=take("resolution", float(settings.resolution)),
        resolution_type=take("resolution_type", settings.resolution_type),
        minimum_image_size=take("minimum_image_size", settings.minimum_image_size),
        maximum_image_size=take("maximum_image_size", settings.maximum_image_size),
        target_downsample_size=take("target_downsample_size", settings.target_downsample_size),
        max_upscale_threshold=take("max_upscale_threshold", settings.max_upscale_threshold),
        caption_strategy=take("caption_strategy", _global_caption_strategy(settings)),
        instance_prompt=take("instance_prompt", settings.instance_prompt),
        prepend_instance_prompt=take("prepend_instance_prompt", settings.prepend_instance_prompt),
        only_instance_prompt=take("only_instance_prompt", settings.only_instance_prompt),
        cache_dir_vae=take("cache_dir_vae", None),
        aws_data_prefix=take("aws_data_prefix", ""),
        repeats=take("repeats", 0),
        repeats_set=repeats_set,
        probability=take("probability", 1.0),
        skip_file_discovery=take("skip_file_discovery", settings.skip_file_discovery or ""),
        preserve_data_backend_cache=take("preserve_data_backend_cache", settings.preserve_data_backend_cache),
        **{k: v for k, v in values.items() if v is not None},
    )
    _check_entry(entry, where, problems)
    return entry


def _global_caption_strategy(settings: DataSettings) -> str:
    value = settings.caption_strategy or "filename"
    return "instanceprompt" if value == "instance_prompt" else value


def _check_entry(e: DatasetEntry, where: str, problems: list[Problem]) -> None:
    def bad(name: str, value: Any, message: str) -> None:
        problems.append(Problem(f"{where}.{name}", _shown(name, value), message))

    if e.type == "local" and e.dataset_type in FILE_DATASET_TYPES and not e.instance_data_dir:
        bad("instance_data_dir", MISSING_VALUE, f"is required for a local {e.dataset_type} dataset: the folder "
            "of its files")
    if e.type == "aws" and not e.aws_bucket_name:
        bad("aws_bucket_name", MISSING_VALUE, "is required when type is 'aws'")
    if e.dataset_type in ("text_embeds", "image_embeds") and e.type == "local" and not e.cache_dir:
        bad("cache_dir", MISSING_VALUE, f"is required for a {e.dataset_type} entry: where the cache is written")
    if e.dataset_type in FILE_DATASET_TYPES and e.cache_dir:
        bad("cache_dir", e.cache_dir, "is for text_embeds/image_embeds entries; an image dataset's latent cache "
            "folder is cache_dir_vae")
    if e.dataset_type not in IMAGE_DATASET_TYPES and e.text_embeds:
        bad("text_embeds", e.text_embeds, "only image datasets refer to a text_embeds entry")
    if e.resolution <= 0:
        bad("resolution", e.resolution, "must be positive")
    if e.resolution_type in ("pixel", "pixel_area") and e.resolution < 64:
        bad("resolution", e.resolution, f"is in pixels for resolution_type {e.resolution_type!r}; use e.g. 1024")
    if e.resolution_type == "area" and e.resolution > 64:
        bad("resolution", e.resolution, "is in megapixels for resolution_type 'area'; use e.g. 1.0")
    if e.maximum_image_size is not None and e.target_downsample_size is None:
        bad("target_downsample_size", MISSING_VALUE, "is required when maximum_image_size is set")
    if (e.maximum_image_size is not None and e.target_downsample_size is not None
            and e.target_downsample_size > e.maximum_image_size):
        bad("target_downsample_size", e.target_downsample_size, "must not exceed maximum_image_size")
    if e.max_upscale_threshold is not None and not 0 < e.max_upscale_threshold <= 1:
        bad("max_upscale_threshold", e.max_upscale_threshold, "must be between 0 (exclusive) and 1, e.g. 0.2")
    for name in ("minimum_aspect_ratio", "maximum_aspect_ratio"):
        value = getattr(e, name)
        if value is not None and value <= 0:
            bad(name, value, "must be a positive width / height ratio")
    if (e.minimum_aspect_ratio and e.maximum_aspect_ratio and e.minimum_aspect_ratio > e.maximum_aspect_ratio):
        bad("minimum_aspect_ratio", e.minimum_aspect_ratio, "is larger than maximum_aspect_ratio")
    if e.crop and e.crop_aspect in ("closest", "random") and not e.crop_aspect_buckets:
        bad("crop_aspect_buckets", MISSING_VALUE, f"is required when crop_aspect is {e.crop_aspect!r}, "
            "e.g. [0.75, 1.0, 1.33]")
    if e.caption_strategy == "instanceprompt" and not e.instance_prompt:
        bad("instance_prompt", MISSING_VALUE, "is required when caption_strategy is 'instanceprompt'")
    if e.only_instance_prompt and not e.instance_prompt:
        bad("instance_prompt", MISSING_VALUE, "is required when only_instance_prompt is true")
    if e.caption_strategy == "parquet" and e.parquet is None:
        bad("parquet", MISSING_VALUE, "is required when caption_strategy is 'parquet': {\"path\": ...}")
    if e.repeats < 0:
        bad("repeats", e.repeats, "must be 0 (each sample once per epoch) or more")
    if e.probability < 0:
        bad("probability", e.probability, "must be 0 or more (0 disables sampling from this dataset)")
    if e.max_num_samples is not None and e.max_num_samples < 1:
        bad("max_num_samples", e.max_num_samples, "must be at least 1")
    stages = [s.strip() for s in e.skip_file_discovery.split(",") if s.strip()]
    for stage in stages:
        if stage not in DISCOVERY_STAGES:
            bad("skip_file_discovery", e.skip_file_discovery,
                f"stage {stage!r} is not one of the allowed values: {', '.join(DISCOVERY_STAGES)}")
    if e.type == "local" and e.aws_bucket_name:
        bad("aws_bucket_name", e.aws_bucket_name, "is only used when type is 'aws'")
    if e.conditioning_type is not None and e.dataset_type != "conditioning":
        bad("conditioning_type", e.conditioning_type, "is for entries with dataset_type 'conditioning'")
    if e.conditioning_data and e.dataset_type not in TRAINING_DATASET_TYPES:
        bad("conditioning_data", list(e.conditioning_data), "links a training dataset (dataset_type 'image' or "
            "'video') to its conditioning datasets")


def _check_references(entries: list[DatasetEntry], problems: list[Problem]) -> None:
    by_id = {e.id: e for e in entries}
    for e in entries:
        for name, kind in (("text_embeds", "text_embeds"), ("image_embeds", "image_embeds")):
            ref = getattr(e, name)
            if ref is None:
                continue
            target = by_id.get(ref)
            if target is None or target.dataset_type != kind:
                known = ", ".join(sorted(x.id for x in entries if x.dataset_type == kind)) or "none defined"
                problems.append(Problem(f"datasets[{e.id}].{name}", ref,
                                        f"must name an entry with dataset_type {kind!r}; such entries: {known}"))
    _check_conditioning_links(entries, by_id, problems)
    defaults = [e.id for e in entries if e.dataset_type == "text_embeds" and e.default and not e.disabled]
    if len(defaults) > 1:
        problems.append(Problem("datasets[*].default", defaults, "only one text_embeds entry may be the default"))


def _check_conditioning_links(entries: list[DatasetEntry], by_id: dict[str, DatasetEntry],
                              problems: list[Problem]) -> None:
    """``conditioning_data`` names conditioning entries; ``source_dataset_id`` names a training entry."""
    known = ", ".join(sorted(e.id for e in entries if e.dataset_type == "conditioning")) or "none defined"
    for e in entries:
        for ref in e.conditioning_data:
            target = by_id.get(ref)
            if target is None or target.dataset_type != "conditioning":
                problems.append(Problem(f"datasets[{e.id}].conditioning_data", ref,
                                        f"must name an entry with dataset_type 'conditioning'; such entries: {known}"))
        if len(set(e.conditioning_data)) != len(e.conditioning_data):
            problems.append(Problem(f"datasets[{e.id}].conditioning_data", list(e.conditioning_data),
                                    "names a conditioning dataset twice"))
        if e.source_dataset_id is not None:
            source = by_id.get(e.source_dataset_id)
            if source is None or source.dataset_type not in TRAINING_DATASET_TYPES:
                problems.append(Problem(f"datasets[{e.id}].source_dataset_id", e.source_dataset_id,
                                        "must name a training entry (dataset_type 'image' or 'video')"))
