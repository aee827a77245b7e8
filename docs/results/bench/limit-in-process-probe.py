"""One-off: the matmul limit on SmolLM2's own weights (32 rows), timed in one process after each thing the bench
does between rounds (the engines, batched generate, a llama.cpp round, idle time), to find what slows it in the
bench; none of them did (docs/benchmarks.md, W4 on the AMX Xeon). Run from the repository root after `make bench`'s
set-up (the Q4_0 file in the benchmark's cache)."""
import copy, json, sys, time
import torch
from metaspo_hf.bench import matmul, w1
from metaspo_hf.models.loading import ModelSpec, load_model
from metaspo_hf.models.base import GenerationSettings
torch.set_num_threads(2)
model, tok = load_model(ModelSpec(name_or_path="smollm2-135m-instruct", dtype="float32"))[:2]
bf = copy.deepcopy(model).to(torch.bfloat16)
chats = w1.Workload().build()
engines = [w1._warm_engine(m, tok, chats) for m in (model, bf)]
def limit(tag):
    r = matmul.LimitRounds(rows=32, new_tokens=48); r.run_round([model, bf]); f = r.figures()
    print(tag, {d: f[d]["step_s_by_kernel"] for d in ("float32", "bfloat16")}, flush=True)
limit("fresh")
limit("fresh again")
for e in engines:
    e.generate_ids(chats, GenerationSettings(max_new_tokens=48))
limit("after engines")
w1.hf_generate(model, tok, w1.prompt_ids(tok, chats), 48, engines[0].eos_ids)
limit("after batched generate")
time.sleep(20)
limit("after 20 s idle")
from metaspo_hf import bench
from metaspo_hf.paths import cache_dir
llama = bench.LlamaCppRounds(w1.Workload(), {"Q4_0": cache_dir() / "bench" / "gguf" / "smollm2-135m-instruct" / "Q4_0.gguf"})
prompts = w1.prompt_ids(tok, chats)
llama.run_round(prompts, sorted(engines[0].eos_ids))
limit("after a llama.cpp round")
limit("again")
time.sleep(60)
limit("after 60 s idle")
