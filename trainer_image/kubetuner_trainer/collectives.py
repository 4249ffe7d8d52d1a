"""A bound on how long a collective (all-reduce, broadcast, barrier) waits for its peers.

When a node of a multi-node run is lost, its peers block in the next collective. With this
bound they raise instead, the process exits with a crash code, and the operator restarts the
whole group from the latest checkpoint (it also stops the group itself as soon as it sees the
lost node's pod fail). The bound must exceed the longest legitimate wait of one rank for another
(rank 0 filling the caches while the others wait): 30 minutes by default, PyTorch's own default
for gloo, made explicit so NCCL (10 minutes by default) waits as long and the value is settable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

COLLECTIVE_TIMEOUT_ENV = "KUBETUNER_COLLECTIVE_TIMEOUT_SECONDS"
DEFAULT_COLLECTIVE_TIMEOUT_SECONDS = 1800


def collective_timeout(environ: Mapping[str, str] | None = None) -> timedelta:
    """The bound from ``$KUBETUNER_COLLECTIVE_TIMEOUT_SECONDS`` (a positive number of seconds).

    Raises ``ValueError`` naming the variable when it is not a positive number.
    """
    raw = (os.environ if environ is None else environ).get(COLLECTIVE_TIMEOUT_ENV)
    if raw is None or raw == "":
        return timedelta(seconds=DEFAULT_COLLECTIVE_TIMEOUT_SECONDS)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ValueError(f"{COLLECTIVE_TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return timedelta(seconds=seconds)


def process_group_kwargs(environ: Mapping[str, str] | None = None) -> list[Any]:
    """``kwargs_handlers`` for ``accelerate.Accelerator`` that set the process group's timeout."""
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(timeout=collective_timeout(environ))]
