"""Bilevel system-prompt search (MetaSPO), its variants and baselines, registered by name; and the
user-prompt writing and search that evaluation runs under fixed system prompts."""

from . import methods  # noqa: F401 (registers every method)
from .config import SearchConfig
from .context import EventSink
from .registry import METHODS, get_method, system_prompt_methods
from .run import SearchResult, run_search
from .user_prompts import adapt_user_prompts, write_user_prompts

__all__ = [
    "METHODS",
    "EventSink",
    "SearchConfig",
    "SearchResult",
    "adapt_user_prompts",
    "get_method",
    "run_search",
    "system_prompt_methods",
    "write_user_prompts",
]
