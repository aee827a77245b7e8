"""One-off: W4 on the 1.5B model loaded in bfloat16, batched generate against the engine, interleaved rounds."""
import json
import sys

import torch

from metaspo_hf.bench import w1, w4
from metaspo_hf.models.base import GenerationSettings
from metaspo_hf.models.loading import ModelSpec, load_model

torch.set_num_threads(2)
model, tokenizer = load_model(ModelSpec(name_or_path="qwen2.5-coder-1.5b-instruct", dtype="bfloat16"))
workload = w4.W4
chats = workload.build()
prompts = w1.prompt_ids(tokenizer, chats)
engine = w1._warm_engine(model, tokenizer, chats)
eos = engine.eos_ids
w1.hf_generate(model, tokenizer, prompts[:2], 2, eos)
settings = GenerationSettings(max_new_tokens=workload.new_tokens)
contenders = {"batched_bf16": w1.Contender(model, lambda: w1.hf_generate(model, tokenizer, prompts, workload.new_tokens, eos)),
              "engine_bf16": w1._engine_contender(engine, chats, settings)}
runs = w1.interleaved(contenders, 3)
out = {name: r.as_dict() for name, r in runs.items()}
out["engine_bf16_over_batched_bf16"] = round(out["engine_bf16"]["tok_s"] / out["batched_bf16"]["tok_s"], 2)
out["identity"] = w1.identity(runs["engine_bf16"].ids, runs["batched_bf16"].ids)
out["model_dtype"] = str(model.dtype)
json.dump(out, open(sys.argv[1], "w"), indent=2)
print(json.dumps(out, indent=1))
