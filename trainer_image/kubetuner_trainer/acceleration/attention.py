"""``--attention_mechanism``: SimpleTuner's kernel names routed to diffusers' attention dispatcher.

Transformers whose attention processors call ``diffusers.models.attention_dispatch`` (Flux and the
newer families) follow :func:`diffusers.attention_backend`; the native SDPA choices also pin
``torch.nn.attention.sdpa_kernel``, which reaches models that call PyTorch SDPA directly (the
UNets, SD3). A kernel that is not installed, or needs a device this run does not have, is a
configuration error naming the kernels that would work. SageAttention is used in the phases
``--sageattention_usage`` names (inference only by default, as in SimpleTuner).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..config import Problem

DEFAULT = "diffusers"


@dataclass(frozen=True)
class Kernel:
    """One ``--attention_mechanism`` value: its diffusers backend, its PyTorch SDPA backend (native ones),
    the package it needs and the device it runs on (``None``: any)."""

    backend: str | None
    sdpa: str | None = None
    package: str | None = None
    device: str | None = "cuda"


#: SimpleTuner's names → diffusers' ``AttentionBackendName`` values (diffusers 0.42)
KERNELS: dict[str, Kernel] = {
    "diffusers": Kernel(None, device=None),
    "native-math": Kernel("_native_math", "MATH", device=None),
    "native-efficient": Kernel("_native_efficient", "EFFICIENT_ATTENTION"),
    "native-flash": Kernel("_native_flash", "FLASH_ATTENTION"),
    "cudnn": Kernel("_native_cudnn", "CUDNN_ATTENTION"),
    "native-npu": Kernel("_native_npu", package="torch_npu", device="npu"),
    "native-xla": Kernel("_native_xla", package="torch_xla", device="xla"),
    "flex": Kernel("flex"),
    "xformers": Kernel("xformers", package="xformers"),
    "flash-attn": Kernel("flash", package="flash_attn"),
    "flash-attn-2": Kernel("flash", package="flash_attn"),
    "flash-attn-3": Kernel("_flash_3", package="flash_attn_interface"),
    "flash-attn-3-varlen": Kernel("_flash_varlen_3", package="flash_attn_interface"),
    "sageattention": Kernel("sage", package="sageattention"),
    "sageattention-int8-fp16-triton": Kernel("_sage_qk_int8_pv_fp16_triton", package="sageattention"),
    "sageattention-int8-fp16-cuda": Kernel("_sage_qk_int8_pv_fp16_cuda", package="sageattention"),
    "sageattention-int8-fp8-cuda": Kernel("_sage_qk_int8_pv_fp8_cuda", package="sageattention"),
    "sla": Kernel(None),
}
SAGE = tuple(name for name in KERNELS if name.startswith("sageattention"))
#: why a kernel cannot run where no package check says so
NOT_PUBLISHED = {"sla": "the SLA package (github.com/thu-ml/SLA) is not published on PyPI and not in the trainer image"}


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def unavailable_reason(name: str, device_type: str, installed: Callable[[str], bool] = _installed) -> str | None:
    """Why ``--attention_mechanism name`` cannot run on a ``device_type`` device here, or None when it can."""
    kernel = KERNELS[name]
    if name in NOT_PUBLISHED:
        return NOT_PUBLISHED[name]
    if kernel.package and not installed(kernel.package):
        return f"needs the {kernel.package} package, which is not installed"
    if kernel.device and kernel.device != device_type:
        what = {"cuda": "a CUDA GPU", "npu": "an Ascend NPU", "xla": "an XLA device"}[kernel.device]
        return f"needs {what} (this run's device is {device_type})"
    if kernel.backend:
        from diffusers.models.attention_dispatch import (
            AttentionBackendName,
            _check_attention_backend_requirements,
        )

        try:
            _check_attention_backend_requirements(AttentionBackendName(kernel.backend))
        except (RuntimeError, ImportError) as exc:
            return str(exc)
    return None


def available_kernels(device_type: str) -> list[str]:
    """The ``--attention_mechanism`` values that can run on this machine's ``device_type``."""
    return [name for name in KERNELS if unavailable_reason(name, device_type) is None]


def attention_problems(cfg: Any, device_type: str) -> list[Problem]:
    """A configured kernel that cannot run here, as a problem naming the ones that can."""
    name = getattr(cfg, "attention_mechanism", None) or DEFAULT
    why = unavailable_reason(name, device_type)
    if why is None:
        return []
    return [Problem("attention_mechanism", name, f"{why}; available here: {', '.join(available_kernels(device_type))}")]


def uses_dispatcher(model: Any) -> bool:
    """Whether the model's attention processors go through diffusers' attention dispatcher."""
    return any(hasattr(getattr(m, "processor", None), "_attention_backend") for m in model.modules())


class AttentionChoice:
    """The configured kernel as a context for each phase: ``with choice.training():`` around the training
    forward pass, ``with choice.inference():`` around validation renders."""

    def __init__(self, cfg: Any):
        self.name = getattr(cfg, "attention_mechanism", None) or DEFAULT
        self.kernel = KERNELS[self.name]
        usage = getattr(cfg, "sageattention_usage", None) or "inference"
        is_sage = self.name in SAGE
        self.in_training = not is_sage or "training" in usage
        self.in_inference = not is_sage or "inference" in usage

    def check_model(self, model: Any, family: str) -> list[Problem]:
        """A non-native kernel for a model that calls PyTorch SDPA itself would change nothing: a problem."""
        if self.kernel.backend is None or self.kernel.sdpa is not None or uses_dispatcher(model):
            return []
        natives = [n for n, k in KERNELS.items() if k.sdpa or n == DEFAULT]
        return [Problem("attention_mechanism", self.name,
                        f"the {family} model calls PyTorch's attention directly, not diffusers' attention "
                        f"dispatcher; choose one of {', '.join(natives)}")]

    @contextlib.contextmanager
    def _use(self, active: bool) -> Iterator[None]:
        if not active or self.kernel.backend is None:
            yield
            return
        from diffusers import attention_backend

        with contextlib.ExitStack() as stack:
            stack.enter_context(attention_backend(self.kernel.backend))
            if self.kernel.sdpa:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel(getattr(SDPBackend, self.kernel.sdpa)))
            yield

    def training(self) -> contextlib.AbstractContextManager[None]:
        return self._use(self.in_training)

    def inference(self) -> contextlib.AbstractContextManager[None]:
        return self._use(self.in_inference)
