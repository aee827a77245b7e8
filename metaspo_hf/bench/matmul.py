"""The machine's own limit for a decode step: the model's linear layers as plain matrix products.

Each of the model's linear layers (the vocabulary projection included), on its own weights, is timed on
random inputs of one token per row, in float32 and bfloat16 (on the variants' own model copies, one per
dtype), once in each round of the variants it is set against (``LimitRounds``), with two kernels:
``torch.nn.functional.linear`` on the plain weights, and oneDNN's on the weights the engine packed for it
(``models/packed.py``; where packing was skipped, the plain kernel alone). The faster kernel's sum is the
seconds a decode step spends in matmuls alone; times ``new_tokens``, a floor for the decode time that
attention, norms, token picking and the rest only add to. ``share`` says how close a variant comes to it.
The plain kernel alone was no floor: the packed one is up to 4x faster at a few rows on some CPUs; nor were
weights read cold after a llama.cpp round: they timed up to 2.6x slower than warm (docs/benchmarks.md).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch

from ..models.packed import packed_linear, packed_linear_weights, plain_float_linear

DTYPES = (torch.float32, torch.bfloat16)


def linear_layers(model) -> dict[tuple[int, int, bool], list[torch.nn.Linear]]:
    """(out features, in features, has bias) -> the linear layers of that shape that one forward pass runs."""
    layers = defaultdict(list)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            layers[(module.out_features, module.in_features, module.bias is not None)].append(module)
    return dict(layers)


class LimitRounds:
    """The limit timed one run per round, beside the variants (``w1.interleaved`` calls ``run_round`` after each
    round): this machine's speed drifts by tens of percent within minutes, and a limit timed once, after all the
    rounds, carried that drift into every share (docs/benchmarks.md, the second interleaved W3 run)."""

    def __init__(self, rows: int, new_tokens: int):
        self.rows, self.new_tokens = rows, new_tokens
        self.shapes: dict[tuple[int, int, bool], int] = {}
        # dtype -> kernel -> shape -> seconds of each round
        self.seconds: dict[torch.dtype, dict[str, dict[tuple, list[float]]]] = {}

    def run_round(self, models: list[torch.nn.Module]) -> None:
        """One timed run of every linear layer of one model per dtype (the first of ``models`` in that dtype
        whose linear layers are all plain float ones: not an int8 copy), with each kernel."""
        timed = set()
        for model in models:
            if model.dtype not in DTYPES or model.dtype in timed or not _all_plain(model):
                continue
            timed.add(model.dtype)
            layers = linear_layers(model)
            self.shapes = self.shapes or {shape: len(modules) for shape, modules in layers.items()}
            by_kernel = self.seconds.setdefault(model.dtype, {})
            for shape, seconds in _seconds(model, layers, self.rows).items():
                for kernel, value in seconds.items():
                    by_kernel.setdefault(kernel, {}).setdefault(shape, []).append(value)

    def figures(self) -> dict:
        """Seconds per decode step of pure matmul (each shape's median over the rounds), per dtype timed: the
        faster kernel's (``kernel``), the other's beside it."""
        runs = max((len(t) for by_kernel in self.seconds.values() for by_shape in by_kernel.values()
                    for t in by_shape.values()), default=0)
        figures = {"rows": self.rows, "new_tokens": self.new_tokens, "threads": torch.get_num_threads(),
                   "runs": runs, "weights": "the model's own",
                   "shapes": {_name(shape): count for shape, count in sorted(self.shapes.items())}}
        for dtype, by_kernel in self.seconds.items():
            medians = {kernel: {_name(shape): statistics.median(times) for shape, times in sorted(by_shape.items())}
                       for kernel, by_shape in by_kernel.items()}
            steps = {kernel: sum(by_shape.values()) for kernel, by_shape in medians.items()}
            fastest = min(steps, key=steps.get)
            figures[dtype_name(dtype)] = {
                "step_s": _significant(steps[fastest]), "decode_floor_s": _significant(steps[fastest] * self.new_tokens),
                "kernel": fastest, "step_s_by_kernel": {kernel: _significant(step) for kernel, step in steps.items()},
                "step_s_by_shape": {name: _significant(t) for name, t in medians[fastest].items()}}
        return figures


def share(figures: dict, dtype: str, decode_s: float) -> float | None:
    """The matmul floor over a measured decode time: 1 would be a decode made of nothing but matmuls (None
    where that dtype's limit was not timed)."""
    if decode_s <= 0 or dtype not in figures:
        return None
    return _significant(figures[dtype]["decode_floor_s"] / decode_s)


def _all_plain(model) -> bool:
    return all(plain_float_linear(m) for m in model.modules() if isinstance(m, torch.nn.Linear))


def _seconds(model, layers: dict, rows: int) -> dict[tuple, dict[str, float]]:
    """Per shape, the seconds of one call of each of its layers, by kernel: the packed one where the engine
    packed this model's weights (``packed_linear_weights`` returns its cached copy)."""
    packed = packed_linear_weights(model)
    generator = torch.Generator().manual_seed(0)
    seconds = {}
    with torch.inference_mode():
        for shape, modules in layers.items():
            x = torch.randn(rows, shape[1], generator=generator).to(model.dtype)
            calls = {"plain": (torch.nn.functional.linear, [(m.weight, m.bias) for m in modules])}
            if all(m in packed for m in modules):
                calls["packed"] = (packed_linear, [(packed[m], m.bias) for m in modules])
            seconds[shape] = {kernel: _timed_calls(linear, x, weights) for kernel, (linear, weights) in calls.items()}
    return seconds


def _timed_calls(linear, x: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor | None]]) -> float:
    # An untimed pass first, over every weight: besides the kernel's first-call setup, weights left untouched for
    # minutes (while a llama.cpp round runs) read slower the first time, and a decode step reads them warm.
    for weight, bias in weights:
        linear(x, weight, bias)
    started = time.perf_counter()
    for weight, bias in weights:
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
