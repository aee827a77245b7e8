"""The engine's fused decode step (models/decode_step.py): its C++ ops are transformers' rotary embedding, cache
write and the decode-attention kernel, bit for bit, and its norms and gated activation to the last bit of a
float32; its merged projections are each projection's own, bit for bit; an engine on it generates exactly what the
model's own forward pass with the kernel generates."""

import collections

import pytest
import torch
from test_decode_kernel import _inputs, kernel  # noqa: F401  (a fixture)
from test_engine import QUESTIONS, SYSTEMS
from tiny import tiny_llama_with_head_dim
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from metaspo_hf.models.base import GenerationSettings, make_chat
from metaspo_hf.models.engine import HFEngine
from metaspo_hf.models.packed import merged_packed_weights, packed_linear, packed_linear_weights


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


def _one_rounding_apart(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal but where a float32 that differs in its last bits rounds the other way: then one step of the dtype
    apart (bfloat16), or a float32 a few ulps apart."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if got.dtype == torch.bfloat16:
        steps = (got.view(torch.int16).int() - expected.view(torch.int16).int()).abs().masked_fill(got == expected, 0)
        assert steps.max() <= 1 and (steps == 0).float().mean() > 0.99
    else:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("width", [576, 200])  # 200: a row that ends inside a 16-lane vector
def test_add_rms_norm_is_a_residual_add_then_the_models_rms_norm(kernel, dtype, width):  # noqa: F811
    gen = torch.Generator().manual_seed(4)
    hidden, delta = (torch.randn(7, width, generator=gen).mul(3).to(dtype) for _ in range(2))
    norm = LlamaRMSNorm(width, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(width, generator=gen).to(dtype)
    expected_hidden = hidden + delta
    with torch.inference_mode():
        expected = norm(expected_hidden)
        got = kernel.add_rms_norm(hidden, delta, norm.weight, norm.variance_epsilon)
    assert torch.equal(hidden, expected_hidden)  # the residual add, in place, rounded as torch rounds it
    _one_rounding_apart(got, expected)
    with torch.inference_mode():  # no delta: the norm alone, hidden left as it was
        _one_rounding_apart(kernel.add_rms_norm(hidden, None, norm.weight, norm.variance_epsilon), expected)
    assert torch.equal(hidden, expected_hidden)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_mul_is_the_gated_activation_on_the_halves_of_one_projection(kernel, dtype):  # noqa: F811
    gen = torch.Generator().manual_seed(5)
    merged = torch.randn(6, 2 * 1000, generator=gen).mul(4).to(dtype)
    merged[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # far past where exp over- or underflows
    gate, up = merged.chunk(2, dim=-1)  # strided rows, as the merged gate and up projection gives them
    got = kernel.silu_mul(gate, up)
    assert got.is_contiguous()
    _one_rounding_apart(got, torch.nn.functional.silu(gate) * up)


def test_the_elementwise_ops_refuse_mismatched_inputs(kernel):  # noqa: F811
    hidden = torch.zeros(2, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="weight \\[width\\]"):
        kernel.add_rms_norm(hidden, None, torch.ones(32, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(RuntimeError, match="delta must be"):
        kernel.add_rms_norm(hidden, torch.zeros(2, 32, dtype=torch.bfloat16), torch.ones(64, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(RuntimeError, match="differ in dtype"):
        kernel.add_rms_norm(hidden, None, torch.ones(64), 1e-5)
    with pytest.raises(RuntimeError, match="one dtype"):
        kernel.silu_mul(hidden, hidden.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_argmax_rows_picks_what_torchs_max_picks(kernel, dtype):  # noqa: F811
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(6, 1, 1003, generator=gen).to(dtype)  # [rows, 1, vocab]: rows strided, as from the model
    logits[0, 0, 17] = logits[0, 0, 900] = 50.0  # tied maxima: the first
    logits[1, 0, :] = float("-inf")
    logits[2, 0, 1002] = 50.0  # the last, in a vector's remainder
    logits[3, 0, 40] = logits[3, 0, 600] = float("nan")
    view = logits[:, -1, :]
    assert torch.equal(kernel.argmax_rows(view), view.max(dim=-1).indices)
    assert kernel.argmax_rows(view)[:4].tolist() == [17, 0, 1002, 40]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merged_projections_are_each_projections_own_output(tiny_tokenizer, dtype, monkeypatch):
    model = tiny_llama_with_head_dim(tiny_tokenizer, 64, dtype, "qwen2")  # biases on query, key and value only
    if not packed_linear_weights(model):
        pytest.skip("no oneDNN packing in this torch build: nothing is merged")
    layer = model.model.layers[0]
    groups = [(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
              (layer.self_attn.o_proj, layer.mlp.up_proj)]  # the second: one layer with a bias, one without
    merged = merged_packed_weights(model, groups)
    assert merged is merged_packed_weights(model, groups)  # made once per model
    states = torch.randn(5, model.config.hidden_size).to(dtype)
    packed = packed_linear_weights(model)
    with torch.inference_mode():
        for group, (weight, bias) in zip(groups, merged, strict=True):
            own = torch.cat([packed_linear(states, packed[m], m.bias) for m in group], dim=-1)
            assert torch.equal(packed_linear(states, weight, bias), own)
    # Past the memory budget: nothing merged, and the step falls back to the projections side by side.
    monkeypatch.setattr("metaspo_hf.models.packed._packing_budget_bytes", lambda: 0)
    assert merged_packed_weights(model, groups[:1]) is None


class _Counting:
    """The kernel, counting which of its ops the engine calls."""

    def __init__(self, real):
        self.real, self.calls = real, collections.Counter()

    def __getattr__(self, name):
        def call(*args):
            self.calls[name] += 1
            return getattr(self.real, name)(*args)
        return call


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: biases on the query, key and value projections
@pytest.mark.parametrize("settings", [GenerationSettings(max_new_tokens=10),
                                      GenerationSettings(max_new_tokens=10, temperature=1.0, seed=3, stop=("e",))],
                         ids=["greedy", "sampled-with-stops"])
@pytest.mark.parametrize("packed", [True, False], ids=["merged-projections", "projections-side-by-side"])
def test_the_fused_step_generates_what_the_models_forward_pass_generates(kernel, tiny_tokenizer, arch, settings,  # noqa: F811
                                                                        packed):
    model = tiny_llama_with_head_dim(tiny_tokenizer, 64, torch.bfloat16, arch)
    chats = [make_chat(SYSTEMS[1], q) for q in QUESTIONS]
    fused = HFEngine(model, tiny_tokenizer, "tiny", progress=False, packed_linears=packed)
    assert fused.fused_step is not None
    counting = _Counting(kernel)
    fused.fused_step.kernel = counting
    forward = HFEngine(model, tiny_tokenizer, "tiny", progress=False, packed_linears=packed)
    forward.fused_step = None
    got = fused.generate_ids(chats, settings)
    assert got == forward.generate_ids(chats, settings)
    # Every layer of every decode step went through the fused op, and nothing through the forward pass's kernel.
    decode_steps = max(len(ids) for ids in got) - 1
    assert counting.calls["rotate_store_attention"] >= decode_steps * model.config.num_hidden_layers > 0
    assert counting.calls["decode_attention"] == 0
    assert counting.calls["silu_mul"] == counting.calls["rotate_store_attention"]


def test_the_fused_step_is_left_out_where_it_would_not_be_the_same_model(kernel, tiny_tokenizer, tiny_llama):  # noqa: F811
    assert HFEngine(tiny_llama, tiny_tokenizer, "tiny", progress=False).fused_step is None  # float32: no kernel
    mistral = tiny_llama_with_head_dim(tiny_tokenizer, 64, torch.bfloat16, "mistral")
    engine = HFEngine(mistral, tiny_tokenizer, "tiny", progress=False)
    assert engine.kernel is not None and engine.fused_step is None  # not a listed class: the forward pass, kernel
    assert len(engine.generate([make_chat(SYSTEMS[1], q) for q in QUESTIONS], GenerationSettings(max_new_tokens=4))) == len(QUESTIONS)
