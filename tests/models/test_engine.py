"""The generation engine on tiny random-weight models: identity with plain `generate`, stops, sampling."""

import copy
import inspect
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from metaspo_hf.models.base import GenerationSettings, make_chat
from metaspo_hf.models.engine import HFEngine

QUESTIONS = [
    "What is two plus two?",
    "Name a color.",
    "Is the sky blue? Answer yes or no.",
    "Sort these words: pear apple fig.",
    "hi",
    "Count the letters in the word assistant, please.",
    "Which is larger, 7 or 12?",
    "Say the alphabet backwards from z to t, separated by commas.",
]
SYSTEMS = ["You are a helpful assistant.", "Think step by step and keep answers short. " * 4, None]


def plain_generate(model, tokenizer, chats, max_new_tokens):
    """Reference: transformers' own batched greedy generate with left padding."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    out = model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return [tokenizer.decode(row[enc.input_ids.shape[1] :], skip_special_tokens=True) for row in out]


@pytest.mark.parametrize(
    "batch_size,n_chats,system_ids",
    [(1, 3, [0]), (3, 7, [0, 1]), (8, 8, [1]), (4, 11, [0, 1, 2]), (16, 9, [2, 1, 0])],
)
def test_prefix_reuse_is_token_identical_to_plain_batched_generate(
    tiny_llama, tiny_tokenizer, batch_size, n_chats, system_ids
):
    # Chats of several system prompts (and none) and lengths; the engine batches them in any mix.
    chats = [
        make_chat(SYSTEMS[system_ids[i % len(system_ids)]], QUESTIONS[i % len(QUESTIONS)] + " x" * i)
        for i in range(n_chats)
    ]
    engine = HFEngine(tiny_llama, tiny_tokenizer, "tiny", batch_size=batch_size, progress=False)
    got = engine.generate(chats, GenerationSettings(max_new_tokens=12))
    assert got == plain_generate(tiny_llama, tiny_tokenizer, chats, 12)
    assert engine.stats.prompts == n_chats
    assert engine.stats.generated_tokens > 0


def test_prefix_reuse_shares_the_system_prompt(tiny_llama, tiny_tokenizer):
    chats = [make_chat(SYSTEMS[1], q) for q in QUESTIONS]
    reused = HFEngine(tiny_llama, tiny_tokenizer, "tiny", progress=False)
    plain = HFEngine(tiny_llama, tiny_tokenizer, "tiny", prefix_reuse=False, progress=False)
    settings = GenerationSettings(max_new_tokens=6)
    assert reused.generate(chats, settings) == plain.generate(chats, settings)
    # The shared prefix is prefilled once instead of once per row.
    assert reused.stats.prefill_tokens < plain.stats.prefill_tokens


def test_each_user_prompt_that_fills_a_chunk_gets_its_own_prefix(tiny_llama, tiny_tokenizer, monkeypatch):
    # One system prompt, two long user prompts that begin alike and a few stray questions: what the unseen
    # evaluation sends (every question of a task under each user prompt).
    instructions = ["Read the question carefully, then weigh each option against the facts it states.",
                    "Read the question carefully, and answer with the single option that the text supports."]
    chats = [make_chat(SYSTEMS[0], f"{instruction}\n\n{question}")
             for instruction in instructions for question in QUESTIONS[:6]]
    chats += [make_chat(SYSTEMS[0], question) for question in QUESTIONS[6:]]
    engine = HFEngine(tiny_llama, tiny_tokenizer, "tiny", batch_size=4, progress=False)
    filled = []
    fill_prefix = engine.fill_prefix
    monkeypatch.setattr(engine, "fill_prefix", lambda prefix: filled.append(prefix) or fill_prefix(prefix))
    assert engine.generate(chats, GenerationSettings(max_new_tokens=8)) == plain_generate(tiny_llama, tiny_tokenizer,
                                                                                          chats, 8)
    prefixes = {tiny_tokenizer.decode(prefix.tokens) for prefix in filled}
    # Each instruction's six questions read it from their own prefix; the two stray ones share the system turn.
    assert len(prefixes) == 3
    for instruction in instructions:
        assert sum(instruction in text for text in prefixes) == 1
    assert any(SYSTEMS[0] in text and "Read the question" not in text for text in prefixes)


def test_questions_that_only_begin_alike_stay_on_their_user_prompt_s_prefix():
    from metaspo_hf.models.prefix import CLUSTER_MIN_GAIN, Prefix, Row, prefix_clusters

    system, instruction = [1, 2, 3], list(range(100, 100 + 2 * CLUSTER_MIN_GAIN))
    # Eight questions start with the same two tokens (fewer than CLUSTER_MIN_GAIN): not worth a prefix of their own.
    rows = [Row(i, system + instruction + ([7, 7] if i < 8 else [8 + i]) + [50 + i], 0) for i in range(12)]
    assert prefix_clusters(rows, min_rows=4) == [rows]
    # Under a second user prompt they are cut off from the first, each cluster in the caller's order.
    other = [Row(12 + i, system + [9] * CLUSTER_MIN_GAIN + [60 + i], 0) for i in range(5)]
    stray = [Row(17 + i, system + [70 + i], 0) for i in range(3)]
    mixed = rows[:3] + other[:2] + stray + rows[3:] + other[2:]

    def clusters(min_rows):
        return sorted([row.index for row in cluster] for cluster in prefix_clusters(mixed, min_rows))

    def indices(*groups):
        return sorted([row.index for row in group] for group in groups)

    assert clusters(4) == indices(rows, other, stray)
    # A cluster needs a chunk's worth of rows: with 6 the second user prompt's 5 rows join the stray ones.
    assert clusters(6) == indices(rows, [row for row in mixed if row in other or row in stray])
    assert prefix_clusters([], min_rows=4) == [] and Prefix([]).length == 0


@contextmanager
def spying_on_shared_prefix_attention(record):
    """Within the block, every call of the engine's shared-prefix attention is first passed to ``record``."""
    from transformers import AttentionInterface

    from metaspo_hf.models import prefix as prefix_module

    def spy(module, *args, **kwargs):
        record(module, *args, **kwargs)
        return prefix_module._shared_prefix_attention(module, *args, **kwargs)

    AttentionInterface.register(prefix_module._SHARED_PREFIX_ATTENTION, spy)
    try:
        yield
    finally:
        AttentionInterface.register(prefix_module._SHARED_PREFIX_ATTENTION, prefix_module._shared_prefix_attention)


