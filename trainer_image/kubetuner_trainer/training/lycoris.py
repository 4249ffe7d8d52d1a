"""LyCORIS adapters (``--lora_type lycoris``) through the maintained ``lycoris-lora`` package.

``--lycoris_config`` is SimpleTuner's JSON format: the network's ``multiplier``, ``linear_dim`` and
``linear_alpha``, an ``apply_preset`` (``target_module``, ``module_algo_map``, ``name_algo_map``, …,
see ``lycoris.config_sdk.VALID_PRESET_KEYS``), and every other key passed on to
``lycoris.create_lycoris`` (``algo``: lokr, loha, locon, lora, full, …; ``factor``, ``conv_dim``,
``conv_alpha``, ``bypass_mode``, ``full_matrix``, …). Defaults when a key is missing follow
SimpleTuner: multiplier 1, linear_dim 4, linear_alpha 1.

The network hangs under the denoiser as the child module :data:`NETWORK_ATTRIBUTE`, so its
parameters are the denoiser's trainable ones (optimizer, DDP, EMA and checkpoints see them like
PEFT LoRA layers). Files use LyCORIS' own key layout (``lycoris_<module path with _>.lokr_w1``, …,
``.alpha``) with the config in the ``lycoris_config`` header, which ComfyUI and
``lycoris.create_lycoris_from_weights`` load.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..files import publish
from ..options.model import ValueProblem, parse_json_value
from . import checkpoints as ckpt
from .trainable import Trainable

log = logging.getLogger(__name__)

#: the file LyCORIS weights are saved in (checkpoints and the final result), as for PEFT LoRA
LYCORIS_FILE = ckpt.LORA_FILE
#: the child module of the denoiser holding the network
NETWORK_ATTRIBUTE = "lycoris_network"
#: create_lycoris' positional arguments in the config, and SimpleTuner's defaults for them
POSITIONAL_DEFAULTS = {"multiplier": 1.0, "linear_dim": 4, "linear_alpha": 1}
#: LycorisNetwork class attributes that ``apply_preset`` sets (restored after each network is built)
_PRESET_ATTRIBUTES = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                      "NAME_ALGO_MAP", "LORA_PREFIX", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")


class LycorisConfigError(ValueError):
    """``--lycoris_config`` (or an option that goes with it) is unusable; the message says why."""


def parse_lycoris_config(value: Any) -> dict[str, Any]:
    """``--lycoris_config`` (a JSON file, inline JSON or a dict) as a validated dict.

    Raises :class:`LycorisConfigError` naming what is wrong: unreadable JSON, not an object,
    an unknown ``algo`` or an unknown ``apply_preset`` key.
    """
    from lycoris.config_sdk import VALID_PRESET_KEYS
    from lycoris.wrapper import network_module_dict

    if value in (None, ""):
        raise LycorisConfigError("lycoris_config is required with --lora_type=lycoris (a JSON file such as "
                                 "SimpleTuner's lycoris_config.json)")
    try:
        config = parse_json_value(value)
    except ValueProblem as problem:
        raise LycorisConfigError(f"lycoris_config: {problem}") from None
    if not isinstance(config, dict):
        raise LycorisConfigError("lycoris_config must be a JSON object")
    algo = str(config.get("algo", "lora")).lower()
    if algo not in network_module_dict:
        raise LycorisConfigError(f"lycoris_config: algo {algo!r} is not one of {', '.join(network_module_dict)}")
    preset = config.get("apply_preset") or {}
    if not isinstance(preset, dict):
        raise LycorisConfigError("lycoris_config: apply_preset must be a JSON object")
    unknown = sorted(set(preset) - set(VALID_PRESET_KEYS))
    if unknown:
        raise LycorisConfigError(f"lycoris_config: apply_preset keys {unknown} are unknown; allowed: "
                                 f"{', '.join(VALID_PRESET_KEYS)}")
    return dict(config)


def lycoris_problems(cfg: Any) -> list[tuple[str, Any, str]]:
    """(option, value, message) for every problem with the LyCORIS options of ``cfg``."""
    if cfg.lora_type != "lycoris" or cfg.model_type != "lora":
        return []
    problems: list[tuple[str, Any, str]] = []
    try:
        config = parse_lycoris_config(cfg.lycoris_config)
    except LycorisConfigError as error:
        return [("lycoris_config", cfg.lycoris_config, str(error))]
    if cfg.init_lokr_norm is not None and str(config.get("algo", "lora")).lower() != "lokr":
        problems.append(("init_lokr_norm", cfg.init_lokr_norm, "needs a LoKr network (lycoris_config algo: lokr)"))
    for option in ("train_text_encoder", "use_dora"):
        if getattr(cfg, option, False):
            problems.append((option, True, "is not supported with --lora_type=lycoris (the network trains the "
                                           "denoiser)"))
    if cfg.peft_lora_mode not in (None, "standard"):
        problems.append(("peft_lora_mode", cfg.peft_lora_mode, "applies to --lora_type=standard only"))
    if cfg.lora_format == "comfyui":
        problems.append(("lora_format", "comfyui", "LyCORIS files always use LyCORIS' own key layout, which "
                                                    "ComfyUI loads; leave lora_format unset"))
    return problems


@contextmanager
def _preset(preset: Mapping[str, Any] | None) -> Iterator[None]:
    """Apply a LyCORIS preset for one network, then put the library's class-wide settings back."""
    from lycoris import LycorisNetwork

    saved = {name: getattr(LycorisNetwork, name) for name in _PRESET_ATTRIBUTES}
    try:
        if preset:
            LycorisNetwork.apply_preset(dict(preset))
        yield
    finally:
        for name, value in saved.items():
            setattr(LycorisNetwork, name, value)


