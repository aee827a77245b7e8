"""One-off probe behind "The rest of the decode step in C++" (docs/benchmarks.md): where a bfloat16 decode step of
W1 goes, on SmolLM2 at 32 rows. Not the benchmark: run alone, under the CPU lock, from the repository root:

    HF_HUB_OFFLINE=1 python docs/results/bench/decode-step-probe.py

Prints (1) the engine's decode ms a step on W1 and, inside the fused step, the ms a step in the attention op, the
norms and the gated activation; (2) all linear layers of one step as the model's own (separate) packed weights and
as merged ones, medians of 10, three alternations; (3) the attention op on one captured call's inputs, repeated,
and on 30 layers' captured inputs in turn; (4) torch's max against argmax_rows on [32, vocab] logits.
"""

import statistics
import time

import torch

from metaspo_hf.bench import MODEL, w1
from metaspo_hf.models.base import GenerationSettings
from metaspo_hf.models.loading import load_model
from metaspo_hf.models.packed import _packed_weight, packed_linear, packed_linear_weights
from metaspo_hf.recipe import ModelSpec

torch.set_num_threads(2)
model, tokenizer = load_model(ModelSpec(name_or_path=MODEL, dtype="float32"))
model = model.to(torch.bfloat16)
chats = w1.Workload().build()
engine = w1._warm_engine(model, tokenizer, chats)
settings = GenerationSettings(max_new_tokens=w1.Workload().new_tokens)
step, kernel = engine.fused_step, engine.fused_step.kernel
seconds, captured, capturing = {"attention": 0.0, "norms": 0.0, "activation": 0.0}, [], [False]


class Timed:
    """The kernel, timing its ops and keeping the attention op's inputs of one call."""

    names = {"rotate_store_attention": "attention", "add_rms_norm": "norms", "silu_mul": "activation"}

    def __getattr__(self, name):
        op = getattr(kernel, name)

        def call(*args):
            if capturing[0] and name == "rotate_store_attention" and len(captured) < 360:
                captured.append([a.clone() if isinstance(a, torch.Tensor) else a for a in args])
            started = time.perf_counter()
            out = op(*args)
            if name in self.names:
                seconds[self.names[name]] += time.perf_counter() - started
            return out
        return call


step.kernel = Timed()
steps = settings.max_new_tokens - 1
for _ in range(3):
    seconds.update(dict.fromkeys(seconds, 0.0))
    _, timing = w1.timed(model, lambda: engine.generate_ids(chats, settings))
    print(f"(1) decode {1000 * timing.decode_s / settings.max_new_tokens:.2f} ms a step;",
          {k: round(1000 * v / steps, 2) for k, v in seconds.items()})
capturing[0] = True  # one more call, untimed, keeping the attention op's inputs of its first 12 steps
engine.generate_ids(chats, settings)
step.kernel = kernel

packed = packed_linear_weights(model)
generator = torch.Generator().manual_seed(0)
inputs = {n: torch.randn(32, n, generator=generator).bfloat16() for n in (576, 1536)}
separate, merged = [], []
with torch.inference_mode():
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        separate += [(inputs[576], packed[x]) for x in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj)]
        separate.append((inputs[1536], packed[m.down_proj]))
        merged += [(inputs[576], _packed_weight(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))),
                   (inputs[576], packed[a.o_proj]),
                   (inputs[576], _packed_weight(torch.cat([m.gate_proj.weight, m.up_proj.weight]))),
                   (inputs[1536], packed[m.down_proj])]
    separate.append((inputs[576], packed[model.lm_head]))
    merged.append(separate[-1])

    def run(calls):
        started = time.perf_counter()
        for x, weight in calls:
            packed_linear(x, weight, None)
        return time.perf_counter() - started

    for _ in range(3):
        for name, calls in (("separate", separate), ("merged", merged)):
            run(calls)
            print(f"(2) {name} {1000 * statistics.median(run(calls) for _ in range(10)):.2f} ms")

    call = captured[30 * 10 + 5]
    print(f"(3) prefix {tuple(call[5].shape)}, own slots {call[7].shape[2]}, attended {call[10].sum(1).float().mean():.1f}")
    for _ in range(50):
        kernel.rotate_store_attention(*call)
    started = time.perf_counter()
    for _ in range(500):
        kernel.rotate_store_attention(*call)
    print(f"(3) one call repeated {(time.perf_counter() - started) / 500 * 1e6:.0f} us")
    for _ in range(3):
        started = time.perf_counter()
        for args in captured[300:330]:
            kernel.rotate_store_attention(*args)
        print(f"(3) 30 layers in turn {(time.perf_counter() - started) / 30 * 1e6:.0f} us a layer")

    logits = torch.randn(32, 1, model.config.vocab_size, generator=generator).bfloat16()[:, -1, :]
    for name, pick in (("torch max", lambda: logits.max(dim=-1).indices), ("argmax_rows", lambda: kernel.argmax_rows(logits))):
        for _ in range(20):
            pick()
        started = time.perf_counter()
        for _ in range(1000):
            pick()
        print(f"(4) {name} {(time.perf_counter() - started) / 1000 * 1e6:.0f} us")