def test_the_shared_prefix_attention_is_the_one_called(tiny_llama, tiny_tokenizer):
    """The engine relies on transformers internals (attention picked through config._attn_implementation,
    plain DynamicLayer caches, the forward's cache argument). Should an upgrade change them, the engine
    could quietly fall back to copying the prefix into every row (slower) or mix up masks (different
    tokens); this fails instead."""
    called = []
    engine = HFEngine(tiny_llama, tiny_tokenizer, "tiny", progress=False)
    assert engine.prefix_reuse, "prefix reuse is off: the cache layers are no longer plain DynamicLayers"
    assert engine._cache_arg in inspect.signature(tiny_llama.forward).parameters
    chats = [make_chat(SYSTEMS[1], q) for q in QUESTIONS[:4]]
    with spying_on_shared_prefix_attention(lambda module, *args, **kwargs: called.append(module.layer_idx)):
        got = engine.generate(chats, GenerationSettings(max_new_tokens=5))
    layers = tiny_llama.config.num_hidden_layers
    # Every layer of every forward pass of the chunk: the first (prefill of the rows' own tokens) and each step.
    assert called and sorted(set(called)) == list(range(layers)), "the shared-prefix attention was not called"
    assert len(called) >= layers * 5 and len(called) % layers == 0
    assert got == plain_generate(tiny_llama, tiny_tokenizer, chats, 5)