def create_network(module: torch.nn.Module, config: Mapping[str, Any], *,
                   init_lokr_norm: float | None = None, seed: int | None = None) -> Any:
    """Build a LyCORIS network for ``module`` from a parsed ``--lycoris_config`` and apply it.

    ``init_lokr_norm`` starts every LoKr layer from w1 = 1 and w2 = normal noise with the mean and
    standard deviation of the layer's original weight, times ``init_lokr_norm`` (SimpleTuner's
    perturbed-normal initialisation). Returns the applied ``LycorisNetwork`` (fp32 parameters).
    """
    from lycoris import create_lycoris

    kwargs = dict(config)
    preset = kwargs.pop("apply_preset", None)
    positional = [kwargs.pop(name, default) for name, default in POSITIONAL_DEFAULTS.items()]
    multiplier, linear_dim, linear_alpha = float(positional[0]), positional[1], positional[2]
    with _preset(preset):
        network = create_lycoris(module, multiplier, linear_dim, linear_alpha, **kwargs)
    if not network.loras:
        raise LycorisConfigError("lycoris_config: apply_preset matches no module of the "
                                 f"{type(module).__name__}; check target_module / target_name")
    if init_lokr_norm is not None:
        perturbed_normal_init(network, init_lokr_norm, seed=seed)
    network.apply_to()
    network.to(dtype=torch.float32)
    return network


def perturbed_normal_init(network: Any, scale: float, *, seed: int | None = None) -> None:
    """LoKr layers: w1 = 1, w2 = noise matched to the original weight's mean and std, times ``scale``.

    Raises :class:`LycorisConfigError` when a layer has no full ``lokr_w1``/``lokr_w2`` pair (a
    decomposed LoKr: raise ``linear_dim`` or set ``full_matrix``).
    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for layer in network.loras:
            w1, w2 = getattr(layer, "lokr_w1", None), getattr(layer, "lokr_w2", None)
            if not isinstance(w1, torch.Tensor) or not isinstance(w2, torch.Tensor):
                raise LycorisConfigError(f"init_lokr_norm: LoKr layer {layer.lora_name} is decomposed; set "
                                         "full_matrix or a large linear_dim in lycoris_config")
            original = layer._current_weight().float()
            noise = torch.randn(w2.shape, generator=generator)
            noise = (noise - noise.mean()) / noise.std().clamp_min(1e-12)
            w1.fill_(1.0)
            w2.copy_((noise * original.std() + original.mean()) * scale)


def save_network(network: Any, path: Path, config: Mapping[str, Any], metadata: Mapping[str, str]) -> Path:
    """Write the network's weights (fp32) in LyCORIS' key layout with the config in the header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": "pt", **metadata, "lycoris_config": json.dumps(dict(config), sort_keys=True)}
    network.save_weights(str(path), torch.float32, header)
    publish(path)  # safetensors leaves its files 0600
    return path


