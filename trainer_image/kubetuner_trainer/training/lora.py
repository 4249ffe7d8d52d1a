"""LoRA adapters through PEFT: configuration, attaching, exporting and re-loading weights.

Exported LoRA files use the diffusers key layout (``<denoiser>.…``, ``text_encoder.…``, where the
denoiser is the family's ``unet`` or ``transformer``) so that ``pipeline.load_lora_weights`` reads
them; ``--lora_format comfyui`` rewrites the keys with the family's ComfyUI naming
(``ModelFamily.comfyui_key``: kohya's ``lora_unet_…``/``lora_te…`` style) and ``.lora_down``/
``.lora_up``/``.alpha`` suffixes.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"
INIT_TYPES = {"default": True, "gaussian": "gaussian", "loftq": "loftq", "olora": "olora", "pissa": "pissa"}


def parse_target_modules(value: Any, default: Sequence[str]) -> list[str]:
    """``--peft_lora_target_modules``: a JSON list, a comma-separated string, or unset (family default)."""
    if value in (None, "", []):
        return list(default)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = json.loads(text)
        else:
            value = [part.strip() for part in text.split(",") if part.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(
            f"peft_lora_target_modules must be a list of module names, e.g. [\"to_q\", \"to_k\"]; got {value!r}"
        )
    return value


def lora_config(cfg: Any, target_modules: Sequence[str]):
    """A PEFT ``LoraConfig`` from ``--lora_rank/--lora_alpha/--lora_dropout/--lora_init_type/--use_dora``.

    With ``--peft_lora_mode singlora`` it is ``peft_singlora``'s config (see ``training/singlora.py``).
    """
    from peft import LoraConfig

    if cfg.peft_lora_mode == "singlora":
        from .singlora import singlora_config

        return singlora_config(cfg, target_modules)
    rank = cfg.lora_rank
    init = cfg.lora_init_type
    if init not in INIT_TYPES:
        raise ValueError(f"lora_init_type {init!r} is not one of {', '.join(INIT_TYPES)}")
    kwargs: dict[str, Any] = {}
    if init == "loftq":
        from peft import LoftQConfig

        kwargs["loftq_config"] = LoftQConfig(loftq_bits=4)
    return LoraConfig(
        r=rank,
        lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else rank,
        lora_dropout=cfg.lora_dropout,
        init_lora_weights=INIT_TYPES[init],
        target_modules=list(target_modules),
        use_dora=bool(cfg.use_dora),
        **kwargs,
    )


def _matches(names: Sequence[str], target: str) -> bool:
    """PEFT's rule: a target names a module by its full name or a dotted suffix of it."""
    return any(n == target or n.endswith("." + target) for n in names)


def _present(module: torch.nn.Module, targets: Sequence[str]) -> list[str]:
    names = [name for name, _ in module.named_modules()]
    return [t for t in targets if _matches(names, t)]


def _check_targets_exist(module: torch.nn.Module, targets: Sequence[str], owner: str) -> None:
    names = [name for name, _ in module.named_modules()]
    missing = [t for t in targets if not _matches(names, t)]
    if missing:
        raise ValueError(f"peft_lora_target_modules: no module of the {owner} matches {missing}")


def attach_lora(family: Any, cfg: Any,
                retarget: Callable[[list[str]], list[str]] | None = None) -> dict[str, torch.nn.Module]:
    """Add LoRA layers to the denoiser (and the text encoders with ``--train_text_encoder``); ``retarget``
    rewrites the denoiser's targets (fused projections).

    Returns the modules that now hold trainable parameters, by pipeline name.
    """
    if cfg.peft_lora_target_modules in (None, "", []):
        # a preset may name layers this checkpoint lacks (fused to_qkv, block 20 of a smaller model)
        denoiser_targets = _present(family.denoiser, family.lora_targets(cfg))
        if not denoiser_targets:
            raise ValueError(f"{family.lora_target_option or 'the default LoRA target'}: none of the layers "
                             f"{list(family.lora_targets(cfg))} exists in this {family.denoiser_class_name}")
    else:
        denoiser_targets = parse_target_modules(cfg.peft_lora_target_modules, ())
        _check_targets_exist(family.denoiser, denoiser_targets, family.denoiser_class_name)
    if retarget is not None:
        denoiser_targets = retarget(denoiser_targets)
    family.denoiser.add_adapter(lora_config(cfg, denoiser_targets))
    trained = {family.denoiser_name: family.denoiser}
    if cfg.train_text_encoder:
        for index, name, te in family.trainable_text_encoders():
            # peft directly: transformers' add_adapter demands a newer peft than diffusers needs
            from peft import inject_adapter_in_model

            inject_adapter_in_model(lora_config(cfg, family.text_lora_targets(index)), te,
                                    adapter_name=ADAPTER_NAME)
            trained[name] = te
    _lora_params_fp32(trained.values())
    if cfg.init_lora:
        load_lora_into(family, trained, cfg.init_lora)
    return trained


