"""The option catalog against the SimpleTuner option spec.

The spec is parsed here on its own terms (never through the catalog): the argparse usage
listing at its end and the per-option sections before it. Every option name, choice list and
required flag found there must be reflected in the registry.
"""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path

import pytest

from kubetuner_trainer.options import get_registry
from kubetuner_trainer.options.catalog import GROUP_TITLES, OPTIONS

REPO = Path(__file__).resolve().parents[2]
SPEC_NAME = "simpletuner-options.ja.md"

# `--words` in the spec that are not trainer options.
NOT_OPTIONS = {
    "help",  # argparse's own -h/--help
    "arguments",  # prose: "the keys are the same as the --arguments below"
    "multi_gpu",  # an accelerate launcher flag, passed through ACCELERATE_EXTRA_ARGS
    # upstream LayerSync repository flags, mapped in prose onto layersync_* options
    "encoder-depth",
    "gt-encoder-depth",
    "reg-weight",
}

# Options the spec names only as config.json keys in prose or examples (no `--` spelling).
CONFIG_KEYS_IN_PROSE = {
    "num_processes",
    "dynamo_backend",
    "dynamo_mode",
    "dynamo_fullgraph",
    "dynamo_dynamic",
    "dynamo_use_regional_compilation",
}

# Choices the catalog adds to a usage-listing choice list because the spec's sections name
# them as values of that option (each must occur in the spec text as `value`).
SDNQ_LEVELS = {
    "uint8-sdnq", "uint16-sdnq", "int16-sdnq", "fp16-sdnq", "int8-sdnq", "int7-sdnq", "int6-sdnq",
    "int5-sdnq", "uint5-sdnq", "uint4-sdnq", "uint3-sdnq", "uint2-sdnq",
}
SECTION_EXTRA_CHOICES = {
    # the precision section lists the SDNQ precision levels next to the quanto/torchao presets
    "base_model_precision": SDNQ_LEVELS,
    **{f"text_encoder_{n}_precision": SDNQ_LEVELS for n in range(1, 5)},
    # the SDNQ section lists its optimizers
    "optimizer": {
        "sdnq-adamw", "sdnq-adamw+no_quant", "sdnq-adafactor", "sdnq-came", "sdnq-lion", "sdnq-muon",
        "sdnq-muon+quantized_matmul",
    },
}


def spec_path() -> Path | None:
    candidates = []
    if os.environ.get("KUBETUNER_SPEC_DIR"):
        candidates.append(Path(os.environ["KUBETUNER_SPEC_DIR"]))
    candidates += [REPO.parent / "shared" / "spec", REPO / "shared" / "spec"]
    for folder in candidates:
        if (folder / SPEC_NAME).is_file():
            return folder / SPEC_NAME
    return None


@pytest.fixture(scope="module")
def spec() -> Spec:
    path = spec_path()
    if path is None:
        pytest.skip(
            f"{SPEC_NAME} lives in the workspace's shared folder (../shared/spec next to the repository, "
            "or set KUBETUNER_SPEC_DIR); it is not part of the repository, so the spec comparison is skipped."
        )
    return Spec.parse(path.read_text(encoding="utf-8"))


