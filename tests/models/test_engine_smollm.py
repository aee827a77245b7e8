"""The engine on the embedded SmolLM2: token-identical to plain batched generate on a real model."""

import pytest
from test_engine import plain_generate

from metaspo_hf.models.base import GenerationSettings, make_chat
from metaspo_hf.models.engine import HFEngine

pytestmark = pytest.mark.smollm

SYSTEM = ("You are a careful assistant. Read the question, think briefly, and give the final answer "
          "inside <answer></answer> tags. Keep the explanation to one sentence.")


def test_prefix_reuse_is_token_identical_on_smollm2(smollm):
    model, tokenizer = smollm
    # 20 chats of clearly different lengths under two system prompts, batched together.
    systems = [SYSTEM, "You are a concise math tutor."]
    chats = [
        make_chat(systems[i % 2], f"Question {i}: what is {i} + {2 * i}?" + " Please explain the steps." * (i % 6))
        for i in range(20)
    ]
    engine = HFEngine(model, tokenizer, "smollm2", batch_size=8, progress=False)
    got = engine.generate(chats, GenerationSettings(max_new_tokens=24))
    assert got == plain_generate(model, tokenizer, chats, 24)
    assert len({len(c[1]["content"]) for c in chats}) >= 6


def test_stop_string_cuts_generation_on_smollm2(smollm):
    model, tokenizer = smollm
    engine = HFEngine(model, tokenizer, "smollm2", progress=False)
    chat = [make_chat(SYSTEM, "Name three colors and explain why the sky is blue.")]
    full = engine.generate(chat, GenerationSettings(max_new_tokens=40))[0]
    stop = full.split()[2]  # a word from the middle of the answer
    stopped = engine.generate(chat, GenerationSettings(max_new_tokens=40, stop=(stop,)))[0]
    assert stopped == full[: full.index(stop) + len(stop)]
