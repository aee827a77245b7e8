"""CPU linear layers on weights packed once for oneDNN (the kernels torch's inductor uses for frozen CPU
models), swapped in only for the duration of an engine call. bfloat16 results are bit-identical to the
default kernels'; float32 ones differ in the last bits (sums in another order). docs/benchmarks.md has
the measured speed-ups.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from functools import partial

import psutil
import torch

# Packing copies the weights: the copy may take at most this share of the memory free at packing time, so
# that the KV cache, activations and other processes keep the rest (a fixed 4 GiB cap left the 1.5B
# optimizer model's float32 linears unpacked on a 24 GB machine, where packing them pays most).
_PACKED_SHARE_OF_FREE_MEMORY = 0.5
# Per model, its packed linear weights (shared by every engine on that model; gone with the model).
_packed_weights: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Per model, its merged packed weights (``merged_packed_weights``), keyed by the groups' modules.
_merged_weights: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def packed_linear_weights(model) -> dict:
    """{Linear module: its weight packed for oneDNN} for the plain float linear layers of a CPU model, else {}
    (not on CPU, no oneDNN, a copy larger than ``_PACKED_SHARE_OF_FREE_MEMORY`` of the memory free now, or a
    torch build whose packed kernel is missing or disagrees). Quantized layers are left out, so a partly
    quantized model keeps its float ones packed."""
    if model in _packed_weights:
        return _packed_weights[model]
    linears = [m for m in model.modules() if plain_float_linear(m)]
    packed = {}
    size = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    if linears and torch.backends.mkldnn.is_available() and size <= _packing_budget_bytes():
        try:
            with torch.inference_mode():
                packed = {m: _packed_weight(m.weight) for m in linears}
                probe = linears[0]
                # Its own generator: building an engine must not move the global random state.
                x = torch.randn(3, probe.in_features, dtype=probe.weight.dtype,
                                generator=torch.Generator().manual_seed(0))
                expected = torch.nn.functional.linear(x, probe.weight, probe.bias).float()
                agree = torch.allclose(packed_linear(x, packed[probe], probe.bias).float(), expected,
                                       rtol=1e-2, atol=1e-3)
        except (AttributeError, RuntimeError):  # an op this torch build lacks or cannot run
            agree = False
        packed = packed if agree else {}
    _packed_weights[model] = packed
    return packed


def merged_packed_weights(model, groups: list[tuple[torch.nn.Linear, ...]]) -> list[tuple] | None:
    """For each group of linear layers that read one input (a layer's query, key and value projections; its gate
    and up projections), one packed weight of their weights stacked and their biases (or None), so that one matmul
    computes the group's outputs side by side: bit for bit each layer's own, in one call instead of several, which
    oneDNN runs faster at a few rows (docs/benchmarks.md). None unless every layer of every group is packed
    (``packed_linear_weights``) and the stacked copy fits the same share of free memory."""
    key = tuple(tuple(group) for group in groups)
    cached = _merged_weights.setdefault(model, {})
    if key in cached:
        return cached[key]
    packed = packed_linear_weights(model)
    modules = [module for group in groups for module in group]
    size = sum(m.weight.numel() * m.weight.element_size() for m in modules)
    merged = None
    if groups and all(m in packed for m in modules) and size <= _packing_budget_bytes():
        with torch.inference_mode():
            merged = [(_packed_weight(torch.cat([m.weight for m in group])), _stacked_bias(group)) for group in groups]
    cached[key] = merged
    return merged


def _stacked_bias(group: tuple[torch.nn.Linear, ...]) -> torch.Tensor | None:
    if all(m.bias is None for m in group):
        return None
    return torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in group])


def _packing_budget_bytes() -> int:
    """The largest copy of linear weights packing may make now."""
    return int(psutil.virtual_memory().available * _PACKED_SHARE_OF_FREE_MEMORY)


def plain_float_linear(module) -> bool:
    """A float CPU ``nn.Linear`` on a plain weight. Not: a subclass (bitsandbytes' layers), nor a weight that
    is a tensor subclass (torchao's quantized tensors keep the Linear and report its float dtype)."""
    return (type(module) is torch.nn.Linear and type(module.weight) is torch.nn.Parameter
            and module.weight.device.type == "cpu" and module.weight.dtype in (torch.float32, torch.bfloat16))


def _packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """A linear weight in oneDNN's layout (``packed_linear`` multiplies with it)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@contextmanager
def on_packed_weights(packed: dict):
    """Within the block, each packed Linear module computes with its packed weight (its forward shadowed)."""
    for module, weight in packed.items():
        module.forward = partial(packed_linear, weight=weight, bias=module.bias)
    try:
        yield
    finally:
        for module in packed:
            vars(module).pop("forward", None)  # the class's forward again
