"""One-off: W4's matmul limit for Qwen2.5-Coder-1.5B (8 rows, 256 steps) timed alone, in a fresh process that holds
no model, 3 rounds, the same code the bench runs (``matmul.LimitRounds``) on the model's linear shapes."""
import json
import sys

import torch

from metaspo_hf.bench import matmul

torch.set_num_threads(2)
# The model's linear layers per decoder layer (q, k, v with bias; o, gate, up, down) x 28, and the vocabulary
# projection; on the meta device: only their shapes are read.
LAYER = [(1536, 1536, True), (256, 1536, True), (256, 1536, True), (1536, 1536, False), (8960, 1536, False),
         (8960, 1536, False), (1536, 8960, False)]
linears = [torch.nn.Linear(i, o, bias=b, device="meta") for _ in range(28) for o, i, b in LAYER]
linears.append(torch.nn.Linear(1536, 151936, bias=False, device="meta"))
rounds = matmul.LimitRounds(torch.nn.ModuleList(linears), rows=8, new_tokens=256)
for _ in range(3):
    rounds.run_round()
figures = rounds.figures()
json.dump(figures, open(sys.argv[1], "w"), indent=2)
print(json.dumps({dtype: figures[dtype]["step_s_by_kernel"] for dtype in ("float32", "bfloat16")}))
