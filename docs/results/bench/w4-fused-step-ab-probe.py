"""One-off probe (docs/benchmarks.md, "W4 with the C++ decode step"): in a fresh process holding only the W4 model in
bfloat16, the fused step with merged projections against the projections side by side (ms a step, W4 chats, 24
new tokens; the forward variant times no fused step). Run alone: HF_HUB_OFFLINE=1 python docs/results/bench/w4-fused-step-ab-probe.py
"""
import time

import torch

from metaspo_hf.bench import w4, w4_model_name
from metaspo_hf.models.base import GenerationSettings
from metaspo_hf.models.decode_step import FusedDecodeStep
from metaspo_hf.models.engine import HFEngine
from metaspo_hf.models.loading import load_model
from metaspo_hf.recipe import ModelSpec

torch.set_num_threads(2)
model, tok = load_model(ModelSpec(name_or_path=w4_model_name(None), dtype="bfloat16"))
chats = w4.W4.build() if hasattr(w4, "W4") else w4.workload().build()
eng = HFEngine(model, tok, "ab", batch_size=8, progress=False, suppress_eos=True)
s = GenerationSettings(max_new_tokens=24)
merged, side = eng.fused_step, FusedDecodeStep(model, eng.kernel, packed=False)
acc = [0.0, 0]
def wrap(step):
    def call(*a):
        t = time.perf_counter(); r = step(*a); acc[0] += time.perf_counter() - t; acc[1] += 1; return r
    return call
eng.generate_ids(chats[:2], GenerationSettings(max_new_tokens=2))
for name, step in [("merged", merged), ("side", side), ("forward", None)] * 2:
    acc[:] = [0.0, 0]
    eng.fused_step = wrap(step) if step else None
    t = time.perf_counter(); eng.generate_ids(chats, s); wall = time.perf_counter() - t
    print(name, "wall", round(wall, 1), "step ms", round(1000 * acc[0] / max(acc[1], 1), 1), acc[1], flush=True)
