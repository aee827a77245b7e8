"""Workload W1: one scoring batch, generated several ways on the same prompts, timed and compared.

32 chats share one ~150-token system prompt and each ask a distinct ~30-token question; every
variant generates exactly ``new_tokens`` tokens per chat (EOS suppressed), greedily:

- ``naive``: transformers ``generate`` one chat at a time;
- ``batched``: transformers ``generate`` on all chats at once, left-padded;
- ``engine``: our ``HFEngine`` (shared-prefix KV, our own decode loop);
- ``batched_bf16``: transformers ``generate`` on a bfloat16 copy of the model, all chats at once: the
  baseline at the dtype the CPU recipes load where the CPU multiplies bfloat16;
- ``engine_bf16``: the engine on that bfloat16 copy;
- ``engine_bf16_torch_attention``: the same without the C++ decode-attention kernel (``models/decode_kernel.py``)
  and so without the fused decode step built on it (``models/decode_step.py``), its decode steps on the model's
  forward pass and torch's ops: their gain, side by side (skipped where the kernel does not apply);
- ``engine_int8_torchao``, ``engine_int8_bnb``: the engine on a bfloat16 copy whose linear layers (but the
  output projection) hold int8 weights, by torchao or bitsandbytes (``models/quantized.py``); each is
  reported as skipped, with the reason, where its library is missing or fails;
- ``llama_cpp_<format>``: llama-cpp-python (see ``llama_cpp.py``) on a GGUF file of the same weights in one
  format (F32, F16, BF16, Q8_0, Q4_0: ``gguf.py``; and the packaged file), the best of its paths;
- ``llama_cpp``: the fastest of those.

W3 (``W3``) is the same chats with 256 new tokens each: decode-heavy. W4 (``w4.py``) runs the same
harness on long optimizer-shaped requests.

Each variant is timed ``repeats`` times after a warm-up and reported by its medians, with the
fastest and slowest wall time (``Runs``); the transformers variants are timed round by round, one run
of each per round, so that the machine's drift reaches all of them alike (``interleaved``; all their
model copies are held at once). Prefill seconds are the wall time of the forward passes
that take more than one token per row (measured with forward hooks, so every variant is split the
same way); decode is the rest.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from typing import ClassVar

import torch
from transformers import GenerationConfig

from ..errors import MetaspoError
from ..models.base import Chat, GenerationSettings, make_chat
from ..models.engine import HFEngine
from ..models.prefix import common_prefix_len
from ..models.quantized import quantize_int8
from .matmul import dtype_name

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
    system_prompt: ClassVar[str] = SYSTEM_PROMPT

    def build(self) -> list[Chat]:
        return [make_chat(self.system_prompt, q) for q in questions(self.chats)]


QUICK = Workload(chats=8, new_tokens=12)
# W3, decode-heavy: W1's chats, 256 new tokens each (the length of an optimizer reply).
W3 = Workload(new_tokens=256)
W3_QUICK = Workload(chats=4, new_tokens=24)


@dataclass
class Timing:
    wall_s: float
    prefill_s: float
    tokens: int

    @property
    def decode_s(self) -> float:
        return self.wall_s - self.prefill_s


@dataclass
class Runs:
    """One variant timed several times on the same prompts."""

    timings: list[Timing]
    ids: list[list[int]]  # the first run's
    ids_stable: bool  # every run generated exactly these ids
    settings: dict | None = None  # an engine variant's dtype, packed linears, threads (and quantization)

    @classmethod
    def of(cls, results: list[tuple[list[list[int]], Timing]], settings: dict | None = None) -> Runs:
        """From (ids, timing) per run."""
        first = results[0][0]
        return cls([timing for _, timing in results], first, all(ids == first for ids, _ in results), settings)

    def as_dict(self) -> dict:
        """Medians (wall, prefill and decode each its own), with the range of wall times. tok/s is
        from the median wall time, so ratios of tok/s are ratios of medians."""
        walls = [t.wall_s for t in self.timings]
        wall = statistics.median(walls)
        tokens = self.timings[0].tokens
        figures = {"tok_s": round(tokens / wall, 2), "wall_s": round(wall, 3),
                   "wall_s_min": round(min(walls), 3), "wall_s_max": round(max(walls), 3),
                   "prefill_s": round(statistics.median(t.prefill_s for t in self.timings), 3),
                   "decode_s": round(statistics.median(t.decode_s for t in self.timings), 3),
                   "new_tokens": tokens, "runs": len(self.timings), "ids_stable_across_runs": self.ids_stable}
        return {**figures, "settings": self.settings} if self.settings else figures


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


def timed(model, run: Callable[[], list[list[int]]]) -> tuple[list[list[int]], Timing]:
    """Runs ``run()`` (which returns token ids per chat) and times it, prefill separately."""
    with prefill_clock(model) as prefill:
        started = time.perf_counter()
        ids = run()
        wall = time.perf_counter() - started
    return ids, Timing(wall, prefill[0], sum(map(len, ids)))


def repeated(model, name: str, run: Callable[[], list[list[int]]], times: int, settings: dict | None = None) -> Runs:
    """``run`` timed ``times`` times as variant ``name``; its median is printed as it is known (a full
    benchmark runs for over an hour)."""
    runs = Runs.of([timed(model, run) for _ in range(times)], settings)
    print(f"[bench]   {name}: median {statistics.median(t.wall_s for t in runs.timings):.2f} s over {times} run(s)",
          file=sys.stderr, flush=True)
    return runs


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


@dataclass
class HFRuns:
    """What ``run_hf_variants`` measured, and the prompts as every variant saw them."""

    variants: dict[str, Runs | str]  # a str: why that variant could not run (an int8 one only)
    prompts: list[list[int]]
    eos_ids: list[int]


# The int8 variants: model.quantization of each (models/quantized.py).
INT8_VARIANTS = {"engine_int8_torchao": "int8-torchao", "engine_int8_bnb": "int8-bnb"}
# Their activations (and their float layers): bfloat16, where torchao's CPU kernel runs fastest (it converts the
# int8 weights to the activation dtype and multiplies in it: AMX for bfloat16).
INT8_ACTIVATIONS = torch.bfloat16
# Variants on a converted copy of the float32 model: their tokens are compared with batched generate's.
COPY_VARIANTS = ("batched_bf16", "engine_bf16", "engine_bf16_torch_attention", *INT8_VARIANTS)


def run_hf_variants(model, tokenizer, workload: Workload, repeats: int = 1, naive_runs: int = 0,
                    bf16: bool = False, int8: bool = False,
                    beside: Callable[[list[list[int]], list[int], list[torch.nn.Module]], None] | None = None
                    ) -> HFRuns:
    """Times batched ``generate`` and the engine ``repeats`` times each; ``naive`` only ``naive_runs``
    times (0: not at all), since one run of it takes about five times as long as batched ``generate``;
    with ``bf16``, also batched ``generate`` and the engine on a bfloat16 copy of the model; with ``int8``, the ``INT8_VARIANTS``
    (each one that cannot run as the reason why). The timed runs go round by round, one of each variant
    per round (``interleaved``); ``beside(prompts, eos_ids, models)`` is called after each round (the llama.cpp
    variants' rounds, and the matmul limit's on the variants' distinct ``models``)."""
    chats = workload.build()
    prompts = prompt_ids(tokenizer, chats)
    settings = GenerationSettings(max_new_tokens=workload.new_tokens)
    engine = _warm_engine(model, tokenizer, chats)
    eos_ids, n = engine.eos_ids, workload.new_tokens

    def batched(on=model):
        return hf_generate(on, tokenizer, prompts, n, eos_ids)

    def one_by_one():
        return [hf_generate(model, tokenizer, [p], n, eos_ids)[0] for p in prompts]

    hf_generate(model, tokenizer, prompts[:2], 2, eos_ids)  # warm-up, as in _warm_engine
    skipped: dict[str, str] = {}
    contenders = {"batched": Contender(model, batched),
                  "engine": _engine_contender(engine, chats, settings)}
    if bf16:
        converted = copy.deepcopy(model).to(torch.bfloat16)
        hf_generate(converted, tokenizer, prompts[:2], 2, eos_ids)
        contenders["batched_bf16"] = Contender(converted, partial(batched, converted))
        contenders["engine_bf16"] = _engine_contender(_warm_engine(converted, tokenizer, chats), chats, settings)
        if contenders["engine_bf16"].settings["attention_kernel"]:
            # The same bfloat16 copy: the two differ only in their decode steps.
            contenders["engine_bf16_torch_attention"] = _engine_contender(
                _warm_engine(converted, tokenizer, chats, attention_kernel=False), chats, settings)
        else:
            skipped["engine_bf16_torch_attention"] = ("engine_bf16 decodes on torch's attention too (the "
                                                      "decode-attention kernel does not apply here)")
    for name, quantization in INT8_VARIANTS.items() if int8 else ():
        try:
            converted = copy.deepcopy(model)
            recorded = _quantized(converted, quantization)
            contender = _engine_contender(_warm_engine(converted, tokenizer, chats), chats, settings)
            contenders[name] = Contender(converted, contender.run, {**contender.settings, **recorded})
        except Exception as error:  # a missing library, or one that fails on this machine: never the benchmark
            skipped[name] = _why(error)
    variants: dict[str, Runs | str] = {"naive": repeated(model, "naive", one_by_one, naive_runs)} if naive_runs else {}
    models = list(dict.fromkeys(contender.model for contender in contenders.values()))
    after_round = partial(beside, prompts, sorted(eos_ids), models) if beside else None
    ran = {**interleaved(contenders, repeats, after_round), **skipped}
    # One order whichever ran: a skipped variant keeps its place in the table and the JSON.
    variants.update({name: ran[name] for name in ("batched", "engine", *COPY_VARIANTS) if name in ran})
    return HFRuns(variants, prompts, sorted(eos_ids))


@dataclass
class Contender:
    """One timed variant: the model its forward hooks split prefill on, what one run calls, what to record."""

    model: torch.nn.Module
    run: Callable[[], list[list[int]]]
    settings: dict | None = None


def _engine_contender(engine: HFEngine, chats: list[Chat], settings: GenerationSettings) -> Contender:
    return Contender(engine.model, lambda: engine.generate_ids(chats, settings), engine_settings(engine))


def interleaved(contenders: dict[str, Contender], repeats: int,
                after_round: Callable[[], None] | None = None) -> dict[str, Runs]:
    """Each contender timed ``repeats`` times, round by round (one run of each per round, in order, then
    ``after_round()``): this machine's speed drifts by tens of percent within minutes, and variants timed one
    after another would carry that drift into their ratios; interleaved, every variant sees the same drift."""
    results: dict[str, list] = {name: [] for name in contenders}
    for round_number in range(1, repeats + 1):
        for name, contender in contenders.items():
            results[name].append(timed(contender.model, contender.run))
            print(f"[bench]   round {round_number}/{repeats} {name}: {results[name][-1][1].wall_s:.2f} s",
                  file=sys.stderr, flush=True)
        if after_round:
            after_round()
    return {name: Runs.of(results[name], contenders[name].settings) for name in contenders}


def _why(error: Exception) -> str:
    """One line: a missing library's message with its install hint, else the error's type and first line (a
    native library's message can run for pages)."""
    if isinstance(error, MetaspoError):
        return error.one_line()
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _quantized(model, quantization: str) -> dict:
    model.to(INT8_ACTIVATIONS)
    return quantize_int8(model, quantization)


def _warm_engine(model, tokenizer, chats: list[Chat], attention_kernel: bool = True) -> HFEngine:
    """An engine for one batch of ``chats``, after one small call: the first forward pass of a process
    (and the engine's first call: weight packing) pays one-off costs."""
    engine = HFEngine(model, tokenizer, "bench", batch_size=len(chats), progress=False, suppress_eos=True,
                      attention_kernel=attention_kernel)
    engine.generate_ids(chats[:2], GenerationSettings(max_new_tokens=2))
    return engine


def engine_settings(engine: HFEngine) -> dict:
    return {"dtype": dtype_name(engine.model.dtype), "packed_linears": bool(engine.packed),
            "attention_kernel": engine.kernel is not None, "threads": torch.get_num_threads()}


def identity(ids: list[list[int]], reference: list[list[int]]) -> dict:
    """Whether two generations are token-identical, and where the first difference of each row is."""
    pairs = list(zip(ids, reference, strict=True))
    first = [common_prefix_len([a, b]) for a, b in pairs if a != b]
    return {"identical": not first, "rows_equal": len(pairs) - len(first), "rows": len(pairs),
            "first_difference": first}


def workload_info(workload: Workload, tokenizer, prompts: list[list[int]]) -> dict:
    shared_prefix = common_prefix_len(prompts)
    mean = sum(map(len, prompts)) / len(prompts)
    system_tokens = len(tokenizer(workload.system_prompt, add_special_tokens=False)["input_ids"])
    return {**asdict(workload), "dtype": "float32", "device": "cpu", "greedy": True, "eos_suppressed": True,
            "system_prompt_tokens": system_tokens, "shared_prefix_tokens": shared_prefix,
            "prompt_tokens_mean": round(mean, 1), "suffix_tokens_mean": round(mean - shared_prefix, 1)}
