"""One-off probe (docs/benchmarks.md, "W4 with the C++ decode step"): all linear layers of one decode step of the
W4 model in bfloat16 at N rows (argv[1], default 8), separate packed weights against merged ones. Run alone:
HF_HUB_OFFLINE=1 python docs/results/bench/w4-merged-linears-probe.py 8
"""
import statistics
import sys
import time

import torch

from metaspo_hf.bench import w4_model_name
from metaspo_hf.models.loading import load_model
from metaspo_hf.models.packed import _packed_weight, packed_linear, packed_linear_weights
from metaspo_hf.recipe import ModelSpec

torch.set_num_threads(2)
name = w4_model_name(None)
rows = int(sys.argv[1]) if len(sys.argv) > 1 else 8
model, tok = load_model(ModelSpec(name_or_path=name, dtype="bfloat16"))
packed = packed_linear_weights(model)
g = torch.Generator().manual_seed(0)
H, I = model.config.hidden_size, model.config.intermediate_size
xs = {n: torch.randn(rows, n, generator=g).bfloat16() for n in (H, I)}
sep, mer = [], []
with torch.inference_mode():
    for l in model.model.layers:
        a, m = l.self_attn, l.mlp
        sep += [(xs[H], packed[x], x.bias) for x in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj)] + [(xs[I], packed[m.down_proj], None)]
        qkv = _packed_weight(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        b = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        gu = _packed_weight(torch.cat([m.gate_proj.weight, m.up_proj.weight]))
        mer += [(xs[H], qkv, b), (xs[H], packed[a.o_proj], None), (xs[H], gu, None), (xs[I], packed[m.down_proj], None)]
    sep.append((xs[H], packed[model.lm_head], None)); mer.append(sep[-1])
    def run(calls):
        t = time.perf_counter()
        for x, w, b in calls: packed_linear(x, w, b)
        return time.perf_counter() - t
    for _ in range(3):
        for n, calls in (("separate", sep), ("merged", mer)):
            run(calls); run(calls)
            print(n, rows, "rows", round(1000 * statistics.median(run(calls) for _ in range(5)), 1), "ms")
