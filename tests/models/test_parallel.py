"""Data parallelism (models/parallel.py): the split of work units, and the engine on 2 gloo processes
launched by torchrun giving exactly what one process gives."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from metaspo_hf.errors import MetaspoError
from metaspo_hf.models.parallel import SINGLE, Processes

REPO = Path(__file__).resolve().parents[2]


def torchrun(nproc: int) -> list[str]:
    # --standalone: a local rendezvous on a free port, so tests never collide on one.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]


def one_thread_env() -> dict:
    """One thread a process in every launch compared (float sums then run in the same order); the
    checkout importable from the script's folder."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_every_unit_goes_to_exactly_one_process_balanced_by_cost():
    costs = [90, 10, 40, 40, 30, 5, 70, 20]
    shares = [Processes(count=3, index=i).assign(costs) for i in range(3)]
    assert sorted(unit for share in shares for unit in share) == list(range(len(costs)))
    loads = [sum(costs[u] for u in share) for share in shares]
    # Costliest first, each to the least loaded process: 90+10+5 | 70+30 | 40+40+20.
    assert loads == [105, 100, 100]
    assert shares == [Processes(count=3, index=i).assign(costs) for i in range(3)], "not deterministic"


def test_fewer_units_than_processes_leave_some_idle():
    assert [Processes(count=4, index=i).assign([5, 7]) for i in range(4)] == [[1], [0], [], []]


def test_one_process_runs_everything_in_order_and_shares_values_unchanged():
    assert SINGLE.share({"a": 1}) == {"a": 1}
    assert SINGLE.gather(3) == [3]
    assert SINGLE.share_work([3, 1, 2], cost=float, run=lambda unit: unit * 10) == [30, 10, 20]


def test_each_process_gets_its_own_share_of_the_machines_gpus():
    assert Processes(count=4, index=1, local_count=2, local_index=1).gpus(8) == [4, 5, 6, 7]
    assert Processes(count=2, index=0, local_count=2, local_index=0).gpus(2) == [0]
    with pytest.raises(MetaspoError, match="3 processes on this machine but 2 GPUs"):
        Processes(count=3, index=0, local_count=3, local_index=0).gpus(2)


ENGINE_SCRIPT = textwrap.dedent("""
    import json, sys
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from metaspo_hf.models.base import GenerationSettings, make_chat
    from metaspo_hf.models.engine import HFEngine
    from metaspo_hf.models.parallel import Processes

    processes = Processes.launched()
    folder, out = sys.argv[1], sys.argv[2]
    engine = HFEngine(AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder),
                      name="tiny", batch_size=3, progress=False, processes=processes)
    # Two system prompts (two prefix groups), no system prompt, uneven lengths, repeated chats.
    chats = [make_chat(system, f"question {i}: " + "count the apples " * (i % 5))
             for i in range(11) for system in ("Be brief.", "Answer with care.", None)]
    chats += chats[:4]
    greedy = engine.generate(chats, GenerationSettings(max_new_tokens=12))
    sampled = engine.generate(chats, GenerationSettings(max_new_tokens=12, temperature=1.0, seed=5))
    requests = [(chat, option) for chat in chats[:9] for option in (" A", " B", " no", "")]
    logliks = engine.loglikelihood(requests)
    stats = engine.stats.as_dict()
    del stats["seconds"]
    if processes.is_main:
        json.dump({"processes": processes.count, "greedy": greedy, "sampled": sampled, "loglik": logliks,
                   "stats": stats}, open(out, "w"))
""")


def test_two_processes_generate_and_score_exactly_what_one_does(tmp_path, tiny_model_dir):
    script = tmp_path / "engine_run.py"
    script.write_text(ENGINE_SCRIPT)
    outputs = {}
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}.json"
        done = subprocess.run([*torchrun(nproc), str(script), str(tiny_model_dir), str(out)],
                              env=one_thread_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[nproc] = json.loads(out.read_text())
    one, two = outputs[1], outputs[2]
    assert (one["processes"], two["processes"]) == (1, 2)
    for key in ("greedy", "sampled", "loglik"):
        assert two[key] == one[key], key
    # The counters count every process's work, each prefix once: as one process would.
    assert two["stats"] == one["stats"]
    assert any(one["greedy"]) and one["sampled"] != one["greedy"]


def test_the_data_parallel_benchmark_compares_two_processes_with_one(tiny_model_dir):
    from metaspo_hf.bench import parallel

    figures = parallel.run(processes=2, model_name=str(tiny_model_dir), quick=True, repeats=1, threads=2)
    one, two = figures["one_process"], figures["2_processes"]
    assert (one["processes"], one["threads_per_process"]) == (1, 2)
    assert (two["processes"], two["threads_per_process"]) == (2, 1)
    assert one["tok_s"] > 0 and two["tok_s"] > 0 and figures["speedup"] > 0
    assert figures["identical"] is True
    assert "speed-up" in "\n".join(parallel.lines(figures))
