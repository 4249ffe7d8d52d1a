"""Pure builders: a parsed TrainingJob spec in, the desired child objects out."""

from .common import resource_names, trainer_name
from .hook_job import build_hook_job, hook_job_name
from .jobset import build_jobset, jobset_name
from .multinode import build_headless_service, build_indexed_job
from .network_policy import NetworkPolicySettings, build_network_policy
from .trainer_pod import build_trainer_pod
from .volumes import build_pvcs

__all__ = [
    "build_headless_service", "build_hook_job", "build_indexed_job", "build_jobset", "jobset_name", "build_network_policy", "build_pvcs",
    "build_trainer_pod", "hook_job_name", "NetworkPolicySettings", "resource_names", "trainer_name",
]
