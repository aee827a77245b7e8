"""`metaspo bench`: the generation engine against plain transformers and llama.cpp (W1), the cost
of one meta-training iteration our way against the reference's way (W2), and the engine on 2
processes against one (``parallel.py``); with ``--loglik``, also `scoring: loglik` against
generative scoring on multiple-choice questions (``loglik.py``).

Prints both tables and writes every figure as JSON (``--out``, default
``bench/results/<timestamp>.json``). ``collect`` does the measuring on any loaded model, so the tests
run the whole harness on a tiny random model.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

from ..errors import MetaspoError
from ..models.loading import ModelSpec, load_model, packaged_gguf_path
from . import w1  # w2 is imported where used, so that `python -m metaspo_hf.bench.w2` runs it alone cleanly

# The targets on W1: engine tok/s over batched generate, and over the best llama.cpp path.
TARGETS = {"engine_over_batched": 2.5, "engine_over_llama_cpp": 1.5}


def main(out: str | None = None, quick: bool = False, loglik: bool = False) -> dict:
    name = "smollm2-135m-instruct"
    model, tokenizer = load_model(ModelSpec(name_or_path=name, dtype="float32"))
    results = collect(model, tokenizer, gguf=packaged_gguf_path(name), quick=quick, model_name=name)
    if loglik:
        results["loglik"] = _loglik(model, tokenizer, quick)
    from . import parallel  # as w2: `python -m metaspo_hf.bench.parallel` runs it alone

    results["data_parallel"] = parallel.run(processes=2, model_name=name, quick=quick,
                                             threads=w1.Workload().threads)
    print(format_tables(results))
    path = Path(out) if out else Path("bench/results") / time.strftime("%Y%m%d-%H%M%S.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(path)
    return results


def collect(model, tokenizer, gguf: Path | None, quick: bool = False, model_name: str = "model") -> dict:
    """Every figure of W1 and W2 as one JSON-ready dict."""
    workload = w1.QUICK if quick else w1.Workload()
    torch.set_num_threads(workload.threads)
    print(f"[bench] W1: {workload.chats} chats x {workload.new_tokens} new tokens", file=sys.stderr, flush=True)
    hf = w1.run_hf_variants(model, tokenizer, workload)
    system_tokens = len(tokenizer(w1.SYSTEM_PROMPT, add_special_tokens=False)["input_ids"])
    variants = {name: hf[name]["timing"].as_dict() for name in ("naive", "batched", "engine")}
    identity = w1.identity(hf["engine"]["ids"], hf["batched"]["ids"])
    variants["llama_cpp"] = _llama_cpp(workload, tokenizer, gguf, hf)
    results = {
        "model": model_name,
        "machine": machine(workload.threads),
        "workload": w1.workload_info(workload, hf["prompt_tokens"], hf["shared_prefix_tokens"], system_tokens),
        "variants": variants,
        "ratios": ratios(variants),
        "targets": TARGETS,
        "engine_identical_to_batched": identity["identical"],
        "identity": identity,
    }
    from . import w2  # see the import of w1

    print("[bench] W2: one meta-training iteration, ours and the reference's way", file=sys.stderr, flush=True)
    results["w2"] = _w2(model, tokenizer, w2.QUICK if quick else w2.RunCost())
    return results


def _llama_cpp(workload: w1.Workload, tokenizer, gguf: Path | None, hf: dict) -> dict:
    """The best llama.cpp path (by tok/s) with every path's figures, or why it was skipped."""
    from . import (
        llama_cpp,  # not at the top: `python -m metaspo_hf.bench.llama_cpp` imports this package first
    )

    if gguf is None:
        return {"skipped": "the model has no GGUF file"}
    reason = llama_cpp.skip_reason()
    if reason:
        print(f"[bench] llama.cpp skipped: {reason}", file=sys.stderr, flush=True)
        return {"skipped": reason}
    prompts = w1.prompt_ids(tokenizer, workload.build())
    measured = llama_cpp.measure(gguf, prompts, workload.new_tokens, workload.threads, hf["eos_ids"])
    paths = {}
    for path, figures in measured["paths"].items():
        if "failed" in figures:
            paths[path] = figures
            continue
        timing = w1.Timing(figures["wall_s"], figures["prefill_s"], sum(map(len, figures["ids"])))
        agreement = w1.identity(figures["ids"], hf["batched"]["ids"])
        paths[path] = {**timing.as_dict(), "rows_equal_to_batched": agreement["rows_equal"]}
    ran = [path for path in paths if "tok_s" in paths[path]]
    if not ran:
        return {"skipped": "every llama.cpp path failed", "build": measured["build"], "paths": paths}
    best = max(ran, key=lambda p: paths[p]["tok_s"])
    return {**paths[best], "path": best, "version": measured["version"], "build": measured["build"], "paths": paths}


