"""The machine's own limit for a decode step: the model's linear layers as plain matrix products.

Every distinct weight shape of the model's linear layers (the vocabulary projection included) is
timed with ``torch.nn.functional.linear`` on random inputs of one token per row, as many times as
the shape occurs in one forward pass, in float32 and bfloat16, once in each round of the variants it is
set against (``LimitRounds``). Their sum is the seconds a decode
step spends in matmuls alone; times ``new_tokens``, a floor for the decode time that attention,
norms, token picking and the rest only add to. ``share`` says how close a variant comes to it.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter

import torch

DTYPES = (torch.float32, torch.bfloat16)


def linear_shapes(model) -> Counter:
    """(out features, in features, has bias) -> how many linear layers of that shape one forward pass runs."""
    return Counter((m.out_features, m.in_features, m.bias is not None)
                   for m in model.modules() if isinstance(m, torch.nn.Linear))


class LimitRounds:
    """The limit timed one run per round, beside the variants (``w1.interleaved`` calls ``run_round`` after each
    round): this machine's speed drifts by tens of percent within minutes, and a limit timed once, after all the
    rounds, carried that drift into every share (docs/benchmarks.md, the second interleaved W3 run)."""

    def __init__(self, model, rows: int, new_tokens: int):
        self.shapes = linear_shapes(model)
        self.rows, self.new_tokens = rows, new_tokens
        self.seconds = {dtype: {shape: [] for shape in self.shapes} for dtype in DTYPES}

    def run_round(self, *_) -> None:
        """One timed run of every shape in every dtype (the arguments of a ``beside`` hook are not needed)."""
        for dtype, by_shape in self.seconds.items():
            for shape, count in self.shapes.items():
                by_shape[shape].append(_seconds(shape, count, self.rows, dtype))

    def figures(self) -> dict:
        """Seconds per decode step of pure matmul (each shape's median over the rounds), per dtype."""
        runs = len(next(iter(self.seconds[DTYPES[0]].values()), []))
        figures = {"rows": self.rows, "new_tokens": self.new_tokens, "threads": torch.get_num_threads(),
                   "runs": runs, "shapes": {_name(shape): count for shape, count in sorted(self.shapes.items())}}
        for dtype, by_shape in self.seconds.items():
            medians = {_name(shape): statistics.median(times) for shape, times in sorted(by_shape.items())}
            step = sum(medians.values())
            figures[dtype_name(dtype)] = {"step_s": _significant(step), "decode_floor_s": _significant(step * self.new_tokens),
                                          "step_s_by_shape": {name: _significant(t) for name, t in medians.items()}}
        return figures


def share(figures: dict, dtype: str, decode_s: float) -> float | None:
    """The matmul floor over a measured decode time: 1 would be a decode made of nothing but matmuls."""
    return _significant(figures[dtype]["decode_floor_s"] / decode_s) if decode_s > 0 else None


def _seconds(shape: tuple[int, int, bool], count: int, rows: int, dtype: torch.dtype) -> float:
    """Seconds of ``count`` linear calls of one shape, on ``count`` distinct weights: one reused weight would
    stay in the CPU's caches, which the model's distinct weights do not."""
    out_features, in_features, bias = shape
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(out_features, in_features, generator=generator).to(dtype) for _ in range(count)]
    bias_values = torch.randn(out_features, generator=generator).to(dtype) if bias else None
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    with torch.inference_mode():
        torch.nn.functional.linear(x, weights[0], bias_values)  # warm-up: first-call kernel setup
        started = time.perf_counter()
        for weight in weights:
            torch.nn.functional.linear(x, weight, bias_values)
        return time.perf_counter() - started


def _name(shape: tuple[int, int, bool]) -> str:
    out_features, in_features, bias = shape
    return f"{out_features}x{in_features}" + ("+bias" if bias else "")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _significant(value: float) -> float:
    """3 significant digits: the tiny test model's steps take microseconds, SmolLM2's milliseconds."""
    return float(f"{value:.3g}")
