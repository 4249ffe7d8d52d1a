"""TREAD token routing (``--tread_config``): Krause et al., 2025, "TREAD: Token Routing for Efficient
Architecture-agnostic Diffusion Training", arXiv:2501.04765.

During a training forward pass each route takes a random subset of the image tokens out before its
first block and puts them back, unchanged, after its last block: the blocks in between see only the
kept tokens (cheaper steps), and the loss still covers every token. Validation, evaluation loss and
export run the model whole (routing needs ``module.training`` and gradients enabled, as in
SimpleTuner 3.1.6).

The configuration is SimpleTuner's: ``{"routes": [{"selection_ratio": r, "start_layer_idx": a,
"end_layer_idx": b}, ...]}``. ``selection_ratio`` is the share of image tokens routed *around* the
blocks (SimpleTuner keeps ``N - round(N·r)``); the layer indices count the blocks of every list of
``ModelFamily.transformer_block_lists`` in forward order, both inclusive, negative ones from the end
(``-1`` is the last block). Routes may not overlap.

Differences from SimpleTuner 3.1.6, on purpose: the kept tokens are drawn once per batch (one subset
for every sample, so the family's shared rotary embeddings and masks are cut the same way for all;
SimpleTuner draws per sample) from the training loop's generator, whose state checkpoints carry (exact
resume); the kept tokens stay in their original order; a misconfigured route is refused (exit 78)
where SimpleTuner would skip it. Text tokens are never routed.

Family-neutral: blocks come from ``transformer_block_lists``; where a list carries the image tokens
(and where its blocks return them) is ``ModelFamily.routed_tokens``; the per-token side inputs a
block takes (rotary embeddings, masks) are cut by ``ModelFamily.route_block_inputs``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ConfigError, Problem
from ..options.model import ValueProblem, parse_json_value

log = logging.getLogger(__name__)

OPTION = "tread_config"
ROUTE_KEYS = ("selection_ratio", "start_layer_idx", "end_layer_idx")
CONFIG_KEYS = ("routes",)


class TreadConfigError(ValueError):
    """``--tread_config`` is malformed; the message names the field and what is allowed."""


@dataclass(frozen=True)
class Route:
    """One routing window: ``selection_ratio`` of the image tokens skip blocks ``start_layer_idx`` to
    ``end_layer_idx`` (inclusive; negative indices count from the end until :func:`resolve_routes`)."""

    selection_ratio: float
    start_layer_idx: int
    end_layer_idx: int


def _route(index: int, entry: Any) -> Route:
    where = f"routes[{index}]"
    if not isinstance(entry, Mapping):
        raise TreadConfigError(f"{where} must be an object with keys {', '.join(ROUTE_KEYS)}")
    missing = [k for k in ROUTE_KEYS if k not in entry]
    unknown = sorted(set(entry) - set(ROUTE_KEYS))
    if missing or unknown:
        said = (f"lacks {', '.join(missing)}" if missing else "") + ("; " if missing and unknown else "") + (
            f"has unknown keys {', '.join(map(str, unknown))}" if unknown else "")
        raise TreadConfigError(f"{where} {said}; allowed keys: {', '.join(ROUTE_KEYS)}")
    ratio = entry["selection_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 < float(ratio) < 1.0:
        raise TreadConfigError(f"{where}.selection_ratio is {ratio!r}; allowed: a number greater than 0 and "
                               "less than 1 (the share of image tokens routed around the blocks)")
    for key in ("start_layer_idx", "end_layer_idx"):
        if isinstance(entry[key], bool) or not isinstance(entry[key], int):
            raise TreadConfigError(f"{where}.{key} is {entry[key]!r}; allowed: an integer block index (negative "
                                   "counts from the last block, -1)")
    start, end = entry["start_layer_idx"], entry["end_layer_idx"]
    if (start >= 0) == (end >= 0) and start > end:
        raise TreadConfigError(f"{where}: start_layer_idx {start} comes after end_layer_idx {end}; a route "
                               "runs from its start block to its end block, both included")
    return Route(float(ratio), start, end)


def parse_tread_config(value: Any) -> list[Route]:
    """``--tread_config`` (a dict, inline JSON/Python literal or a JSON file) → its routes, in the given order.

    Raises :class:`TreadConfigError` naming the field: not an object, unknown keys, no ``routes``, a
    ``selection_ratio`` outside (0, 1), a non-integer layer index, a start after its end.
    """
    try:
        config = parse_json_value(value)
    except ValueProblem as problem:
        raise TreadConfigError(str(problem)) from None
    if not isinstance(config, Mapping):
        raise TreadConfigError('must be a JSON object such as {"routes": [{"selection_ratio": 0.5, '
                               '"start_layer_idx": 2, "end_layer_idx": -2}]}')
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise TreadConfigError(f"has unknown keys {', '.join(map(str, unknown))}; allowed: {', '.join(CONFIG_KEYS)}")
    routes = config.get("routes")
    if not isinstance(routes, list) or not routes:
        raise TreadConfigError("routes must be a non-empty list of objects with keys " + ", ".join(ROUTE_KEYS))
    return [_route(i, entry) for i, entry in enumerate(routes)]


def resolve_routes(routes: list[Route], depth: int) -> list[Route]:
    """The routes with non-negative indices into ``depth`` blocks, in forward order.

    Raises :class:`TreadConfigError` when an index is outside ``[-depth, depth)``, a route ends before it
    starts or two routes share a block.
    """
    resolved = []
    for i, route in enumerate(routes):
        bounds = []
        for key in ("start_layer_idx", "end_layer_idx"):
            index = getattr(route, key)
            if not -depth <= index < depth:
                raise TreadConfigError(f"routes[{i}].{key} is {index}; the model has {depth} transformer blocks, "
                                       f"so allowed: {-depth} to {depth - 1}")
            bounds.append(index % depth)
        if bounds[0] > bounds[1]:
            raise TreadConfigError(f"routes[{i}] starts at block {bounds[0]} after it ends at block {bounds[1]} "
                                   f"(of {depth})")
        resolved.append(Route(route.selection_ratio, bounds[0], bounds[1]))
    resolved.sort(key=lambda r: r.start_layer_idx)
    for before, after in zip(resolved, resolved[1:], strict=False):
        if after.start_layer_idx <= before.end_layer_idx:
            raise TreadConfigError(f"routes over blocks {before.start_layer_idx}-{before.end_layer_idx} and "
                                   f"{after.start_layer_idx}-{after.end_layer_idx} overlap; a block belongs to "
                                   "one route at most")
    return resolved


def routable_families() -> list[str]:
    """The implemented families whose denoiser TREAD can route (``ModelFamily.routed_tokens`` set)."""
    from ..models import family_class, implemented_families

    return [name for name in implemented_families() if family_class(name).routed_tokens]


def tread_problems(cfg: Any, family_cls: Any) -> list[Problem]:
    """Config-time problems of ``--tread_config`` (before the model loads; the block count is checked at
    :func:`install_token_routing`): a family that cannot be routed, a malformed configuration."""
    value = getattr(cfg, OPTION, None)
    if value in (None, "", {}):
        return []
    if not family_cls.routed_tokens:
        return [Problem(OPTION, value, f"TREAD routing is not built for model_family {family_cls.family}; "
                                       f"it is for: {', '.join(routable_families())}")]
    try:
        parse_tread_config(value)
    except TreadConfigError as error:
        return [Problem(OPTION, value, str(error))]
    return []


def kept_count(tokens: int, ratio: float) -> int:
    """Image tokens a route keeps: ``N - round(N·ratio)`` (SimpleTuner's budget), at least one."""
    return max(1, tokens - int(round(tokens * ratio)))


def _arguments(block: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A block call's arguments by name (``**kwargs`` of the signature flattened)."""
    bound = inspect.signature(block.forward).bind(*args, **kwargs)
    arguments: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{type(block).__name__}.forward takes *{name}; TREAD cannot route it by name")
        else:
            arguments[name] = value
    return arguments


@dataclass
class _Pass:
    """What one forward pass routes: the kept indices and the full image tokens of each open route."""

    active: bool = False
    arguments: Mapping[str, Any] = field(default_factory=dict)
    image_tokens: int | None = None
    keep: dict[int, torch.Tensor] = field(default_factory=dict)
    full: dict[int, torch.Tensor] = field(default_factory=dict)


class TokenRouter:
    """Routes image tokens around blocks of a family's denoiser (see the module docstring).

    Forward hooks on the routed blocks: before a route's first block the image tokens are cut to the
    kept ones (and every routed block's side inputs with them), after its last block the routed tokens
    are written back into the full sequence at their positions. Kept indices are drawn once per forward
    pass (a recomputation under gradient checkpointing reuses them) from ``generator`` (CPU).
    """

    def __init__(self, family: Any, denoiser: torch.nn.Module, routes: list[Route], generator: torch.Generator):
        self.family = family
        self.denoiser = denoiser
        self.generator = generator
        self.blocks: list[tuple[str, Any, torch.nn.Module]] = [
            (name, spec, block)
            for name, spec in zip(family.transformer_block_lists, family.routed_tokens, strict=True)
            for block in getattr(denoiser, name)
        ]
        self.routes = resolve_routes(routes, len(self.blocks))
        self.state = _Pass()
        self._handles: list[Any] = []

    # ----- hooks --------------------------------------------------------------------------------
    def install(self) -> TokenRouter:
        """Register the hooks on the denoiser and its routed blocks."""
        self._handles.append(self.denoiser.register_forward_pre_hook(self._begin_pass, with_kwargs=True))
        for r, route in enumerate(self.routes):
            for index in range(route.start_layer_idx, route.end_layer_idx + 1):
                block = self.blocks[index][2]
                self._handles.append(block.register_forward_pre_hook(self._pre_hook(r, index), with_kwargs=True))
            end = self.blocks[route.end_layer_idx][2]
            self._handles.append(end.register_forward_hook(self._post_hook(r, route.end_layer_idx)))
        return self

    def remove(self) -> None:
        """Take every hook off (the denoiser runs unrouted again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _begin_pass(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        active = module.training and torch.is_grad_enabled()
        self.state = _Pass(active=active, arguments=_arguments(module, args, kwargs) if active else {})

    def _image_count(self, tokens: torch.Tensor, spec: Any) -> int:
        if self.state.image_tokens is None:
            self.state.image_tokens = (self.family.image_token_count(self.state.arguments) if spec.trailing
                                       else tokens.shape[1])
        return self.state.image_tokens

    def _keep(self, r: int, count: int, device: torch.device) -> torch.Tensor:
        if r not in self.state.keep:
            order = torch.randperm(count, generator=self.generator)
            kept = order[:kept_count(count, self.routes[r].selection_ratio)]
            self.state.keep[r] = kept.sort().values.to(device)
        return self.state.keep[r]

    def _pre_hook(self, r: int, index: int):
        name, spec, block = self.blocks[index]
        starts = index == self.routes[r].start_layer_idx

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
            if not self.state.active:
                return None
            arguments = _arguments(block, args, kwargs)
            if starts:
                tokens = arguments[spec.argument]
                count = self._image_count(tokens, spec)
                image = tokens[:, tokens.shape[1] - count:]
                keep = self._keep(r, count, tokens.device)
                self.state.full[r] = image
                arguments[spec.argument] = torch.cat([tokens[:, :tokens.shape[1] - count],
                                                      image.index_select(1, keep)], dim=1)
            keep = self.state.keep[r]
            return (), self.family.route_block_inputs(name, arguments, keep)

        return hook

    def _post_hook(self, r: int, index: int):
        spec = self.blocks[index][1]

        def hook(module: torch.nn.Module, args: tuple, output: Any):
            if not self.state.active:
                return None
            tokens = output if spec.output is None else output[spec.output]
            full, keep = self.state.full[r], self.state.keep[r]
            routed = tokens[:, tokens.shape[1] - keep.numel():]
            image = full.to(routed.dtype).index_copy(1, keep, routed)
            restored = torch.cat([tokens[:, :tokens.shape[1] - keep.numel()], image], dim=1)
            if spec.output is None:
                return restored
            return (*output[:spec.output], restored, *output[spec.output + 1:])

        return hook


def install_token_routing(cfg: Any, family: Any, denoiser: torch.nn.Module,
                          generator: torch.Generator) -> TokenRouter | None:
    """Route ``denoiser`` (the unwrapped trained module) as ``--tread_config`` says; None when it is unset.

    Raises :class:`ConfigError` (exit 78) when the routes do not fit the model's blocks.
    """
    value = getattr(cfg, OPTION, None)
    if value in (None, "", {}):
        return None
    try:
        router = TokenRouter(family, denoiser, parse_tread_config(value), generator)
    except TreadConfigError as error:
        raise ConfigError([Problem(OPTION, value, str(error))]) from None
    log.info("TREAD routing: %s", ", ".join(f"blocks {r.start_layer_idx}-{r.end_layer_idx} route "
                                              f"{r.selection_ratio:g} of the image tokens" for r in router.routes))
    return router.install()
