"""The trainer's log: our messages, not third-party noise.

Libraries we build on announce things the user cannot act on at every start (torchao's optional
kernels that do not load on this machine, "no triton", torch deprecations, Hugging Face progress bars
and advisories). Unless ``--log_level DEBUG`` (or ``KUBETUNER_LOG_LEVEL=DEBUG``) is asked for, their
loggers report errors only and their Python warnings are not shown; everything from
``kubetuner_trainer`` keeps its level. Must run before those libraries are imported: some read their
verbosity from the environment once, at import time.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import MutableMapping

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers of the libraries under the trainer; errors from them still reach the log. torch resets the
# level of its "torch" logger when imported, so its chatty children are named as well.
THIRD_PARTY_LOGGERS = (
    "torch", "torch.utils._pytree", "torch.distributed", "torchao", "diffusers", "transformers", "accelerate", "peft", "huggingface_hub", "safetensors",
    "PIL", "urllib3", "botocore", "boto3", "s3transfer", "filelock", "optimi", "lycoris", "tensorboard",
    "wandb", "comet_ml", "bitsandbytes", "matplotlib",
)
# Read once by the libraries when imported.
QUIET_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
}
# Python warnings raised from any module outside kubetuner (matched against the warning's module).
_THIRD_PARTY_MODULE = r"(?!kubetuner)"


def setup_logging(level: str | int = "INFO", *, environ: MutableMapping[str, str] | None = None) -> None:
    """Configure the root logger (one line per record, on stderr) and quieten third-party libraries.

    ``level`` is a logging level name or number. At DEBUG nothing is hidden. Variables already set in
    ``environ`` (default ``os.environ``) win over the quiet defaults.
    """
    env = os.environ if environ is None else environ
    numeric = logging.getLevelName(level) if isinstance(level, str) else level
    numeric = numeric if isinstance(numeric, int) else logging.INFO
    logging.basicConfig(level=numeric, format=LOG_FORMAT, stream=sys.stderr)
    if numeric <= logging.DEBUG:
        return
    for name, value in QUIET_ENVIRONMENT.items():
        env.setdefault(name, value)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=_THIRD_PARTY_MODULE)
