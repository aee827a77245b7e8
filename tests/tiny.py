"""Tiny random-weight models and a tokenizer built in-process: no downloads, milliseconds to create."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|pad|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Training on the project's own meta-prompts keeps rendered prompts short (fast tests).
    templates = Path(__file__).resolve().parent.parent / "metaspo_hf" / "search" / "templates"
    corpus = [string.printable * 3, "the answer is <answer>A</answer> system user assistant question " * 20,
              *(path.read_text() for path in sorted(templates.glob("*.txt")))]
    trainer = trainers.BpeTrainer(
        vocab_size=1500, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>", chat_template=CHATML
    )


def tiny_model(tokenizer, arch: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def tiny_llama_with_head_dim(tokenizer, head_dim: int, dtype=torch.float32, arch: str = "llama"):
    """A tiny random llama (or another ``arch`` of the same shape) with two ``head_dim``-dimensional query heads
    on one key head (the CPU decode-attention kernel is built for 64 and 128; ``tiny_model``'s heads have 16)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    # Mistral's default sliding window would turn prefix reuse off (engine._cache_is_plain).
    extra = {"sliding_window": None} if arch == "mistral" else {}
    config = config_class(vocab_size=len(tokenizer), hidden_size=2 * head_dim, intermediate_size=4 * head_dim,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim,
                          max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