class Spec:
    """What the spec document says, parsed without the catalog."""

    def __init__(self, text: str):
        self.text = text
        self.synopsis_required: set[str] = set()
        self.synopsis_optional: set[str] = set()
        self.listing: dict[str, tuple[str, str]] = {}  # name -> (argument spec, help prose)
        self.section_choices: dict[str, set[str]] = {}
        self.aliases: dict[str, str] = {}  # alias -> name

    @classmethod
    @cache
    def parse(cls, text: str) -> Spec:
        spec = cls(text)
        spec._parse_synopsis()
        spec._parse_listing()
        spec._parse_sections()
        return spec

    def _parse_synopsis(self) -> None:
        start = self.text.index("usage: train.py")
        end = self.text.index("options:\n", start)
        synopsis = self.text[start:end]
        for match in re.finditer(r"(\[?)--([a-z0-9_]+)", synopsis):
            bracketed, name = match.groups()
            if name == "help":
                continue
            # "[--x X]" is optional; a bare "--x X" (no bracket right before it) is required.
            (self.synopsis_optional if bracketed else self.synopsis_required).add(name)

    def _parse_listing(self) -> None:
        start = self.text.index("options:\n", self.text.index("usage: train.py"))
        end = self.text.index("```", start)
        current = None
        for line in self.text[start:end].splitlines()[1:]:
            match = re.match(r"  --(\w+)(?: (\S+))?(?:\s{2,}(.*))?$", line)
            if match:
                current = match.group(1)
                self.listing[current] = (match.group(2) or "", match.group(3) or "")
            elif current and line.startswith("    "):
                argspec, prose = self.listing[current]
                self.listing[current] = (argspec, f"{prose} {line.strip()}".strip())
        for name, (_argspec, prose) in self.listing.items():
            for alias in re.findall(r"deprecated alias: --(\w+)", prose):
                self.aliases[alias] = name

    def _parse_sections(self) -> None:
        sections = re.split(r"^### ", self.text, flags=re.M)
        for section in sections[1:]:
            heading, _, body = section.partition("\n")
            names = re.findall(r"`--(\w+)`", heading)
            if not names:
                continue
            name = names[0]
            for alias in names[1:]:  # "### `--a`（別名: `--b`）"
                self.aliases[alias] = name
            choices = _section_choices(body)
            if choices:
                self.section_choices.setdefault(name, set()).update(choices)

    def listing_choices(self, name: str) -> set[str] | None:
        argspec = self.listing.get(name, ("", ""))[0]
        if argspec.startswith("{"):
            return set(argspec.strip("{}").split(","))
        return None

    def is_flag(self, name: str) -> bool:
        """``--x [X]``: an argparse flag that may be given without a value."""
        return self.listing.get(name, ("", ""))[0].startswith("[")

    def all_dash_names(self) -> set[str]:
        return set(re.findall(r"--([a-z][a-z0-9_-]*)", self.text))

    def toml_keys(self) -> set[str]:
        keys = set()
        for block in re.findall(r"```toml\n(.*?)```", self.text, flags=re.S):
            keys.update(re.findall(r"^#?\s*([a-z][a-z0-9_]*)\s*=", block, flags=re.M))
        return keys


def _section_choices(body: str) -> set[str]:
    """Values listed after **選択肢** (choices) or **オプション** (options) in a section."""
    found: set[str] = set()
    lines = body.splitlines()
    for index, line in enumerate(lines):
        match = re.search(r"\*\*(?:選択肢|オプション)\*\*[:：]\s*(.*)$", line)
        if not match:
            continue
        inline = match.group(1).strip()
        if inline:
            quoted = re.findall(r"`([^`]+)`|\"([^\"]+)\"", inline)
            if quoted:
                found.update(a or b for a, b in quoted)
            else:
                for part in re.split(r"[,、]", inline):
                    value = re.sub(r"（.*?）|\*", "", part).strip().rstrip(".。")
                    if value:
                        found.add(value)
            continue
        for sub in lines[index + 1 :]:  # the values are the following "  - `value`" bullets
            bullet = re.match(r"  - `([^`]+)`", sub)
            if bullet:
                found.add(bullet.group(1).split("=")[-1])
            elif not sub.startswith("    "):
                break
    return found


def as_strings(values) -> set[str]:
    return {str(v) for v in values or ()}


# ---------------------------------------------------------------- names


def test_every_usage_listing_option_is_known(spec: Spec):
    registry = get_registry()
    names = set(spec.listing) | spec.synopsis_optional | spec.synopsis_required
    names -= NOT_OPTIONS
    assert len(names) > 250, "the usage listing parsed suspiciously small"
    missing = sorted(n for n in names if n not in registry)
    assert not missing, f"usage-listing options missing from the catalog: {missing}"


