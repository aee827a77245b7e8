"""One-off probe (docs/benchmarks.md, "W4 with the C++ decode step"): the fused step's ms a step on W4's chats (24 new
tokens), in a fresh process holding only the W4 model in bfloat16. Run alone from a checkout of each commit, e.g.
PYTHONPATH=. HF_HUB_OFFLINE=1 python docs/results/bench/w4-fused-step-old-new-probe.py
"""
import sys, time, torch
from metaspo_hf.bench import w4_model_name, w4
from metaspo_hf.models.loading import load_model
from metaspo_hf.recipe import ModelSpec
from metaspo_hf.models.base import GenerationSettings
from metaspo_hf.models.engine import HFEngine
import metaspo_hf; print(metaspo_hf.__file__)
torch.set_num_threads(2)
model, tok = load_model(ModelSpec(name_or_path=w4_model_name(None), dtype="bfloat16"))
chats = w4.W4.build()
eng = HFEngine(model, tok, "ab", batch_size=8, progress=False, suppress_eos=True)
eng.generate_ids(chats[:2], GenerationSettings(max_new_tokens=2))
step = eng.fused_step; acc = [0.0, 0]
def call(*a):
    t = time.perf_counter(); r = step(*a); acc[0] += time.perf_counter() - t; acc[1] += 1; return r
eng.fused_step = call
for _ in range(2):
    acc[:] = [0.0, 0]; eng.generate_ids(chats, GenerationSettings(max_new_tokens=24))
    print("step ms", round(1000 * acc[0] / acc[1], 1), acc[1], flush=True)
