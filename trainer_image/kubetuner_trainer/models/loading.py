"""Loading a family's components from a diffusers folder, a hub id or a single checkpoint file.

Where things come from:

* ``--pretrained_model_name_or_path`` (else the flavour's default hub id): a local folder in
  diffusers layout, a hub id (with ``--revision`` and ``--variant``), or a single
  ``.safetensors``/``.ckpt`` file (local path or URL) loaded with ``from_single_file``.
* The family's denoiser options (``--pretrained_unet_*`` or ``--pretrained_transformer_*``) and
  ``--pretrained_vae_model_name_or_path`` replace those components; a VAE location may be a VAE
  folder or a whole pipeline folder (its ``vae/`` subfolder is tried first, then the root).
* A family may relocate one text encoder (``--pretrained_t5_model_name_or_path``).

Every failure to find or read a component is a :class:`~kubetuner_trainer.config.ConfigError`
naming the option, the location and what was expected there (exit 78, never retried).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import ConfigError, Problem
from .components import Components, ModelSource

if TYPE_CHECKING:
    from .family import ModelFamily

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin", ".sft")
MODEL_OPTION = "pretrained_model_name_or_path"
VAE_OPTION = "pretrained_vae_model_name_or_path"
PIPELINE_LAYOUT = "a diffusers model folder (model_index.json plus one subfolder per component)"


def is_single_file(location: str) -> bool:
    """A checkpoint file (local or URL) rather than a folder/hub id."""
    return location.lower().endswith(SINGLE_FILE_SUFFIXES)


def denoiser_options(family_cls: type[ModelFamily]) -> tuple[str, str]:
    """The (location, subfolder) options that relocate this family's denoiser."""
    from .family import DENOISER_LOCATION_OPTIONS

    return DENOISER_LOCATION_OPTIONS[family_cls.denoiser_name]


def resolve_source(family_cls: type[ModelFamily], cfg: Any) -> ModelSource:
    """Pick the model location from the config, defaulting to the flavour's hub id."""
    model = cfg.pretrained_model_name_or_path
    if not model:
        flavour = cfg.model_flavour or family_cls.default_flavour
        try:
            model = family_cls.flavours[flavour]
        except KeyError:
            allowed = ", ".join(sorted(family_cls.flavours))
            raise ValueError(
                f"model_flavour {flavour!r} is not known for model_family {family_cls.family}; "
                f"allowed: {allowed}"
            ) from None
    location_option, subfolder_option = denoiser_options(family_cls)
    text_encoders = tuple((name, str(getattr(cfg, option)))
                          for option, name in family_cls.text_encoder_location_options.items()
                          if getattr(cfg, option, None))
    return ModelSource(
        model=str(model),
        revision=cfg.revision or None,
        variant=cfg.variant or None,
        vae=cfg.pretrained_vae_model_name_or_path or None,
        denoiser=getattr(cfg, location_option, None) or None,
        denoiser_subfolder=(getattr(cfg, subfolder_option, None) or family_cls.denoiser_subfolder(cfg.model_flavour)
                            or None),
        single_file=is_single_file(str(model)),
        text_encoders=text_encoders,
    )


