"""The engine's one-token decode step for Llama-family models in bfloat16 on CPU, as a plain loop over the layers.

transformers' forward pass spends a small model's decode step mostly around its matrix products: module calls,
mask and cache bookkeeping, and per layer about thirty small elementwise ops for the norms, the rotary embedding,
the cache write, the attention, the gated activation and the residual adds. Here a layer is eight calls: the query,
key and value projections as one matmul, one C++ op (kernels/decode_attention.cpp, ``rotate_store_attention``)
for everything from there to the attention's output, the output projection, the residual add and the next norm
as one op (``add_rms_norm``), the gate and up projections as one matmul, the gated activation as one op
(``silu_mul``), the down projection and again ``add_rms_norm``.

Its tokens are those of the model's forward pass with the decode-attention kernel (tests/models/test_decode_step.py):
the projections merged into one matmul give each projection's own bits, and the two elementwise ops round as
transformers' modules do, but for the norm's float32 sum of squares (summed in another order) and the activation's
exp, which may differ in the last bit of a float32 before it is rounded to bfloat16. The measured gain is in
docs/benchmarks.md.

Used for shared-prefix chunks whose cache is whole buffers (``prefix.BufferLayer``), where that kernel applies.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from .packed import merged_packed_weights, packed_linear

# Model classes whose decode step is exactly the loop below: pre-norm layers of RMSNorm, attention with rotary
# embedding (biases, if any, inside the projections) and a SiLU-gated MLP, a final norm and the LM head.
ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


class FusedDecodeStep:
    """``step(tokens, positions, cache, mask, prefix_kv) -> logits`` for one new token per row."""

    def __init__(self, model, kernel, packed: bool):
        self.kernel = kernel
        inner = model.model
        self.embed, self.rotary, self.lm_head = inner.embed_tokens, inner.rotary_emb, model.lm_head
        self.layers = list(inner.layers[:model.config.num_hidden_layers])
        attentions, mlps = [layer.self_attn for layer in self.layers], [layer.mlp for layer in self.layers]
        self.split = (attentions[0].q_proj.out_features, attentions[0].k_proj.out_features,
                      attentions[0].v_proj.out_features)
        # Each layer's query, key and value projections as one matmul, and its gate and up projections: on one
        # packed weight each where the engine packs weights (``packed=True``), else the projections side by side.
        groups = [(a.q_proj, a.k_proj, a.v_proj) for a in attentions] + [(m.gate_proj, m.up_proj) for m in mlps]
        merged = merged_packed_weights(model, groups) if packed else None
        projections = ([partial(packed_linear, weight=weight, bias=bias) for weight, bias in merged] if merged
                       else [_side_by_side(group) for group in groups])
        self.qkv, self.gate_up = projections[:len(self.layers)], projections[len(self.layers):]
        # Each norm as (weight, eps). A layer's residual add runs with the norm after it: the attention's with the
        # layer's second norm, the MLP's with the next layer's first (the last layer's: the final norm).
        self.first_norm = _norm(self.layers[0].input_layernorm)
        following = [layer.input_layernorm for layer in self.layers[1:]] + [inner.norm]
        self.norms = [(_norm(layer.post_attention_layernorm), _norm(after))
                      for layer, after in zip(self.layers, following, strict=True)]

    @classmethod
    def for_model(cls, model, kernel, packed: bool) -> FusedDecodeStep | None:
        """The fused step where it computes what the model's forward pass would, else None."""
        config = model.config
        if kernel is None or type(model).__name__ not in ARCHITECTURES or config.hidden_act != "silu":
            return None
        return cls(model, kernel, packed)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache, mask: torch.Tensor,
                 prefix_kv: list) -> torch.Tensor:
        """``tokens`` [rows], ``positions`` [rows, 1]; ``cache`` the chunk's whole-buffer cache, each layer's new
        token written at its current length; ``mask`` [rows, slots], True where a row attends (the new slot
        included); ``prefix_kv`` per layer (keys, values) [kv_heads, length, dim]. Returns [rows, vocab]."""
        rows, kernel = tokens.shape[0], self.kernel
        hidden = self.embed.forward(tokens)  # [rows, hidden]: the residual stream, updated in place by add_rms_norm
        cos, sin = self.rotary(hidden, position_ids=positions)
        cos, sin = cos.view(rows, -1), sin.view(rows, -1)
        states = kernel.add_rms_norm(hidden, None, *self.first_norm)
        # Module forwards are called directly: the hooks machinery of a module call is per-step overhead too.
        for layer, qkv, gate_up, (after_attention, after_mlp), buffers, (prefix_keys, prefix_values) in zip(
                self.layers, self.qkv, self.gate_up, self.norms, cache.layers, prefix_kv, strict=True):
            attention = layer.self_attn
            keys, values = buffers.buffers
            query, key, value = qkv(states).split(self.split, dim=-1)
            out = kernel.rotate_store_attention(query, key, value, cos, sin, prefix_keys, prefix_values, keys, values,
                                                buffers.length, mask, attention.scaling)
            buffers.advance(1)
            states = kernel.add_rms_norm(hidden, attention.o_proj.forward(out.view(rows, -1)), *after_attention)
            gated = kernel.silu_mul(*gate_up(states).chunk(2, dim=-1))
            states = kernel.add_rms_norm(hidden, layer.mlp.down_proj.forward(gated), *after_mlp)
        return self.lm_head.forward(states)


def _side_by_side(group: tuple[torch.nn.Linear, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda states: torch.cat([module.forward(states) for module in group], dim=-1)


def _norm(norm) -> tuple[torch.Tensor, float]:
    return norm.weight, norm.variance_epsilon