def print_and_write(table: list[str], figures: dict, out: str | None) -> None:
    """How a benchmark run on its own ends: its table on the terminal, its figures as JSON in ``out``."""
    print("\n".join(table))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(figures, indent=2) + "\n")


def ratios(variants: dict) -> dict:
    def over(a: str, b: str) -> float | None:
        if "tok_s" not in variants.get(a, {}) or "tok_s" not in variants.get(b, {}):
            return None
        return round(variants[a]["tok_s"] / variants[b]["tok_s"], 2)

    return {"engine_over_batched": over("engine", "batched"), "engine_over_naive": over("engine", "naive"),
            "engine_over_llama_cpp": over("engine", "llama_cpp"), "batched_over_naive": over("batched", "naive")}


def _w2(model, tokenizer, cost) -> dict:  # cost: w2.RunCost
    from . import w2  # see the import of w1

    try:
        return w2.run(model, tokenizer, cost)
    except MetaspoError as error:  # e.g. BIG-bench not fetched and no network
        print(f"[bench] W2 skipped: {error}", file=sys.stderr, flush=True)
        return {"skipped": str(error)}


def _loglik(model, tokenizer, quick: bool) -> dict:
    from . import loglik  # as w2: `python -m metaspo_hf.bench.loglik` runs it alone

    print("[bench] loglik: scoring: loglik against generation on multiple-choice questions", file=sys.stderr, flush=True)
    try:
        return loglik.run(model, tokenizer, loglik.QUICK if quick else loglik.Workload())
    except MetaspoError as error:  # e.g. BIG-bench not fetched and no network
        print(f"[bench] loglik skipped: {error}", file=sys.stderr, flush=True)
        return {"skipped": str(error)}


def machine(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def format_tables(results: dict) -> str:
    work = results["workload"]
    lines = [f"W1: {work['chats']} chats x {work['new_tokens']} new tokens (EOS suppressed), greedy, "
             f"{results['model']} {work['dtype']} on {work['device']}, {work['threads']} threads; "
             f"shared prefix {work['shared_prefix_tokens']} tokens, prompts {work['prompt_tokens_mean']} tokens on average",
             f"{'variant':<19}{'tok/s':>8}{'wall s':>9}{'prefill s':>11}{'decode s':>10}{'vs batched':>12}"]
    batched = results["variants"]["batched"]["tok_s"]

    def row(label: str, figures: dict) -> str:
        return (f"{label:<19}{figures['tok_s']:>8.1f}{figures['wall_s']:>9.2f}{figures['prefill_s']:>11.2f}"
                f"{figures['decode_s']:>10.2f}{figures['tok_s'] / batched:>11.2f}x")

    for name, figures in results["variants"].items():
        if "skipped" in figures:
            lines.append(f"{name:<19}skipped: {figures['skipped']}")
            continue
        lines.append(row(f"{name} (best)" if "paths" in figures else name, figures))
        for path, other in figures.get("paths", {}).items():
            if "failed" in other:
                lines.append(f"  {path}: failed: {other['failed']}")
                continue
            lines.append(row(f"  {path}", other) + f"   rows equal to batched: {other['rows_equal_to_batched']}"
                         f"/{work['chats']}")
    ratio = results["ratios"]
    for key, target in results["targets"].items():
        value = ratio.get(key)
        shown = f"{value:.2f}" if value is not None else "n/a"
        verdict = "n/a" if value is None else ("met" if value >= target else "NOT met")
        lines.append(f"{key.replace('_', ' ')}: {shown} (target >= {target}: {verdict})")
    identity = results["identity"]
    lines.append(f"engine tokens identical to batched generate: {results['engine_identical_to_batched']} "
                 f"({identity['rows_equal']}/{identity['rows']} rows)")
    lines.append("")
    lines.extend(_w2_lines(results["w2"]))
    if "loglik" in results:
        from .loglik import lines as loglik_lines  # as w2: see the import of w1

        lines += ["", *loglik_lines(results["loglik"])]
    if "data_parallel" in results:
        from .parallel import lines as parallel_lines  # as w2: see the import of w1

        lines += ["", *parallel_lines(results["data_parallel"])]
    return "\n".join(lines)


def _w2_lines(figures: dict) -> list[str]:
    from . import w2  # see the import of w1

    return w2.lines(figures)