def _pretrained_kwargs(src: ModelSource, *, subfolder: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if subfolder:
        kwargs["subfolder"] = subfolder
    if src.revision:
        kwargs["revision"] = src.revision
    if src.variant:
        kwargs["variant"] = src.variant
    return kwargs


def _is_local(location: str) -> bool:
    return Path(location).exists() or location.startswith(("/", "./", "../", "~"))


def _load_failure(exc: BaseException, location: str) -> bool:
    """Whether ``exc`` is permanent: the location does not hold what was asked for, or its files cannot be
    fetched even after huggingface_hub's own retries (no network, offline mode)."""
    if _is_local(location):
        return isinstance(exc, (OSError, ValueError, KeyError, TypeError, RuntimeError))
    try:
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - huggingface_hub always ships with diffusers
        return False
    if isinstance(exc, (EntryNotFoundError, GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError,
                        LocalEntryNotFoundError)):
        return True
    # diffusers/transformers report a file they could not get (after huggingface_hub's own retries with
    # backoff) as a plain OSError without errno; one with errno (disk full, I/O error) is not about the location
    return isinstance(exc, OSError) and exc.errno is None


def _unreachable_hint(exc: BaseException) -> str:
    """A hint when the Hub could not be reached for a file not in the local cache (no network, offline mode)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, LocalEntryNotFoundError | ConnectionError) or "connect" in str(seen).lower():
            return ("; the Hub could not be reached and the files are not in the local Hugging Face cache: "
                    "put the model on a volume (a local folder, or spec.model.source pvc/s3) or let the pod reach "
                    "the Hub (HF_ENDPOINT, no HF_HUB_OFFLINE)")
        seen = seen.__cause__ or seen.__context__
    return ""


def load_part(cls: Any, location: str, src: ModelSource, *, subfolder: str | None, option: str,
              what: str, torch_dtype: torch.dtype | None = None, use_variant: bool = True,
              quantization_config: Any = None) -> Any:
    """``cls.from_pretrained`` with the configured revision/variant (and a quantization config to load with).

    A missing subfolder, an unreadable or mismatched component, or an unknown hub id raises
    :class:`ConfigError` for ``option`` naming ``location`` and ``what`` was expected there.
    """
    kwargs = _pretrained_kwargs(src, subfolder=subfolder)
    if not use_variant:
        kwargs.pop("variant", None)
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    local = Path(location)
    if _is_local(location):
        if not local.exists():
            raise ConfigError([Problem(option, location, f"no such folder; expected {what}")])
        if subfolder and not (local / subfolder).is_dir():
            raise ConfigError([Problem(option, location, f"{location} has no {subfolder}/ folder; expected {what}")])
    try:
        return cls.from_pretrained(location, **kwargs)
    except Exception as exc:
        if not _load_failure(exc, location):
            raise
        where = f"{location}/{subfolder}" if subfolder else location
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError([Problem(option, location, f"cannot load a {cls.__name__} from {where} "
                                                     f"(expected {what}): {detail}{_unreachable_hint(exc)}")]) from exc


def load_vae(family_cls: type[ModelFamily], src: ModelSource, model: str) -> Any:
    """The VAE: from ``--pretrained_vae_model_name_or_path`` (its ``vae/`` subfolder, else its root), or the model's."""
    from diffusers import AutoencoderKL

    vae_cls = getattr(family_cls, "vae_class", None) or AutoencoderKL
    expected = "a VAE folder (config.json and weights) or a pipeline folder with a vae/ subfolder"
    if not src.vae:
        return load_part(vae_cls, model, src, subfolder="vae", option=MODEL_OPTION, what=PIPELINE_LAYOUT)
    location = src.vae
    if _is_local(location):
        root = Path(location)
        if not root.exists():
            raise ConfigError([Problem(VAE_OPTION, location, f"no such folder; expected {expected}")])
        subfolder = "vae" if (root / "vae" / "config.json").is_file() else None
        if subfolder is None and not (root / "config.json").is_file():
            raise ConfigError([Problem(VAE_OPTION, location, f"holds no config.json and no vae/config.json; "
                                                             f"expected {expected}")])
        return load_part(vae_cls, location, src, subfolder=subfolder, option=VAE_OPTION, what=expected,
                         use_variant=False)
    try:
        return load_part(vae_cls, location, src, subfolder="vae", option=VAE_OPTION, what=expected,
                         use_variant=False)
    except ConfigError:
        return load_part(vae_cls, location, src, subfolder=None, option=VAE_OPTION, what=expected,
                         use_variant=False)


def load_components(family_cls: type[ModelFamily], cfg: Any, *,
                    weight_dtype: torch.dtype = torch.float32) -> Components:
    """Load the denoiser, VAE, text encoders, tokenizers and the training noise scheduler."""
    from .quantization import pipeline_quantization

    src = resolve_source(family_cls, cfg)
    if src.single_file:
        comps = _from_single_file(family_cls, src, cfg, weight_dtype)
    else:
        comps = _from_folder(family_cls, src, weight_dtype, pipeline_quantization(family_cls, cfg, weight_dtype))
    comps.noise_scheduler = family_cls.training_scheduler(comps.noise_scheduler, cfg)
    if comps.vae is not None:
        comps.vae.requires_grad_(False)
        comps.vae.eval()
        comps.vae.to(dtype=vae_dtype(cfg))
    for te in comps.text_encoders:
        te.requires_grad_(False)
        te.eval()
    comps.denoiser.requires_grad_(False)
    return comps


def _from_folder(family_cls: type[ModelFamily], src: ModelSource, weight_dtype: torch.dtype,
                 quantization: dict[str, Any] | None = None) -> Components:
    """``quantization``: component name → the quantization config it loads with (``--quantize_via pipeline``)."""
    quantization = quantization or {}
    model = src.model
    location_option, _ = denoiser_options(family_cls)
    name = family_cls.denoiser_name
    if src.denoiser:
        denoiser = load_part(family_cls.denoiser_class(), src.denoiser, src, subfolder=src.denoiser_subfolder,
                             option=location_option, torch_dtype=weight_dtype,
                             what=f"a {family_cls.denoiser_class_name} folder (config.json and weights)",
                             quantization_config=quantization.get(name))
    else:
        denoiser = load_part(family_cls.denoiser_class(), model, src, subfolder=src.denoiser_subfolder or name,
                             option=MODEL_OPTION, what=PIPELINE_LAYOUT, torch_dtype=weight_dtype,
                             quantization_config=quantization.get(name))
    vae = load_vae(family_cls, src, model) if family_cls.uses_vae else None
    text_encoders = load_text_encoders(family_cls, src, weight_dtype, quantization)
    tokenizers = []
    for tok_cls, tok_name in zip(family_cls.tokenizer_classes(), family_cls.tokenizer_names, strict=True):
        if separate := _separate_source(family_cls, model, tok_name):
            tokenizers.append(load_part(tok_cls, separate, ModelSource(separate), subfolder=None, option=MODEL_OPTION,
                                        what=f"a {tok_cls.__name__} repository", use_variant=False))
        else:
            tokenizers.append(load_part(tok_cls, model, src, subfolder=tok_name, option=MODEL_OPTION,
                                        what=PIPELINE_LAYOUT, use_variant=False))
    scheduler = load_part(family_cls.scheduler_class(), model, src, subfolder="scheduler", option=MODEL_OPTION,
                          what=PIPELINE_LAYOUT, use_variant=False)
    return Components(denoiser, vae, text_encoders, tokenizers, scheduler, src)


def load_text_encoders(family_cls: type[ModelFamily], src: ModelSource, weight_dtype: torch.dtype,
                       quantization: dict[str, Any] | None = None) -> list[Any]:
    """The text encoders, in pipeline order, from the model folder, their relocation options or their own
    repositories (frozen, in eval mode); ``quantization`` as in :func:`_from_folder`."""
    quantization = quantization or {}
    model = src.model
    relocated = dict(src.text_encoders)
    options = {te_name: option for option, te_name in family_cls.text_encoder_location_options.items()}
    text_encoders = []
    for te_cls, te_name in zip(family_cls.text_encoder_classes(), family_cls.text_encoder_names, strict=True):
        if te_name in relocated:
            location = relocated[te_name]
            subfolder = te_name if _is_local(location) and (Path(location) / te_name).is_dir() else None
            text_encoders.append(load_part(te_cls, location, src, subfolder=subfolder, option=options[te_name],
                                           what=f"a {te_cls.__name__} folder or a pipeline folder with "
                                                f"{te_name}/", torch_dtype=weight_dtype,
                                           quantization_config=quantization.get(te_name)))
        elif separate := _separate_source(family_cls, model, te_name):
            text_encoders.append(load_part(te_cls, separate, ModelSource(separate), subfolder=None,
                                           option=MODEL_OPTION, what=f"a {te_cls.__name__} repository",
                                           torch_dtype=weight_dtype, quantization_config=quantization.get(te_name)))
        else:
            text_encoders.append(load_part(te_cls, model, src, subfolder=te_name, option=MODEL_OPTION,
                                           what=PIPELINE_LAYOUT, torch_dtype=weight_dtype,
                                           quantization_config=quantization.get(te_name)))
    for te in text_encoders:
        te.requires_grad_(False)
        te.eval()
    return text_encoders


def _separate_source(family_cls: type[ModelFamily], model: str, name: str) -> str | None:
    """The repository of a component the family's model repositories do not ship (``separate_sources``, e.g.
    HiDream's Llama), unless ``model`` is a local folder holding ``name/``; else None."""
    location = getattr(family_cls, "separate_sources", {}).get(name)
    if location and _is_local(model) and (Path(model) / name).is_dir():
        return None
    return location


def vae_dtype(cfg: Any) -> torch.dtype:
    """VAE weights stay in fp32 unless asked otherwise (SD VAEs overflow in fp16)."""
    choice = getattr(cfg, "vae_dtype", None) or "default"
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(choice, torch.float32)


def _from_single_file(family_cls: type[ModelFamily], src: ModelSource, cfg: Any,
                      weight_dtype: torch.dtype) -> Components:
    """Load an original-format checkpoint through the family pipeline's ``from_single_file``."""
    import diffusers

    pipeline_cls = getattr(diffusers, family_cls.pipeline_class)
    if not hasattr(pipeline_cls, "from_single_file"):
        raise ConfigError([Problem(MODEL_OPTION, src.model,
                                   f"model_family {family_cls.family} cannot load a single checkpoint file; "
                                   "point pretrained_model_name_or_path at a diffusers folder or hub id")])
    if _is_local(src.model) and not Path(src.model).is_file():
        raise ConfigError([Problem(MODEL_OPTION, src.model, "no such checkpoint file")])
    flavour = cfg.model_flavour or family_cls.default_flavour
    config_source = family_cls.flavours.get(flavour)
    kwargs: dict[str, Any] = {"torch_dtype": weight_dtype}
    if config_source:
        kwargs["config"] = config_source
    if src.revision:
        kwargs["revision"] = src.revision
    try:
        pipe = pipeline_cls.from_single_file(src.model, **kwargs)
    except Exception as exc:
        if not _load_failure(exc, src.model):
            raise
        raise ConfigError([Problem(MODEL_OPTION, src.model,
                                   f"cannot load it as a single {family_cls.family} checkpoint file "
                                   f"({type(exc).__name__}: {str(exc).strip()[:200]})")]) from exc
    comps = Components(
        denoiser=getattr(pipe, family_cls.denoiser_name),
        vae=pipe.vae,
        text_encoders=[getattr(pipe, n) for n in family_cls.text_encoder_names],
        tokenizers=[getattr(pipe, n) for n in family_cls.tokenizer_names],
        noise_scheduler=pipe.scheduler,
        source=src,
    )
    if src.vae:
        comps.vae = load_vae(family_cls, src, src.model)
    return comps
