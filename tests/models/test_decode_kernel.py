"""The C++ decode-step attention (models/kernels/decode_attention.cpp): same attention as the torch ops it
replaces, on the slots the mask allows only, and used by the engine for bfloat16 decode steps alone."""

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metaspo_hf.models import decode_kernel
from metaspo_hf.models import prefix as prefix_module
from metaspo_hf.models.base import GenerationSettings, make_chat
from metaspo_hf.models.engine import HFEngine


@pytest.fixture(scope="module")
def kernel():
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the engine decodes with torch's ops (tested elsewhere)")
    module = decode_kernel.load()
    assert module is not None, "a C++ compiler is here, so the kernel must build"
    return module


class _Layer:
    layer_idx = 0


def _torch_attention(query, keys, values, mask, prefix_keys, prefix_values):
    """The torch ops' answer (``_shared_prefix_attention`` without a kernel), as [rows, heads, dim]."""
    token = prefix_module._shared_prefix_kv.set([(prefix_keys, prefix_values)])
    try:
        out, _ = prefix_module._shared_prefix_attention(_Layer, query, keys, values, mask[:, None, None, :])
    finally:
        prefix_module._shared_prefix_kv.reset(token)
    return out[:, 0]


def _inputs(rows, heads, kv_heads, dim, prefix_len, capacity, written, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)

    query = randn(rows, heads, 1, dim)
    keys, values = randn(rows, kv_heads, capacity, dim), randn(rows, kv_heads, capacity, dim)
    prefix_keys, prefix_values = randn(kv_heads, prefix_len, dim), randn(kv_heads, prefix_len, dim)
    mask = torch.zeros(rows, capacity, dtype=torch.bool)
    for row in range(rows):  # left padding of a different width per row, then the written slots
        mask[row, row % 4:written] = True
    return query, keys, values, mask, prefix_keys, prefix_values


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (12, 2, 128), (4, 4, 64)])
@pytest.mark.parametrize("whole_buffer", [True, False])
def test_the_kernel_computes_the_shared_prefix_attention_of_a_decode_step(kernel, heads, kv_heads, dim, whole_buffer):
    query, keys, values, mask, prefix_keys, prefix_values = _inputs(5, heads, kv_heads, dim, 37, 60, 41)
    if not whole_buffer:  # the first written slots only, as views of the buffers (strided rows)
        keys, values, mask = keys[:, :, :41], values[:, :, :41], mask[:, :41].contiguous()
    got = kernel.decode_attention(query[:, :, 0].contiguous(), prefix_keys, prefix_values, keys, values, mask,
                                  dim ** -0.5)
    # The same bfloat16 inputs through the torch ops in float32: the kernel keeps float32 inside and
    # rounds once at the end, so it is within one bfloat16 rounding of that.
    exact = _torch_attention(*(t.float() if t.is_floating_point() else t
                               for t in (query, keys, values, mask, prefix_keys, prefix_values)))
    assert got.shape == exact.shape and got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), exact, rtol=2**-7, atol=1e-3)
    # And at least as close to it as the torch ops in bfloat16 are (they round scores and weights too).
    torch_bf16 = _torch_attention(query, keys, values, mask, prefix_keys, prefix_values).float()
    assert (got.float() - exact).abs().mean() <= (torch_bf16 - exact).abs().mean()


def test_masked_slots_are_never_read(kernel):
    query, keys, values, mask, prefix_keys, prefix_values = _inputs(3, 9, 3, 64, 11, 30, 20, seed=1)
    clean = kernel.decode_attention(query[:, :, 0].contiguous(), prefix_keys, prefix_values, keys, values, mask, 0.125)
    keys[~mask[:, None, :].expand(-1, 3, -1)] = float("nan")
    values[~mask[:, None, :].expand(-1, 3, -1)] = float("inf")
    poisoned = kernel.decode_attention(query[:, :, 0].contiguous(), prefix_keys, prefix_values, keys, values, mask,
                                       0.125)
    assert torch.equal(clean, poisoned)


def test_the_kernel_refuses_what_it_was_not_built_for(kernel):
    query, keys, values, mask, prefix_keys, prefix_values = _inputs(2, 4, 2, 64, 5, 8, 6)
    with pytest.raises(RuntimeError, match="bfloat16 only"):
        kernel.decode_attention(query[:, :, 0].float().contiguous(), prefix_keys.float(), prefix_values.float(),
                                keys.float(), values.float(), mask, 0.125)
    with pytest.raises(RuntimeError, match="wider than the cache"):
        kernel.decode_attention(query[:, :, 0].contiguous(), prefix_keys, prefix_values, keys, values,
                                torch.ones(2, 9, dtype=torch.bool), 0.125)


def _bf16_model(tokenizer, dim):
    from tiny import tiny_llama_with_head_dim

    return tiny_llama_with_head_dim(tokenizer, dim, torch.bfloat16)


