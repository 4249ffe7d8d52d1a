"""``--optimizer_release_gradients``: optimi's gradient release.

An optimi optimizer built with ``gradient_release=True`` updates each parameter from a hook that runs
as soon as the parameter's gradient is accumulated in the backward pass, then frees that gradient: no
step ever holds every gradient at once. ``optimizer.step()``/``zero_grad()`` find no gradients left and
do nothing. With gradient accumulation the hooks accumulate into the optimizer state instead of
updating (optimi's ``optimizer_accumulation``) until the micro-batch that ends the step, as SimpleTuner
sets it (helpers/training/trainer.py, release 3.1.6).

What follows from stepping inside the backward pass: gradients are never clipped (``--max_grad_norm``)
nor cast (``--gradient_precision``), fp16 loss scaling could not unscale them first, and several
processes would step before their gradients are averaged; :func:`release_problems` refuses the last
two, :func:`release_warnings` names the first.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..config import Problem
from ._settings import asks_for_something, setting
from .optimizers import optimizer_spec


def releases_gradients(cfg: Any) -> bool:
    """Whether this run's optimizer releases gradients (the option is on and the optimizer is an optimi one)."""
    if not setting(cfg, "optimizer_release_gradients") or setting(cfg, "optimizer") is None:
        return False
    try:
        return optimizer_spec(setting(cfg, "optimizer")).releases_gradients
    except ValueError:
        return False


def release_problems(cfg: Any) -> list[Problem]:
    """Combinations gradient release cannot train correctly: fp16 loss scaling and several processes."""
    if not releases_gradients(cfg):
        return []
    problems = []
    if setting(cfg, "mixed_precision") == "fp16":
        problems.append(Problem("optimizer_release_gradients", True,
                                "cannot be combined with --mixed_precision=fp16: the loss-scaled gradients would be "
                                "applied in the backward pass before the scaler could unscale them; use bf16"))
    processes = int(setting(cfg, "num_processes") or 1)
    if processes > 1:
        problems.append(Problem("optimizer_release_gradients", True,
                                f"needs a single process (this run has {processes}): each parameter would step in "
                                "its backward hook before its gradient is averaged across processes"))
    return problems


def release_warnings(cfg: Any) -> list[Problem]:
    """The option without an optimi optimizer, and the gradient treatments gradient release skips."""
    if not asks_for_something(cfg, "optimizer_release_gradients"):
        return []
    if not releases_gradients(cfg):
        return [Problem("optimizer_release_gradients", True,
                        f"has no effect with --optimizer={setting(cfg, 'optimizer')}: only the optimi-* optimizers "
                        "release gradients")]
    skipped = [f"--{name}" for name in ("max_grad_norm", "gradient_precision")
               if setting(cfg, name) not in (None, 0, 0.0, "unmodified")]
    if not skipped:
        return []
    return [Problem("optimizer_release_gradients", True,
                    f"each gradient is applied and freed in the backward pass, so {' and '.join(skipped)} "
                    "no longer apply to it")]


class GradientRelease:
    """optimi's backward hooks on the trained parameters of one run (see the module docstring)."""

    def __init__(self, optimizer: Any, params: Iterable[torch.nn.Parameter]):
        from optimi import prepare_for_gradient_release

        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps optimizers
        # optimi hooks every trainable parameter of a module: the run's parameters, held without copying
        self._holder = torch.nn.ParameterList(list(params))
        prepare_for_gradient_release(self._holder, self.optimizer)
        # optimi keeps each parameter's group in its state, where the hook's step reads the learning rate. The
        # link must point at the live group, which the LR scheduler changes: accelerate's prepare already
        # reloaded the state (new group dicts), and so does every resume; and it must not be saved.
        _link_groups(self.optimizer)
        self.optimizer.register_state_dict_post_hook(_without_group_links)
        self.optimizer.register_load_state_dict_post_hook(_link_groups)

    def before_backward(self, ends_step: bool) -> None:
        """Set whether the coming backward pass updates the weights (the micro-batch that ends a step) or
        only accumulates into the optimizer state."""
        self.optimizer.optimizer_accumulation = not ends_step

    def remove(self) -> None:
        """Take the hooks off again."""
        from optimi import remove_gradient_release

        remove_gradient_release(self._holder)


def _without_group_links(_optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    state = {key: {k: v for k, v in entry.items() if k != "group"} for key, entry in state_dict["state"].items()}
    return {**state_dict, "state": state}


def _link_groups(optimizer: Any) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            optimizer.state[param]["group"] = group
