"""The `metaspo bench` harness on a tiny random model: the JSON it writes, the table it prints, and how it
decides token identity. No timing is asserted: only that the figures are there and consistent."""

import copy
import importlib.metadata
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from fixtures.fake_bigbench import write_fake_bigbench

from metaspo_hf import bench
from metaspo_hf.bench import gguf as bench_gguf
from metaspo_hf.bench import llama_cpp, matmul, parallel, w1, w4
from metaspo_hf.cli import build_parser
from metaspo_hf.errors import MetaspoError
from metaspo_hf.models import decode_kernel, quantized
from metaspo_hf.models.base import GenerationSettings
from metaspo_hf.models.engine import HFEngine
from metaspo_hf.models.loading import ModelSpec
from metaspo_hf.models.packed import packed_linear_weights
from metaspo_hf.paths import cache_dir


@pytest.fixture
def fake_bigbench(tmp_path, monkeypatch):
    monkeypatch.setenv("METASPO_BIGBENCH_ARCHIVE", str(write_fake_bigbench(tmp_path / "archive")))



def fake_worker(tmp_path, monkeypatch, script: str) -> None:
    """The llama.cpp worker replaced by ``script``, run by this Python, with the environment taken as ready."""
    worker = tmp_path / "worker.py"
    worker.write_text(script)
    monkeypatch.setattr(llama_cpp, "WORKER", worker)
    monkeypatch.setattr(llama_cpp, "_python", lambda root: Path(sys.executable))
    monkeypatch.setattr(llama_cpp, "skip_reason", lambda: None)

def two_chats(tokenizer, ids: list[list[int]], *names: str) -> tuple[w1.Workload, w1.HFRuns]:
    """A workload of 2 chats x 3 new tokens, and its HF variants ``names``, each one run that generated ``ids``."""
    workload = w1.Workload(chats=2, new_tokens=3)
    runs = w1.Runs.of([(ids, w1.Timing(1.0, 0.5, 6))])
    return workload, w1.HFRuns(variants=dict.fromkeys(names, runs),
                               prompts=w1.prompt_ids(tokenizer, workload.build()), eos_ids=[])


def llama_cpp_rounds(workload: w1.Workload, ggufs: dict, hf: w1.HFRuns, rounds: int, every_path: bool = False) -> dict:
    """The llama.cpp variants of ``ggufs`` after ``rounds`` rounds, as the benchmark runs them beside its own."""
    llama = bench.LlamaCppRounds(workload, ggufs, every_path)
    for _ in range(rounds):
        llama.run_round(hf.prompts, hf.eos_ids)
    return bench._llama_cpp_variants(llama, hf)


def token_7_worker(runs: str, paths: str) -> str:
    """A stand-in worker's script that generates token 7 throughout: ``runs`` and ``paths`` are Python
    expressions for its timed runs and its paths' figures, with ``job`` and ``ids`` (per prompt) in scope."""
    return ("import json, sys\njob = json.load(open(sys.argv[1]))\n"
            "ids = [[7] * job['new_tokens'] for _ in job['prompts']]\n"
            f"runs = {runs}\n"
            f"json.dump({{'version': 'fake', 'paths': {paths}}}, open(sys.argv[2], 'w'))\n")