def test_every_option_named_anywhere_in_the_spec_is_known(spec: Spec):
    registry = get_registry()
    missing = sorted(n for n in spec.all_dash_names() - NOT_OPTIONS if n not in registry)
    assert not missing, f"options named in the spec but missing from the catalog: {missing}"


def test_config_keys_of_examples_and_prose_are_known(spec: Spec):
    registry = get_registry()
    for key in CONFIG_KEYS_IN_PROSE:
        assert key in spec.text, f"{key} is listed as a spec config key but the spec never mentions it"
    keys = spec.toml_keys() | CONFIG_KEYS_IN_PROSE
    missing = sorted(k for k in keys if k not in registry)
    assert not missing, f"config keys used by the spec but missing from the catalog: {missing}"


def test_spec_aliases_resolve_to_their_option(spec: Spec):
    registry = get_registry()
    assert spec.aliases, "the spec names deprecated aliases; none were parsed"
    for alias, name in spec.aliases.items():
        assert registry.canonical(alias) == name, f"--{alias} should be an alias of --{name}"
    assert registry.canonical("checkpointing_steps") == "checkpoint_step_interval"
    assert registry.canonical("validation_steps") == "validation_step_interval"


# ---------------------------------------------------------------- choices


def test_listing_choice_lists_match(spec: Spec):
    registry = get_registry()
    checked = 0
    for name in spec.listing:
        listed = spec.listing_choices(name)
        if listed is None:
            continue
        checked += 1
        option = registry.get(name)
        expected = listed | spec.section_choices.get(name, set()) | SECTION_EXTRA_CHOICES.get(name, set())
        assert as_strings(option.choices) == expected, (
            f"--{name}: catalog choices differ from the spec; "
            f"missing {sorted(expected - as_strings(option.choices))}, "
            f"extra {sorted(as_strings(option.choices) - expected)}"
        )
    assert checked > 50


def test_section_extra_choices_are_in_the_spec(spec: Spec):
    for name, extras in SECTION_EXTRA_CHOICES.items():
        for value in extras:
            assert f"`{value}`" in spec.text, f"{value} (extra choice of --{name}) is not named in the spec"


def test_section_choice_lists_are_included(spec: Spec):
    registry = get_registry()
    # a few the spec states only in its sections; the parser must find them
    for name in ("lora_format", "validation_method", "group_offload_type", "crepa_scheduler",
                 "scheduled_sampling_sampler", "validation_adapter_mode", "data_backend_sampling"):
        assert spec.section_choices.get(name), f"no choices parsed for --{name}"
    for name, values in spec.section_choices.items():
        option = registry.get(name)
        missing = values - as_strings(option.choices)
        assert not missing, f"--{name}: choices named in its section are missing: {sorted(missing)}"


def test_specific_section_choices():
    registry = get_registry()
    assert registry.get("lora_format").choices == ("diffusers", "comfyui")
    assert registry.get("validation_method").choices == ("simpletuner-local", "external-script")
    assert registry.get("group_offload_type").choices == ("block_level", "leaf_level")
    assert registry.get("aspect_bucket_rounding").choices == tuple(range(1, 10))
    assert registry.get("aspect_bucket_alignment").choices == (8, 16, 24, 32, 64)
    assert registry.get("report_to").multiple


def test_numeric_choices_are_numbers():
    for option in OPTIONS:
        if option.choices and option.type in ("int", "float"):
            assert all(isinstance(c, int | float) and not isinstance(c, bool) for c in option.choices), option.name


# ---------------------------------------------------------------- required, types, defaults


def test_required_exactly_as_the_synopsis_shows(spec: Spec):
    registry = get_registry()
    assert spec.synopsis_required >= {"model_family", "output_dir", "model_type", "optimizer",
                                      "data_backend_config"}
    required = {o.name for o in registry if o.required}
    assert required == spec.synopsis_required


def test_argparse_flags_are_booleans(spec: Spec):
    registry = get_registry()
    wrong = [name for name in spec.listing if spec.is_flag(name) and registry.get(name).type != "bool"]
    assert not wrong, f"[--x [X]] flags that are not bool options: {wrong}"


