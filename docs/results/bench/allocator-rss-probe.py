"""One-off probe (docs/benchmarks.md, "Freed memory kept"): the W1 bfloat16 engine called 24 times on varying
chats and new tokens, VmRSS after each call. Run alone, under the CPU lock:
HF_HUB_OFFLINE=1 python docs/results/bench/allocator-rss-probe.py
"""
import copy, resource, torch
from metaspo_hf.bench import MODEL, w1
from metaspo_hf.models.base import GenerationSettings
from metaspo_hf.models.loading import load_model
from metaspo_hf.recipe import ModelSpec
torch.set_num_threads(2)
model, tok = load_model(ModelSpec(name_or_path=MODEL, dtype="bfloat16"))
chats = w1.Workload().build()
eng = w1._warm_engine(model, tok, chats)
def rss(): return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) >> 10
out = []
for i in range(24):
    n = (32, 7, 19, 25)[i % 4]
    eng.generate_ids(chats[:n], GenerationSettings(max_new_tokens=(48, 16, 80)[i % 3]))
    out.append(rss())
print("RSS MB after each call:", out, "maxrss MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10)