def test_bench_writes_the_json_and_prints_both_tables(tiny_llama, tiny_tokenizer, tiny_model_dir, fake_bigbench,
                                                      tmp_path, monkeypatch, capsys):
    # The names bench.main calls (imported from models.loading).
    monkeypatch.setattr(bench, "load_model", lambda spec: (tiny_llama, tiny_tokenizer))
    # The data-parallel variant launches its own processes: they load the tiny model from its folder.
    run_parallel = parallel.run
    monkeypatch.setattr(parallel, "run", lambda **kw: run_parallel(**{**kw, "model_name": str(tiny_model_dir),
                                                                       "repeats": 1}))
    # The llama.cpp environment was never built in this private cache: llama.cpp is skipped, no GGUF is made.
    out = tmp_path / "results" / "bench.json"
    bench.main(out=str(out), quick=True, repeats=2)

    results = json.loads(out.read_text())
    w1_section = results["w1"]
    work = w1_section["workload"]
    assert (work["chats"], work["new_tokens"], work["repeats"], work["naive_runs"]) == (
        w1.QUICK.chats, w1.QUICK.new_tokens, 2, 1)
    assert 0 < work["shared_prefix_tokens"] < work["prompt_tokens_mean"]
    variants = w1_section["variants"]
    assert list(variants) == ["naive", "batched", "engine", "batched_bf16", "engine_bf16",
                              "engine_bf16_torch_attention", *w1.INT8_VARIANTS, "llama_cpp"]
    # The tiny model's 16-dimensional heads are not what the kernel is built for: engine_bf16 is on torch's ops.
    assert variants["engine_bf16"]["settings"]["attention_kernel"] is False
    assert "does not apply" in variants["engine_bf16_torch_attention"]["skipped"]
    for name in w1.INT8_VARIANTS:  # each ran on the tiny model, or says why not (its library missing here)
        figures = variants[name]
        assert figures["skipped"] if "skipped" in figures else (
            figures["new_tokens"] == work["chats"] * work["new_tokens"]
            and 0 <= figures["rows_equal_to_batched"] <= work["chats"] and figures["settings"]["library"])
    for name in ("naive", "batched", "engine", "batched_bf16", "engine_bf16"):
        figures = variants[name]
        # EOS is suppressed, so every variant generates exactly the workload's tokens.
        assert figures["new_tokens"] == work["chats"] * work["new_tokens"]
        assert figures["runs"] == (1 if name == "naive" else 2)
        assert figures["wall_s_min"] <= figures["wall_s"] <= figures["wall_s_max"]
        assert figures["tok_s"] > 0 and 0 < figures["prefill_s"] < figures["wall_s_max"]
        assert figures["decode_s"] > 0 and figures["ids_stable_across_runs"] is True
    for name, dtype in (("engine", "float32"), ("engine_bf16", "bfloat16")):
        settings = variants[name]["settings"]
        assert (settings["dtype"], settings["threads"]) == (dtype, 2) and isinstance(settings["packed_linears"], bool)
        assert variants[name]["decode_share_of_matmul_limit"] > 0
    for name in ("batched", "batched_bf16"):  # transformers' own generate: no engine settings, no share
        assert "settings" not in variants[name] and "decode_share_of_matmul_limit" not in variants[name]
    for name in ("batched_bf16", "engine_bf16"):
        assert 0 <= variants[name]["rows_equal_to_batched"] <= work["chats"]
    limit = w1_section["matmul_limit"]
    assert (limit["rows"], limit["new_tokens"], limit["runs"]) == (work["chats"], work["new_tokens"], 2)
    for dtype in ("float32", "bfloat16"):
        assert limit[dtype]["step_s"] > 0 and limit[dtype]["decode_floor_s"] > 0
    assert "make bench" in variants["llama_cpp"]["skipped"]
    ratios = w1_section["ratios"]
    assert ratios["engine_over_llama_cpp"] is None
    # Ratios are of the reported tok/s, which come from the median wall times.
    for a, b in (("engine", "batched"), ("engine", "naive"), ("engine_bf16", "engine"), ("engine_bf16", "batched_bf16")):
        assert ratios[f"{a}_over_{b}"] == round(variants[a]["tok_s"] / variants[b]["tok_s"], 2)
    assert {f"{name}_over_{b}" for name in w1.INT8_VARIANTS for b in ("batched", "engine_bf16")} <= set(ratios)
    assert w1_section["engine_identical_to_batched"] is True

    for key, workload in (("w3", w1.W3_QUICK), ("w4", w4.QUICK)):
        section = results[key]
        assert (section["workload"]["chats"], section["workload"]["new_tokens"]) == (workload.chats, workload.new_tokens)
        assert set(section["variants"]) == {"batched", "engine", "batched_bf16", "engine_bf16",
                                            "engine_bf16_torch_attention", "llama_cpp"}
        assert set(section["ratios"]) == {"engine_over_batched", "engine_over_llama_cpp", "engine_bf16_over_batched",
                                          "engine_bf16_over_batched_bf16", "engine_bf16_over_engine",
                                          "engine_bf16_over_llama_cpp", "engine_bf16_over_engine_bf16_torch_attention"}
        for figures in (section["variants"][name] for name in ("batched", "engine", "engine_bf16")):
            assert figures["new_tokens"] == workload.chats * workload.new_tokens and figures["runs"] == 2
        assert section["variants"]["engine"]["decode_share_of_matmul_limit"] > 0
        assert section["engine_identical_to_batched"] is True
    # W4's rows share the short optimizer system prompt, not W1's long one.
    assert results["w4"]["workload"]["shared_prefix_tokens"] < w1_section["workload"]["shared_prefix_tokens"]

    w2 = results["w2"]
    for way in ("ours", "reference"):
        assert w2[way]["base_generations"] > 0 and w2[way]["optimizer_calls"] > 0
        assert w2[way]["generated_tokens"] == w2[way]["base_generated_tokens"] + w2[way]["optimizer_generated_tokens"]
    assert w2["ratio"]["generated_tokens"] == pytest.approx(
        w2["ours"]["generated_tokens"] / w2["reference"]["generated_tokens"], abs=1e-3)
    assert isinstance(w2["same_prompts_selected"], bool)
    # Again at the CPU recipes' settings: their racing is off, so ours skips nothing by racing.
    assert list(results["w2_at_recipes"]) == list(bench.W2_RECIPES)
    for figures in results["w2_at_recipes"].values():
        assert figures["settings"]["racing"] is False and figures["ours"]["racing_skipped"] == 0

    assert results["data_parallel"]["identical"] is True
    assert results["data_parallel"]["2_processes"]["processes"] == 2

    # Each generation workload carries its own acceptance targets, and its table says whether each is met
    # (n/a here: llama.cpp was skipped).
    assert [results[key]["targets"] for key in ("w1", "w3", "w4")] == [bench.TARGETS[key] for key in ("w1", "w3", "w4")]
    printed = capsys.readouterr().out
    assert len(re.findall(r"\(target >= [\d.]+: (?:met|NOT met|n/a)\)$", printed, re.M)) == sum(
        len(bench.TARGETS[key]) for key in ("w1", "w3", "w4"))
    assert re.search(r"^engine over batched: [\d.]+ \(target >= 1.2: (?:met|NOT met)\)$", printed, re.M)
    assert all(f"{key}:" in printed for key in ("W1", "W2", "W3", "W4", "Data parallel"))
    assert re.search(r"^llama_cpp +skipped: ", printed, re.M) and "matmul limit" in printed
    assert re.search(r"^engine_bf16 .*rows equal to batched: \d+/8$", printed, re.M)
    assert re.search(r"^engine_int8_torchao +(skipped: |[\d.]+ .*torchao .*rows equal to batched: \d+/8$)", printed, re.M)
    assert printed.strip().endswith(str(out))


def test_identity_is_decided_by_comparing_tokens(tiny_llama, tiny_tokenizer, monkeypatch):
    real = HFEngine.generate_ids

    def one_token_off(self, chats, settings, desc=None):
        ids = real(self, chats, settings, desc)
        ids[1][-1] += 1
        return ids

    monkeypatch.setattr(HFEngine, "generate_ids", one_token_off)
    workload = w1.Workload(chats=4, new_tokens=5)
    runs = w1.run_hf_variants(tiny_llama, tiny_tokenizer, workload).variants
    verdict = w1.identity(runs["engine"].ids, runs["batched"].ids)
    assert verdict["identical"] is False
    assert (verdict["rows_equal"], verdict["first_difference"]) == (3, [4])