def test_the_engine_decodes_bfloat16_shared_prefix_chunks_on_the_kernel(kernel, tiny_tokenizer):
    from test_engine import QUESTIONS, SYSTEMS, spying_on_shared_prefix_attention

    model = _bf16_model(tiny_tokenizer, 64)
    chats = [make_chat(SYSTEMS[1], q) for q in QUESTIONS]
    settings = GenerationSettings(max_new_tokens=8)
    calls = []
    real = kernel.decode_attention

    class Counting:
        def decode_attention(self, query, *args):
            calls.append(tuple(query.shape))
            return real(query, *args)

        def __getattr__(self, name):  # the kernel's other ops (the engine's argmax_rows) as they are
            return getattr(kernel, name)

    on = HFEngine(model, tiny_tokenizer, "tiny", progress=False)
    assert on.kernel is kernel
    on.kernel = Counting()
    on.fused_step = None  # the model's own forward pass, as for architectures the fused step does not cover
    queries = []
    with spying_on_shared_prefix_attention(lambda module, query, *a, **k: queries.append(query.shape[2])):
        with_kernel = on.generate_ids(chats, settings)
    # Every decode step of every layer, and nothing else: prefill stays on torch's ops.
    assert calls and len(calls) == queries.count(1) and all(q > 1 for q in queries[:model.config.num_hidden_layers])
    assert all(shape == (len(chats), 2, 64) for shape in calls[:model.config.num_hidden_layers])
    off = HFEngine(model, tiny_tokenizer, "tiny", progress=False, attention_kernel=False)
    assert off.kernel is None
    without = off.generate_ids(chats, settings)
    # The same greedy tokens as torch's ops here; the two round differently, so a near tie could part them.
    assert sum(a == b for a, b in zip(with_kernel, without, strict=True)) >= len(chats) - 1


def test_the_kernel_is_left_out_where_it_does_not_apply(tiny_llama, tiny_tokenizer, monkeypatch):
    loads = []
    monkeypatch.setattr(decode_kernel, "load", lambda: loads.append(1))
    assert HFEngine(tiny_llama, tiny_tokenizer, "tiny", progress=False).kernel is None  # float32
    small_heads = copy.deepcopy(tiny_llama).to(torch.bfloat16)  # 16-dimensional heads
    assert HFEngine(small_heads, tiny_tokenizer, "tiny", progress=False).kernel is None
    bf16 = _bf16_model(tiny_tokenizer, 64)
    assert HFEngine(bf16, tiny_tokenizer, "tiny", progress=False, prefix_reuse=False).kernel is None
    assert loads == []


def test_a_failed_build_is_reported_and_decoding_goes_on_without_the_kernel(tiny_tokenizer, monkeypatch, capsys,
                                                                            tmp_path):
    broken = tmp_path / "decode_attention.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(decode_kernel, "SOURCE", broken)
    monkeypatch.setattr(decode_kernel, "_registered", lambda: False)  # as in a process that never loaded it
    decode_kernel.load.cache_clear()
    try:
        engine = HFEngine(_bf16_model(tiny_tokenizer, 64), tiny_tokenizer, "tiny", progress=False)
    finally:
        decode_kernel.load.cache_clear()
    assert engine.kernel is None
    assert "could not be built" in capsys.readouterr().err
    system = "You are a helpful assistant."
    out = engine.generate([make_chat(system, "hi"), make_chat(system, "hello there")], GenerationSettings(max_new_tokens=4))
    assert len(out) == 2 and engine.stats.generated_tokens > 2


_PORTABLE_BUILD = """
import sys, torch
from metaspo_hf.models import decode_kernel
decode_kernel._CFLAGS = decode_kernel._CFLAGS + ["-mno-avx512bf16"]  # as on a CPU without AVX512-BF16
ops = decode_kernel.load()
assert ops is not None, "the portable build failed"
inputs = torch.load(sys.argv[1])
torch.save(ops.decode_attention(*inputs), sys.argv[2])
"""


def test_the_portable_loops_compute_the_same_attention(kernel, tmp_path):
    """CPUs without AVX512-BF16 (many AMD EPYC) compile the kernel's portable loops instead of its vector paths:
    built here in a child process with that extension turned off, they give the same attention."""
    query, keys, values, mask, prefix_keys, prefix_values = _inputs(5, 12, 2, 128, 37, 60, 41)
    inputs = (query[:, :, 0].contiguous(), prefix_keys, prefix_values, keys, values, mask, 128 ** -0.5)
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "METASPO_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(Path(decode_kernel.__file__).parents[2])}
    subprocess.run([sys.executable, "-c", _PORTABLE_BUILD, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                   env=env, check=True, timeout=300)
    portable = torch.load(tmp_path / "out.pt")
    exact = _torch_attention(*(t.float() if t.is_floating_point() else t
                               for t in (query, keys, values, mask, prefix_keys, prefix_values)))
    assert torch.allclose(portable.float(), exact, rtol=2**-7, atol=1e-3)
    assert torch.allclose(portable.float(), kernel.decode_attention(*inputs).float(), rtol=2**-7, atol=1e-3)
