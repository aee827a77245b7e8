"""The `metaspo bench` harness on a tiny random model: the JSON it writes, the table it prints, and how it
decides token identity. No timing is asserted: only that the figures are there and consistent."""

import json
import re
import sys
from pathlib import Path

import pytest
from fixtures.fake_bigbench import write_fake_bigbench

from metaspo_hf import bench
from metaspo_hf.bench import llama_cpp, matmul, parallel, w1, w4
from metaspo_hf.errors import MetaspoError
from metaspo_hf.models.base import GenerationSettings
from metaspo_hf.models.engine import HFEngine


@pytest.fixture
def fake_bigbench(tmp_path, monkeypatch):
    monkeypatch.setenv("METASPO_BIGBENCH_ARCHIVE", str(write_fake_bigbench(tmp_path / "archive")))


def test_bench_writes_the_json_and_prints_both_tables(tiny_llama, tiny_tokenizer, tiny_model_dir, fake_bigbench,
                                                      tmp_path, monkeypatch, capsys):
    # The names bench.main calls (imported from models.loading).
    monkeypatch.setattr(bench, "load_model", lambda spec: (tiny_llama, tiny_tokenizer))
    # The data-parallel variant launches its own processes: they load the tiny model from its folder.
    run_parallel = parallel.run
    monkeypatch.setattr(parallel, "run", lambda **kw: run_parallel(**{**kw, "model_name": str(tiny_model_dir),
                                                                       "repeats": 1}))
    # A GGUF path is given, but the llama.cpp environment was never built in this private cache.
    monkeypatch.setattr(bench, "packaged_gguf_path", lambda name: tmp_path / "model.gguf")
    out = tmp_path / "results" / "bench.json"
    bench.main(out=str(out), quick=True, repeats=2)

    results = json.loads(out.read_text())
    w1_section = results["w1"]
    work = w1_section["workload"]
    assert (work["chats"], work["new_tokens"], work["repeats"], work["naive_runs"]) == (
        w1.QUICK.chats, w1.QUICK.new_tokens, 2, 1)
    assert 0 < work["shared_prefix_tokens"] < work["prompt_tokens_mean"]
    variants = w1_section["variants"]
    assert list(variants) == ["naive", "batched", "engine", "engine_bf16", "llama_cpp"]
    for name in ("naive", "batched", "engine", "engine_bf16"):
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
    assert "settings" not in variants["batched"] and "decode_share_of_matmul_limit" not in variants["batched"]
    assert 0 <= variants["engine_bf16"]["rows_equal_to_batched"] <= work["chats"]
    limit = w1_section["matmul_limit"]
    assert (limit["rows"], limit["new_tokens"], limit["runs"]) == (work["chats"], work["new_tokens"], 2)
    for dtype in ("float32", "bfloat16"):
        assert limit[dtype]["step_s"] > 0 and limit[dtype]["decode_floor_s"] > 0
    assert "make bench" in variants["llama_cpp"]["skipped"]
    ratios = w1_section["ratios"]
    assert ratios["engine_over_llama_cpp"] is None
    # Ratios are of the reported tok/s, which come from the median wall times.
    for a, b in (("engine", "batched"), ("engine", "naive"), ("engine_bf16", "engine")):
        assert ratios[f"{a}_over_{b}"] == round(variants[a]["tok_s"] / variants[b]["tok_s"], 2)
    assert w1_section["engine_identical_to_batched"] is True

    for key, workload in (("w3", w1.W3_QUICK), ("w4", w4.QUICK)):
        section = results[key]
        assert (section["workload"]["chats"], section["workload"]["new_tokens"]) == (workload.chats, workload.new_tokens)
        assert set(section["variants"]) == {"batched", "engine", "llama_cpp"}
        assert set(section["ratios"]) == {"engine_over_batched", "engine_over_llama_cpp"}
        for figures in (section["variants"]["batched"], section["variants"]["engine"]):
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

    assert results["data_parallel"]["identical"] is True
    assert results["data_parallel"]["2_processes"]["processes"] == 2

    printed = capsys.readouterr().out
    assert all(f"{key}:" in printed for key in ("W1", "W2", "W3", "W4", "Data parallel"))
    assert re.search(r"^llama_cpp +skipped: ", printed, re.M) and "matmul limit" in printed
    assert re.search(r"^engine_bf16 .*rows equal to batched: \d+/8$", printed, re.M)
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
    crash = tmp_path / "worker.py"
    crash.write_text("import os, signal, sys\nprint('llama_decode: bad batch', file=sys.stderr, flush=True)\n"
                     "os.kill(os.getpid(), signal.SIGSEGV)\n")
    monkeypatch.setattr(llama_cpp, "WORKER", crash)
    monkeypatch.setattr(llama_cpp, "_python", lambda root: Path(sys.executable))
    monkeypatch.setattr(llama_cpp, "skip_reason", lambda: None)
    hf = w1.HFRuns(variants={}, prompts=w1.prompt_ids(tiny_tokenizer, w1.QUICK.build()), eos_ids=[])
    figures = bench._llama_cpp(w1.QUICK, tmp_path / "model.gguf", hf, repeats=1)
    assert figures["skipped"] == "every llama.cpp path failed"
    failure = figures["paths"]["worker"]["failed"]
    assert "killed by SIGSEGV" in failure and "llama_decode: bad batch" in failure
    assert figures["build"] == llama_cpp.CMAKE_ARGS