@pytest.mark.parametrize("name", list(w1.INT8_VARIANTS))
def test_an_int8_variant_generates_every_token_on_a_quantized_copy(tiny_llama, tiny_tokenizer, name, monkeypatch):
    quantization = w1.INT8_VARIANTS[name]
    library = quantized.INT8_LIBRARIES[quantization]
    pytest.importorskip(library)
    monkeypatch.setattr(w1, "INT8_VARIANTS", {name: quantization})  # this one only
    workload = w1.Workload(chats=3, new_tokens=5)
    runs = w1.run_hf_variants(tiny_llama, tiny_tokenizer, workload, int8=True).variants[name]
    assert isinstance(runs, w1.Runs), runs  # else: why it could not run
    assert [len(row) for row in runs.ids] == [workload.new_tokens] * workload.chats
    settings = runs.settings
    assert (settings["library"], settings["version"]) == (library, importlib.metadata.version(library))
    assert settings["dtype"] == settings["activation_dtype"] == "bfloat16" and settings["scheme"]
    # Every linear layer of the decoder blocks (7 per layer) is quantized; the output projection stays float.
    assert settings["quantized_linears"] == 7 * tiny_llama.config.num_hidden_layers
    assert settings["float_linears"] == ["lm_head"] and isinstance(settings["packed_linears"], bool)
    # The quantized model is a copy: the float32 one is as it was.
    assert all(type(m.weight) is torch.nn.Parameter and m.weight.dtype == torch.float32
               for m in tiny_llama.modules() if isinstance(m, torch.nn.Linear))


def test_the_bfloat16_engine_runs_beside_itself_on_torch_attention_where_the_kernel_applies(tiny_tokenizer):
    from tiny import tiny_llama_with_head_dim

    if decode_kernel.load() is None:
        pytest.skip("the decode-attention kernel cannot be built here")
    model = tiny_llama_with_head_dim(tiny_tokenizer, 64)
    section = bench.generation(model, tiny_tokenizer, {}, w1.Workload(chats=4, new_tokens=5), repeats=1, int8=False)
    variants = section["variants"]
    on, off = variants["engine_bf16"], variants["engine_bf16_torch_attention"]
    assert (on["settings"]["attention_kernel"], off["settings"]["attention_kernel"]) == (True, False)
    assert on["new_tokens"] == off["new_tokens"] == 20 and 0 <= off["rows_equal_to_batched"] <= 4
    assert section["ratios"]["engine_bf16_over_engine_bf16_torch_attention"] == round(on["tok_s"] / off["tok_s"], 2)


def test_int8_variants_without_their_libraries_are_skipped_with_the_reason(tiny_llama, tiny_tokenizer, monkeypatch):
    for library in quantized.INT8_LIBRARIES.values():
        monkeypatch.setitem(sys.modules, library, None)  # `import library` raises ImportError
    section = bench.generation(tiny_llama, tiny_tokenizer, {}, w1.Workload(chats=2, new_tokens=3), repeats=1,
                               int8=True)
    variants = section["variants"]
    assert list(variants)[:7] == ["batched", "engine", "batched_bf16", "engine_bf16", "engine_bf16_torch_attention",
                                  "engine_int8_torchao", "engine_int8_bnb"]
    for name, quantization in w1.INT8_VARIANTS.items():
        library = quantized.INT8_LIBRARIES[quantization]
        assert variants[name]["skipped"].startswith(f"model.quantization={quantization!r} needs {library}")
        assert f'pip install --no-deps "{library}==' in variants[name]["skipped"]
        assert section["ratios"][f"{name}_over_engine_bf16"] is None
    turned_off = bench.generation(tiny_llama, tiny_tokenizer, {}, w1.Workload(chats=2, new_tokens=3), repeats=1,
                                  int8=False)["variants"]
    assert all(turned_off[name] == {"skipped": "int8 variants turned off (--no-int8)"} for name in w1.INT8_VARIANTS)
    assert build_parser().parse_args(["bench", "--no-int8"]).int8 is False
    assert build_parser().parse_args(["bench"]).int8 is True