@pytest.mark.parametrize("whole_buffers", [False, True])
def test_a_prefill_too_large_for_one_score_matrix_keeps_the_shared_prefix(tiny_llama, tiny_tokenizer, monkeypatch,
                                                                         whole_buffers):
    """Past ``SHARED_PREFIX_MAX_SCORES`` (here: every prefill) the rows' prefill attends over copies of the prefix
    through SDPA; the chunk stays on the shared prefix, so its decode steps read the one copy (and the kernel,
    where there is one). Tokens are still plain generate's."""
    from metaspo_hf.models import prefix as prefix_module

    monkeypatch.setattr(prefix_module, "SHARED_PREFIX_MAX_SCORES", 0)
    copies, calls = [], []
    real = prefix_module._attention_on_copies
    monkeypatch.setattr(prefix_module, "_attention_on_copies", lambda *args: copies.append(args[1].shape) or real(*args))
    engine = HFEngine(tiny_llama, tiny_tokenizer, "tiny", progress=False)
    engine.whole_buffers = whole_buffers
    chats = [make_chat(SYSTEMS[1], q) for q in QUESTIONS[:6]]
    with spying_on_shared_prefix_attention(lambda module, query, *args, **kwargs: calls.append(query.shape[2])):
        got = engine.generate(chats, GenerationSettings(max_new_tokens=7))
    assert got == plain_generate(tiny_llama, tiny_tokenizer, chats, 7)
    layers = tiny_llama.config.num_hidden_layers
    assert len(copies) == layers and all(shape[2] > 1 for shape in copies)  # the prefill only
    assert calls.count(1) >= layers * 6  # every decode step still on the shared prefix


def test_attention_on_copies_equals_the_one_score_matrix(tiny_llama):
    """The two prefill paths of the shared-prefix attention compute the same attention (float32)."""
    from metaspo_hf.models import prefix as prefix_module

    torch.manual_seed(0)
    module = tiny_llama.model.layers[0].self_attn
    heads, kv_heads = tiny_llama.config.num_attention_heads, tiny_llama.config.num_key_value_heads
    dim = tiny_llama.config.hidden_size // heads
    batch, queries, own, length = 3, 5, 9, 4
    query = torch.randn(batch, heads, queries, dim)
    key, value = torch.randn(batch, kv_heads, own, dim), torch.randn(batch, kv_heads, own, dim)
    prefix_kv = [(torch.randn(kv_heads, length, dim), torch.randn(kv_heads, length, dim))] * len(tiny_llama.model.layers)
    mask = torch.ones(queries, own, dtype=torch.bool).tril(diagonal=own - queries)[None, None].repeat(batch, 1, 1, 1)
    mask[1, :, :, :3] = False  # a left-padded row
    token = prefix_module._shared_prefix_kv.set(prefix_kv)
    try:
        one_matrix, _ = prefix_module._shared_prefix_attention(module, query, key, value, mask)
        on_copies, _ = prefix_module._attention_on_copies(module, query, key, value, mask, *prefix_kv[0], dim ** -0.5)
    finally:
        prefix_module._shared_prefix_kv.reset(token)
    assert on_copies.shape == one_matrix.shape == (batch, queries, heads, dim)
    torch.testing.assert_close(on_copies, one_matrix)


def test_decode_steps_on_whole_buffers_are_token_identical_and_read_every_slot(tiny_llama, tiny_tokenizer):
    """Whole-buffer reads (on by default outside float32) forced on in float32: the unwritten slots are
    masked and zero, so the tokens are plain generate's; each decode step sees all the chunk's slots."""
    widths = []

    def record(module, query, key, value, attention_mask, *args, **kwargs):
        widths.append((query.shape[2], key.shape[2], attention_mask.shape[-1]))

    engine = HFEngine(tiny_llama, tiny_tokenizer, "tiny", progress=False)
    assert not engine.whole_buffers  # float32's default
    engine.whole_buffers = True
    chats = [make_chat(SYSTEMS[1], q) for q in QUESTIONS[:4]]
    with spying_on_shared_prefix_attention(record):
        got = engine.generate(chats, GenerationSettings(max_new_tokens=6))
    assert got == plain_generate(tiny_llama, tiny_tokenizer, chats, 6)
    prefill, *decode = [w for i, w in enumerate(widths) if i % tiny_llama.config.num_hidden_layers == 0]
    capacity = prefill[0] + 6  # the rows' own tokens, then room for every new one
    assert prefill == (prefill[0], capacity, prefill[0]) and decode
    assert all(step == (1, capacity, capacity) for step in decode)
    assert HFEngine(copy.deepcopy(tiny_llama).to(torch.bfloat16), tiny_tokenizer, "tiny", progress=False).whole_buffers


