"""The schema of one ``spec.datasets[]`` entry: SimpleTuner's multidatabackend.json keys plus two
Kubernetes additions (``pvc`` to mount a claim, ``credentialsSecret`` for S3 keys)."""

from __future__ import annotations

from kubetuner_trainer.data.dataset_config import CONDITIONING_TYPES
from kubetuner_trainer.data.dataset_config import DATASET_TYPES as TRAINER_DATASET_TYPES
from kubetuner_trainer.data.generated import GENERATED_TYPES

from .fields import (
    Schema,
    array,
    boolean,
    claim_ref,
    credentials_secret,
    integer,
    obj,
    rule,
    string,
)

DATASET_ID = r"^[A-Za-z0-9]([-_.A-Za-z0-9]*[A-Za-z0-9])?$"
# What the trainer's dataset parser accepts today (kubetuner_trainer.data.dataset_config).
DATASET_TYPES = list(TRAINER_DATASET_TYPES)  # one list: the trainer's dataset parser (torch-free)
STORAGE_TYPES = ["local", "aws"]
CAPTION_STRATEGIES = ["filename", "textfile", "instanceprompt", "instance_prompt", "parquet"]
INLINE_CREDENTIALS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
# Cache folders the operator places on spec.caches.latents for every entry.
OPERATOR_PATHS = ("cache_dir", "cache_dir_vae")
DISCOVERY_STAGE = "(aspect|vae|text|metadata)"
MAX_CONDITIONING_LINKS = 4  # keeps the link rule (datasets × links × datasets) under CEL's per-call budget


def _conditioning_fields() -> dict[str, Schema]:
    """SimpleTuner's conditioning keys. Structural schemas give a field one type, so ``conditioning_data``
    and ``conditioning`` are lists here (SimpleTuner also takes a single id or block)."""
    dataset_id = string("id of a dataset with dataset_type conditioning.", maxLength=63, pattern=DATASET_ID)
    return {
        "conditioning_data": array("ids of the conditioning datasets paired with this dataset's files, in order.",
                                   dataset_id, minItems=1, maxItems=MAX_CONDITIONING_LINKS),
        "conditioning_type": string("How a conditioning dataset's image pairs with its target.",
                                    enum=list(CONDITIONING_TYPES)),
        "source_dataset_id": string("The training dataset a conditioning dataset belongs to.", maxLength=63,
                                    pattern=DATASET_ID),
        "conditioning": array(
            "Conditioning datasets generated from this dataset's images (SimpleTuner's conditioning block); "
            "generator settings such as blur_radius or low_threshold sit beside type.",
            {"type": "object", "description": "One generated conditioning dataset.",
             "x-kubernetes-preserve-unknown-fields": True,
             "properties": {
                 "type": string("The generator.", enum=sorted(GENERATED_TYPES)),
                 "conditioning_type": string("How the generated image pairs with its target.",
                                             enum=list(CONDITIONING_TYPES)),
             },
             "required": ["type"]},
            minItems=1, maxItems=MAX_CONDITIONING_LINKS),
    }


def _number(description: str, **extra) -> Schema:
    return {"type": "number", "description": description, **extra}


def _path(description: str) -> Schema:
    return string(description, maxLength=4096)


