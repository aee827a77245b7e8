import os

import pytest
import torch

# Two cores: more threads only add contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tiny import tiny_tokenizer as build

    return build()


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer):
    from tiny import tiny_model

    return tiny_model(tiny_tokenizer, "llama")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer, tiny_llama):
    """The tiny random model and its tokenizer saved as a local model folder."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Each test writes caches under a temporary folder, except converted models, which are shared
    across tests (and runs) because converting the embedded GGUF takes ~20 s."""
    monkeypatch.setenv("METASPO_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, loaded once per test session."""
    from metaspo_hf.models.loading import ModelSpec, load_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return load_model(ModelSpec(name_or_path="smollm2-135m-instruct", dtype="float32"))
