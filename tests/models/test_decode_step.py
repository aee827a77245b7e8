"""The engine's fused decode step (models/decode_step.py): its C++ part is transformers' rotary embedding, cache
write and the decode-attention kernel, bit for bit, and an engine on it generates exactly what the model's own
forward pass with the kernel generates."""

import pytest
import torch
from test_decode_kernel import _inputs, kernel  # noqa: F401  (a fixture)
from test_engine import QUESTIONS, SYSTEMS
from tiny import tiny_llama_with_head_dim
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from metaspo_hf.models.base import GenerationSettings, make_chat
from metaspo_hf.models.engine import HFEngine


def _projections(rows, heads, kv_heads, dim, seed=2):
    gen = torch.Generator().manual_seed(seed)
    query, key, value = (torch.randn(rows, n * dim, generator=gen).to(torch.bfloat16) for n in (heads, kv_heads, kv_heads))
    positions = torch.randint(0, 500, (rows, 1), generator=gen)
    rotary = LlamaRotaryEmbedding(_rotary_config(dim))
    cos, sin = rotary(query[:, None], position_ids=positions)
    return query, key, value, cos, sin


def _rotary_config(dim):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2 * dim, num_attention_heads=2, head_dim=dim, max_position_embeddings=1024)


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (12, 2, 128)])
def test_rotate_store_attention_is_a_layers_rotary_embedding_cache_write_and_attention(kernel, heads, kv_heads, dim):  # noqa: F811
    rows, slot = 5, 40
    _, keys, values, mask, prefix_keys, prefix_values = _inputs(rows, heads, kv_heads, dim, 37, 60, slot + 1)
    query, key, value, cos, sin = _projections(rows, heads, kv_heads, dim)
    assert cos.dtype == torch.bfloat16
    # What transformers' attention does with the same projections: rotate, write into the cache, attend.
    rotated_query, rotated_key = apply_rotary_pos_emb(query.view(rows, 1, heads, dim).transpose(1, 2),
                                                      key.view(rows, 1, kv_heads, dim).transpose(1, 2), cos, sin)
    expected_keys, expected_values = keys.clone(), values.clone()
    expected_keys[:, :, slot] = rotated_key[:, :, 0]
    expected_values[:, :, slot] = value.view(rows, kv_heads, dim)
    expected = kernel.decode_attention(rotated_query[:, :, 0].contiguous(), prefix_keys, prefix_values, expected_keys,
                                       expected_values, mask, dim ** -0.5)
    # The query as a column slice of a wider tensor: its rows are strided, as a fused projection's would be.
    wide = torch.cat([query, torch.zeros(rows, 7, dtype=query.dtype)], dim=1)
    got = kernel.rotate_store_attention(wide[:, :heads * dim], key, value, cos.view(rows, dim), sin.view(rows, dim),
                                        prefix_keys, prefix_values, keys, values, slot, mask, dim ** -0.5)
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
    assert torch.equal(got, expected)


def test_rotate_store_attention_refuses_a_slot_outside_the_mask_and_mismatched_heads(kernel):  # noqa: F811
    _, keys, values, mask, prefix_keys, prefix_values = _inputs(2, 4, 2, 64, 5, 8, 6)
    query, key, value, cos, sin = _projections(2, 4, 2, 64)
    cos, sin = cos.view(2, 64), sin.view(2, 64)
    with pytest.raises(RuntimeError, match="outside the mask"):
        kernel.rotate_store_attention(query, key, value, cos, sin, prefix_keys, prefix_values, keys, values, 8, mask, 0.125)
    with pytest.raises(RuntimeError, match="do not match the cache"):
        kernel.rotate_store_attention(query, key[:, :64], value, cos, sin, prefix_keys, prefix_values, keys, values, 5,
                                      mask, 0.125)


class _Counting:
    """The kernel, counting which of its ops the engine calls."""

    def __init__(self, real):
        self.real, self.calls = real, {"rotate_store_attention": 0, "decode_attention": 0}

    def __getattr__(self, name):
        def call(*args):
            self.calls[name] += 1
            return getattr(self.real, name)(*args)
        return call


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: biases on the query, key and value projections
@pytest.mark.parametrize("settings", [GenerationSettings(max_new_tokens=10),
                                      GenerationSettings(max_new_tokens=10, temperature=1.0, seed=3, stop=("e",))],
                         ids=["greedy", "sampled-with-stops"])
def test_the_fused_step_generates_what_the_models_forward_pass_generates(kernel, tiny_tokenizer, arch, settings):  # noqa: F811
    model = tiny_llama_with_head_dim(tiny_tokenizer, 64, torch.bfloat16, arch)
    chats = [make_chat(SYSTEMS[1], q) for q in QUESTIONS]
    fused = HFEngine(model, tiny_tokenizer, "tiny", progress=False)
    assert fused.fused_step is not None
    counting = _Counting(kernel)
    fused.fused_step.kernel = counting
    forward = HFEngine(model, tiny_tokenizer, "tiny", progress=False)
    forward.fused_step = None
    got = fused.generate_ids(chats, settings)
    assert got == forward.generate_ids(chats, settings)
    # Every layer of every decode step went through the fused op, and nothing through the forward pass's kernel.
    decode_steps = max(len(ids) for ids in got) - 1
    assert counting.calls["rotate_store_attention"] >= decode_steps * model.config.num_hidden_layers > 0
    assert counting.calls["decode_attention"] == 0


def test_the_fused_step_is_left_out_where_it_would_not_be_the_same_model(kernel, tiny_tokenizer, tiny_llama):  # noqa: F811
    assert HFEngine(tiny_llama, tiny_tokenizer, "tiny", progress=False).fused_step is None  # float32: no kernel
    mistral = tiny_llama_with_head_dim(tiny_tokenizer, 64, torch.bfloat16, "mistral")
    engine = HFEngine(mistral, tiny_tokenizer, "tiny", progress=False)
    assert engine.kernel is not None and engine.fused_step is None  # not a listed class: the forward pass, kernel
    assert len(engine.generate([make_chat(SYSTEMS[1], q) for q in QUESTIONS], GenerationSettings(max_new_tokens=4))) == len(QUESTIONS)
