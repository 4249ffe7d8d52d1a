"""CEL rules for dataset values that fall back to the trainer-wide options in ``spec.config``.

The trainer fills a field a dataset entry leaves out from the global option of the same name
(``resolution``, ``resolution_type``, ``caption_strategy``, ``instance_prompt``, ...), so some
checks only make sense on the value in effect. Rules on ``spec.config`` check the global values
(they also reach the text-embeds entry the operator adds); rules on ``spec`` check each dataset
with its fallbacks.
"""

from __future__ import annotations

from typing import Any

from kubetuner_trainer.options import get_registry

from .fields import rule

# The data pipeline's own fallbacks when the option is unset (kubetuner_trainer.data.settings.DataSettings).
PIPELINE_FALLBACKS: dict[str, Any] = {"resolution": 1024.0, "resolution_type": "pixel_area",
                                      "caption_strategy": "filename", "only_instance_prompt": False}
INSTANCE_PROMPT_STRATEGIES = "['instanceprompt', 'instance_prompt']"


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(float(value))
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _default(name: str) -> Any:
    registry = get_registry()
    default = registry.get(name).default if name in registry else None
    return PIPELINE_FALLBACKS.get(name) if default is None else default


def _global(name: str, owner: str = "self") -> str:
    """The global option's value in effect (config value, else the trainer's default)."""
    return f"(has({owner}.{name}) ? {owner}.{name} : {_literal(_default(name))})"


def _effective(name: str) -> str:
    """Inside ``self.datasets`` iteration: the entry's value, else the global option in effect."""
    fallback = f"((has(self.config) && has(self.config.{name})) ? self.config.{name} : {_literal(_default(name))})"
    return f"(has(d.{name}) ? d.{name} : {fallback})"


def _present(name: str) -> str:
    return f"(has(d.{name}) || (has(self.config) && has(self.config.{name})))"


def _value(name: str) -> str:
    return f"(has(d.{name}) ? d.{name} : self.config.{name})"


def _resolution_ok(kind: str, resolution: str) -> str:
    return f"({kind} == 'area' ? {resolution} <= 64.0 : {resolution} >= 64.0)"


RESOLUTION_MESSAGE = ("resolution is in megapixels for resolution_type area (e.g. 1.0) and in pixels for pixel and "
                      "pixel_area (at least 64, e.g. 1024)")


def config_rules() -> list[dict[str, str]]:
    """Rules on ``spec.config`` (``self`` is the config object)."""
    return [
        rule(_resolution_ok(_global("resolution_type"), _global("resolution")), RESOLUTION_MESSAGE),
        rule(f"!has(self.caption_strategy) || !(self.caption_strategy in {INSTANCE_PROMPT_STRATEGIES}) || "
             "has(self.instance_prompt)", "caption_strategy instance_prompt needs instance_prompt"),
        rule("!has(self.only_instance_prompt) || !self.only_instance_prompt || has(self.instance_prompt)",
             "only_instance_prompt needs instance_prompt"),
        rule("!has(self.maximum_image_size) || (has(self.target_downsample_size) && "
             "self.target_downsample_size <= self.maximum_image_size)",
             "maximum_image_size needs target_downsample_size, at most as large"),
    ]


def _per_dataset(check: str, message: str) -> dict[str, str]:
    """A spec-level rule over every dataset.

    No messageExpression naming the failing dataset: an id taken from a filtered list has no schema
    path, so the API server prices it as an unbounded string and refuses the CRD (see celcheck).
    """
    return rule(f"!has(self.datasets) || self.datasets.all(d, {check})", f"a dataset fails: {message}")


def spec_rules() -> list[dict[str, str]]:
    """Rules on ``spec`` checking each dataset together with the global fallbacks."""
    instance_prompt = _present("instance_prompt")
    return [
        _per_dataset(_resolution_ok(_effective("resolution_type"), _effective("resolution")), RESOLUTION_MESSAGE),
        _per_dataset(f"!({_effective('caption_strategy')} in {INSTANCE_PROMPT_STRATEGIES}) || {instance_prompt}",
                     "caption_strategy instanceprompt needs instance_prompt (on the dataset or in spec.config)"),
        _per_dataset(f"!{_effective('only_instance_prompt')} || {instance_prompt}",
                     "only_instance_prompt needs instance_prompt (on the dataset or in spec.config)"),
        _per_dataset(f"{_effective('caption_strategy')} != 'parquet' || has(d.parquet)",
                     "caption_strategy parquet needs the parquet block (path and columns)"),
        _per_dataset(f"!{_present('maximum_image_size')} || ({_present('target_downsample_size')} && "
                     f"{_value('target_downsample_size')} <= {_value('maximum_image_size')})",
                     "maximum_image_size needs target_downsample_size (on the dataset or in spec.config), "
                     "at most as large"),
    ]
