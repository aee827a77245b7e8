"""W1, W3 and W4 on llama-cpp-python, run by ``llama_cpp.py`` inside its own virtual environment.

Standalone on purpose (only ``llama_cpp`` and ``numpy`` are importable there): reads a JSON job
``{"gguf", "prompts" (token ids), "new_tokens", "threads", "suppress" (token ids never picked), "repeats",
"paths" (which of the paths below to run)}`` from the file named by argv[1] and writes ``{"version", "paths": {name: {...}}}`` to argv[2]; each path
has ``runs``, one ``{"wall_s", "prefill_s", "ids" (per prompt)}`` per timed run after a warm-up, or
``failed`` with the error.

- ``high_level``: ``Llama.generate`` one prompt after another, greedy; its own prefix matching
  keeps the KV of the tokens shared with the previous prompt (the system prompt).
- ``batched_unified`` / ``batched_split``: the low-level API with one sequence per prompt; the shared
  prefix is decoded once and copied to every sequence (``llama_memory_seq_cp``), the suffixes are
  prefilled in one batch, then every decode step takes one token of every sequence. In a unified KV
  cache the copied cells are shared; in a split one each sequence has its own stream.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time

import llama_cpp
import numpy as np


def high_level(llm, job: dict) -> dict:
    suppress = job["suppress"]

    def no_eos(_ids, logits):
        logits[suppress] = -np.inf
        return logits

    processors = llama_cpp.LogitsProcessorList([no_eos])

    def run(prompt, count):
        tokens, first_at = [], None
        for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, logits_processor=processors):
            if first_at is None:
                first_at = time.perf_counter()
            tokens.append(int(token))
            if len(tokens) == count:
                return tokens, first_at

    def timed_run() -> dict:
        llm.reset()  # every timed run starts with an empty cache, like the other variants
        started, prefill, ids = time.perf_counter(), 0.0, []
        for prompt in job["prompts"]:
            begun = time.perf_counter()
            tokens, first_at = run(prompt, job["new_tokens"])
            prefill += first_at - begun
            ids.append(tokens)
        return {"wall_s": time.perf_counter() - started, "prefill_s": prefill, "ids": ids}

    run(job["prompts"][0], 2)  # warm-up
    return {"runs": [timed_run() for _ in range(job["repeats"])]}


class Batch:
    """A reusable llama_batch; ``add`` appends one token of one sequence."""

    def __init__(self, capacity: int):
        self.raw = llama_cpp.llama_batch_init(capacity, 0, 1)
        self.capacity = capacity

    def clear(self):
        self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, logits: bool):
        i = self.raw.n_tokens
        self.raw.token[i], self.raw.pos[i] = token, pos
        self.raw.n_seq_id[i] = 1
        self.raw.seq_id[i][0] = seq
        self.raw.logits[i] = logits
        self.raw.n_tokens = i + 1

    def free(self):
        llama_cpp.llama_batch_free(self.raw)


def batched(llm, job: dict, unified: bool) -> dict:
    prompts, count = job["prompts"], job["new_tokens"]
    shared = _common_prefix_len(prompts)
    shared = min([shared] + [len(p) - 1 for p in prompts])  # every sequence needs a token of its own
    suffix_tokens = sum(len(p) - shared for p in prompts)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = shared + suffix_tokens + len(prompts) * count + 64
    params.n_batch = params.n_ubatch = max(512, suffix_tokens)
    params.n_seq_max = len(prompts)
    # Unified: one cell pool, where the copied prefix cells are shared by all sequences (but every token's
    # attention spans the whole pool); split: one stream per sequence, the prefix copied into each.
    params.kv_unified = unified
    params.n_threads = params.n_threads_batch = job["threads"]
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm.model))
    batch = Batch(max(shared, suffix_tokens, len(prompts)))
    memory = llama_cpp.llama_get_memory(ctx)

    def logits_of(index: int) -> np.ndarray:
        pointer = llama_cpp.llama_get_logits_ith(ctx, index)
        return np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))

    def pick(index: int) -> int:
        logits = logits_of(index).copy()
        logits[job["suppress"]] = -np.inf
        return int(logits.argmax())

    def decode():
        if llama_cpp.llama_decode(ctx, batch.raw) != 0:
            raise RuntimeError("llama_decode failed")

    def run(count_now: int) -> tuple[list[list[int]], float]:
        llama_cpp.llama_memory_clear(memory, True)
        batch.clear()
        for pos in range(shared):
            batch.add(prompts[0][pos], pos, 0, False)
        decode()
        for seq in range(1, len(prompts)):
            llama_cpp.llama_memory_seq_cp(memory, 0, seq, -1, -1)
        batch.clear()
        last = []
        for seq, prompt in enumerate(prompts):
            for pos in range(shared, len(prompt)):
                batch.add(prompt[pos], pos, seq, pos == len(prompt) - 1)
            last.append(batch.raw.n_tokens - 1)
        decode()
        ids = [[pick(index)] for index in last]
        prefilled_at = time.perf_counter()
        for step in range(1, count_now):
            batch.clear()
            for seq, prompt in enumerate(prompts):
                batch.add(ids[seq][-1], len(prompt) + step - 1, seq, True)
            decode()
            for seq in range(len(prompts)):
                ids[seq].append(pick(seq))
        return ids, prefilled_at

    def timed_run() -> dict:
        started = time.perf_counter()
        ids, prefilled_at = run(count)
        return {"wall_s": time.perf_counter() - started, "prefill_s": prefilled_at - started, "ids": ids}

    try:
        run(2)  # warm-up
        return {"runs": [timed_run() for _ in range(job["repeats"])]}
    finally:
        batch.free()
        llama_cpp.llama_free(ctx)


def _common_prefix_len(sequences):
    length = min(map(len, sequences))
    for i in range(length):
        if any(s[i] != sequences[0][i] for s in sequences):
            return i
    return length


def main(job_path: str, out_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    context = max(map(len, job["prompts"])) + job["new_tokens"] + 16
    llm = llama_cpp.Llama(job["gguf"], n_ctx=context, n_batch=512, n_threads=job["threads"],
                          n_threads_batch=job["threads"], verbose=False)
    paths = {"high_level": lambda: high_level(llm, job),
             "batched_unified": lambda: batched(llm, job, unified=True),
             "batched_split": lambda: batched(llm, job, unified=False)}
    results = {"version": llama_cpp.__version__, "paths": {}}
    for name in job["paths"]:
        run = paths[name]
        try:
            results["paths"][name] = run()
        except Exception as error:  # one path failing (e.g. an API this build lacks) leaves the others
            results["paths"][name] = {"failed": f"{type(error).__name__}: {error}"}
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
