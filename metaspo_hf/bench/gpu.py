"""W1 on a GPU: a Llama-3.2-3B-shaped model with random weights (built from a config, nothing
downloaded), in bfloat16 and, when bitsandbytes is installed, 4-bit NF4 or 8-bit LLM.int8; ``--dtype float32``
checks token identity where rounding cannot explain a difference.

    python -m metaspo_hf.bench.gpu --out bench/results/gpu.json [--chats 256] [--quant 4bit|8bit] [--tokenizer DIR]

Random weights make the text meaningless but not the cost: every variant still runs the full
prefill and exactly ``new_tokens`` decode steps. The prompts are W1's, tokenized by the embedded
SmolLM2 tokenizer (the model's vocabulary is larger, so every id is valid), or by the tokenizer in
``--tokenizer DIR`` on a machine without the embedded model (a GPU machine that only receives the
tokenizer's files). The weights are created on the GPU itself. ``--tiny`` swaps in a
two-layer model of the same family, to check the script on a machine without a GPU. Each variant
is timed ``--repeats`` times (medians, with the range of wall times, as in ``metaspo bench``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from ..models.loading import CUDA_QUANTIZATIONS, ModelSpec, load_model
from . import REPEATS, machine, w1

# Llama-3.2-3B's published shape; the weights are random, so nothing is downloaded.
LLAMA_3_2_3B = dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                    num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=131072,
                    rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
QUANT_NAMES = {"4bit": "nf4 4-bit (bitsandbytes)", "8bit": "LLM.int8 8-bit (bitsandbytes)"}
TINY = dict(LLAMA_3_2_3B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def build_model(shape: dict, quant: str, device: str, tokenizer, dtype: torch.dtype = torch.bfloat16):
    config = LlamaConfig(**shape)
    torch.manual_seed(0)
    # Initialized where it runs: random init of 3B parameters is slow on the host's CPU.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if quant == "none":
        return model
    # bitsandbytes quantizes while loading, so the random weights go through a temporary folder and the
    # product's own loader (what a recipe's `quantization: 4bit` or `8bit` runs).
    with tempfile.TemporaryDirectory(prefix="metaspo-gpu-bench-") as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
        return load_model(ModelSpec(name_or_path=folder, quantization=quant))[0].eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m metaspo_hf.bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON file for the results")
    # 256 rows: what the 3B recipe batches (recipes/llama-3.2-3b-instruct.yaml).
    parser.add_argument("--chats", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=w1.Workload.new_tokens)
    parser.add_argument("--quant", choices=("none", *CUDA_QUANTIZATIONS), default="none")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed runs per variant (medians reported)")
    parser.add_argument("--tiny", action="store_true", help="a two-layer model, to check the script on CPU")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="the unquantized weights' dtype (bitsandbytes computes in bfloat16)")
    parser.add_argument("--tokenizer", help="a local tokenizer folder (default: the embedded SmolLM2's)")
    args = parser.parse_args(argv)
    if args.quant != "none" and args.dtype != "bfloat16":
        parser.error("--quant computes in bfloat16: leave --dtype at bfloat16")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = (AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer
                 else load_model(ModelSpec(name_or_path="smollm2-135m-instruct", dtype="float32"))[1])
    dtype = getattr(torch, args.dtype)
    model = build_model(TINY if args.tiny else LLAMA_3_2_3B, args.quant, device, tokenizer, dtype)
    workload = replace(w1.Workload(), chats=args.chats, new_tokens=args.new_tokens)
    runs = w1.run_hf_variants(model, tokenizer, workload, repeats=args.repeats)
    variants = {name: runs.variants[name].as_dict() for name in ("batched", "engine")}
    identity = w1.identity(runs.variants["engine"].ids, runs.variants["batched"].ids)
    results = {
        "model": f"Llama-3.2-3B shape, random weights, {args.dtype if args.quant == 'none' else QUANT_NAMES[args.quant]}",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "machine": machine(torch.get_num_threads()),
        "workload": {**w1.workload_info(workload, tokenizer, runs.prompts), "dtype": args.dtype, "device": device,
                     "quant": args.quant, "repeats": args.repeats},
        "variants": variants,
        "ratios": {"engine_over_batched": round(variants["engine"]["tok_s"] / variants["batched"]["tok_s"], 2)},
        "engine_identical_to_batched": identity["identical"],
        "identity": identity,
    }
    print(json.dumps({k: results[k] for k in ("model", "device", "variants", "ratios", "engine_identical_to_batched")},
                     indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(args.out, file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
