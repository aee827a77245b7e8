"""Data parallelism: the engine on one workload with N processes against one process (``metaspo bench``).

The workload is W1's chats, four engine batches of them, so that there is work to share out (the
processes split a call by whole batches: models/parallel.py). On a CPU, N processes of 1 thread
compete with 1 process of N threads for the same cores; on a machine with N GPUs each process has its
own GPU (``--shape llama-3.2-3b``: the GPU benchmark's random-weight model, bfloat16).

    python -m metaspo_hf.bench.parallel --processes 2 --out bench/results/parallel.json

``run`` launches each configuration (``torchrun --standalone`` for N > 1) on this module's
``measure``, which times ``repeats`` calls of the whole workload on every process, started together,
and has the main process write the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..models.base import GenerationSettings
from ..models.parallel import Processes
from . import REPEATS, print_and_write, w1

# Four batches of 32: each of 2 or 4 processes gets whole batches.
WORKLOAD = w1.Workload(chats=128, new_tokens=48)
BATCH_SIZE = 32
QUICK = w1.Workload(chats=16, new_tokens=8)
QUICK_BATCH_SIZE = 4


def measure(out: str, model_name: str, shape: str | None, quick: bool, repeats: int) -> None:
    """Runs in every launched process; the main one writes ``out``."""
    import torch

    from ..models.engine import HFEngine

    processes = Processes.launched()
    workload, batch_size = (QUICK, QUICK_BATCH_SIZE) if quick else (WORKLOAD, BATCH_SIZE)
    model, tokenizer = _model(model_name, shape, processes)
    engine = HFEngine(model, tokenizer, name=model_name, batch_size=batch_size, progress=False,
                      suppress_eos=True, processes=processes)
    chats = workload.build()
    settings = GenerationSettings(max_new_tokens=workload.new_tokens)
    engine.generate_ids(chats[:batch_size], settings)  # warm-up: first-call allocations and weight packing
    walls, ids = [], []
    for _ in range(repeats):
        processes.share(None)  # every process starts the call together
        started = time.perf_counter()
        ids = engine.generate_ids(chats, settings)
        walls.append(time.perf_counter() - started)
    if not processes.is_main:
        return
    tokens = sum(map(len, ids))
    median = statistics.median(walls)
    Path(out).write_text(json.dumps({
        "processes": processes.count, "threads_per_process": torch.get_num_threads(),
        "device": str(model.device), "chats": len(chats), "new_tokens": workload.new_tokens, "batch_size": batch_size,
        "wall_s": {"median": round(median, 3), "min": round(min(walls), 3), "max": round(max(walls), 3), "runs": len(walls)},
        "tok_s": round(tokens / median, 2),
        # Equal digests: N processes generated exactly the tokens one process did.
        "ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
    }))


def _model(model_name: str, shape: str | None, processes: Processes):
    from ..models.loading import ModelSpec, load_model

    if shape is None:
        return load_model(ModelSpec(name_or_path=model_name, dtype="float32"), processes)
    import torch

    from .gpu import LLAMA_3_2_3B, TINY, build_model

    device = f"cuda:{processes.gpus(torch.cuda.device_count())[0]}" if torch.cuda.is_available() else "cpu"
    _, tokenizer = load_model(ModelSpec(name_or_path="smollm2-135m-instruct", dtype="float32"))
    return build_model({"llama-3.2-3b": LLAMA_3_2_3B, "tiny": TINY}[shape], "none", device), tokenizer


def run(processes: int = 2, model_name: str = "smollm2-135m-instruct", shape: str | None = None,
        quick: bool = False, repeats: int = REPEATS, threads: int | None = None) -> dict:
    """One process against ``processes`` processes on the same workload. On a CPU the cores are shared
    out (``threads`` in all: 1 x threads against processes x threads/processes); on GPUs, one each."""
    threads = threads or processes
    configs = {"one_process": (1, threads), f"{processes}_processes": (processes, max(1, threads // processes))}
    figures = {}
    with tempfile.TemporaryDirectory(prefix="metaspo-bench-parallel-") as folder:
        for label, (count, per_process) in configs.items():
            out = Path(folder) / f"{label}.json"
            launcher = [sys.executable] if count == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={count}"]
            command = [*launcher, "-m", "metaspo_hf.bench.parallel", "--measure", str(out), "--model", model_name,
                       "--repeats", str(repeats), *(["--shape", shape] if shape else []), *(["--quick"] if quick else [])]
            print(f"[bench] data parallel: {count} process(es) x {per_process} thread(s)", file=sys.stderr, flush=True)
            done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(per_process)},
                                  capture_output=True, text=True)
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                figures[label] = {"failed": f"exit code {done.returncode}: {tail}"}
                continue
            figures[label] = json.loads(out.read_text())
    one, many = figures["one_process"], figures[f"{processes}_processes"]
    if "tok_s" in one and "tok_s" in many:
        figures["speedup"] = round(many["tok_s"] / one["tok_s"], 2)
        figures["identical"] = one["ids_sha256"] == many["ids_sha256"]
    return figures


def lines(figures: dict) -> list[str]:
    out = ["Data parallel: the engine on one workload, N processes against one (medians)"]
    for label, result in figures.items():
        if not isinstance(result, dict):
            continue
        if "failed" in result:
            out.append(f"  {label}: failed: {result['failed']}")
            continue
        wall = result["wall_s"]
        out.append(f"  {result['processes']} process(es) x {result['threads_per_process']} thread(s) on "
                   f"{result['device']}: {result['tok_s']:.1f} tok/s, wall {wall['median']:.2f} s "
                   f"(min {wall['min']:.2f}, max {wall['max']:.2f}, {wall['runs']} runs)")
    if "speedup" in figures:
        out.append(f"  speed-up {figures['speedup']:.2f}x; tokens identical to one process: {figures['identical']}")
    return out


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(prog="python -m metaspo_hf.bench.parallel", description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, help="CPU threads in all (default: one per process)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a packaged model or a model folder")
    parser.add_argument("--shape", choices=("llama-3.2-3b", "tiny"), help="random weights of this shape instead")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--out", help="JSON file for the results")
    parser.add_argument("--measure", metavar="OUT", help=argparse.SUPPRESS)  # one launched configuration
    args = parser.parse_args(argv)
    if args.measure:
        measure(args.measure, args.model, args.shape, args.quick, args.repeats)
        return None
    figures = run(args.processes, args.model, args.shape, args.quick, args.repeats, args.threads)
    print_and_write(lines(figures), figures, args.out)
    return figures


if __name__ == "__main__":
    main()