def _lora_params_fp32(modules) -> None:
    """Trainable LoRA weights stay in fp32 even when the base model is in half precision."""
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()


def lora_state_dicts(trained: dict[str, torch.nn.Module],
                     adapt: Callable[[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
                     ) -> dict[str, dict[str, torch.Tensor]]:
    """LoRA weights per module in the diffusers layout (unprefixed keys); ``adapt(name, state)`` rewrites each
    module's PEFT-format weights first (fused projections)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    adapt = adapt or (lambda _name, state: state)
    return {name: convert_state_dict_to_diffusers(adapt(name, get_peft_model_state_dict(module)))
            for name, module in trained.items()}


def lora_adapter_metadata(trained: dict[str, torch.nn.Module]) -> dict[str, dict[str, Any]]:
    return {name: module.peft_config[ADAPTER_NAME].to_dict() for name, module in trained.items()}


def flatten_with_prefix(per_module: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, sd in per_module.items() for k, v in sd.items()}


def load_lora_into(family: Any, trained: dict[str, torch.nn.Module], path: str | Path,
                   adapt: Callable[[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> None:
    """Load a LoRA file (diffusers or kohya keys) into already-attached adapters; exact for our own files.
    ``adapt(name, state)`` rewrites each module's PEFT-format weights first (fused projections)."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    path = Path(path)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"init_lora: no LoRA weights at {path}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except SafetensorError as error:
        raise OSError(f"init_lora: {path} is not a readable safetensors file: {error}") from error
    own = from_comfyui(family, trained, tensors)
    if own is not None:  # our own ComfyUI-format file (e.g. a checkpoint): read back exactly, fused layers too
        for name, module in trained.items():
            _set_adapter_state(name, module, own[name], path, adapt)
        return
    loader = family.lora_loader_class()
    # loaders differ in what follows the state dict (alphas, metadata); with metadata it is always first
    state = loader.lora_state_dict(str(path), return_lora_metadata=True)[0]
    for name, module in trained.items():
        prefix = name + "."
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not part:
            log.warning("init_lora: %s has no weights for the %s", path, name)
            continue
        if name == family.denoiser_name:
            part = convert_unet_state_dict_to_peft(part)
        else:
            from diffusers.utils import convert_state_dict_to_peft

            part = _without_text_model_level(module, convert_state_dict_to_peft(part))
        _set_adapter_state(name, module, part, path, adapt)


def _set_adapter_state(name: str, module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path,
                       adapt: Callable[[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> None:
    """Copy PEFT-format LoRA weights into ``module``'s attached adapter; raises ValueError for weights that do not
    fit it."""
    from peft.utils import set_peft_model_state_dict

    if adapt is not None:
        state = adapt(name, state)

    result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"init_lora: {path} has weights that do not fit the {name}: {unexpected[:5]}")


def _without_text_model_level(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Kohya/ComfyUI CLIP keys name ``text_model.encoder.…`` (transformers 4's layout); transformers 5's
    ``CLIPTextModel`` has no ``text_model`` level, so the keys lose it there."""
    if hasattr(module, "text_model"):
        return state
    return {k.removeprefix("text_model."): v for k, v in state.items()}


# ----- ComfyUI / kohya key format -----------------------------------------------------------------

_KOHYA_SUFFIXES = ((".lora_A.", ".lora_down."), (".lora_B.", ".lora_up."), (".lora.down.", ".lora_down."),
                   (".lora.up.", ".lora_up."), (".lora_linear_layer.down.", ".lora_down."),
                   (".lora_linear_layer.up.", ".lora_up."), (".lora_magnitude_vector", ".dora_scale"))

#: the layers of a CLIP text encoder ComfyUI applies LoRA weights to (its ``LORA_CLIP_MAP``)
COMFYUI_CLIP_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                       "mlp.fc1", "mlp.fc2")
_CLIP_LAYER_RE = re.compile(r"^(?:text_model\.)?encoder\.layers\.(\d+)\.(.+)$")


def comfyui_clip_layer(module_path: str) -> str:
    """ComfyUI's name for a CLIP text-encoder layer, ``text_model_encoder_layers_<i>_<layer>``
    (after the ``lora_te_``/``lora_te1_``/``lora_te2_`` prefix).

    ComfyUI names layers as in transformers 4's ``CLIPTextModel`` (``text_model.encoder.…``); in
    transformers 5 the plain ``CLIPTextModel`` has no ``text_model`` level, so it is added here.
    Raises ValueError for a layer ComfyUI does not load (it would silently drop its weights).
    """
    match = _CLIP_LAYER_RE.match(module_path)
    if match is None or match.group(2) not in COMFYUI_CLIP_LAYERS:
        raise ValueError(f"ComfyUI loads no LoRA weights for the text-encoder layer {module_path!r} "
                         f"(it reads {', '.join(COMFYUI_CLIP_LAYERS)} of encoder.layers.<i>)")
    return f"text_model_encoder_layers_{match.group(1)}_{match.group(2).replace('.', '_')}"


def to_comfyui(family: Any, per_module: dict[str, dict[str, torch.Tensor]],
               alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    """Rewrite diffusers LoRA keys to the names ComfyUI loads, adding ``.alpha`` per layer.

    Layer names come from ``family.comfyui_key`` (for the UNet families kohya's:
    ``unet.down_blocks.0…to_q.lora_A.weight`` → ``lora_unet_down_blocks_0_…_to_q.lora_down.weight``). Layers the
    family names alike (``comfyui_fused_parts``) become one LoRA on the fused weight (:func:`fuse_lora_layers`).
    Raises ValueError for a key with no ComfyUI name.
    """
    layers: dict[str, list[tuple[str, dict[str, torch.Tensor], float]]] = {}
    trained = list(per_module)
    for name, sd in per_module.items():
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in sd.items():
            for peft_part, kohya_part in _KOHYA_SUFFIXES:
                if peft_part in key:
                    module_path, rest = key.split(peft_part, 1)
                    parts.setdefault(module_path, {})[kohya_part + rest if rest else kohya_part.rstrip(".")] = tensor
                    break
            else:
                raise ValueError(f"unexpected LoRA key {key!r} in the {name}")
        for module_path, tensors in parts.items():
            base = family.comfyui_key(name, module_path, trained)
            layers.setdefault(base, []).append((module_path, tensors, float(alphas[name])))
    out: dict[str, torch.Tensor] = {}
    for base, group in layers.items():
        if len(group) > 1 or group[0][0].rsplit(".", 1)[-1] in family.comfyui_fused_parts:
            tensors, alpha = fuse_lora_layers(base, group, family.comfyui_fused_parts)
        else:
            _, tensors, alpha = group[0]
        out.update({base + suffix: tensor for suffix, tensor in tensors.items()})
        if ".lora_down.weight" in tensors:
            out[base + ".alpha"] = torch.tensor(alpha)
    return out


def fuse_lora_layers(base: str, group: list[tuple[str, dict[str, torch.Tensor], float]],
                     order: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], float]:
    """One LoRA for a fused weight (e.g. ``qkv`` = ``[q; k; v]`` rows) from its parts' LoRAs, exactly.

    ``group``: (module path, kohya tensors, alpha) per part, all of one rank ``r`` and alpha ``α`` (one adapter
    config); ``order``: the parts' last names in row order. ``ΔW_i = (α/r)·B_i·A_i`` stacks as
    ``(nα/nr)·blockdiag(B_i)·[A_1; …; A_n]``: ``lora_down [n·r, in]``, ``lora_up [Σout, n·r]``, alpha ``n·α``.
    :func:`from_comfyui` splits it back bit for bit. Raises ValueError when a part is missing, the parts differ
    in rank or alpha, or carry more than ``lora_down``/``lora_up`` (DoRA).
    """
    by_part = {path.rsplit(".", 1)[-1]: (tensors, alpha) for path, tensors, alpha in group}
    if sorted(by_part) != sorted(order) or len(group) != len(order):
        raise ValueError(f"ComfyUI holds {base} as one fused weight of {', '.join(order)}: train all of them "
                         f"(LoRA targets) or none (trained: {', '.join(sorted(by_part))})")
    parts = [by_part[part] for part in order]
    if any(set(tensors) != {".lora_down.weight", ".lora_up.weight"} for tensors, _ in parts):
        raise ValueError(f"ComfyUI's fused {base} takes plain LoRA layers only (not DoRA)")
    downs = [tensors[".lora_down.weight"] for tensors, _ in parts]
    if len({d.shape[0] for d in downs}) != 1 or len({alpha for _, alpha in parts}) != 1:
        raise ValueError(f"the parts of ComfyUI's fused {base} need one LoRA rank and alpha")
    ups = [tensors[".lora_up.weight"] for tensors, _ in parts]
    return {".lora_down.weight": torch.cat(downs), ".lora_up.weight": torch.block_diag(*ups)}, parts[0][1] * len(parts)


def from_comfyui(family: Any, trained: dict[str, torch.nn.Module],
                 tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]] | None:
    """The per-module PEFT state dicts of a file :func:`to_comfyui` wrote for these adapters (its exact inverse:
    fused layers are split back by rank and by each part's output size), or None when ``tensors`` are not that
    layout (a diffusers file, someone else's LoRA)."""
    names = list(trained)
    layers: dict[str, list[tuple[str, str, torch.nn.Module]]] = {}
    for name, module in trained.items():
        for path, sub in module.named_modules():
            if isinstance(getattr(sub, "lora_A", None), torch.nn.ModuleDict) and ADAPTER_NAME in sub.lora_A:
                try:
                    base = family.comfyui_key(name, path, names)
                except ValueError:
                    return None
                layers.setdefault(base, []).append((name, path, sub))
    found = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    if not layers or found != set(layers) or not _alphas_match(layers, tensors):
        return None
    out: dict[str, dict[str, torch.Tensor]] = {name: {} for name in trained}
    for base, group in layers.items():
        fused = len(group) > 1 or group[0][1].rsplit(".", 1)[-1] in family.comfyui_fused_parts
        if fused:
            order = {part: i for i, part in enumerate(family.comfyui_fused_parts)}
            group = sorted(group, key=lambda item: order[item[1].rsplit(".", 1)[-1]])
            down, up = tensors[f"{base}.lora_down.weight"], tensors[f"{base}.lora_up.weight"]
            rank, row = down.shape[0] // len(group), 0
            for i, (name, path, sub) in enumerate(group):
                rows = sub.lora_B[ADAPTER_NAME].weight.shape[0]
                out[name][f"{path}.lora_A.weight"] = down[i * rank:(i + 1) * rank]
                out[name][f"{path}.lora_B.weight"] = up[row:row + rows, i * rank:(i + 1) * rank]
                row += rows
            continue
        name, path, _ = group[0]
        for key, tensor in tensors.items():
            if not key.startswith(base + ".") or key == f"{base}.alpha":
                continue
            rest = key[len(base):]
            for peft_part, kohya_part in _PEFT_PARTS:
                if rest.startswith(kohya_part.rstrip(".")):
                    out[name][path + peft_part.rstrip(".") + rest[len(kohya_part.rstrip(".")):]] = tensor
                    break
    return out


def _alphas_match(layers: dict[str, list[tuple[str, str, torch.nn.Module]]], tensors: dict[str, torch.Tensor]) -> bool:
    """Whether each layer's ``.alpha`` is what :func:`to_comfyui` writes for these adapters (their ``lora_alpha``,
    times the parts of a fused layer): only then do the weights read back unscaled."""
    for base, group in layers.items():
        alpha = tensors.get(f"{base}.alpha")
        sub = group[0][2]
        expected = float(sub.lora_alpha[ADAPTER_NAME]) * len(group)
        if alpha is None or abs(float(alpha) - expected) > 1e-6 * max(1.0, expected):
            return False
    return True


#: kohya's names of PEFT's LoRA parts (what :func:`to_comfyui` writes for our own adapters)
_PEFT_PARTS = ((".lora_A.", ".lora_down."), (".lora_B.", ".lora_up."), (".lora_magnitude_vector", ".dora_scale"))
