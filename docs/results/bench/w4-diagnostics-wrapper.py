"""The W4 bench as `metaspo bench --workloads w4 ...`, with diagnostics: each timed run's fused-step ms and the
process's memory, and after each round the merged vs separate packed bf16 projections timed at 8 rows."""
import statistics, sys, time, torch
from metaspo_hf.bench import w1, matmul
from metaspo_hf.models import decode_step, packed as packed_mod

def mem():
    st = dict(l.split(":", 1) for l in open("/proc/self/status"))
    mi = dict(l.split(":", 1) for l in open("/proc/meminfo"))
    f = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
    return (int(st["RssAnon"].split()[0]) >> 20, int(st["RssFile"].split()[0]) >> 20,
            int(mi["MemAvailable"].split()[0]) >> 20, int(f[7]), int(f[9]))  # GB, GB, GB, minflt, majflt

steps = []
orig_call = decode_step.FusedDecodeStep.__call__
def call(self, *a, **k):
    t = time.perf_counter(); r = orig_call(self, *a, **k); steps.append(time.perf_counter() - t); return r
decode_step.FusedDecodeStep.__call__ = call

orig_timed = w1.timed
def timed(model, run):
    steps.clear(); m0 = mem()
    out = orig_timed(model, run)
    m1 = mem(); t = out[1]
    msg = f"[diag] {str(model.dtype)[6:]} wall {t.wall_s:.2f} decode {t.decode_s:.2f}"
    if steps:
        msg += f" | fused steps {len(steps)} median {1000*statistics.median(steps):.1f} ms first {1000*steps[0]:.0f} ms"
    print(msg + f" | anon {m1[0]}G file {m1[1]}G avail {m1[2]}G minflt +{m1[3]-m0[3]} majflt +{m1[4]-m0[4]}", file=sys.stderr, flush=True)
    return out
w1.timed = timed

def linears_ms(calls, x):
    for w, b in calls: packed_mod.packed_linear(x, w, b)
    t = time.perf_counter()
    for w, b in calls: packed_mod.packed_linear(x, w, b)
    return 1000 * (time.perf_counter() - t)

orig_rr = matmul.LimitRounds.run_round
def rr(self, models):
    orig_rr(self, models)
    for m in models:
        cache = packed_mod._merged_weights.get(m)
        merged = next((v for v in (cache or {}).values() if v), None)
        if not merged: continue
        packed = packed_mod.packed_linear_weights(m)
        names = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
        separate = [(w, mod.bias) for mod, w in packed.items() if any(mod is getattr(p, n, None) for p in m.modules() for n in names)]
        x = torch.randn(8, m.config.hidden_size).to(m.dtype)
        with torch.inference_mode():
            a, b = [], []
            for _ in range(3):
                a.append(linears_ms(merged, x)); b.append(linears_ms(separate, x))
        print(f"[diag] round end: merged q/k/v+gate/up {statistics.median(a):.1f} ms, separate packed {statistics.median(b):.1f} ms ({len(separate)} modules) | mem {mem()}", file=sys.stderr, flush=True)
matmul.LimitRounds.run_round = rr

from metaspo_hf.cli import main
sys.exit(main(sys.argv[1:]))
