"""Bilevel system-prompt search (MetaSPO), its variants and baselines, registered by name."""

from . import methods  # noqa: F401 (registers every method)
from .budget import EvalBudget, SearchBudget
from .registry import METHODS, get_method, system_prompt_methods
from .run import SearchResult, run_search

__all__ = [
    "METHODS",
    "EvalBudget",
    "SearchBudget",
    "SearchResult",
    "get_method",
    "run_search",
    "system_prompt_methods",
]
