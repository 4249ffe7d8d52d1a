"""Model families: one module per family in ``families/`` behind :class:`~.family.ModelFamily`.

Importing this package needs no torch; the family classes load on first use.
"""

from .components import Components, ModelSource
from .registry import family_class, implemented_families, load_family

__all__ = ["Components", "ModelSource", "family_class", "implemented_families", "load_family"]