def dataset_schema() -> Schema:
    properties: dict[str, Schema] = {
        "id": string("Stable identifier; caches and sampler state are keyed by it.", minLength=1, maxLength=63,
                     pattern=DATASET_ID),
        "type": string("Where the files live.", enum=STORAGE_TYPES),
        "dataset_type": string("What the entry holds.", enum=DATASET_TYPES, default="image"),
        "disabled": boolean("Skip this entry."),
        "disable": boolean("Same as disabled (SimpleTuner accepts both spellings)."),
        "default": boolean("The default text-embedding (or image-embedding) cache for image datasets."),
        "pvc": claim_ref("Mount this claim read-only; instance_data_dir is set to the mounted folder."),
        "instance_data_dir": _path("Folder with the images, as seen inside the trainer pod."),
        "text_embeds": string("id of the text_embeds entry to use.", maxLength=63, pattern=DATASET_ID),
        "image_embeds": string("id of the image_embeds entry to use.", maxLength=63, pattern=DATASET_ID),
        "aws_bucket_name": string("S3 bucket.", minLength=3, maxLength=63),
        "aws_data_prefix": string("Key prefix inside the bucket.", maxLength=1024),
        "aws_region_name": string("S3 region.", maxLength=64),
        "aws_endpoint_url": string("Endpoint of an S3-compatible store.", maxLength=2048,
                                   pattern=r"^https?://"),
        "credentialsSecret": credentials_secret(
            "Secret with this dataset's S3 keys; reaches the trainer as "
            "KUBETUNER_DATASET_<ID>_AWS_ACCESS_KEY_ID / _AWS_SECRET_ACCESS_KEY."),
        "resolution": _number("Training resolution (meaning set by resolution_type).", exclusiveMinimum=True,
                              minimum=0),
        "resolution_type": string("How resolution is read.", enum=["pixel", "pixel_area", "area"]),
        "minimum_image_size": _number("Smaller images are skipped.", minimum=0),
        "maximum_image_size": _number("Larger images are downsampled (needs target_downsample_size).",
                                      exclusiveMinimum=True, minimum=0),
        "target_downsample_size": _number("Size that oversized images are first reduced to.",
                                          exclusiveMinimum=True, minimum=0),
        "max_upscale_threshold": _number("Largest upscale allowed for small images, as a fraction (0, 1].",
                                         exclusiveMinimum=True, minimum=0, maximum=1),
        "minimum_aspect_ratio": _number("Images with a smaller aspect ratio are skipped.",
                                        exclusiveMinimum=True, minimum=0),
        "maximum_aspect_ratio": _number("Images with a larger aspect ratio are skipped.",
                                        exclusiveMinimum=True, minimum=0),
        "crop": boolean("Crop images to their bucket."),
        "crop_style": string("Where the crop is taken.", enum=["random", "center", "corner"]),
        "crop_aspect": string("Aspect of the crop.", enum=["square", "preserve", "closest", "random"]),
        "crop_aspect_buckets": array("Aspect ratios to crop to (closest/random crop_aspect).",
                                     {"type": "number", "exclusiveMinimum": True, "minimum": 0},
                                     minItems=1, maxItems=64),
        "caption_strategy": string("Where captions come from.", enum=CAPTION_STRATEGIES),
        "instance_prompt": string("Caption used by caption_strategy instanceprompt (or prepended).",
                                  maxLength=4096),
        "prepend_instance_prompt": boolean("Prepend instance_prompt to every caption."),
        "only_instance_prompt": boolean("Use instance_prompt as the only caption."),
        "caption_filter_list": array("Phrases or regular expressions removed from captions.",
                                     string("One phrase or pattern.", maxLength=1024), maxItems=1024),
        "parquet": obj("Caption metadata in a parquet file (caption_strategy parquet).", {
            "path": _path("The parquet file."),
            "filename_column": string("Column with the image file name.", maxLength=256),
            "caption_column": string("Column with the caption.", maxLength=256),
            "fallback_caption_column": string("Column used when the caption column is empty.", maxLength=256),
            "width_column": string("Column with the width.", maxLength=256),
            "height_column": string("Column with the height.", maxLength=256),
            "identifier_includes_extension": boolean("File names in filename_column include the extension."),
        }, required=["path"]),
        "repeats": integer("Extra passes over this dataset per epoch (0 = none).", minimum=0),
        "probability": _number("Sampling weight relative to other datasets.", minimum=0),
        "max_num_samples": integer("Use at most this many samples.", minimum=1),
        "is_regularisation_data": boolean("Regularisation images (prior preservation)."),
        "is_regularization_data": boolean("Same as is_regularisation_data."),
        "skip_file_discovery": string("Discovery stages to skip, comma-separated: aspect, vae, text, metadata.",
                                      maxLength=64,
                                      pattern=rf"^({DISCOVERY_STAGE}( ?, ?{DISCOVERY_STAGE})*)?$"),
        "preserve_data_backend_cache": boolean("Keep the discovery cache even when the config changes."),
        "scan_for_errors": boolean("Check cached latents against the samples at startup."),
        "video": obj("Clips of a dataset_type video entry (SimpleTuner's video block).", {
            "num_frames": integer("Frames per training clip (default: 5 seconds at framerate, else 30 fps).",
                                  minimum=1),
            "min_frames": integer("Clips with fewer frames are skipped (default and lowest value: num_frames).",
                                  minimum=1),
            "max_frames": integer("Clips with more frames are skipped.", minimum=1),
            "is_i2v": boolean("Train these clips image-to-video (unset: the model family decides)."),
        }),
    }
    properties.update(_conditioning_fields())
    for key in INLINE_CREDENTIALS:
        properties[key] = string("Not allowed: reference a Secret with credentialsSecret instead.",
                                 maxLength=1024)
    for key in OPERATOR_PATHS:
        properties[key] = string("Not allowed: the operator places caches on spec.caches.latents.", maxLength=4096)
    credential_check = " && ".join(f"!has(self.{key})" for key in INLINE_CREDENTIALS)
    operator_paths = " && ".join(f"!has(self.{key})" for key in OPERATOR_PATHS)
    rules = [
        rule(credential_check,
             "S3 credentials must not be written inline (aws_access_key_id, aws_secret_access_key, "
             "aws_session_token); put them in a Secret and reference it with credentialsSecret"),
        rule(operator_paths, "cache_dir and cache_dir_vae are set by the operator (on spec.caches.latents); "
             "remove them"),
        rule("self.type != 'aws' || has(self.aws_bucket_name)", "an aws dataset needs aws_bucket_name",
             fieldPath=".aws_bucket_name", reason="FieldValueRequired"),
        rule("self.type == 'aws' || !(has(self.aws_bucket_name) || has(self.aws_data_prefix) || "
             "has(self.aws_endpoint_url) || has(self.aws_region_name) || has(self.credentialsSecret))",
             "aws_* fields and credentialsSecret only apply to datasets of type aws"),
        rule("self.type != 'local' || self.dataset_type in ['text_embeds', 'image_embeds'] || "
             "has(self.pvc) || has(self.instance_data_dir)",
             "a local dataset needs pvc (a claim to mount) or instance_data_dir"),
        rule("!has(self.pvc) || (self.type == 'local' && !has(self.instance_data_dir))",
             "pvc applies to local datasets only and replaces instance_data_dir; set one of them"),
        rule("!has(self.crop) || !self.crop || !has(self.crop_aspect) || "
             "!(self.crop_aspect in ['closest', 'random']) || has(self.crop_aspect_buckets)",
             "crop_aspect closest/random needs crop_aspect_buckets, e.g. [0.75, 1.0, 1.33]"),
        rule("!has(self.video) || self.dataset_type == 'video'", "video applies to dataset_type video only",
             fieldPath=".video"),
        rule("!has(self.minimum_aspect_ratio) || !has(self.maximum_aspect_ratio) || "
             "self.minimum_aspect_ratio <= self.maximum_aspect_ratio",
             "minimum_aspect_ratio must not exceed maximum_aspect_ratio"),
    ]
    return obj("One dataset entry (SimpleTuner multidatabackend.json keys).", properties,
               required=["id", "type"], rules=rules)