def test_every_option_is_well_formed():
    for option in OPTIONS:
        assert option.help.strip(), f"--{option.name} has no help"
        assert option.group in GROUP_TITLES, f"--{option.name}: unknown group {option.group!r}"
        assert option.parse(option.default) == option.default, f"--{option.name}: default fails its parse"
        if option.choices and option.default is not None and not option.multiple:
            assert option.default in option.choices, f"--{option.name}: default is not a choice"
        if option.minimum is not None and option.maximum is not None:
            assert option.minimum <= option.maximum, option.name


def test_every_group_has_options():
    used = {o.group for o in OPTIONS}
    assert set(GROUP_TITLES) == used
    assert len(GROUP_TITLES) <= 25


def test_kubetuner_and_environment_options():
    registry = get_registry()
    port = registry.get("metrics_port")
    assert (port.type, port.default, port.minimum, port.maximum) == ("int", 9400, 0, 65535)
    assert registry.get("metrics_host").default == "0.0.0.0"
    assert registry.get("stop_grace_seconds").default == 120
    assert registry.get("num_processes").default == 1
    backend = registry.get("dynamo_backend")
    assert backend.default == "no"
    assert {"no", "inductor", "aot_eager", "cudagraphs"} <= set(backend.choices)


def test_spec_stated_defaults():
    registry = get_registry()
    expected = {
        "model_type": "lora", "lora_format": "diffusers", "group_offload_type": "block_level",
        "group_offload_blocks_per_group": 1, "group_offload_use_stream": False, "musubi_blocks_to_swap": 0,
        "musubi_block_swap_device": "cpu", "quantize_via": "cpu", "resolution": 1024,
        "validation_method": "simpletuner-local", "validation_adapter_strength": 1.0,
        "validation_preview": False, "validation_preview_steps": 1, "ema_device": "cpu",
        "data_backend_sampling": "auto-weighting", "vae_cache_scan_behaviour": "recreate",
        "dataloader_prefetch_qlen": 10, "write_batch_size": 64, "aspect_bucket_worker_count": 12,
        "flow_beta_schedule_alpha": 2.0, "flow_beta_schedule_beta": 2.0,
        "scheduled_sampling_prob_end": 0.5, "scheduled_sampling_order": 2,
        "scheduled_sampling_sampler": "unipc", "scheduled_sampling_reflexflow_beta1": 10.0,
        "crepa_lambda": 0.5, "crepa_model": "dinov2_vitg14", "crepa_encoder_image_size": 518,
        "crepa_encoder_frames_batch_size": -1, "crepa_normalize_by_frames": True,
        "crepa_spatial_align": True, "crepa_similarity_ema_decay": 0.99,
        "crepa_threshold_mode": "permanent", "crepa_scheduler": "constant",
        "attention_mechanism": "diffusers", "max_upscale_threshold": None,
    }
    for name, value in expected.items():
        assert registry.get(name).default == value, name


def test_ranges():
    registry = get_registry()
    threshold = registry.get("max_upscale_threshold")
    assert (threshold.minimum, threshold.maximum) == (0, 1)
    assert registry.get("gradient_checkpointing_interval").minimum == 1


# ---------------------------------------------------------------- help texts are our own

WINDOW = 40


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def test_help_texts_are_not_copied_from_the_listing(spec: Spec):
    windows: dict[str, str] = {}
    for name, (_argspec, prose) in spec.listing.items():
        text = _normal(prose)
        for i in range(len(text) - WINDOW + 1):
            windows.setdefault(text[i : i + WINDOW], name)
    copied = []
    for option in OPTIONS:
        text = _normal(option.help)
        listing_help = _normal(spec.listing.get(option.name, ("", ""))[1])
        if listing_help and text == listing_help:
            copied.append((option.name, "identical"))
            continue
        for i in range(len(text) - WINDOW + 1):
            if text[i : i + WINDOW] in windows:
                copied.append((option.name, text[i : i + WINDOW]))
                break
    assert not copied, f"help texts sharing a {WINDOW}-character run with the listing: {copied}"
