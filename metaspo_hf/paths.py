"""Where metaspo-hf keeps files between runs (converted models, datasets, response caches)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The user cache folder: $METASPO_CACHE, else $XDG_CACHE_HOME/metaspo-hf, else ~/.cache/metaspo-hf."""
    root = os.environ.get("METASPO_CACHE")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "metaspo-hf"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