def test_llama_cpp_paths_report_the_medians_of_the_workers_runs(tiny_tokenizer, tmp_path, monkeypatch):
    # A stand-in worker: every path generates token 7 throughout, in runs of 2, 4 and 3 seconds.
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import json, sys\njob = json.load(open(sys.argv[1]))\n"
        "ids = [[7] * job['new_tokens'] for _ in job['prompts']]\n"
        "runs = [{'wall_s': w, 'prefill_s': w / 4, 'ids': ids} for w in (2.0, 4.0, 3.0)[:job['repeats']]]\n"
        "json.dump({'version': 'fake', 'paths': {'batched_split': {'runs': runs}, "
        "'high_level': {'failed': 'no'}}}, open(sys.argv[2], 'w'))\n")
    monkeypatch.setattr(llama_cpp, "WORKER", worker)
    monkeypatch.setattr(llama_cpp, "_python", lambda root: Path(sys.executable))
    monkeypatch.setattr(llama_cpp, "skip_reason", lambda: None)
    workload = w1.Workload(chats=2, new_tokens=3)
    batched = w1.Runs.of([([[7, 7, 7], [7, 7, 8]], w1.Timing(1.0, 0.5, 6))])
    hf = w1.HFRuns(variants={"batched": batched}, prompts=w1.prompt_ids(tiny_tokenizer, workload.build()), eos_ids=[])
    figures = bench._llama_cpp(workload, tmp_path / "model.gguf", hf, repeats=3)
    assert (figures["path"], figures["runs"], figures["wall_s"], figures["wall_s_min"], figures["wall_s_max"]) == (
        "batched_split", 3, 3.0, 2.0, 4.0)
    assert (figures["tok_s"], figures["prefill_s"], figures["rows_equal_to_batched"]) == (2.0, 0.75, 1)
    assert figures["paths"]["high_level"] == {"failed": "no"}


def test_runs_report_medians_of_each_figure_and_whether_the_ids_held():
    ids = [[1, 2], [3, 4]]
    results = [(ids, w1.Timing(3.0, 1.0, 4)), ([[1, 2], [3, 5]], w1.Timing(1.0, 0.2, 4)), (ids, w1.Timing(2.0, 0.9, 4))]
    figures = w1.Runs.of(results).as_dict()
    assert (figures["wall_s"], figures["wall_s_min"], figures["wall_s_max"], figures["runs"]) == (2.0, 1.0, 3.0, 3)
    # Prefill and decode are medians of their own: 0.9 and 1.1 come from different runs.
    assert (figures["prefill_s"], figures["decode_s"], figures["tok_s"]) == (0.9, 1.1, 2.0)
    assert figures["ids_stable_across_runs"] is False and "settings" not in figures
    assert w1.Runs.of(results[::2]).as_dict()["ids_stable_across_runs"] is True


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


def test_the_matmul_limit_counts_every_linear_layer(tiny_llama):
    shapes = matmul.linear_shapes(tiny_llama)
    # Per layer q, k, v, o, gate, up, down; then the vocabulary projection.
    assert sum(shapes.values()) == 7 * tiny_llama.config.num_hidden_layers + 1
    assert shapes[(tiny_llama.config.vocab_size, tiny_llama.config.hidden_size, False)] == 1
    limit = matmul.limit(tiny_llama, rows=4, new_tokens=10, repeats=2)
    for dtype in ("float32", "bfloat16"):
        assert limit[dtype]["step_s"] > 0 and limit[dtype]["decode_floor_s"] > 0
        assert set(limit[dtype]["step_s_by_shape"]) == set(limit["shapes"])
    assert matmul.share(limit, "float32", 0.0) is None


def test_the_workloads_can_be_chosen(tiny_llama, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "load_model", lambda spec: (tiny_llama, tiny_tokenizer))
    monkeypatch.setattr(bench, "packaged_gguf_path", lambda name: None)
    results = bench.main(out=str(tmp_path / "w3.json"), quick=True, workloads="w3")
    assert set(results) == {"model", "machine", "w3"}
    assert results["w3"]["variants"]["llama_cpp"] == {"skipped": "the model has no GGUF file"}
    with pytest.raises(MetaspoError, match="unknown workload"):
        bench.main(quick=True, workloads="w1,w5")


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
