"""W4's (or W1's) matmul limit on a model's own weights, timed in a fresh process (no llama.cpp worker, no
variants run before it): the float32 model and a bfloat16 copy, both packed as the engine packs them.
Usage: python limit-alone-own-weights-probe.py OUT.json MODEL ROWS (qwen2.5-coder-1.5b-instruct 8; smollm2-135m-instruct 32)."""
import copy, json, sys, time
import psutil, torch
from metaspo_hf.bench import matmul
from metaspo_hf.models.loading import ModelSpec, load_model
from metaspo_hf.models.packed import packed_linear_weights

torch.set_num_threads(2)
model = load_model(ModelSpec(name_or_path=sys.argv[2], dtype="float32"))[0]
print(type(model), model.dtype, file=sys.stderr)
copy_bf16 = copy.deepcopy(model).to(torch.bfloat16)
for m in (model, copy_bf16):
    print(m.dtype, "packed layers:", len(packed_linear_weights(m)), file=sys.stderr)
print("available GB", psutil.virtual_memory().available / 2**30, file=sys.stderr)
rounds = matmul.LimitRounds(rows=int(sys.argv[3]), new_tokens=256)
for _ in range(3):
    rounds.run_round([model, copy_bf16])
figures = rounds.figures()
json.dump(figures, open(sys.argv[1], "w"), indent=2)
print(json.dumps({d: figures[d]["step_s_by_kernel"] for d in ("float32", "bfloat16")}))