def test_other_architecture_without_prefix_reuse_still_matches(tiny_tokenizer):
    from tiny import tiny_model

    model = tiny_model(tiny_tokenizer, "qwen2", seed=1)
    chats = [make_chat(SYSTEMS[0], q) for q in QUESTIONS[:5]]
    engine = HFEngine(model, tiny_tokenizer, "tiny-qwen", batch_size=2, progress=False)
    assert engine.generate(chats, GenerationSettings(max_new_tokens=8)) == plain_generate(
        model, tiny_tokenizer, chats, 8
    )


def test_stop_string_ends_generation_and_is_kept(tiny_llama, tiny_tokenizer):
    engine = HFEngine(tiny_llama, tiny_tokenizer, "tiny", progress=False)
    chat = [make_chat(SYSTEMS[0], QUESTIONS[3])]
    full = engine.generate(chat, GenerationSettings(max_new_tokens=30))[0]
    assert len(full) > 6
    stop = full[3:6]
    before = engine.stats.generated_tokens
    stopped = engine.generate(chat, GenerationSettings(max_new_tokens=30, stop=(stop,)))[0]
    assert stopped == full[: full.index(stop) + len(stop)]
    assert engine.stats.generated_tokens - before < before  # fewer decode steps than the full run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_picks_the_first_of_tied_maxima_as_argmax_does(tiny_llama, tiny_tokenizer, dtype):
    engine = HFEngine(tiny_llama, tiny_tokenizer, "tiny", progress=False)
    logits = torch.randint(0, 3, (16, 500), generator=torch.Generator().manual_seed(0)).to(dtype)
    picks = engine._pick(logits.clone(), GenerationSettings(), None)
    assert torch.equal(picks, logits.argmax(dim=-1))
    assert all(bool((row[:pick] < row[pick]).all()) for row, pick in zip(logits, picks.tolist(), strict=True))


def test_max_new_tokens_is_respected(tiny_llama, tiny_tokenizer):
    engine = HFEngine(tiny_llama, tiny_tokenizer, "tiny", progress=False)
    short = engine.generate([make_chat(None, "hello")], GenerationSettings(max_new_tokens=5))[0]
    assert engine.stats.generated_tokens <= 5
    longer = engine.generate([make_chat(None, "hello")], GenerationSettings(max_new_tokens=10))[0]
    assert longer.startswith(short) and len(longer) > len(short)


def test_sampling_is_seeded_per_row_and_independent_of_batching(tiny_llama, tiny_tokenizer):
    settings = GenerationSettings(max_new_tokens=10, temperature=1.0, seed=7)
    chats = [make_chat(SYSTEMS[0], "write a prompt")] * 3 + [make_chat(SYSTEMS[1], "another")]
    one = HFEngine(tiny_llama, tiny_tokenizer, "tiny", batch_size=1, progress=False).generate(chats, settings)
    many = HFEngine(tiny_llama, tiny_tokenizer, "tiny", batch_size=4, progress=False).generate(
        chats, settings
    )
    assert one == many
    assert len(set(one[:3])) > 1  # identical chats in one call get different samples
    reseeded = HFEngine(tiny_llama, tiny_tokenizer, "tiny", progress=False).generate(
        chats, GenerationSettings(max_new_tokens=10, temperature=1.0, seed=8)
    )
    assert reseeded != one


def test_top_p_keeps_samples_within_the_nucleus(tiny_llama, tiny_tokenizer):
    # With a tiny nucleus, sampling degenerates to greedy decoding.
    greedy = HFEngine(tiny_llama, tiny_tokenizer, "tiny", progress=False).generate(
        [make_chat(None, "abc")], GenerationSettings(max_new_tokens=8)
    )
    nucleus = HFEngine(tiny_llama, tiny_tokenizer, "tiny", progress=False).generate(
        [make_chat(None, "abc")], GenerationSettings(max_new_tokens=8, temperature=1.0, top_p=1e-6)
    )
    assert nucleus == greedy


