"""The registered search methods; importing this package registers them all."""

from . import bilevel, sprig, unilevel  # noqa: F401 (each module registers its methods)
