"""The machine's own limit for a decode step: the model's linear layers as plain matrix products.

Every distinct weight shape of the model's linear layers (the vocabulary projection included) is
timed on random inputs of one token per row, as many times as the shape occurs in one forward pass, in
float32 and bfloat16, once in each round of the variants it is set against (``LimitRounds``), with two
kernels: ``torch.nn.functional.linear`` on plain weights, and oneDNN's on weights packed for it (the
engine's CPU linears, ``models/packed.py``). The faster kernel's sum is the seconds a decode step spends
in matmuls alone; times ``new_tokens``, a floor for the decode time that attention, norms, token picking
and the rest only add to. ``share`` says how close a variant comes to it. The plain kernel alone was no
floor: the packed one is up to 4x faster at a few rows on some CPUs (docs/benchmarks.md).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter

import torch

from ..models.packed import packed_linear, packed_weight

DTYPES = (torch.float32, torch.bfloat16)
KERNELS = ("plain", "packed")
# Distinct weights timed per shape: enough bytes that none stays in a CPU cache, few enough that the limit
# does not hold a second copy of a large model's weights beside the model (the time is scaled to the count).
_TIMED_BYTES_PER_SHAPE = 2**30


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
        self.seconds = {dtype: {kernel: {shape: [] for shape in self.shapes} for kernel in KERNELS} for dtype in DTYPES}

    def run_round(self, *_) -> None:
        """One timed run of every shape in every dtype, with each kernel (the arguments of a ``beside`` hook
        are not needed)."""
        for dtype, by_kernel in self.seconds.items():
            for shape, count in self.shapes.items():
                for kernel, seconds in _seconds(shape, count, self.rows, dtype).items():
                    by_kernel[kernel][shape].append(seconds)

    def figures(self) -> dict:
        """Seconds per decode step of pure matmul (each shape's median over the rounds), per dtype: the faster
        kernel's (``kernel``), the other's beside it."""
        runs = len(next(iter(self.seconds[DTYPES[0]]["plain"].values()), []))
        figures = {"rows": self.rows, "new_tokens": self.new_tokens, "threads": torch.get_num_threads(),
                   "runs": runs, "shapes": {_name(shape): count for shape, count in sorted(self.shapes.items())}}
        for dtype, by_kernel in self.seconds.items():
            medians = {kernel: {_name(shape): statistics.median(times) for shape, times in sorted(by_shape.items())}
                       for kernel, by_shape in by_kernel.items() if all(by_shape.values())}
            steps = {kernel: sum(by_shape.values()) for kernel, by_shape in medians.items()}
            fastest = min(steps, key=steps.get)
            figures[dtype_name(dtype)] = {
                "step_s": _significant(steps[fastest]), "decode_floor_s": _significant(steps[fastest] * self.new_tokens),
                "kernel": fastest, "step_s_by_kernel": {kernel: _significant(step) for kernel, step in steps.items()},
                "step_s_by_shape": {name: _significant(t) for name, t in medians[fastest].items()}}
        return figures


def share(figures: dict, dtype: str, decode_s: float) -> float | None:
    """The matmul floor over a measured decode time: 1 would be a decode made of nothing but matmuls."""
    return _significant(figures[dtype]["decode_floor_s"] / decode_s) if decode_s > 0 else None


def _seconds(shape: tuple[int, int, bool], count: int, rows: int, dtype: torch.dtype) -> dict[str, float]:
    """Seconds of ``count`` linear calls of one shape, by kernel (the packed one left out where this torch
    cannot pack), on distinct weights: one reused weight would stay in the CPU's caches, which the model's
    distinct weights do not. Up to ``_TIMED_BYTES_PER_SHAPE`` of them are timed, the time scaled to ``count``."""
    out_features, in_features, bias = shape
    generator = torch.Generator().manual_seed(0)
    timed = min(count, max(1, _TIMED_BYTES_PER_SHAPE // (out_features * in_features * dtype.itemsize)))
    weights = [torch.randn(out_features, in_features, generator=generator).to(dtype) for _ in range(timed)]
    bias_values = torch.randn(out_features, generator=generator).to(dtype) if bias else None
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    seconds = {"plain": _timed_calls(torch.nn.functional.linear, x, weights, bias_values) * count / timed}
    with torch.inference_mode():
        try:
            for i, weight in enumerate(weights):  # one at a time: never two copies of them all
                weights[i] = packed_weight(weight)
        except (AttributeError, RuntimeError):  # a torch build without oneDNN's packing ops
            return seconds
    seconds["packed"] = _timed_calls(packed_linear, x, weights, bias_values) * count / timed
    return seconds


def _timed_calls(linear, x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None) -> float:
    with torch.inference_mode():
        linear(x, weights[0], bias)  # warm-up: first-call kernel setup
        started = time.perf_counter()
        for weight in weights:
            linear(x, weight, bias)
        return time.perf_counter() - started


def _name(shape: tuple[int, int, bool]) -> str:
    out_features, in_features, bias = shape
    return f"{out_features}x{in_features}" + ("+bias" if bias else "")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _significant(value: float) -> float:
    """3 significant digits: the tiny test model's steps take microseconds, SmolLM2's milliseconds."""
    return float(f"{value:.3g}")