def load_network_weights(network: Any, path: Path) -> None:
    """Load a file written by :func:`save_network` into ``network``, every key (raises ``ValueError``)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no LyCORIS weights at {path}")
    result = network.load_weights(str(path))
    if result:
        raise ValueError(f"{path} does not fit the LyCORIS network: {result}")


def network_from_file(module: torch.nn.Module, path: Path, multiplier: float = 1.0) -> Any:
    """A fresh network rebuilt from a LyCORIS file alone (what other tools do), applied to ``module``."""
    from lycoris import create_lycoris_from_weights

    network, _ = create_lycoris_from_weights(multiplier, str(path), module)
    network.apply_to()
    network.load_weights(str(path))
    return network


def attached_network(denoiser: torch.nn.Module) -> Any:
    """The LyCORIS network attached to ``denoiser`` (raises ``ValueError`` when there is none)."""
    network = getattr(denoiser, NETWORK_ATTRIBUTE, None)
    if network is None:
        raise ValueError("no LyCORIS network is attached to the denoiser")
    return network


class LycorisTrainable(Trainable):
    """A LyCORIS network on the frozen denoiser (``--model_type lora --lora_type lycoris``)."""

    def __init__(self, family: Any, cfg: Any):
        super().__init__(family, cfg)
        self.config = parse_lycoris_config(cfg.lycoris_config)
        self.network: Any = None

    def _attach(self) -> dict[str, torch.nn.Module]:
        denoiser = self.family.denoiser
        denoiser.requires_grad_(False)
        if self.cfg.init_lora:
            self.network = network_from_file(denoiser, Path(self.cfg.init_lora),
                                             float(self.config.get("multiplier", 1.0)))
            self.network.to(dtype=torch.float32)
        else:
            self.network = create_network(denoiser, self.config, init_lokr_norm=self.cfg.init_lokr_norm,
                                          seed=self.cfg.seed)
        self.network.to(device=next(denoiser.parameters()).device)
        self.network.requires_grad_(True)
        denoiser.add_module(NETWORK_ATTRIBUTE, self.network)
        count = sum(p.numel() for p in self.network.parameters())
        log.info("LyCORIS %s network: %d layers, %d parameters", self.config.get("algo", "lora"),
                 len(self.network.loras), count)
        return {self.denoiser_name: denoiser}

    def metadata(self, title: str) -> dict[str, str]:
        return ckpt.modelspec_metadata(self.cfg, architecture=self.family.modelspec_architecture, title=title,
                                       lora=True)

    def save(self, folder: Path, *, title: str, ema: Any = None) -> None:
        save_network(self.network, folder / LYCORIS_FILE, self.config, self.metadata(title))

    def load(self, folder: Path) -> None:
        load_network_weights(self.network, folder / LYCORIS_FILE)

    def export(self, out: Path, *, title: str, ema: Any = None) -> None:
        """The final LyCORIS file (the EMA weights when EMA ran, as the EMA of a PEFT LoRA run)."""
        if ema is None:
            self.save(out, title=title)
            return
        network = attached_network(self.ema_denoiser(ema))
        save_network(network, out / LYCORIS_FILE, self.config, self.metadata(title))

    @contextmanager
    def validation_context(self) -> Iterator[None]:
        """Renders with the network at ``--validation_lycoris_strength`` (then back to training strength)."""
        strength = self.cfg.validation_lycoris_strength
        if strength is None or self.network is None:
            yield
            return
        training = self.network.multiplier
        self.network.set_multiplier(float(strength))
        try:
            yield
        finally:
            self.network.set_multiplier(training)
