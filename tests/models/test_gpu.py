"""CUDA only (`make test-gpu`): the engine against plain `generate` on the GPU, bitsandbytes 4/8-bit loading,
the out-of-memory halving on a real allocation failure, and `device_map: auto`. Skipped without CUDA."""

import gc

import pytest
import torch
from test_engine import QUESTIONS, SYSTEMS, plain_generate

from metaspo_hf.models.base import GenerationSettings, make_chat
from metaspo_hf.models.engine import HFEngine
from metaspo_hf.models.loading import ModelSpec, load_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU on this machine")]


def chats(count: int = 8) -> list:
    return [make_chat(SYSTEMS[i % 2], QUESTIONS[i % len(QUESTIONS)]) for i in range(count)]


def test_engine_is_token_identical_to_plain_generate_on_cuda(tiny_model_dir):
    model, tokenizer = load_model(ModelSpec(name_or_path=str(tiny_model_dir), dtype="float32"))
    assert model.device.type == "cuda"
    engine = HFEngine(model, tokenizer, "tiny", batch_size=3, progress=False)
    assert engine.prefix_reuse
    got = engine.generate(chats(), GenerationSettings(max_new_tokens=12))
    assert got == plain_generate(model, tokenizer, chats(), 12)


@pytest.mark.parametrize("quantization, layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_bitsandbytes_loading_quantizes_the_linear_layers(tiny_model_dir, quantization, layer):
    pytest.importorskip("bitsandbytes")
    model, tokenizer = load_model(ModelSpec(name_or_path=str(tiny_model_dir), quantization=quantization))
    assert {type(module).__name__ for module in model.modules()} >= {layer}
    assert next(model.parameters()).device.type == "cuda"
    engine = HFEngine(model, tokenizer, "tiny", batch_size=4, progress=False)
    answers = engine.generate(chats(4), GenerationSettings(max_new_tokens=6))
    assert len(answers) == 4 and engine.stats.generated_tokens > 0


def test_device_map_auto_places_the_model_on_the_gpu(tiny_model_dir):
    model, tokenizer = load_model(ModelSpec(name_or_path=str(tiny_model_dir), dtype="float32", device_map="auto"))
    assert {parameter.device.type for parameter in model.parameters()} == {"cuda"}
    # transformers sets hf_device_map only where the model spans several devices: then none may be the CPU.
    assert not {"cpu", "disk"} & set(getattr(model, "hf_device_map", {}).values())
    got = HFEngine(model, tokenizer, "tiny", progress=False).generate(chats(3), GenerationSettings(max_new_tokens=8))
    assert got == plain_generate(model, tokenizer, chats(3), 8)


def test_a_real_out_of_memory_error_halves_the_batch(tiny_model_dir):
    """Memory capped between what half a batch and a full batch need: the full one fails to allocate for
    real, and the engine finishes it in halves with the same answers."""
    model, tokenizer = load_model(ModelSpec(name_or_path=str(tiny_model_dir), dtype="float32"))
    model.config._attn_implementation = "eager"  # materializes the [rows, heads, queries, keys] scores
    long = [make_chat(None, " ".join(["count"] * 400) + f" {index}") for index in range(8)]
    settings = GenerationSettings(max_new_tokens=2)

    def engine(batch_size: int) -> HFEngine:
        # Without prefix reuse: the rows' long common prefix would be prefilled once, in our own attention,
        # and a full batch would take no more memory than half of one.
        return HFEngine(model, tokenizer, "tiny", batch_size=batch_size, prefix_reuse=False, progress=False)

    def settled() -> int:
        """Memory still allocated once the previous engine's tensors are freed (the baseline of a peak)."""
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak(batch_size: int) -> tuple[list, int]:
        base = settled()
        return engine(batch_size).generate(long, settings), torch.cuda.max_memory_allocated() - base

    want, full = peak(8)
    _, half = peak(4)
    assert full > half * 1.3, f"the test needs a full batch ({full} B) to take clearly more than half of one ({half} B)"
    base = settled()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((base + (half + full) / 2) / total)
    try:
        capped = engine(8)
        got = capped.generate(long, settings)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert capped.stats.oom_retries >= 1 and capped.batch_size <= 4
    assert got == want
