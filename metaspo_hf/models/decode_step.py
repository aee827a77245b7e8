"""The engine's one-token decode step for Llama-family models in bfloat16 on CPU, as a plain loop over the layers.

transformers' forward pass spends a small model's decode step mostly around its matrix products: module calls,
mask and cache bookkeeping, and per layer about twenty small elementwise ops for the rotary embedding, the cache
write and the attention. Here a step calls the same torch ops for the norms, projections, MLP and residual adds,
in the same order, and one C++ op (kernels/decode_attention.cpp, ``rotate_store_attention``) for everything from
the projections to the attention's output. Its logits are bit-identical to the model's forward pass with the
decode-attention kernel (tests/models/test_decode_step.py); the measured gain is in docs/benchmarks.md.

Used for shared-prefix chunks whose cache is whole buffers (``prefix.BufferLayer``), where that kernel applies.
"""

from __future__ import annotations

import torch

# Model classes whose decode step is exactly the loop below: pre-norm layers of RMSNorm, attention with rotary
# embedding (biases, if any, inside the projections) and a SiLU-gated MLP, a final norm and the LM head.
ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


class FusedDecodeStep:
    """``step(tokens, positions, cache, mask, prefix_kv) -> logits`` for one new token per row."""

    def __init__(self, model, kernel):
        self.kernel = kernel
        inner = model.model
        self.embed, self.rotary, self.norm, self.lm_head = inner.embed_tokens, inner.rotary_emb, inner.norm, model.lm_head
        self.layers = list(inner.layers[:model.config.num_hidden_layers])

    @classmethod
    def for_model(cls, model, kernel) -> FusedDecodeStep | None:
        """The fused step where it computes exactly what the model's forward pass would, else None."""
        config = model.config
        if kernel is None or type(model).__name__ not in ARCHITECTURES or config.hidden_act != "silu":
            return None
        return cls(model, kernel)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache, mask: torch.Tensor,
                 prefix_kv: list) -> torch.Tensor:
        """``tokens`` [rows], ``positions`` [rows, 1]; ``cache`` the chunk's whole-buffer cache, each layer's new
        token written at its current length; ``mask`` [rows, slots], True where a row attends (the new slot
        included); ``prefix_kv`` per layer (keys, values) [kv_heads, length, dim]. Returns [rows, vocab]."""
        rows = tokens.shape[0]
        hidden = self.embed.forward(tokens[:, None])
        cos, sin = self.rotary(hidden, position_ids=positions)
        cos, sin = cos.view(rows, -1), sin.view(rows, -1)
        # Module forwards are called directly: the hooks machinery of a module call is per-step overhead too.
        for layer, buffers, (prefix_keys, prefix_values) in zip(self.layers, cache.layers, prefix_kv, strict=True):
            attention, mlp = layer.self_attn, layer.mlp
            states = layer.input_layernorm.forward(hidden)
            keys, values = buffers.buffers
            out = self.kernel.rotate_store_attention(
                attention.q_proj.forward(states).view(rows, -1), attention.k_proj.forward(states).view(rows, -1),
                attention.v_proj.forward(states).view(rows, -1), cos, sin, prefix_keys, prefix_values, keys, values,
                buffers.length, mask, attention.scaling)
            buffers.advance(1)
            hidden = hidden + attention.o_proj.forward(out.view(rows, 1, -1))
            states = layer.post_attention_layernorm.forward(hidden)
            gated = mlp.act_fn(mlp.gate_proj.forward(states)) * mlp.up_proj.forward(states)
            hidden = hidden + mlp.down_proj.forward(gated)
        return self.lm_head.forward(self.norm.forward(hidden))[:, -1, :]