def datasets_schema() -> Schema:
    return array(
        "Datasets to train on; ids are unique.",
        dataset_schema(),
        minItems=1,
        maxItems=64,
        **{
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["id"],
            "x-kubernetes-validations": [
                rule("self.exists(d, d.dataset_type in ['image', 'video'] && "
                     "!(has(d.disabled) && d.disabled) && !(has(d.disable) && d.disable))",
                     "at least one enabled image or video dataset is needed"),
                rule("self.filter(d, d.dataset_type == 'text_embeds' && has(d.default) && d.default && "
                     "!(has(d.disabled) && d.disabled)).size() <= 1",
                     "only one text_embeds dataset may be the default"),
                rule("self.all(d, !has(d.text_embeds) || "
                     "self.exists(e, e.id == d.text_embeds && e.dataset_type == 'text_embeds'))",
                     "text_embeds must name the id of a dataset with dataset_type text_embeds"),
                rule("self.all(d, !has(d.image_embeds) || "
                     "self.exists(e, e.id == d.image_embeds && e.dataset_type == 'image_embeds'))",
                     "image_embeds must name the id of a dataset with dataset_type image_embeds"),
                rule("self.all(d, !has(d.conditioning_data) || d.conditioning_data.all(c, "
                     "self.exists(e, e.id == c && e.dataset_type == 'conditioning')))",
                     "conditioning_data must name ids of datasets with dataset_type conditioning"),
            ],
        },
    )
