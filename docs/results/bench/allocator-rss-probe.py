"""One-off probe (docs/benchmarks.md, "Freed memory kept" and "W1 and W3 with freed memory kept"): VmRSS over a
long series of engine calls mixed as a run mixes them (system prompts of ~20 to ~600 tokens, 1 to 48 chats,
8 to 48 new tokens, seeded), with the engine's allocator setting ("kept") or without it ("default").
Run alone, under the CPU lock:
HF_HUB_OFFLINE=1 python docs/results/bench/allocator-rss-probe.py kept|default float32|bfloat16 CALLS
"""
import random, resource, sys, time, torch
import metaspo_hf.models.engine as engine_module
from metaspo_hf.bench import MODEL
from metaspo_hf.bench.w1 import questions
from metaspo_hf.models.base import GenerationSettings, make_chat
from metaspo_hf.models.engine import HFEngine
from metaspo_hf.models.loading import load_model
from metaspo_hf.recipe import ModelSpec

mode, dtype, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "default":
    engine_module.keep_freed_memory = lambda: False
torch.set_num_threads(2)
model, tok = load_model(ModelSpec(name_or_path=MODEL, dtype=dtype))
engine = HFEngine(model, tok, "probe", batch_size=32, progress=False, suppress_eos=True)
pool = questions(64)
sentence = "Think about the question step by step, check each fact you use, and answer in the format asked. "
rng = random.Random(0)
def rss(): return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) >> 10
trace, start = [], time.time()
for _ in range(calls):
    system = sentence * rng.choice((1, 3, 8, 20, 30))
    chats = [make_chat(system, q) for q in rng.sample(pool, rng.randint(1, 48))]
    engine.generate_ids(chats, GenerationSettings(max_new_tokens=rng.choice((8, 24, 48))))
    trace.append(rss())
print(mode, dtype, "calls", calls, "seconds", round(time.time() - start))
print("RSS MB at calls 1,5,10,25,50,75,100,...:", [trace[k - 1] for k in (1, 5, 10, 25, 50, 75, 100, 125, 150, 200) if k <= calls])
print("RSS MB last", trace[-1], "max", max(trace), "maxrss MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10)
