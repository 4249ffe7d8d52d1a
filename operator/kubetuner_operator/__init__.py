"""kubetuner operator: reconciles TrainingJob objects into trainer pods (kopf)."""

__version__ = "0.1.0"
