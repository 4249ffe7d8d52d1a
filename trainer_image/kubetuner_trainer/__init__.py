"""kubetuner trainer: the process that runs inside a TrainingJob's pod.

Importing this package (and ``options``, ``config``, ``contract``) must stay torch-free:
the operator image uses them to build the CRD schema and to read trainer status.
"""

__version__ = "0.1.0"