def test_out_of_memory_halves_the_batch_and_keeps_results(tiny_llama, tiny_tokenizer, monkeypatch):
    chats = [make_chat(SYSTEMS[0], q) for q in QUESTIONS]
    settings = GenerationSettings(max_new_tokens=6)
    want = HFEngine(tiny_llama, tiny_tokenizer, "tiny", batch_size=8, progress=False).generate(chats, settings)
    engine = HFEngine(tiny_llama, tiny_tokenizer, "tiny", batch_size=8, progress=False)
    real_chunk = engine._generate_chunk

    def small_memory(chunk, *args):
        if len(chunk) > 2:  # pretend that more than two rows do not fit on the GPU
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_chunk(chunk, *args)

    monkeypatch.setattr(engine, "_generate_chunk", small_memory)
    assert engine.generate(chats, settings) == want
    assert engine.batch_size == 2 and engine.stats.oom_retries >= 2


def test_cpu_linears_run_on_packed_weights_only_inside_engine_calls(tiny_llama, tiny_tokenizer):
    from metaspo_hf.models.packed import packed_linear_weights

    packed = packed_linear_weights(tiny_llama)
    if not packed:
        pytest.skip("this torch build has no usable oneDNN packed linear kernel")
    linears = [m for m in tiny_llama.modules() if type(m) is torch.nn.Linear]
    assert set(packed) == set(linears)
    shadowed = []
    hook = linears[0].register_forward_pre_hook(lambda m, args: shadowed.append("forward" in vars(m)))
    chats = [make_chat(SYSTEMS[0], q) for q in QUESTIONS]
    settings = GenerationSettings(max_new_tokens=6)
    with_packing = HFEngine(tiny_llama, tiny_tokenizer, "tiny", batch_size=4, progress=False).generate(chats, settings)
    hook.remove()
    assert shadowed and all(shadowed)  # every layer call inside the engine used the packed weight
    assert not any("forward" in vars(m) for m in linears)  # and the model is left as it was
    without = HFEngine(tiny_llama, tiny_tokenizer, "tiny", batch_size=4, progress=False, packed_linears=False)
    assert without.packed == {}
    assert with_packing == without.generate(chats, settings)


@pytest.mark.parametrize("quantization", ["int8-torchao", "int8-bnb"])
def test_the_engine_packs_the_float_linears_of_a_quantized_model_and_not_the_quantized_ones(tiny_tokenizer,
                                                                                             quantization):
    from tiny import tiny_model

    from metaspo_hf.models.packed import packed_linear_weights
    from metaspo_hf.models.quantized import INT8_LIBRARIES, quantize_int8

    pytest.importorskip(INT8_LIBRARIES[quantization])
    model = tiny_model(tiny_tokenizer, seed=2)  # a fresh model: packing is remembered per model
    if not packed_linear_weights(model):
        pytest.skip("this torch build has no usable oneDNN packed linear kernel")
    quantized = tiny_model(tiny_tokenizer, seed=2)
    quantize_int8(quantized, quantization)
    engine = HFEngine(quantized, tiny_tokenizer, "tiny", progress=False)
    assert list(engine.packed) == [quantized.lm_head]  # the one float linear layer left
    settings = GenerationSettings(max_new_tokens=4)
    assert all(len(ids) == 4 for ids in engine.generate_ids([make_chat(SYSTEMS[0], q) for q in QUESTIONS[:3]],
                                                            settings))


def test_packing_is_skipped_where_the_copy_would_not_fit_in_free_memory(tiny_tokenizer, monkeypatch):
    from tiny import tiny_model

    from metaspo_hf.models import packed as packed_module
    from metaspo_hf.models.packed import packed_linear_weights

    model = tiny_model(tiny_tokenizer, seed=1)  # a fresh model: packing is remembered per model
    linear_bytes = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                       if isinstance(m, torch.nn.Linear))
    free = SimpleNamespace(available=2 * linear_bytes - 2)  # half of it is one byte short of the copy
    monkeypatch.setattr(packed_module.psutil, "virtual_memory", lambda: free)
    assert HFEngine(model, tiny_tokenizer, "tiny", progress=False).packed == {}
    free.available += 2  # half of it now holds the copy exactly
    fresh = tiny_model(tiny_tokenizer, seed=1)
    if not packed_linear_weights(fresh):
        pytest.skip("this torch build has no usable oneDNN packed linear kernel")
    assert set(packed_linear_weights(fresh)) == {m for m in fresh.modules() if isinstance(m, torch.nn.Linear)}
