"""``--fuse_qkv_projections`` with LoRA: one matmul for Q, K and V while training, separate layers in every file.

diffusers' ``fuse_qkv_projections()`` adds a fused layer next to the separate ones of each attention (``to_qkv``
for self-attention, ``to_kv`` for the key/value of cross-attention, ``to_added_qkv`` for the context stream of
joint attention) and its processors then call the fused layer only. The base is fused before the LoRA is
attached, so the adapter sits on the fused layers (SimpleTuner targets ``to_qkv`` likewise); a fused LoRA is
exactly a LoRA of each part with the same down matrix and that part's rows of the up matrix, which is how it is
written out (:func:`unfuse_lora_state`), so files load into the unfused pipeline, and how a checkpoint is read
back (:func:`fuse_lora_state`, exact: the parts' down matrices are the one written).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ConfigError, Problem

#: fused layer → the separate layers it stands for, in diffusers' concatenation order (``fuse_projections``)
FUSED_PARTS: dict[str, tuple[str, ...]] = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}
#: LoRA tensors whose rows follow the layer's output rows (split), versus those shared by every part
_PER_ROW = re.compile(r"^(lora_B|lora\.up|lora_magnitude_vector)\b")
_SHARED = re.compile(r"^(lora_A|lora\.down)\b")


@dataclass
class Fusion:
    """The fused layers of one denoiser: full name → [(part's full name, its output features)]."""

    parts: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    #: full names of the separate layers the processors no longer call
    superseded: set[str] = field(default_factory=set)


def fuse(denoiser: torch.nn.Module, family: str) -> Fusion:
    """Fuse the QKV projections of ``denoiser`` (diffusers' ``fuse_qkv_projections``); raises ConfigError when
    the model cannot fuse them."""
    try:
        denoiser.fuse_qkv_projections()
    except (AttributeError, ValueError) as exc:
        raise ConfigError([Problem("fuse_qkv_projections", True,
                                   f"the {family} model cannot fuse its attention projections: {exc}")]) from exc
    fusion = Fusion()
    for name, module in denoiser.named_modules():
        for fused, parts in FUSED_PARTS.items():
            if isinstance(getattr(module, fused, None), torch.nn.Linear):
                prefix = f"{name}." if name else ""
                fusion.parts[prefix + fused] = [(prefix + p, getattr(module, p).out_features) for p in parts]
                fusion.superseded.update(prefix + p for p in parts)
    if not fusion.parts:
        raise ConfigError([Problem("fuse_qkv_projections", True,
                                   f"the {family} model has no attention projections diffusers fuses")])
    return fusion


def fused_targets(denoiser: torch.nn.Module, targets: list[str], fusion: Fusion) -> list[str]:
    """The LoRA targets (PEFT suffixes) as full module names, each superseded part replaced by its fused layer
    (which is targeted when any of its parts is)."""
    names = [name for name, _ in denoiser.named_modules()]
    chosen: list[str] = []
    owner = {part: fused for fused, parts in fusion.parts.items() for part, _ in parts}
    for name in names:
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        chosen.append(owner.get(name, name))
    return list(dict.fromkeys(chosen))


def _split_key(key: str, fusion: Fusion) -> tuple[str, str] | None:
    for fused in fusion.parts:
        if key.startswith(fused + "."):
            return fused, key[len(fused) + 1:]
    return None


def unfuse_lora_state(state: dict[str, torch.Tensor], fusion: Fusion) -> dict[str, torch.Tensor]:
    """A LoRA state dict (keys relative to the denoiser) of the fused layers as one LoRA per separate layer:
    the down matrix copied, the up matrix (and a DoRA magnitude, a LoRA bias) split by the parts' rows."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        found = _split_key(key, fusion)
        if found is None:
            out[key] = value
            continue
        fused, rest = found
        parts = fusion.parts[fused]
        if _PER_ROW.match(rest):
            pieces = torch.split(value, [size for _, size in parts], dim=0)
        elif _SHARED.match(rest):
            pieces = tuple(value for _ in parts)
        else:
            raise ValueError(f"fuse_qkv_projections: no rule to split the LoRA tensor {key}")
        out.update({f"{part}.{rest}": piece.clone() for (part, _), piece in zip(parts, pieces, strict=True)})
    return out


def fuse_lora_state(state: dict[str, torch.Tensor], fusion: Fusion) -> dict[str, torch.Tensor]:
    """The inverse of :func:`unfuse_lora_state` (keys in the same layout); raises ValueError when the parts of a
    fused layer do not share one down matrix (a LoRA that was not trained fused)."""
    owner = {part: fused for fused, parts in fusion.parts.items() for part, _ in parts}
    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        part = next((p for p in owner if key.startswith(p + ".")), None)
        if part is None:
            out[key] = value
            continue
        grouped.setdefault((owner[part], key[len(part) + 1:]), {})[part] = value
    for (fused, rest), pieces in grouped.items():
        ordered = [pieces[part] for part, _ in fusion.parts[fused] if part in pieces]
        if len(ordered) != len(fusion.parts[fused]):
            raise ValueError(f"fuse_qkv_projections: {fused} needs LoRA weights for all of "
                             f"{[p for p, _ in fusion.parts[fused]]}")
        if _PER_ROW.match(rest):
            out[f"{fused}.{rest}"] = torch.cat(ordered, dim=0)
        elif all(torch.equal(t, ordered[0]) for t in ordered):
            out[f"{fused}.{rest}"] = ordered[0]
        else:
            raise ValueError(f"fuse_qkv_projections: the parts of {fused} have different {rest} weights; only a "
                             "LoRA trained with fused projections can be read back fused")
    return out


def unfused_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """PEFT adapter metadata naming the separate layers instead of the fused ones (diffusers' loader builds
    the adapter of the unfused model from it)."""
    targets = meta.get("target_modules")
    if not targets:
        return meta
    names = sorted(targets) if isinstance(targets, (set, list, tuple)) else [targets]
    unfused: list[str] = []
    for name in names:
        stem, _, last = name.rpartition(".")
        parts = FUSED_PARTS.get(last)
        unfused += [f"{stem}.{p}" if stem else p for p in parts] if parts else [name]
    return {**meta, "target_modules": sorted(dict.fromkeys(unfused))}


class SupersededCheck:
    """After the first forward pass: the superseded layers were not called, the fused ones were (else the
    model's attention processors ignore the fusion and the fused LoRA would not train): ConfigError."""

    def __init__(self, denoiser: torch.nn.Module, fusion: Fusion, family: str):
        modules = dict(denoiser.named_modules())
        self.family = family
        self.called: set[str] = set()
        self.handles = [modules[n].register_forward_hook(self._seen(n)) for n in [*fusion.superseded, *fusion.parts]
                        if n in modules]
        self.fused = set(fusion.parts)
        self.handles.append(denoiser.register_forward_hook(self._check))

    def _seen(self, name: str):
        def hook(*_: Any) -> None:
            self.called.add(name)
        return hook

    def _check(self, *_: Any) -> None:
        for handle in self.handles:
            handle.remove()
        stale = sorted(self.called - self.fused)
        if stale or not self.called & self.fused:
            raise ConfigError([Problem("fuse_qkv_projections", True,
                                       f"the {self.family} model's attention processors do not use diffusers' "
                                       f"fused projections (they still call {stale[:1] or 'the separate layers'})")])
