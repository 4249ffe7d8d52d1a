"""CLIP score of validation renders (``--evaluation_type clip``).

The score of an image and its prompt is ``max(100 * cos(E_image, E_prompt), 0)``: the cosine of the
projected CLIP image and text embeddings, times 100, floored at 0 — the CLIPScore of Hessel et al.
(2021) with w = 100, as torchmetrics' ``CLIPScore`` defines it and SimpleTuner 3.1.6 reports it
(through torchmetrics' ``clip_score``). torchmetrics 1.9 reads ``get_image_features`` as a tensor,
which transformers 5 no longer returns, so the embeddings come from ``transformers.CLIPModel`` itself.

The model is ``--pretrained_evaluation_model_name_or_path`` (SimpleTuner's default
``openai/clip-vit-large-patch14-336``): a hub id or a local folder with the model, its tokenizer and
its image processor, loaded through :func:`~kubetuner_trainer.models.loading.load_part` (a missing or
unreachable model is exit 78). Scoring runs on the CPU, as SimpleTuner's does (its image tensors
stay on the CPU); prompts longer than the text tower's positions are cut.

What is reported per validation round (SimpleTuner's tracker keys): ``clip/mean``, ``clip/min``,
``clip/max`` and ``clip/std`` (population standard deviation) over the prompts, each prompt's score
being the mean over its scored images, plus ``clip/prompt/<name>`` per prompt.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

from ._options import option

log = logging.getLogger(__name__)

OPTION = "pretrained_evaluation_model_name_or_path"
#: tracker tag prefix of the CLIP scores; per-prompt scores are ``clip/prompt/<name>``
PREFIX = "clip/"
PROMPT_PREFIX = PREFIX + "prompt/"
MEAN = PREFIX + "mean"
STATISTICS = ("mean", "min", "max", "std")


def clip_evaluation_requested(cfg: Any) -> bool:
    """Whether ``--evaluation_type clip`` is set."""
    return str(option(cfg, "evaluation_type") or "none").lower() == "clip"


class ClipScorer:
    """Scores (image, prompt) pairs with a CLIP model (see the module docstring for the formula)."""

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_tokens = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def load(cls, location: str) -> ClipScorer:
        """Load the model, tokenizer and image processor from a hub id or folder.

        Raises :class:`~kubetuner_trainer.config.ConfigError` naming ``--pretrained_evaluation_model_name_or_path``
        when the location holds no CLIP model or the Hub cannot be reached (exit 78).
        """
        import transformers

        from ..models.components import ModelSource
        from ..models.loading import load_part

        source = ModelSource(model=location)
        what = "a CLIP model (transformers CLIPModel with its tokenizer and image processor)"
        # the PIL image processor: the default one wants torchvision, whose PyPI wheel links CUDA
        image_processor_cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
        parts = [load_part(cls_, location, source, subfolder=None, option=OPTION, what=what)
                 for cls_ in (transformers.CLIPModel, transformers.CLIPTokenizer, image_processor_cls)]
        log.info("CLIP evaluation model loaded from %s", location)
        return cls(*parts)

    def score(self, images: Sequence[Any], prompts: Sequence[str]) -> list[float]:
        """CLIP scores (0–100) of PIL ``images`` against their ``prompts``, pairwise.

        Raises ValueError when the two sequences differ in length.
        """
        import torch

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not images:
            return []
        text = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_tokens,
                              return_tensors="pt")
        pixels = self.image_processor(images=[i.convert("RGB") for i in images], return_tensors="pt")
        with torch.no_grad():
            out = self.model(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                             pixel_values=pixels["pixel_values"].to(self.model.dtype))
        image = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        prompt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return [float(s) for s in (100 * (image * prompt).sum(-1)).clamp(min=0)]


def summarize(per_prompt: dict[str, Iterable[float]]) -> dict[str, float]:
    """Tracker scalars of one round: ``clip/mean|min|max|std`` over prompts and ``clip/prompt/<name>``.

    Each prompt's score is the mean of its images' scores; prompts without scores are left out.
    Returns ``{}`` when nothing was scored.
    """
    means = {name: sum(v) / len(v) for name, values in per_prompt.items() if (v := list(values))}
    if not means:
        return {}
    values = list(means.values())
    mean = sum(values) / len(values)
    out = {MEAN: mean, f"{PREFIX}min": min(values), f"{PREFIX}max": max(values),
           f"{PREFIX}std": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))}
    out.update({f"{PROMPT_PREFIX}{name}": value for name, value in means.items()})
    return out


def load_scorer(cfg: Any) -> ClipScorer | None:
    """The CLIP scorer when ``--evaluation_type clip`` asks for one, else None (see :meth:`ClipScorer.load`)."""
    if not clip_evaluation_requested(cfg):
        return None
    return ClipScorer.load(str(option(cfg, OPTION)))
