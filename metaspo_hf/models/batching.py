"""Running a batch of rows that may not fit: CUDA out-of-memory halves it."""

from __future__ import annotations

from collections.abc import Callable

import torch


def split_on_oom(engine, chunk: list, run: Callable[[list], list], shrink_batch: bool = False) -> list:
    """``run(chunk)``; on CUDA out-of-memory, run the two halves and join their results (with
    ``shrink_batch``, later chunks also get the halved batch size). Rows never depend on their batch-mates
    (per-row generators for sampling), so a split changes nothing but speed."""
    try:
        return run(chunk)
    except torch.cuda.OutOfMemoryError:
        if len(chunk) == 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        engine.stats.oom_retries += 1
        half = len(chunk) // 2
        if shrink_batch:
            engine.batch_size = max(1, half)
        return (split_on_oom(engine, chunk[:half], run, shrink_batch)
                + split_on_oom(engine, chunk[half:], run, shrink_batch))
