"""Workload W1: one scoring batch, generated four ways on the same prompts, timed and compared.

32 chats share one ~150-token system prompt and each ask a distinct ~30-token question; every
variant generates exactly ``new_tokens`` tokens per chat (EOS suppressed), greedily:

- ``naive``: transformers ``generate`` one chat at a time;
- ``batched``: transformers ``generate`` on all chats at once, left-padded;
- ``engine``: our ``HFEngine`` (shared-prefix KV, our own decode loop);
- ``llama_cpp``: llama-cpp-python on the same GGUF file (see ``llama_cpp.py``), the best of its paths.

Prefill seconds are the wall time of the forward passes that take more than one token per row
(measured with forward hooks, so every variant is split the same way); decode is the rest.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from transformers import GenerationConfig

from ..models.base import Chat, GenerationSettings, make_chat
from ..models.engine import HFEngine
from ..models.prefix import common_prefix_len

SYSTEM_PROMPT = (
    "You are a patient and precise assistant who helps people reason through everyday problems. "
    "Before answering, restate the quantities that matter, decide which operations connect them, and "
    "carry out each step in order without skipping any. Prefer whole numbers and simple fractions, "
    "keep units attached to every number, and check the result against common sense before you "
    "commit to it. If a question is ambiguous, choose the most natural reading and say which one you "
    "chose. Write in short plain sentences, avoid lists unless they make the steps clearer, and never "
    "invent facts that the question does not give. When a result is not a whole number, say how the "
    "remainder is handled. End with one line that states the final answer inside <answer></answer> "
    "tags, with nothing after the closing tag."
)

_NAMES = ["Maya", "Tomas", "Priya", "Jonah", "Elena", "Kwame", "Sofia", "Ravi"]
_ITEMS = [("apples", "basket"), ("pencils", "box"), ("stamps", "album"), ("marbles", "jar")]


def questions(count: int) -> list[str]:
    """``count`` distinct word problems of about 30 tokens each (names, items and numbers vary)."""
    out = []
    for i in range(count):
        name = _NAMES[i % len(_NAMES)]
        item, holder = _ITEMS[(i // len(_NAMES)) % len(_ITEMS)]
        start, added, shared = 3 + i, 2 + (i * 7) % 11, 2 + i % 3
        out.append(f"{name} keeps {start} {item} in a {holder} and buys {added} more. If {name} shares "
                   f"them equally among {shared} friends, how many does each friend get?")
    return out


@dataclass(frozen=True)
class Workload:
    # 32 rows: one engine batch, the size the search scores at once on CPU.
    chats: int = 32
    # 48 tokens: the embedded recipe's base max_new_tokens (a sentence of reasoning and the answer).
    new_tokens: int = 48
    # The development machines have 2 cores; more threads only add contention.
    threads: int = 2

    def build(self) -> list[Chat]:
        return [make_chat(SYSTEM_PROMPT, q) for q in questions(self.chats)]


QUICK = Workload(chats=8, new_tokens=12)


@dataclass
class Timing:
    wall_s: float
    prefill_s: float
    tokens: int

    @property
    def decode_s(self) -> float:
        return self.wall_s - self.prefill_s

    def as_dict(self) -> dict:
        return {"tok_s": round(self.tokens / self.wall_s, 2), "wall_s": round(self.wall_s, 3),
                "prefill_s": round(self.prefill_s, 3), "decode_s": round(self.decode_s, 3),
                "new_tokens": self.tokens}


@contextmanager
def prefill_clock(model):
    """Yields a list whose first item accumulates the seconds of multi-token forward passes."""
    spent = [0.0]
    starts: list[tuple[float, bool]] = []

    def before(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        starts.append((time.perf_counter(), ids is not None and ids.shape[-1] > 1))

    def after(module, args, kwargs, output):
        started, is_prefill = starts.pop()
        if is_prefill:
            spent[0] += time.perf_counter() - started

    handles = [model.register_forward_pre_hook(before, with_kwargs=True),
               model.register_forward_hook(after, with_kwargs=True)]
    try:
        yield spent
    finally:
        for handle in handles:
            handle.remove()


def timed(model, run) -> tuple[list[list[int]], Timing]:
    """Runs ``run()`` (which returns token ids per chat) and times it, prefill separately."""
    with prefill_clock(model) as prefill:
        started = time.perf_counter()
        ids = run()
        wall = time.perf_counter() - started
    return ids, Timing(wall, prefill[0], sum(map(len, ids)))


def prompt_ids(tokenizer, chats: list[Chat]) -> list[list[int]]:
    """The rendered chats as token ids, exactly as the engine and ``generate`` see them."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def hf_generate(model, tokenizer, prompts: list[list[int]], new_tokens: int, eos_ids: set[int]) -> list[list[int]]:
    """Plain transformers greedy ``generate`` on left-padded prompts; EOS suppressed for ``new_tokens``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    # A fresh config, so the checkpoint's sampling defaults neither apply nor warn.
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=sorted(eos_ids), pad_token_id=pad)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device),
                             generation_config=config)
    return [row[width:].tolist() for row in out]


def run_hf_variants(model, tokenizer, workload: Workload, naive: bool = True) -> dict:
    """(variant name -> {"timing": Timing, "ids": token ids}) for naive, batched and engine."""
    chats = workload.build()
    prompts = prompt_ids(tokenizer, chats)
    engine = HFEngine(model, tokenizer, "bench", batch_size=workload.chats, progress=False, suppress_eos=True)
    settings = GenerationSettings(max_new_tokens=workload.new_tokens)
    n = workload.new_tokens

    def batched():
        return hf_generate(model, tokenizer, prompts, n, engine.eos_ids)

    def one_by_one():
        return [hf_generate(model, tokenizer, [p], n, engine.eos_ids)[0] for p in prompts]

    def ours():
        return engine.generate_ids(chats, settings)

    # One small call each first: the first forward pass of a process pays one-off allocation costs.
    hf_generate(model, tokenizer, prompts[:2], 2, engine.eos_ids)
    engine.generate_ids(chats[:2], GenerationSettings(max_new_tokens=2))
    runs = {"batched": batched, "engine": ours}
    if naive:
        runs = {"naive": one_by_one, **runs}
    results = {}
    for name, run in runs.items():
        ids, timing = timed(model, run)
        results[name] = {"timing": timing, "ids": ids}
    results["eos_ids"] = sorted(engine.eos_ids)
    results["prompt_tokens"] = [len(p) for p in prompts]
    results["shared_prefix_tokens"] = common_prefix_len(prompts)
    return results


def identity(ids: list[list[int]], reference: list[list[int]]) -> dict:
    """Whether two generations are token-identical, and where the first difference of each row is."""
    pairs = list(zip(ids, reference, strict=True))
    first = [common_prefix_len([a, b]) for a, b in pairs if a != b]
    return {"identical": not first, "rows_equal": len(pairs) - len(first), "rows": len(pairs),
            "first_difference": first}


def workload_info(workload: Workload, prompt_tokens: list[int], shared_prefix: int, system_tokens: int) -> dict:
    return {**asdict(workload), "dtype": "float32", "device": "cpu", "greedy": True, "eos_suppressed": True,
            "system_prompt_tokens": system_tokens, "shared_prefix_tokens": shared_prefix,
            "prompt_tokens_mean": round(sum(prompt_tokens) / len(prompt_tokens), 1),
            "suffix_tokens_mean": round(sum(prompt_tokens) / len(prompt_tokens) - shared_prefix, 1)}
