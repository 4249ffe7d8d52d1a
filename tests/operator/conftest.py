"""Fixtures of the operator tests; the helpers themselves live in operator_helpers.py.

Test modules import helpers from ``operator_helpers`` (a unique module name): several test
folders have a ``conftest.py``, so ``from conftest import ...`` would pick the wrong one.
"""

from operator_helpers import cluster, trainingjob

__all__ = ["cluster", "trainingjob"]
