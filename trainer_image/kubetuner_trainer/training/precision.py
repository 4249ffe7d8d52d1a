"""Number formats of the computation: ``--mixed_precision``, ``--disable_tf32``, ``--gradient_precision``.

* ``bf16``/``no`` run anywhere. ``fp16`` runs on CUDA, where accelerate scales the loss
  (``torch.amp.GradScaler``: ``accelerator.backward`` scales, clipping unscales, the optimizer
  step skips overflowing steps); accelerate has no loss scaling on the CPU, so fp16 is refused there.
* ``fp8`` is accelerate's float8 training through torchao (``AORecipeKwargs``, as SimpleTuner sets
  it up), which needs a GPU of compute capability 8.9+; with a quantized base only ``fp8-torchao``
  fits (SimpleTuner's rule).
* ``--disable_tf32`` sets PyTorch's ``fp32_precision`` controls to ``ieee`` (strict fp32 matmuls and
  convolutions); otherwise CUDA matmuls may use TF32.
* ``--gradient_precision fp32`` casts gradients to fp32 after each backward pass (SimpleTuner's
  behaviour), so accumulation and the optimizer see fp32 gradients.
"""

from __future__ import annotations

from typing import Any

from ..config import Problem

FP8_NEEDS = "a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell) and torchao"


def precision_problems(cfg: Any) -> list[Problem]:
    """Mixed-precision settings this machine cannot run (empty list: fine)."""
    from ..models.quantization import FP8_CAPABILITY, cuda_capability, preset_for

    precision = cfg.mixed_precision
    capability = cuda_capability()
    if precision == "fp16" and capability is None:
        return [Problem("mixed_precision", precision,
                        "fp16 needs a CUDA GPU (its loss scaling runs there); this machine has none; "
                        "use bf16 or no")]
    if precision != "fp8":
        return []
    problems = []
    if capability is None or capability < FP8_CAPABILITY:
        found = "no CUDA GPU" if capability is None else f"compute capability {capability[0]}.{capability[1]}"
        problems.append(Problem("mixed_precision", precision, f"fp8 needs {FP8_NEEDS}; this machine has {found}; "
                                                              "use bf16"))
    base = preset_for(cfg, "base_model_precision")
    if base is not None and base.name != "fp8-torchao":
        problems.append(Problem("mixed_precision", precision,
                                f"fp8 cannot train on a {base.name} base; use fp8-torchao or no_change for "
                                "--base_model_precision, or bf16"))
    return problems


def accelerator_kwargs_handlers(cfg: Any) -> list[Any]:
    """Extra accelerate kwargs handlers the precision needs (torchao's float8 recipe for fp8)."""
    if cfg.mixed_precision != "fp8":
        return []
    from accelerate.utils import AORecipeKwargs

    return [AORecipeKwargs()]


def apply_tf32(cfg: Any) -> None:
    """Strict IEEE fp32 for matmuls and convolutions with ``--disable_tf32``; PyTorch's defaults otherwise."""
    if not getattr(cfg, "disable_tf32", False):
        return
    import torch

    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "ieee"


def cast_gradients(cfg: Any, params: list[Any]) -> None:
    """With ``--gradient_precision fp32``, store every gradient of ``params`` in fp32 (in place)."""
    if getattr(cfg, "gradient_precision", None) != "fp32":
        return
    import torch

    for param in params:
        if param.grad is not None and param.grad.dtype != torch.float32:
            param.grad.data = param.grad.data.float()
