"""int8 weights for a loaded model's linear layers, meant for CPU: torchao's int8 weight-only tensors, or
bitsandbytes' 8-bit layers (LLM.int8(), whose CPU backend multiplies int8 by int8). Used by
`model.quantization: int8-torchao|int8-bnb` (loading.py) and by the benchmark's int8 engine variants.

The output projection keeps its float weight, as transformers' bitsandbytes loading keeps it: the logits
keep the model's precision, and the engine still packs that layer for oneDNN (``packed.py`` packs plain
float layers only). Everything else (embeddings, norms, attention) runs in the model's dtype.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging

from ..errors import MetaspoError

# model.quantization -> the library that quantizes.
INT8_LIBRARIES = {"int8-torchao": "torchao", "int8-bnb": "bitsandbytes"}
# The versions tested: the `bench` extra of pyproject.toml and `make bench` pin the same.
TESTED = {"torchao": "0.18.0", "bitsandbytes": "0.50.2"}


def require(quantization: str) -> str:
    """The installed version of the library that ``quantization`` needs; a MetaspoError when it is missing."""
    library = INT8_LIBRARIES[quantization]
    try:
        importlib.import_module(library)
    except ImportError as error:
        raise MetaspoError(f"model.quantization={quantization!r} needs {library}, which cannot be imported ({error})",
                           hint=f'pip install --no-deps "{library}=={TESTED[library]}"',
                           key="quantization") from None
    return importlib.metadata.version(library)


def quantize_int8(model, quantization: str) -> dict:
    """Quantizes ``model``'s linear layers, except its output projection, in place (``quantization``: a key of
    ``INT8_LIBRARIES``). Returns what was done: library, version, scheme, activation dtype, the number of
    quantized layers and the names of the linear layers left in float."""
    import torch  # not at the top: loading.py imports this module, and `metaspo --help` skips torch

    version = require(quantization)
    output = model.get_output_embeddings()
    targets = {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear and m is not output}
    scheme = (_torchao if quantization == "int8-torchao" else _bitsandbytes)(model, targets)
    kept = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear and name not in targets]
    return {"library": INT8_LIBRARIES[quantization], "version": version, "scheme": scheme,
            "activation_dtype": str(model.dtype).removeprefix("torch."), "quantized_linears": len(targets),
            "float_linears": kept}


def _torchao(model, targets: dict) -> str:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    chosen = {id(m) for m in targets.values()}
    # set_inductor_config=False: nothing here is compiled, so torch's global compiler settings stay as they are.
    quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=lambda m, name: id(m) in chosen)
    return ("torchao Int8WeightOnlyConfig: int8 weights, one scale per output channel; each call converts them "
            "to the activation dtype and multiplies in it")


def _bitsandbytes(model, targets: dict) -> str:
    import bitsandbytes as bnb

    # Its CPU path logs a warning on every call whose input is not float16 (it quantizes from a float16 copy).
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    for name, linear in targets.items():
        parent, _, attribute = name.rpartition(".")
        # threshold 0: every column in int8 (a positive one computes outlier columns in float16, LLM.int8()'s
        # safeguard for models past ~6B parameters).
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
        layer.bias = linear.bias
        # Int8Params quantizes when moved to a device (bitsandbytes' documented way), the CPU included.
        setattr(model.get_submodule(parent), attribute, layer.to(linear.weight.device))
    return ("bitsandbytes Linear8bitLt, threshold 0: int8 weights, one scale per output row; each call quantizes "
            "the activations per row to int8 and multiplies int8 by int8")
