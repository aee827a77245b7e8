"""`metaspo bench`: the generation engine against plain transformers and llama.cpp on one scoring
batch (W1), decode-heavy (W3) and on optimizer-shaped requests (W4); the cost of one meta-training
iteration our way against the reference's way (W2); and the engine on 2 processes against one
(``parallel``); with ``--loglik``, also `scoring: loglik` against generative scoring on
multiple-choice questions (``loglik.py``). ``--workloads`` picks a subset. W4 runs on the validity
recipe's optimizer model where it is installed (``w4_model_name``), the rest on the embedded model.

Every generation figure is the median of ``repeats`` timed runs (min and max of wall time kept), and
each workload's engine decode time is set against the machine's own matmul limit (``matmul.py``).
Prints the tables and writes every figure as JSON (``--out``, default
``bench/results/<timestamp>.json``). ``collect`` does the measuring on any loaded model, so the tests
run the whole harness on a tiny random model.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from ..errors import MetaspoError
from ..models.loading import ModelSpec, check_loadable, load_model, local_folder, packaged_gguf_path
from . import matmul, w1, w4  # w2 is imported where used: `python -m metaspo_hf.bench.w2` runs it alone

MODEL = "smollm2-135m-instruct"
# W4's model where it is installed (`make install-models`): the validity recipe's optimizer, whose requests W4 mimics.
W4_MODEL = "qwen2.5-coder-1.5b-instruct"
# The performance issue's acceptance, per workload, as ratios of medians (checked in each printed table).
_OVER_LLAMA_CPP = {"engine_bf16_over_llama_cpp": 1.5, "engine_bf16_over_llama_cpp_bf16": 1.5}
TARGETS = {"w1": {**_OVER_LLAMA_CPP, "engine_int8_torchao_over_llama_cpp_q8_0": 1.5},
           "w3": _OVER_LLAMA_CPP,
           # The engine over batched generate at each dtype: float32, and bfloat16 (what the recipes load here).
           "w4": {"engine_over_batched": 1.2, "engine_bf16_over_batched_bf16": 1.2, "engine_bf16_over_llama_cpp": 1.0}}
WORKLOADS = ("w1", "w2", "w3", "w4", "parallel")
# Medians of 3: a single run on this machine swings by about 10%.
REPEATS = 3
# The llama.cpp formats W3 and W4 run: the ones a user picks for speed, each at a precision class of the engine's.
ROUNDED_FORMATS = ("F16", "BF16", "Q8_0", "Q4_0")
# W2 again at the settings of the recipes users run on CPU: the embedded default and the validity recipe.
W2_RECIPES = ("smollm2-135m-cpu", "qwen2.5-coder-1.5b-cpu")
# The generation workloads: what each one is, and its full and quick sizes.
GENERATION = {"w1": ("one scoring batch", w1.Workload(), w1.QUICK),
              "w3": ("decode-heavy, W1's chats", w1.W3, w1.W3_QUICK),
              "w4": ("optimizer-shaped requests", w4.W4, w4.QUICK)}


def main(out: str | None = None, quick: bool = False, loglik: bool = False, workloads: str | None = None,
         repeats: int | None = None, naive_runs: int = 1, int8: bool = True, w4_model: str | None = None,
         llama_formats: str | None = None) -> dict:
    """``workloads``: comma-separated names from ``WORKLOADS`` (default: all); ``repeats``: timed runs per
    variant (default 3, 1 with ``quick``); ``naive_runs``: W1's naive variant's runs (0 skips it); ``int8``:
    W1's int8 engine variants (each skipped where its library is missing); ``w4_model``: W4's model (default
    ``w4_model_name``); ``llama_formats``: comma-separated llama.cpp formats W3 and W4 run (default
    ``ROUNDED_FORMATS``)."""
    chosen = parse_workloads(workloads) if workloads else WORKLOADS
    formats = parse_formats(llama_formats) if llama_formats else ROUNDED_FORMATS
    repeats = (1 if quick else REPEATS) if repeats is None else repeats
    if repeats < 1 or naive_runs < 0:
        raise MetaspoError(f"repeats must be at least 1 and naive runs at least 0 (got {repeats}, {naive_runs})")
    # W4 on the model that answers optimizer requests in real runs; the rest on the embedded model.
    by_model: dict[str, list[str]] = {}
    for key in chosen:
        by_model.setdefault(w4_model_name(w4_model) if key == "w4" else MODEL, []).append(key)
    for name in by_model:  # a wrong model name fails now, not after the workloads before it have run
        try:
            check_loadable(ModelSpec(name_or_path=name, dtype="float32"))
        except MetaspoError as error:
            if name != w4_model:
                raise
            raise MetaspoError(error.message, hint="check --w4-model: a packaged model's name or a local model "
                                                   "folder") from None
    path = Path(out) if out else Path("bench/results") / time.strftime("%Y%m%d-%H%M%S.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"model": MODEL}

    def save(measured: dict) -> None:  # after every workload: a full run takes hours, and a stop keeps the rest
        path.write_text(json.dumps({**results, **_sections(measured)}, indent=2) + "\n")

    for name, keys in by_model.items():  # one model loaded at a time: the 1.5B model's copies fill the memory
        spec = ModelSpec(name_or_path=name, dtype="float32")
        model, tokenizer = load_model(spec)
        ggufs = gguf_files(spec) if any(key in GENERATION for key in keys) else {}
        measured = collect(model, tokenizer, ggufs, quick=quick, model_name=name, workloads=tuple(keys),
                           repeats=repeats, naive_runs=naive_runs, int8=int8, save=save, llama_formats=formats)
        results.update(_sections(measured))
        if name == MODEL and loglik:
            results["loglik"] = _loglik(model, tokenizer, quick)
        del model, tokenizer
        gc.collect()
    if "parallel" in chosen:
        from . import parallel  # as w2: `python -m metaspo_hf.bench.parallel` runs it alone

        results["data_parallel"] = parallel.run(processes=2, model_name=MODEL, quick=quick, repeats=repeats,
                                                threads=w1.Workload().threads)
    print(format_tables(results))
    save(results)
    print(path)
    return results


def _sections(measured: dict) -> dict:
    """What ``collect`` measured on one model, less its model's name (each section names its own)."""
    return {key: value for key, value in measured.items() if key != "model"}