def test_the_int8_libraries_are_pinned_alike_in_the_bench_extra_the_makefile_and_the_hint():
    """`make bench` installs them with --no-deps (bitsandbytes declares torch): the same pins as the extra."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pins = [f"{library}=={version}" for library, version in quantized.TESTED.items()]
    repo = Path(__file__).resolve().parent.parent
    assert sorted(tomllib.loads((repo / "pyproject.toml").read_text())["project"]["optional-dependencies"]["bench"]) \
        == sorted(pins)
    install = next(line for line in (repo / "Makefile").read_text().splitlines() if "--no-deps" in line
                   and "torchao" in line)
    assert install.split("--no-deps", 1)[1].split() == [f'"{pin}"' for pin in pins]


def test_suppressed_eos_generates_exactly_max_new_tokens(tiny_llama, tiny_tokenizer):
    chats = w1.Workload(chats=3).build()
    settings = GenerationSettings(max_new_tokens=40)
    eos = tiny_tokenizer.eos_token_id
    free = HFEngine(tiny_llama, tiny_tokenizer, "tiny", progress=False).generate_ids(chats, settings)
    forced = HFEngine(tiny_llama, tiny_tokenizer, "tiny", progress=False, suppress_eos=True).generate_ids(chats, settings)
    assert all(len(ids) == 40 and eos not in ids for ids in forced)
    # Where the free run stopped early, the forced one agrees up to that point.
    assert all(f == g[: len(f)] for f, g in zip(free, forced, strict=True))
    prompts = w1.prompt_ids(tiny_tokenizer, chats)
    assert forced == w1.hf_generate(tiny_llama, tiny_tokenizer, prompts, 40, {eos})


def test_a_crashing_llama_cpp_worker_fails_its_variant_not_the_benchmark(tiny_tokenizer, tmp_path, monkeypatch):
    starts = tmp_path / "starts"
    fake_worker(tmp_path, monkeypatch, f"import os, signal, sys\nopen({str(starts)!r}, 'a').write('x')\n"
                "print('llama_decode: bad batch', file=sys.stderr, flush=True)\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    hf = w1.HFRuns(variants={}, prompts=w1.prompt_ids(tiny_tokenizer, w1.QUICK.build()), eos_ids=[])
    variants = llama_cpp_rounds(w1.QUICK, {"Q8_0": tmp_path / "model.gguf"}, hf, rounds=3)
    assert variants["llama_cpp"] == {"skipped": "no llama.cpp variant ran"}
    figures = variants["llama_cpp_q8_0"]
    assert starts.read_text() == "x"  # not started again in the later rounds
    assert figures["skipped"] == "every llama.cpp path failed"
    failure = figures["paths"]["worker"]["failed"]
    assert "killed by SIGSEGV" in failure and "llama_decode: bad batch" in failure
    assert figures["build"] == llama_cpp.CMAKE_ARGS


def test_llama_cpp_paths_report_the_medians_of_the_workers_runs(tiny_tokenizer, tmp_path, monkeypatch):
    # A stand-in worker: every path generates token 7 throughout, one timed run a round, of 2, 4 and 3 seconds.
    started = tmp_path / "started"
    fake_worker(tmp_path, monkeypatch, f"import os\nrounds = open({str(started)!r}, 'a+')\nrounds.write('x')\n"
                "rounds.seek(0)\nw = (2.0, 4.0, 3.0)[len(rounds.read()) - 1]\n" + token_7_worker(
                    runs="[{'wall_s': w, 'prefill_s': w / 4, 'ids': ids}] * job['repeats']",
                    paths="{'batched_split': {'runs': runs}, 'high_level': {'failed': 'no'}}"))
    workload, hf = two_chats(tiny_tokenizer, [[7, 7, 7], [7, 7, 8]], "batched")
    figures = llama_cpp_rounds(workload, {"F16": tmp_path / "model.gguf"}, hf, rounds=3)["llama_cpp_f16"]
    assert (figures["path"], figures["runs"], figures["wall_s"], figures["wall_s_min"], figures["wall_s_max"]) == (
        "batched_split", 3, 3.0, 2.0, 4.0)
    assert (figures["tok_s"], figures["prefill_s"], figures["rows_equal_to_batched"]) == (2.0, 0.75, 1)
    assert figures["paths"]["high_level"] == {"failed": "no"}


def test_only_the_f32_file_on_w1_runs_the_one_chat_at_a_time_path(tiny_tokenizer, tmp_path, monkeypatch):
    # A stand-in worker that runs the paths the job names, each generating token 7 throughout.
    fake_worker(tmp_path, monkeypatch, token_7_worker(
        runs="[{'wall_s': 1.0, 'prefill_s': 0.5, 'ids': ids}] * job['repeats']",
        paths="{p: {'runs': runs} for p in job['paths']}"))
    workload, hf = two_chats(tiny_tokenizer, [[7, 7, 7], [7, 7, 7]], "batched", "engine")
    ggufs = {fmt: tmp_path / f"{fmt}.gguf" for fmt in ("F32", "Q8_0")}
    on_w1 = llama_cpp_rounds(workload, ggufs, hf, rounds=1, every_path=True)
    assert list(on_w1["llama_cpp_f32"]["paths"]) == ["batched_unified", "batched_split", "high_level"]
    assert list(on_w1["llama_cpp_q8_0"]["paths"]) == ["batched_unified", "batched_split"]
    elsewhere = llama_cpp_rounds(workload, ggufs, hf, rounds=1)
    assert list(elsewhere["llama_cpp_f32"]["paths"]) == ["batched_unified", "batched_split"]


def test_w2_at_a_recipe_takes_its_sizes_budgets_and_racing():
    from metaspo_hf.bench import w2

    cost = w2.RunCost().at_recipe("qwen2.5-coder-1.5b-cpu")
    assert (cost.train_size, cost.system_candidates, cost.base_new_tokens, cost.optimizer_new_tokens) == (16, 5, 32, 256)
    assert (cost.racing, cost.recipe, cost.tasks) == (False, "qwen2.5-coder-1.5b-cpu", w2.RunCost().tasks)
    assert cost.budget(ours=True).racing is False and w2.RunCost().budget(ours=True).racing is True
    assert w2.RunCost().budget(ours=False).racing is False
    quick = w2.QUICK.at_recipe("smollm2-135m-cpu", sizes=False)
    assert (quick.train_size, quick.racing) == (w2.QUICK.train_size, False)


def test_w2_at_an_unknown_recipe_is_a_one_line_error(capsys):
    from metaspo_hf.bench import w2

    with pytest.raises(SystemExit) as stopped:
        w2.main(["--recipe", "smollm2-135m-cpuu"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "recipe not found: smollm2-135m-cpuu" in error and "Traceback" not in error


def test_the_figures_so_far_are_saved_after_each_workload(monkeypatch):
    monkeypatch.setattr(bench, "generation", lambda model, tokenizer, ggufs, workload, *args, **kwargs: {})
    saved = []
    bench.collect(None, None, {}, quick=True, workloads=("w1", "w3"),
                  save=lambda results: saved.append([key for key in results if key.startswith("w")]))
    assert saved == [["w1"], ["w1", "w3"]]


def test_runs_report_medians_of_each_figure_and_whether_the_ids_held():
    ids = [[1, 2], [3, 4]]
    results = [(ids, w1.Timing(3.0, 1.0, 4)), ([[1, 2], [3, 5]], w1.Timing(1.0, 0.2, 4)), (ids, w1.Timing(2.0, 0.9, 4))]
    figures = w1.Runs.of(results).as_dict()
    assert (figures["wall_s"], figures["wall_s_min"], figures["wall_s_max"], figures["runs"]) == (2.0, 1.0, 3.0, 3)
    # Prefill and decode are medians of their own: 0.9 and 1.1 come from different runs.
    assert (figures["prefill_s"], figures["decode_s"], figures["tok_s"]) == (0.9, 1.1, 2.0)
    assert figures["ids_stable_across_runs"] is False and "settings" not in figures
    assert w1.Runs.of(results[::2]).as_dict()["ids_stable_across_runs"] is True


def test_variants_are_timed_round_by_round_with_their_own_settings():
    """One run of each variant per round, so drift reaches all alike; each keeps its settings and its
    prefill is split on its own model."""
    order, models = [], [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]

    def run_of(name, model):
        def run():
            order.append(name)
            model(torch.ones(1, 1, 2))  # a "prefill": more than one token per row
            return [[len(order)]]
        return run

    contenders = {"a": w1.Contender(models[0], run_of("a", models[0])),
                  "b": w1.Contender(models[1], run_of("b", models[1]), {"dtype": "bfloat16"})}
    runs = w1.interleaved(contenders, 3, after_round=lambda: order.append("llama.cpp"))
    assert order == ["a", "b", "llama.cpp"] * 3
    assert runs["a"].settings is None and runs["b"].settings == {"dtype": "bfloat16"}
    assert len(runs["b"].timings) == 3 and all(t.prefill_s > 0 for t in runs["b"].timings)
    assert runs["a"].ids == [[1]] and runs["a"].ids_stable is False  # each run returned other ids


def test_llama_cpp_runs_round_by_round_beside_the_transformers_variants(tiny_llama, tiny_tokenizer, tmp_path,
                                                                         monkeypatch, capsys):
    """Each round times every transformers variant once, then each llama.cpp format once: drift reaches
    llama.cpp's figures as it reaches the others'."""
    fake_worker(tmp_path, monkeypatch, token_7_worker(
        runs="[{'wall_s': 1.0, 'prefill_s': 0.5, 'ids': ids}] * job['repeats']",
        paths="{p: {'runs': runs} for p in job['paths']}"))
    ggufs = {fmt: tmp_path / f"{fmt}.gguf" for fmt in ("F16", "Q8_0")}
    figures = bench.generation(tiny_llama, tiny_tokenizer, ggufs, w1.W3_QUICK, repeats=2)
    log = capsys.readouterr().err
    events = [line for line in log.splitlines() if "round" in line or "llama.cpp on" in line]
    per_round = ["round {r}/2 batched", "round {r}/2 engine", "round {r}/2 batched_bf16", "round {r}/2 engine_bf16",
                 "round {r}/2 engine_bf16_torch_attention", "llama.cpp on " + str(ggufs["F16"]),
                 "llama.cpp on " + str(ggufs["Q8_0"])]
    kernel = "engine_bf16_torch_attention" in figures["variants"] and "skipped" not in figures["variants"][
        "engine_bf16_torch_attention"]
    expected = [e.format(r=r) for r in (1, 2) for e in per_round if kernel or "torch_attention" not in e]
    assert len(events) == len(expected) and all(e in line for e, line in zip(expected, events, strict=True))
    assert figures["variants"]["llama_cpp_q8_0"]["runs"] == 2
    # Each format's round time is in the log, and the matmul limit took its turn in each round too.
    assert len(re.findall(r"llama\.cpp Q8_0: batched_unified 1\.00 s, batched_split 1\.00 s$", log, re.M)) == 2
    assert figures["matmul_limit"]["runs"] == 2


def test_w3_and_w4_generate_their_tokens_on_every_row(tiny_llama, tiny_tokenizer):
    for workload in (w1.W3_QUICK, w4.QUICK):
        runs = w1.run_hf_variants(tiny_llama, tiny_tokenizer, workload).variants
        for name in ("batched", "engine"):
            assert [len(row) for row in runs[name].ids] == [workload.new_tokens] * workload.chats


def test_w4_requests_are_long_distinct_and_deterministic():
    chats = w4.W4.build()
    assert chats == w4.W4.build() and len(chats) == 8
    assert all(chat[0]["content"] == w4.OPTIMIZER_SYSTEM_PROMPT for chat in chats)
    requests = [chat[1]["content"] for chat in chats]
    assert len(set(requests)) == 8 and all(request.count("## Wrong answer") == 5 for request in requests)
    # Distinct from the first words: the rows share no more than the system prompt.
    assert len({request[:20] for request in requests}) == 8


def test_the_matmul_limit_times_every_linear_layer_on_each_dtypes_own_model(tiny_llama):
    layers = matmul.linear_layers(tiny_llama)
    # Per layer q, k, v, o, gate, up, down; then the vocabulary projection.
    assert sum(map(len, layers.values())) == 7 * tiny_llama.config.num_hidden_layers + 1
    assert layers[(tiny_llama.config.vocab_size, tiny_llama.config.hidden_size, False)] == [tiny_llama.lm_head]
    bf16_copy = copy.deepcopy(tiny_llama).to(torch.bfloat16)
    int8_copy = copy.deepcopy(bf16_copy)  # its linear layers a subclass, as bitsandbytes' int8 ones are
    up = int8_copy.model.layers[0].mlp.up_proj
    int8_copy.model.layers[0].mlp.up_proj = type("Int8Linear", (torch.nn.Linear,), {})(
        up.in_features, up.out_features, bias=False, dtype=torch.bfloat16)
    timed = []
    real_seconds = matmul._seconds
    rounds = matmul.LimitRounds(rows=4, new_tokens=10)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(matmul, "_seconds", lambda model, *args: timed.append(model) or real_seconds(model, *args))
        for _ in range(2):  # as the hook beside the variants' rounds is called: an int8 copy is no float limit
            rounds.run_round([tiny_llama, int8_copy, bf16_copy, copy.deepcopy(bf16_copy)])
    assert timed == [tiny_llama, bf16_copy] * 2
    limit = rounds.figures()
    assert (limit["rows"], limit["new_tokens"], limit["runs"]) == (4, 10, 2)
    assert sum(limit["shapes"].values()) == 7 * tiny_llama.config.num_hidden_layers + 1
    for dtype, model in (("float32", tiny_llama), ("bfloat16", bf16_copy)):
        assert limit[dtype]["step_s"] > 0 and limit[dtype]["decode_floor_s"] > 0
        assert set(limit[dtype]["step_s_by_shape"]) == set(limit["shapes"])
        # The floor is the faster kernel's; the packed one is timed on the weights the engine packed.
        by_kernel = limit[dtype]["step_s_by_kernel"]
        assert limit[dtype]["step_s"] == min(by_kernel.values()) == by_kernel[limit[dtype]["kernel"]]
        assert set(by_kernel) == ({"plain", "packed"} if packed_linear_weights(model) else {"plain"})
    assert matmul.share(limit, "float32", 0.0) is None


def test_the_limit_reads_every_weight_once_untimed_before_it_times_them():
    calls = []
    weights = [(torch.zeros(3, 2), None) for _ in range(4)]
    matmul._timed_calls(lambda x, weight, bias: calls.append(weight), torch.zeros(1, 2), weights)
    # Weights left cold by a llama.cpp round read slower the first time: the timed pass is the second.
    assert [id(w) for w in calls] == [id(w) for w, _ in weights] * 2


def test_a_dtype_whose_limit_was_not_timed_has_no_share(tiny_llama):
    rounds = matmul.LimitRounds(rows=2, new_tokens=3)
    rounds.run_round([tiny_llama])
    limit = rounds.figures()
    assert "float32" in limit and "bfloat16" not in limit
    assert matmul.share(limit, "bfloat16", 1.0) is None and matmul.share(limit, "float32", 1.0) > 0



def test_the_workloads_can_be_chosen(tiny_llama, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "load_model", lambda spec: (tiny_llama, tiny_tokenizer))
    results = bench.main(out=str(tmp_path / "w3.json"), quick=True, workloads="w3")
    assert set(results) == {"model", "machine", "w3"}
    assert list(results["w3"]["variants"]["llama_cpp"]) == ["skipped"]
    with pytest.raises(MetaspoError, match="unknown workload"):
        bench.main(quick=True, workloads="w1,w5")
    with pytest.raises(MetaspoError, match=r"unknown llama.cpp format\(s\) Q4_1; choose from F16, BF16, Q8_0, Q4_0"):
        bench.main(quick=True, workloads="w3", llama_formats="q4_0,Q4_1")


def test_w4_runs_on_its_own_model_loaded_after_the_others(tiny_llama, tiny_tokenizer, tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(bench, "load_model", lambda spec: loaded.append(spec.name_or_path) or (tiny_llama, tiny_tokenizer))
    out = tmp_path / "w3-w4.json"
    results = bench.main(out=str(out), quick=True, workloads="w4,w3", w4_model="the-optimizer")
    assert loaded == ["the-optimizer", bench.MODEL]  # in the order asked, each once
    assert (results["model"], results["w3"]["model"], results["w4"]["model"]) == (
        bench.MODEL, bench.MODEL, "the-optimizer")
    assert json.loads(out.read_text()) == results
    tables = bench.format_tables(results)
    assert "W4: optimizer-shaped requests" in tables and ", the-optimizer float32 on cpu" in tables
    loaded.clear()
    with pytest.raises(MetaspoError, match="model folder not found: ./no/such-model") as refused:
        bench.main(out=str(tmp_path / "never.json"), quick=True, workloads="w1,w4", w4_model="./no/such-model")
    assert refused.value.hint.startswith("check --w4-model")  # the flag the user typed, not a recipe key
    assert loaded == [] and not (tmp_path / "never.json").exists()  # refused before any model was loaded


def test_w4s_model_is_the_validity_recipes_optimizer_where_installed(monkeypatch):
    assert bench.w4_model_name("some/model-folder") == "some/model-folder"

    def not_installed(name, assemble=True):
        raise MetaspoError(f"the packaged model {name!r} lacks 22 of its 22 parts")

    monkeypatch.setattr(bench, "packaged_gguf_path", not_installed)
    assert bench.w4_model_name() == bench.MODEL
    monkeypatch.setattr(bench, "packaged_gguf_path", lambda name, assemble=True: Path(f"/cache/{name}.gguf"))
    assert bench.w4_model_name() == bench.W4_MODEL == "qwen2.5-coder-1.5b-instruct"


def test_a_llama_cpp_environment_built_with_other_flags_is_rebuilt(tmp_path, monkeypatch):
    """The flags decide which native kernels run (the AMX ones crash on some CPUs): an environment
    built with other flags, or with none recorded, is not taken as ready."""
    monkeypatch.setattr(llama_cpp, "env_dir", lambda: tmp_path)
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'print(\"{llama_cpp.VERSION}\")'\n")
    python.chmod(0o755)
    assert not llama_cpp.is_ready()  # no flags recorded
    (tmp_path / "metaspo-build-flags.txt").write_text("-DGGML_NATIVE=ON")
    assert not llama_cpp.is_ready()
    (tmp_path / "metaspo-build-flags.txt").write_text(llama_cpp.CMAKE_ARGS)
    assert llama_cpp.is_ready()


def _fake_conversion_script(tools: Path, log: Path, failing: str = "") -> None:
    """A stand-in for llama.cpp's convert_hf_to_gguf.py: logs its interpreter, argv and PYTHONPATH, and writes
    its --outtype into --outfile, or fails on the outtype ``failing``."""
    (tools / "gguf-py").mkdir(parents=True)
    (tools / bench_gguf.SCRIPT).write_text(
        "import json, os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps([sys.executable, sys.argv, os.environ['PYTHONPATH']]) + '\\n')\n"
        "outtype = sys.argv[sys.argv.index('--outtype') + 1]\n"
        f"if outtype == {failing!r}:\n"
        "    sys.exit(f'cannot write {outtype}')\n"
        "open(sys.argv[sys.argv.index('--outfile') + 1], 'w').write(outtype)\n")


def test_gguf_files_are_converted_once_and_q4_0_waits_for_llama_cpp(tiny_model_dir, tmp_path, monkeypatch):
    tools, log = tmp_path / "tools", tmp_path / "calls.jsonl"
    _fake_conversion_script(tools, log)
    monkeypatch.setattr(bench_gguf, "source", lambda: tools)
    made = bench_gguf.files(tiny_model_dir, "tiny")
    folder = cache_dir("bench", "gguf", "tiny")
    assert list(made) == ["F32", "F16", "BF16", "Q8_0", "Q4_0"]
    for fmt, outtype in bench_gguf.OUTTYPES.items():
        assert made[fmt] == folder / f"{fmt}.gguf" and made[fmt].read_text() == outtype
    # No llama.cpp environment in this private cache, so no quantizer: Q4_0 is skipped, saying why.
    assert "make bench" in made["Q4_0"] and not (folder / "Q4_0.gguf").exists()
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    for (python, argv, pythonpath), outtype in zip(calls, bench_gguf.OUTTYPES.values(), strict=True):
        assert python == sys.executable
        assert argv[:5] == [str(tools / bench_gguf.SCRIPT), str(tiny_model_dir), "--outtype", outtype, "--outfile"]
        # Written under a temporary name beside the file, renamed when the script is done.
        assert Path(argv[5]).parent == folder and Path(argv[5]).name.startswith(".staging-")
        assert pythonpath.split(os.pathsep)[:2] == [str(tools / "gguf-py"), str(tools / "deps")]
    assert bench_gguf.files(tiny_model_dir, "tiny") == made
    assert len(log.read_text().splitlines()) == len(calls)  # the second call converted nothing


def test_a_failed_conversion_fails_only_its_format_and_q4_0_is_quantized_from_f32(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    tools = tmp_path / "tools"
    _fake_conversion_script(tools, tmp_path / "calls.jsonl", failing="bf16")
    monkeypatch.setattr(bench_gguf, "source", lambda: tools)
    # A ready llama.cpp environment whose quantizer copies its input.
    monkeypatch.setattr(llama_cpp, "skip_reason", lambda: None)
    monkeypatch.setattr(llama_cpp, "_python", lambda root: Path(sys.executable))
    monkeypatch.setattr(bench_gguf, "QUANTIZE_Q4_0", "import shutil, sys\nshutil.copy(sys.argv[1], sys.argv[2])\n")
    made = bench_gguf.files(tiny_model_dir, "tiny-bf16-fails")  # the cache is the session's: a name of its own
    assert "exited with code 1: cannot write bf16" in made["BF16"]
    folder = cache_dir("bench", "gguf", "tiny-bf16-fails")
    assert made["Q4_0"] == folder / "Q4_0.gguf" and made["Q4_0"].read_text() == "f32"
    # Nothing half-written is left behind.
    assert sorted(path.name for path in folder.iterdir()) == ["F16.gguf", "F32.gguf", "Q4_0.gguf", "Q8_0.gguf"]


def test_the_packaged_file_is_the_variant_of_its_own_format(tmp_path, monkeypatch):
    spec = ModelSpec(name_or_path=bench.MODEL, dtype="float32")
    assert bench.gguf_files(spec) == {}  # llama.cpp cannot run here: nothing is converted
    monkeypatch.setattr(llama_cpp, "skip_reason", lambda: None)
    monkeypatch.setattr(bench, "local_folder", lambda spec: tmp_path / "model")
    monkeypatch.setattr(bench_gguf, "files", lambda folder, name: {"F32": folder / "F32.gguf", "Q8_0": "failed"})
    monkeypatch.setattr(bench, "packaged_gguf_path", lambda name: tmp_path / "packaged.gguf")
    monkeypatch.setattr(bench_gguf, "file_format", lambda path: "Q4_1")
    assert bench.gguf_files(spec) == {"F32": tmp_path / "model" / "F32.gguf", "Q8_0": "failed",
                                      "Q4_1": tmp_path / "packaged.gguf"}
    monkeypatch.setattr(bench_gguf, "file_format", lambda path: "Q8_0")  # as one of the converted formats
    assert bench.gguf_files(spec)["Q8_0_packaged"] == tmp_path / "packaged.gguf"


@pytest.fixture
def format_variants(tiny_tokenizer, tmp_path, monkeypatch):
    """The llama.cpp variants of six GGUF files run by a stand-in worker (token 7 throughout): F32 4 s, F16 3 s,
    BF16 crashes, Q8_0 1 s, Q4_0 without a file, the packaged Q4_1 2 s. Returns (variants, the engine's runs)."""
    fake_worker(tmp_path, monkeypatch,
                "import json, os, signal, sys\njob = json.load(open(sys.argv[1]))\n"
                "name = os.path.basename(job['gguf'])\n"
                "if name == 'BF16.gguf':\n    os.kill(os.getpid(), signal.SIGSEGV)\n"
                "wall = {'F32.gguf': 4.0, 'F16.gguf': 3.0, 'Q8_0.gguf': 1.0, 'packaged.gguf': 2.0}[name]\n"
                "ids = [[7] * job['new_tokens'] for _ in job['prompts']]\n"
                "runs = [{'wall_s': wall, 'prefill_s': wall / 4, 'ids': ids}] * job['repeats']\n"
                "json.dump({'version': 'fake', 'paths': {'batched_split': {'runs': runs}}}, open(sys.argv[2], 'w'))\n")
    ggufs = {fmt: tmp_path / f"{fmt}.gguf" for fmt in ("F32", "F16", "BF16", "Q8_0")}
    ggufs |= {"Q4_0": "no quantizer", "Q4_1": tmp_path / "packaged.gguf"}
    workload, hf = two_chats(tiny_tokenizer, [[7, 7, 7], [7, 8, 7]], "batched", "engine")
    return llama_cpp_rounds(workload, ggufs, hf, rounds=1), hf.variants["engine"]


def test_each_gguf_format_is_a_llama_cpp_variant_and_the_fastest_is_the_best(format_variants):
    variants, _ = format_variants
    assert list(variants) == ["llama_cpp_f32", "llama_cpp_f16", "llama_cpp_bf16", "llama_cpp_q8_0", "llama_cpp_q4_0",
                              "llama_cpp_q4_1", "llama_cpp"]
    best = variants["llama_cpp"]
    assert (best["variant"], best["format"], best["path"], best["tok_s"]) == ("llama_cpp_q8_0", "Q8_0", "batched_split", 6.0)
    assert "paths" not in best  # they are in its variant
    # The crashing worker failed its own variant only.
    bf16 = variants["llama_cpp_bf16"]
    assert bf16["skipped"] == "every llama.cpp path failed" and "killed by SIGSEGV" in bf16["paths"]["worker"]["failed"]
    assert variants["llama_cpp_q4_0"] == {"format": "Q4_0", "skipped": "no quantizer"}
    # The F32 variant's tokens against the engine's: row 2 differs at its second token.
    identity = variants["llama_cpp_f32"]["identity_to_engine"]
    assert (identity["rows_equal"], identity["first_difference"]) == (1, [1])
    assert all("identity_to_engine" not in variants[name] for name in ("llama_cpp_f16", "llama_cpp_q8_0"))
    ratios = bench.ratios({"engine": {"tok_s": 12.0}, "engine_bf16": {"tok_s": 6.0}, **variants})
    assert (ratios["engine_over_llama_cpp"], ratios["engine_over_llama_cpp_f32"]) == (2.0, 8.0)
    assert (ratios["engine_bf16_over_llama_cpp_f16"], ratios["engine_bf16_over_llama_cpp_bf16"]) == (3.0, None)


def test_the_table_shows_every_format_and_the_best(format_variants):
    variants, engine = format_variants
    limit = {"step_s": 1e-3, "decode_floor_s": 3e-3}
    section = {"model": "tiny", "workload": {"chats": 2, "new_tokens": 3, "dtype": "float32", "device": "cpu", "threads": 2,
                            "shared_prefix_tokens": 1, "prompt_tokens_mean": 2.0, "repeats": 1},
               "variants": {"batched": engine.as_dict(), **variants}, "ratios": {},
               "matmul_limit": {"rows": 2, "runs": 1, "float32": limit, "bfloat16": limit},
               "engine_identical_to_batched": True, "identity": w1.identity(engine.ids, engine.ids)}
    table = "\n".join(bench.generation_lines("w1", section))
    assert re.search(r"^llama_cpp \(best\) .*llama_cpp_q8_0, batched_split", table, re.M)
    assert re.search(r"^llama_cpp_f32 .*best path: batched_split .*rows equal to engine: 1/2$", table, re.M)
    assert re.search(r"^llama_cpp_bf16 +skipped: every llama.cpp path failed\n  worker: failed: .*SIGSEGV", table, re.M)
    assert re.search(r"^llama_cpp_q4_0 +skipped: no quantizer$", table, re.M)


@pytest.mark.slow
def test_llama_cpps_conversion_script_converts_the_tiny_model(tiny_model_dir, tiny_llama, tmp_path):
    """The real script, from the llama-cpp-python sdist (fetched here: network, about a minute)."""
    from gguf import GGUFReader

    try:
        bench_gguf.source()
    except bench_gguf.Unavailable as why:
        pytest.skip(f"llama.cpp's conversion script could not be fetched: {why}")
    # The tiny tokenizer as it is: the script names a byte-level BPE pre-tokenizer by a hash of its tokens on a
    # test text, known for published tokenizers only, so it refuses this one; each format says so.
    refused = bench_gguf.files(tiny_model_dir, "tiny")
    assert all("pre-tokenizer was not recognized" in refused[fmt] for fmt in bench_gguf.OUTTYPES)
    # Read as a llama (sentencepiece-style) vocabulary instead, which needs no hash: byte fallback on, and the
    # decoder in a sequence.
    folder = tmp_path / "llama-vocab"
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["model"]["byte_fallback"] = True
    tokenizer["decoder"] = {"type": "Sequence", "decoders": [tokenizer["decoder"]]}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    made = bench_gguf.files(folder, "tiny-llama-vocab")
    assert "make bench" in made["Q4_0"]  # no llama.cpp environment here
    for fmt in bench_gguf.OUTTYPES:
        reader = GGUFReader(made[fmt])
        assert bench_gguf.file_format(made[fmt]) == fmt
        assert reader.fields["general.architecture"].contents() == "llama"
        assert len(reader.tensors) == len(tiny_llama.state_dict())


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_gpu_benchmark_runs_end_to_end_on_the_tiny_shape_with_a_local_tokenizer(tiny_model_dir, tmp_path, dtype):
    """The script a lent GPU machine runs, checked here on CPU with ``--tiny`` (the machine only receives the
    tokenizer's files, hence ``--tokenizer``)."""
    from metaspo_hf.bench import gpu

    out = tmp_path / "gpu.json"
    results = gpu.main(["--tiny", "--tokenizer", str(tiny_model_dir), "--chats", "3", "--new-tokens", "4",
                        "--repeats", "1", "--dtype", dtype, "--out", str(out)])
    assert json.loads(out.read_text()) == results
    assert results["engine_identical_to_batched"] is True
    assert results["model"].endswith(dtype) and results["workload"]["dtype"] == dtype
    assert results["workload"]["chats"] == 3 and results["workload"]["quant"] == "none"
    for name in ("batched", "engine"):
        assert results["variants"][name]["new_tokens"] == 3 * 4
    assert results["ratios"]["engine_over_batched"] > 0
