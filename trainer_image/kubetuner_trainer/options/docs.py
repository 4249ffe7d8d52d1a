"""Render the trainer option reference (``docs/options.md``) from the registry.

    python -m kubetuner_trainer.options.docs                 # print the Markdown
    python -m kubetuner_trainer.options.docs --write         # rewrite docs/options.md
    python -m kubetuner_trainer.options.docs --check docs/options.md   # exit 1 when stale

The reference includes the "implemented" marks of ``options/implemented/*.txt``, so it must
be regenerated whenever the catalog or those files change.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .catalog import GROUP_TITLES
from .model import SAME, Option
from .registry import Registry, get_registry

DEFAULT_PATH = Path("docs/options.md")
REGENERATE = "python -m kubetuner_trainer.options.docs --write"

HEADER = f"""\
# Trainer options

<!-- Generated from trainer_image/kubetuner_trainer/options/ (catalog.py and implemented/*.txt).
     Do not edit by hand; regenerate with: {REGENERATE} -->

Every option the trainer accepts, in the SimpleTuner option language. Each can be given in
`config.json` (with or without the leading `--`), in `config.toml`, or as a command-line flag;
command-line flags override files.

*Generated file.* Regenerate it after changing `options/catalog.py` or
`options/implemented/*.txt`:

```bash
{REGENERATE}
```

**Implemented** says whether the trainer honours the option today: `yes`, `no`, or `partial`
with the values that work. The trainer refuses an option that is not implemented with a clear
error instead of silently ignoring it, unless its value asks for nothing kubetuner lacks:
SimpleTuner's own default (shown as "SimpleTuner:" where it differs from kubetuner's) or an
"off" value is accepted, because SimpleTuner's tools write every default out.
"""


def _cell(text: str) -> str:
    """Make text safe inside one Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").strip()


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _code(value: Any) -> str:
    return f"`{_cell(_literal(value))}`"


def _flag(option: Option) -> str:
    text = f"`{option.flag}`"
    if option.aliases:
        text += "<br>alias: " + ", ".join(f"`--{alias}`" for alias in option.aliases)
    return text


def _type(option: Option) -> str:
    text = option.type
    low, high = option.minimum, option.maximum
    if low is not None and high is not None:
        text += f" [{low:g}, {high:g}]"
    elif low is not None:
        text += f" ≥ {low:g}"
    elif high is not None:
        text += f" ≤ {high:g}"
    if option.type == "json":
        text += " (inline or file)"
    return text


def _default(option: Option) -> str:
    text = "" if option.default is None else _code(option.default)
    if option.upstream.default is not SAME:
        upstream = option.upstream.default
        text += ("<br>" if text else "") + "SimpleTuner: " + ("unset" if upstream is None else _code(upstream))
    if option.upstream.off:
        text += ("<br>" if text else "") + "off: " + ", ".join(_code(v) for v in option.upstream.off)
    return text


def _choices(option: Option) -> str:
    if not option.choices:
        return ""
    text = ", ".join(_code(choice) for choice in option.choices)
    if option.multiple:
        text += " (comma-separated, several allowed)"
    return text


def _implemented(option: Option) -> str:
    if not option.implemented:
        return "no"
    if option.implemented_choices is None:
        return "yes"
    ordered = [c for c in option.choices or () if c in option.implemented_choices]
    ordered += sorted((c for c in option.implemented_choices if c not in ordered), key=str)
    return "partial: " + ", ".join(_code(choice) for choice in ordered)


def render_markdown(registry: Registry) -> str:
    """The option reference as Markdown: a contents list, then one table per group."""
    grouped = registry.groups()
    order = [key for key in GROUP_TITLES if key in grouped]
    order += sorted(key for key in grouped if key not in GROUP_TITLES)

    total = len(registry)
    done = sum(1 for option in registry if option.implemented)
    lines = [HEADER, f"{total} options, {done} implemented (fully or partly).", "", "## Contents", "",
             "- [Differences from SimpleTuner](#differences-from-simpletuner)"]
    for key in order:
        count = len(grouped[key])
        lines.append(f"- [{GROUP_TITLES.get(key, key)}](#{key}) ({count})")
    for key in order:
        lines += [
            "",
            f'<a id="{key}"></a>',
            "",
            f"## {GROUP_TITLES.get(key, key)}",
            "",
            "| Option | Type | Default | Choices | Required | Implemented | Description |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for option in grouped[key]:
            cells = [
                _flag(option),
                _type(option),
                _default(option),
                _choices(option),
                "yes" if option.required else "",
                _implemented(option),
                _cell(option.help),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + render_differences(registry)


DIFFERENCES_INTRO = """\
## Differences from SimpleTuner

kubetuner reads SimpleTuner's configs as SimpleTuner does, and an option left unset trains as
it would in SimpleTuner (release 3.1.6): its defaults are kubetuner's, including those that
change training (`caption_dropout_probability` 0.1, `lora_dropout` 0.1, `noise_offset` 0.1
applied with `noise_offset_probability` 0.25, gradients clipped by value at `max_grad_norm`
2.0, `lr_scheduler` constant_with_warmup, `learning_rate` 4e-7, `train_batch_size` 4, bf16
mixed precision, gradient checkpointing, a checkpoint every 500 steps with 5 kept, resume from
the latest checkpoint). These are the deliberate differences:

- **Adam options.** `--adam_beta1/--adam_beta2/--adam_epsilon/--adam_weight_decay` set the
  optimizer's values when given (SimpleTuner reads them only under DeepSpeed). Left unset, each
  optimizer gets SimpleTuner's own settings for it (adamw_bf16 and the torchao AdamWs: eps 1e-6;
  optimi AdamW/Adam/RAdam/Ranger: betas (0.9, 0.99), eps 1e-6, no weight decay).
- **Options that have no effect** as configured (`prodigy_steps` without prodigy, `lr_warmup_steps`
  with a constant schedule, EMA options without `use_ema`, ...) are logged as warnings naming the
  option; SimpleTuner ignores them silently.
- **Options kubetuner has not built** are refused by name, unless written at SimpleTuner's
  default or an off value: those are accepted and change nothing. Where SimpleTuner's default
  would do something (for example `torch_num_threads` 8), kubetuner leaves it to the library.
- **`--print-config`** runs the start-up checks that need neither the model nor the data: options,
  cross-option rules, the dataset list. Checks that read the model folder or the files come later in a
  real start and can still refuse a config `--print-config` accepted: a `--model_flavour` the model folder
  does not fit, `tread_config` routes beyond the model's depth, conditioning files without their pair, an
  evaluation model (`--pretrained_evaluation_model_name_or_path`) that cannot be loaded.
- **Dataset lists:** `{model_family}` is filled in every text value as in SimpleTuner; `csv` and
  `huggingface` sources, `dataset_name`, `caption_strategy` huggingface/csv and `metadata_backend`
  parquet/huggingface are refused as not supported yet (`metadata_backend` discovery/json is what
  kubetuner does).
- **LTX-Video image-to-video.** SimpleTuner 3.1.6 declares `--ltx_i2v_prob`,
  `--ltx_partial_noise_fraction` and `--ltx_protect_first_frame` but never applies them; kubetuner
  conditions i2v samples on their first latent frame (kept clean, or lightly noised with
  probability `ltx_i2v_prob`) and leaves that frame out of the loss. `--flow_schedule_auto_shift`
  counts all of a clip's latent tokens (frames x height x width, as LTXPipeline does) where
  SimpleTuner counts one frame's height x width / 4.
- **Wan image-to-video flavours** follow diffusers' pipelines where SimpleTuner 3.1.6 departs from
  them. `i2v-14b-2.2-high`/`-low` train the expert diffusers runs for that stage (`transformer`: high
  noise, `transformer_2`: low; SimpleTuner loads the other subfolder) on timesteps of its own range
  only (above/below the 0.9 boundary; SimpleTuner samples all), and validation renders with both
  experts (SimpleTuner: the trained one alone, 40 steps, guidance 3.5 forced). `flf2v-14b-2.1` also
  conditions on the clip's last frame, the condition latents are the VAE posterior mean, and
  `ti2v-5b-2.2` leaves the clean first frame out of the loss.
- **TREAD routing** (`--tread_config`) draws one set of kept image tokens per batch (SimpleTuner:
  per sample) from the loop's seeded generator, so a resumed run routes exactly as an unbroken one,
  and keeps them in their order. Malformed, out-of-range or overlapping routes are refused (exit 78)
  where SimpleTuner would crash or skip them; `start_layer_idx`/`end_layer_idx` count the blocks of
  every block list in forward order, both included, as in SimpleTuner. A family that cannot be
  routed is refused with the list of those that can (SimpleTuner 3.1.6 also routes sana and
  hidream, which kubetuner does not yet).
- **Qwen-Image edit flavours** (`edit-v1`, `edit-v2`). Both encode each caption with its reference
  images once and cache it per (caption, reference files); SimpleTuner does so for edit-v1 and
  re-encodes edit-v2's prompts every step (the same tensors). Qwen2.5-VL reads each reference
  image resized as the diffusers pipeline resizes it (edit-v1: about 1 MP, edit-v2: 384x384 px of
  area); SimpleTuner's edit-v1 hands it the image as read. edit-v2's reference latents are the
  conditioning dataset's cached latents (the target's crop and size for `reference_strict`);
  SimpleTuner encodes them again every step at about 1 MP, sampling the VAE posterior. The
  image preprocessing is transformers' PIL implementation (the trainer has no torchvision).

Options whose default differs from SimpleTuner's, and why:

| Option | kubetuner | SimpleTuner | Why |
| --- | --- | --- | --- |
"""


def render_differences(registry: Registry) -> str:
    """The "Differences from SimpleTuner" section: the fixed list, then every option with a ``why``."""
    rows = []
    for option in registry:
        if option.upstream.why:
            upstream = option.upstream.default
            cells = [f"`{option.flag}`", "unset" if option.default is None else _code(option.default),
                     "unset" if upstream is None else _code(upstream), _cell(option.upstream.why)]
            rows.append("| " + " | ".join(cells) + " |")
    return DIFFERENCES_INTRO + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetuner_trainer.options.docs",
        description="Render the trainer option reference as Markdown.",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", nargs="?", const=str(DEFAULT_PATH), metavar="PATH",
                        help=f"write the reference to PATH (default {DEFAULT_PATH})")
    action.add_argument("--check", metavar="PATH",
                        help="exit 1 when PATH differs from what would be generated")
    args = parser.parse_args(argv)

    text = render_markdown(get_registry())
    if args.check:
        path = Path(args.check)
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current != text:
            print(f"{path} is out of date; regenerate it with: {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    if args.write:
        path = Path(args.write)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