def w4_model_name(asked: str | None = None) -> str:
    """W4's model: the one asked for, else ``W4_MODEL`` (the optimizer of the validity recipe) where it is
    installed, else ``MODEL``."""
    if asked:
        return asked
    try:
        packaged_gguf_path(W4_MODEL, assemble=False)  # raises while its parts are not installed
    except MetaspoError:
        return MODEL
    return W4_MODEL


def parse_workloads(names: str) -> tuple[str, ...]:
    return _choice(names.lower(), WORKLOADS, "workload")


def parse_formats(names: str) -> tuple[str, ...]:
    return _choice(names.upper(), ROUNDED_FORMATS, "llama.cpp format")


def _choice(names: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    """Comma-separated names, each one of ``allowed``."""
    chosen = tuple(name.strip() for name in names.split(",") if name.strip())
    unknown = [name for name in chosen if name not in allowed]
    if unknown or not chosen:
        raise MetaspoError(f"unknown {what}(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(allowed)}")
    return chosen


def gguf_files(spec: ModelSpec) -> dict[str, Path | str]:
    """The GGUF file of each llama.cpp variant, by format: the ones converted from the model folder the engine
    runs (``gguf.py``), and the packaged file; a format without a file maps to why. Empty while llama.cpp
    cannot run: nothing would read them."""
    from . import gguf, llama_cpp  # as w2: `python -m metaspo_hf.bench.gguf` (or .llama_cpp) runs it alone

    if llama_cpp.skip_reason():
        return {}
    files = gguf.files(local_folder(spec), spec.name_or_path)
    packaged = packaged_gguf_path(spec.name_or_path)
    fmt = gguf.file_format(packaged) or "packaged"
    files[f"{fmt}_packaged" if fmt in files else fmt] = packaged
    return files


def collect(model, tokenizer, ggufs: dict[str, Path | str], quick: bool = False, model_name: str = "model",
            workloads: tuple[str, ...] = ("w1", "w2", "w3", "w4"), repeats: int = 1, naive_runs: int = 1,
            int8: bool = True, save: Callable[[dict], None] | None = None,
            llama_formats: tuple[str, ...] = ROUNDED_FORMATS) -> dict:
    """Every figure of the chosen workloads (of W1 to W4) as one JSON-ready dict; ``ggufs`` as ``gguf_files``
    gives them; ``llama_formats``: those W3 and W4 run. ``save`` is called with the figures so far after each
    workload."""
    threads = w1.Workload().threads
    torch.set_num_threads(threads)
    results = {"model": model_name, "machine": machine(threads)}
    for key in workloads:
        if key == "w2":
            from . import w2  # see the import of w1

            print("[bench] W2: one meta-training iteration, ours and the reference's way", file=sys.stderr, flush=True)
            cost = w2.QUICK if quick else w2.RunCost()
            results["w2"] = _w2(model, tokenizer, cost)
            # Racing is off in the CPU recipes, so W2's own setting is not what their users get.
            results["w2_at_recipes"] = {name: _w2(model, tokenizer, cost.at_recipe(name, sizes=not quick))
                                      for name in W2_RECIPES}
        elif key in GENERATION:
            _, full, small = GENERATION[key]
            workload = small if quick else full
            print(f"[bench] {key.upper()}: {workload.chats} chats x {workload.new_tokens} new tokens, "
                  f"{repeats} run(s) each", file=sys.stderr, flush=True)
            if key == "w1":  # the only one with the naive and int8 variants
                figures = generation(model, tokenizer, ggufs, workload, repeats, naive_runs, int8=int8,
                                     every_llama_path=True)
            else:  # W1 already checked the F32 file's tokens and timed the packaged one
                figures = generation(model, tokenizer, {fmt: ggufs[fmt] for fmt in llama_formats if fmt in ggufs},
                                     workload, repeats)
            results[key] = {"model": model_name, **figures, "targets": TARGETS[key]}
        if save:
            save(results)
    return results


def generation(model, tokenizer, ggufs: dict[str, Path | str], workload: w1.Workload, repeats: int,
               naive_runs: int | None = None, int8: bool | None = None, every_llama_path: bool = False) -> dict:
    """One generation workload (W1, W3 or W4): each variant's medians, the ratios of their tok/s, the
    engine's token identity with batched ``generate``, and the matmul limit of a decode step.
    ``naive_runs``: None where the workload has no naive variant, 0 to list it as skipped; ``int8``: None
    where it has no int8 variants, False to list them as skipped; ``every_llama_path``: the F32 file also runs
    llama.cpp's one-chat-at-a-time path (else only the batched ones run)."""
    llama = LlamaCppRounds(workload, ggufs, every_llama_path)
    # The limit too takes its turn in every round, so that the shares carry no more drift than the ratios.
    limit_rounds = matmul.LimitRounds(workload.chats, workload.new_tokens)

    def beside(prompts: list[list[int]], eos_ids: list[int], models: list[torch.nn.Module]) -> None:
        llama.run_round(prompts, eos_ids)
        limit_rounds.run_round(models)

    hf = w1.run_hf_variants(model, tokenizer, workload, repeats, naive_runs or 0, bf16=True, int8=bool(int8),
                            beside=beside)
    limit = limit_rounds.figures()
    batched_ids = hf.variants["batched"].ids
    variants = {}
    for name, runs in hf.variants.items():
        if isinstance(runs, str):  # an int8 variant that could not run, or the kernel's pair where it does not apply
            variants[name] = {"skipped": runs}
            continue
        figures = runs.as_dict()
        if runs.settings:  # an engine variant: how close its decode comes to the matmul floor of its dtype
            figures["decode_share_of_matmul_limit"] = matmul.share(limit, runs.settings["dtype"], figures["decode_s"])
        if name in w1.COPY_VARIANTS:  # bfloat16 and int8 round differently: tokens compared, not expected identical
            figures["rows_equal_to_batched"] = w1.identity(runs.ids, batched_ids)["rows_equal"]
        variants[name] = figures
    if int8 is False:
        variants.update({name: {"skipped": "int8 variants turned off (--no-int8)"} for name in w1.INT8_VARIANTS})
    if naive_runs == 0:
        variants = {"naive": {"skipped": "naive runs set to 0"}, **variants}
    variants.update(_llama_cpp_variants(llama, hf))
    identity = w1.identity(hf.variants["engine"].ids, batched_ids)
    return {
        "workload": {**w1.workload_info(workload, tokenizer, hf.prompts), "repeats": repeats,
                     **({"naive_runs": naive_runs} if naive_runs is not None else {})},
        "variants": variants,
        "ratios": ratios(variants),
        "matmul_limit": limit,
        "engine_identical_to_batched": identity["identical"],
        "identity": identity,
    }


class LlamaCppRounds:
    """The llama.cpp variants of one workload, one timed run of each format per round, run after each round of
    the transformers variants (``w1.interleaved``), so that the ratios against llama.cpp carry no more of this
    machine's drift than the others do. Each round starts every format's worker anew (its load and warm-up are
    not timed); a format whose worker crashed is not run again."""

    def __init__(self, workload: w1.Workload, ggufs: dict[str, Path | str], every_path: bool = False):
        from . import llama_cpp  # as w2: `python -m metaspo_hf.bench.llama_cpp` runs it alone

        self.workload, self.every_path = workload, every_path
        self.skipped = llama_cpp.skip_reason()
        self.files = {} if self.skipped else ggufs
        # Per format, the worker's results of every round so far: {"version", "build", "paths": {path: ...}}.
        self.measured: dict[str, dict] = {}

    def run_round(self, prompts: list[list[int]], eos_ids: list[int]) -> None:
        from . import llama_cpp

        for fmt, file in self.files.items():
            if isinstance(file, str) or "worker" in self.measured.get(fmt, {}).get("paths", {}):
                continue  # no file, or its worker crashed in an earlier round
            print(f"[bench] llama.cpp on {file}", file=sys.stderr, flush=True)
            # The F32 file holds the engine's float32 weights, so its tokens should be the engine's: a check of
            # the worker itself; the one-chat-at-a-time path runs only there.
            paths = llama_cpp.PATHS if self.every_path and fmt == "F32" else llama_cpp.BATCHED_PATHS
            measured = llama_cpp.measure(file, prompts, self.workload.new_tokens, self.workload.threads, eos_ids,
                                         1, paths)
            self.measured[fmt] = _with_round(self.measured.get(fmt), measured)
            print(f"[bench]   llama.cpp {fmt}: {_round_times(measured)}", file=sys.stderr, flush=True)


def _round_times(measured: dict) -> str:
    """One round of one format, as the bench log shows it: each path's wall time, or why it failed."""
    return ", ".join(f"{path} " + (figures["failed"] if "failed" in figures
                                   else " ".join(f"{run['wall_s']:.2f} s" for run in figures["runs"]))
                     for path, figures in measured["paths"].items())


def _with_round(so_far: dict | None, measured: dict) -> dict:
    """One format's results with one more round's: each path's runs appended; a path that failed in any round
    stays failed."""
    if so_far is None:
        return measured
    for path, figures in measured["paths"].items():
        kept = so_far["paths"].get(path)
        if kept is None or "failed" in figures:
            so_far["paths"][path] = figures
        elif "failed" not in kept:
            kept["runs"].extend(figures["runs"])
    return so_far


def _llama_cpp_variants(rounds: LlamaCppRounds, hf: w1.HFRuns) -> dict:
    """One llama.cpp variant per GGUF format (``llama_cpp_<format>``, each its best path), then ``llama_cpp``:
    the fastest of them, naming its variant, format and path; only ``llama_cpp``, skipped, while llama.cpp
    cannot run."""
    if rounds.skipped:
        print(f"[bench] llama.cpp skipped: {rounds.skipped}", file=sys.stderr, flush=True)
        return {"llama_cpp": {"skipped": rounds.skipped}}
    variants = {}
    for fmt, file in rounds.files.items():
        name = f"llama_cpp_{fmt.lower()}"
        if isinstance(file, str):
            variants[name] = {"format": fmt, "skipped": file}
            continue
        variants[name] = {"format": fmt, "gguf": str(file),
                          **_llama_cpp(rounds.measured[fmt], hf, against_engine=fmt == "F32")}
    ran = [name for name in variants if "tok_s" in variants[name]]
    if not ran:
        return {**variants, "llama_cpp": {"skipped": "no llama.cpp variant ran"}}
    best = max(ran, key=lambda name: variants[name]["tok_s"])
    return {**variants, "llama_cpp": {"variant": best, **{k: v for k, v in variants[best].items() if k != "paths"}}}


def _llama_cpp(measured: dict, hf: w1.HFRuns, against_engine: bool = False) -> dict:
    """The best llama.cpp path on one GGUF file (by tok/s) with every path's figures, or why none ran, from
    the worker's ``measured`` runs. With ``against_engine``, each path's token identity with the (float32)
    engine's."""
    paths = {}
    for path, figures in measured["paths"].items():
        if "failed" in figures:
            paths[path] = figures
            continue
        runs = w1.Runs.of([(run["ids"], w1.Timing(run["wall_s"], run["prefill_s"], sum(map(len, run["ids"]))))
                           for run in figures["runs"]])
        agreement = w1.identity(runs.ids, hf.variants["batched"].ids)
        paths[path] = {**runs.as_dict(), "rows_equal_to_batched": agreement["rows_equal"]}
        if against_engine:
            paths[path]["identity_to_engine"] = w1.identity(runs.ids, hf.variants["engine"].ids)
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


# Besides the best llama.cpp variant, each engine variant against llama.cpp's of its precision class; the int8
# ones also against the bfloat16 engine (the issue keeps the faster of bfloat16 and int8 at equal scores).
RATIOS = (("engine", "batched"), ("engine", "naive"), ("engine", "llama_cpp"), ("engine", "llama_cpp_f32"),
          ("batched", "naive"), ("engine_bf16", "batched"), ("engine_bf16", "batched_bf16"), ("engine_bf16", "engine"),
          ("engine_bf16", "llama_cpp"), ("engine_bf16", "llama_cpp_bf16"), ("engine_bf16", "llama_cpp_f16"),
          ("engine_bf16", "engine_bf16_torch_attention"),
          *((name, other) for name in w1.INT8_VARIANTS
            for other in ("batched", "engine_bf16", "llama_cpp", "llama_cpp_q8_0")))


def ratios(variants: dict) -> dict:
    """tok/s of one variant over another's (both medians), for the pairs whose variants the workload has;
    None where one of them was skipped or failed."""

    def over(a: str, b: str) -> float | None:
        if "tok_s" not in variants[a] or "tok_s" not in variants[b]:
            return None
        return round(variants[a]["tok_s"] / variants[b]["tok_s"], 2)

    return {f"{a}_over_{b}": over(a, b) for a, b in RATIOS if a in variants and b in variants}


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
    lines = []
    for key in ("w1", "w3", "w4"):
        if key in results:
            lines += [*generation_lines(key, results[key]), ""]
    if "w2" in results:
        lines += [*_w2_lines(results["w2"]), ""]
        for figures in results.get("w2_at_recipes", {}).values():
            lines += [*_w2_lines(figures), ""]
    if "loglik" in results:
        from .loglik import lines as loglik_lines  # as w2: see the import of w1

        lines += [*loglik_lines(results["loglik"]), ""]
    if "data_parallel" in results:
        from .parallel import lines as parallel_lines  # as w2: see the import of w1

        lines += [*parallel_lines(results["data_parallel"]), ""]
    return "\n".join(lines).rstrip("\n")


# The width of the tables' variant column: the longest name ("engine_bf16_torch_attention") and two spaces.
LABEL = 29


def generation_lines(key: str, section: dict) -> list[str]:
    """The table of one generation workload: medians, with the range of wall times."""
    work = section["workload"]
    runs = f"medians of {work['repeats']} run(s)" + (f" (naive: {work['naive_runs']})" if "naive_runs" in work else "")
    lines = [f"{key.upper()}: {GENERATION[key][0]}: {work['chats']} chats x {work['new_tokens']} new tokens "
             f"(EOS suppressed), greedy, {section['model']} {work['dtype']} on {work['device']}, {work['threads']} threads; "
             f"shared prefix {work['shared_prefix_tokens']} tokens, prompts {work['prompt_tokens_mean']} tokens on "
             f"average; {runs}",
             f"{'variant':<{LABEL}}{'tok/s':>8}{'wall s (min-max)':>23}{'prefill s':>11}{'decode s':>10}{'vs batched':>12}"
             f"{'decode/limit':>14}"]
    batched = section["variants"]["batched"]["tok_s"]

    def row(label: str, figures: dict) -> str:
        wall = f"{figures['wall_s']:.2f} ({figures['wall_s_min']:.2f}-{figures['wall_s_max']:.2f})"
        share = figures.get("decode_share_of_matmul_limit")
        notes = []
        if "variant" in figures:  # the best llama.cpp variant
            notes.append(f"{figures['variant']}, {figures['path']}")
        elif "path" in figures:  # a llama.cpp variant: its best path
            notes.append(f"best path: {figures['path']}")
        if "library" in figures.get("settings", {}):  # an int8 variant
            notes.append(f"{figures['settings']['library']} {figures['settings']['version']}")
        if "rows_equal_to_batched" in figures:
            notes.append(f"rows equal to batched: {figures['rows_equal_to_batched']}/{work['chats']}")
        if "identity_to_engine" in figures:
            notes.append(f"rows equal to engine: {figures['identity_to_engine']['rows_equal']}/{work['chats']}")
        if not figures["ids_stable_across_runs"]:
            notes.append("ids differ between runs")
        return (f"{label:<{LABEL}}{figures['tok_s']:>8.1f}{wall:>23}{figures['prefill_s']:>11.2f}{figures['decode_s']:>10.2f}"
                f"{figures['tok_s'] / batched:>11.2f}x{'' if share is None else f'{share:.3g}':>14}"
                + "".join(f"   {note}" for note in notes))

    for name, figures in section["variants"].items():
        label = f"{name} (best)" if "variant" in figures else name
        lines.append(f"{label:<{LABEL}}skipped: {figures['skipped']}" if "skipped" in figures else row(label, figures))
        for path, other in figures.get("paths", {}).items():  # a llama.cpp variant's (failed ones too)
            lines.append(f"  {path}: failed: {other['failed']}" if "failed" in other else row(f"  {path}", other))
    limit = section["matmul_limit"]
    lines.append(f"matmul limit ({limit['rows']} rows x 1 token, the model's own linear layers on the faster kernel, median of "
                 f"{limit['runs']}, one per round): "
                 + "; ".join(f"{dtype} {limit[dtype]['step_s'] * 1e3:.3g} ms/step ({limit[dtype].get('kernel', 'plain')}), "
                             f"decode floor {limit[dtype]['decode_floor_s']:.3g} s" for dtype in map(matmul.dtype_name, matmul.DTYPES) if dtype in limit))
    for key_name, target in section.get("targets", {}).items():
        value = section["ratios"].get(key_name)
        shown = f"{value:.2f}" if value is not None else "n/a"
        verdict = "n/a" if value is None else ("met" if value >= target else "NOT met")
        lines.append(f"{key_name.replace('_', ' ')}: {shown} (target >= {target}: {verdict})")
    identity = section["identity"]
    lines.append(f"engine tokens identical to batched generate: {section['engine_identical_to_batched']} "
                 f"({identity['rows_equal']}/{identity['rows']} rows)")
    return lines


def _w2_lines(figures: dict) -> list[str]:
    from . import w2  # see the import of w1

    return w2.lines(figures)
