"""Model sources, role sharing, GGUF conversion cache, and the embedded default model."""

import sys
import time

import pytest
import torch

from metaspo_hf.errors import MetaspoError
from metaspo_hf.models import loading
from metaspo_hf.models.base import GenerationSettings, make_chat
from metaspo_hf.models.loading import ModelSpec, load_engines, resolve_source


def test_sources_are_recognised(tmp_path, tiny_model_dir):
    assert resolve_source(ModelSpec(name_or_path="smollm2-135m-instruct")).kind == "packaged"
    assert resolve_source(ModelSpec(name_or_path=str(tiny_model_dir))).kind == "folder"
    assert resolve_source(ModelSpec(name_or_path="Qwen/Qwen2.5-7B-Instruct")).kind == "hub"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    source = resolve_source(ModelSpec(name_or_path=str(gguf)))
    assert (source.kind, source.gguf_file) == ("gguf", "m.gguf")


@pytest.mark.parametrize("name", ["./missing-folder", "/nowhere/model.gguf", "missing.gguf"])
def test_missing_local_model_is_a_clear_error(name):
    with pytest.raises(MetaspoError, match="not found"):
        resolve_source(ModelSpec(name_or_path=name))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_quantization_without_cuda_is_refused(tiny_model_dir):
    with pytest.raises(MetaspoError, match="needs a CUDA GPU"):
        loading.load_model(ModelSpec(name_or_path=str(tiny_model_dir), quantization="4bit"))


def test_int8_torchao_quantizes_on_cpu_through_the_recipes_model_section(tiny_model_dir):
    pytest.importorskip("torchao")
    spec = ModelSpec(name_or_path=str(tiny_model_dir), quantization="int8-torchao", dtype="bfloat16")
    base, _ = load_engines(spec, None, progress=False)
    layers = {name: type(m.weight).__name__ for name, m in base.model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert layers.pop("lm_head") == "Parameter" and set(layers.values()) == {"Int8Tensor"}
    assert list(base.packed) in ([], [base.model.lm_head])  # never a quantized layer
    texts = base.generate([make_chat("Be brief.", "hi")], GenerationSettings(max_new_tokens=3))
    assert len(texts) == 1


def test_int8_quantization_without_its_library_is_a_clear_error(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(MetaspoError, match="int8-bnb.* needs bitsandbytes") as raised:
        loading.load_model(ModelSpec(name_or_path=str(tiny_model_dir), quantization="int8-bnb"))
    assert raised.value.hint.startswith('pip install --no-deps "bitsandbytes==')


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's bfloat16 units decide")
@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_if_native_follows_the_cpus_bfloat16_units_and_plain_bfloat16_warns_without_them(
        tiny_model_dir, monkeypatch, capsys, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    model, _ = loading.load_model(ModelSpec(name_or_path=str(tiny_model_dir), dtype="bfloat16-if-native"))
    assert model.dtype == (torch.bfloat16 if native else torch.float32)
    assert "bfloat16-if-native" not in capsys.readouterr().err
    model, _ = loading.load_model(ModelSpec(name_or_path=str(tiny_model_dir), dtype="bfloat16"))
    assert model.dtype == torch.bfloat16, "an explicit bfloat16 is kept"
    warned = "without bfloat16 arithmetic" in capsys.readouterr().err
    assert warned == (not native)


def test_roles_share_one_model_when_the_recipe_names_the_same(tiny_model_dir):
    spec = ModelSpec(name_or_path=str(tiny_model_dir))
    base, optimizer = load_engines(spec, None, progress=False)
    assert base is optimizer
    base, optimizer = load_engines(spec, ModelSpec(name_or_path=str(tiny_model_dir)), progress=False)
    assert base is optimizer
    base, optimizer = load_engines(
        spec, ModelSpec(name_or_path=str(tiny_model_dir), dtype="bfloat16"), progress=False
    )
    assert base is not optimizer


def test_offline_hub_miss_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MetaspoError, match="could not load model"):
        loading.load_model(ModelSpec(name_or_path="nobody/no-such-model-xyz"))


@pytest.mark.smollm
def test_packaged_default_loads_offline_generates_and_caches_the_conversion(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ModelSpec(name_or_path="smollm2-135m-instruct", dtype="float32")
    conversions = []
    real_convert = loading._converted_gguf

    def spy(source, spec):
        conversions.append(source)
        return real_convert(source, spec)

    monkeypatch.setattr(loading, "_converted_gguf", spy)
    started = time.perf_counter()
    first, _ = load_engines(spec, None, progress=False)
    first_seconds = time.perf_counter() - started
    started = time.perf_counter()
    second, _ = load_engines(spec, None, progress=False)
    second_seconds = time.perf_counter() - started
    print(f"first load {first_seconds:.1f}s, second load {second_seconds:.1f}s")
    folders = {str(real_convert(s, spec)) for s in conversions}
    assert len(folders) == 1  # the second load found the converted copy in the cache
    answer = second.generate(
        [make_chat("You are a helpful assistant.", "What is the capital of France?")],
        GenerationSettings(max_new_tokens=16),
    )[0]
    assert "Paris" in answer
