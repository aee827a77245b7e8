"""The `metaspo bench` harness on a tiny random model: the JSON it writes, the table it prints, and how it
decides token identity. No timing is asserted: only that the figures are there and consistent."""

import json
import re
import sys
from pathlib import Path

import pytest
from fixtures.fake_bigbench import write_fake_bigbench

from metaspo_hf import bench
from metaspo_hf.bench import llama_cpp, parallel, w1
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
    bench.main(out=str(out), quick=True)

    results = json.loads(out.read_text())
    work = results["workload"]
    assert (work["chats"], work["new_tokens"]) == (w1.QUICK.chats, w1.QUICK.new_tokens)
    assert 0 < work["shared_prefix_tokens"] < work["prompt_tokens_mean"]
    for name in ("naive", "batched", "engine"):
        figures = results["variants"][name]
        # EOS is suppressed, so every variant generates exactly the workload's tokens.
        assert figures["new_tokens"] == work["chats"] * work["new_tokens"]
        assert figures["tok_s"] > 0 and 0 < figures["prefill_s"] < figures["wall_s"]
        assert figures["decode_s"] == pytest.approx(figures["wall_s"] - figures["prefill_s"], abs=2e-3)
    assert "make bench" in results["variants"]["llama_cpp"]["skipped"]
    assert results["ratios"]["engine_over_llama_cpp"] is None
    assert results["ratios"]["engine_over_batched"] == pytest.approx(
        results["variants"]["engine"]["tok_s"] / results["variants"]["batched"]["tok_s"], abs=0.01)
    assert results["engine_identical_to_batched"] is True

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
    assert "W1:" in printed and "W2:" in printed and re.search(r"^llama_cpp +skipped: ", printed, re.M)
    assert "Data parallel:" in printed
    assert printed.strip().endswith(str(out))


def test_identity_is_decided_by_comparing_tokens(tiny_llama, tiny_tokenizer, monkeypatch):
    real = HFEngine.generate_ids

    def one_token_off(self, chats, settings, desc=None):
        ids = real(self, chats, settings, desc)
        ids[1][-1] += 1
        return ids

    monkeypatch.setattr(HFEngine, "generate_ids", one_token_off)
    workload = w1.Workload(chats=4, new_tokens=5)
    runs = w1.run_hf_variants(tiny_llama, tiny_tokenizer, workload, naive=False)
    verdict = w1.identity(runs["engine"]["ids"], runs["batched"]["ids"])
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
    hf = {"eos_ids": [], "batched": {"ids": []}}
    figures = bench._llama_cpp(w1.QUICK, tiny_tokenizer, tmp_path / "model.gguf", hf)
    assert figures["skipped"] == "every llama.cpp path failed"
    failure = figures["paths"]["worker"]["failed"]
    assert "killed by SIGSEGV" in failure and "llama_decode: bad batch" in failure
    assert figures["build"] == llama_cpp.CMAKE_ARGS
