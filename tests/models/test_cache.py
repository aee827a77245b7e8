"""CachedEngine: misses go to the wrapped engine once, hits come from disk, sampled copies stay distinct."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import time
from contextlib import closing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metaspo_hf.errors import MetaspoError
from metaspo_hf.models.base import GenerationSettings, make_chat
from metaspo_hf.models.cache import CachedEngine, count_responses
from metaspo_hf.models.fake import FakeEngine, stable_hash

GREEDY = GenerationSettings(max_new_tokens=16)
SAMPLED = GenerationSettings(max_new_tokens=16, temperature=1.0, seed=3)


def respond(chat, settings, k):
    # Sampled copies differ by k; greedy answers depend on the chat only, as with a real model.
    draw = stable_hash(chat[-1]["content"], settings.seed, k) % 1000 if not settings.greedy else 0
    return f"answer to {chat[-1]['content']} / draw {draw}"


def chats(*texts):
    return [make_chat("Be brief.", text) for text in texts]


def test_second_identical_call_is_served_from_disk(tmp_path):
    inner = FakeEngine(respond)
    engine = CachedEngine(inner, tmp_path / "responses.sqlite", model_id="m")
    first = engine.generate(chats("a", "b", "c"), GREEDY)
    assert len(inner.calls) == 1 and engine.stats.cache_hits == 0 and engine.stats.prompts == 3

    second = engine.generate(chats("a", "b", "c"), GREEDY)
    assert second == first
    assert len(inner.calls) == 1, "a fully cached call must not reach the wrapped engine"
    assert engine.stats.cache_hits == 3 and engine.stats.prompts == 3


def test_only_misses_are_sent_in_one_call_keeping_order(tmp_path):
    inner = FakeEngine(respond)
    engine = CachedEngine(inner, tmp_path / "responses.sqlite", model_id="m")
    engine.generate(chats("b", "d"), GREEDY)
    outputs = engine.generate(chats("a", "b", "c", "d", "e"), GREEDY)
    sent, _ = inner.calls[-1]
    assert [chat[-1]["content"] for chat in sent] == ["a", "c", "e"]
    assert outputs == FakeEngine(respond).generate(chats("a", "b", "c", "d", "e"), GREEDY)
    assert engine.stats.cache_hits == 2


def test_sampled_duplicates_keep_distinct_outputs_and_replay_exactly(tmp_path):
    path = tmp_path / "responses.sqlite"
    engine = CachedEngine(FakeEngine(respond), path, model_id="m")
    three = engine.generate(chats("q", "q", "q"), SAMPLED)
    assert len(set(three)) == 3

    # A fourth copy is new: copies 0..3 go to the wrapped engine so that copy 3 gets sample index 3.
    inner = FakeEngine(respond)
    engine = CachedEngine(inner, path, model_id="m")
    four = engine.generate(chats("q", "q", "q", "q"), SAMPLED)
    assert four[:3] == three
    assert four == FakeEngine(respond).generate(chats("q", "q", "q", "q"), SAMPLED)
    assert len(inner.calls[0][0]) == 4


def test_cache_survives_reopen_and_separates_models_and_settings(tmp_path):
    path = tmp_path / "responses.sqlite"
    with CachedEngine(FakeEngine(respond), path, model_id="m") as engine:
        stored = engine.generate(chats("a", "b"), SAMPLED)
    assert count_responses(path) == 2

    def must_not_generate(chat, settings, k):
        raise AssertionError("a stored response was generated again")

    with CachedEngine(FakeEngine(must_not_generate), path, model_id="m") as engine:
        assert engine.generate(chats("a", "b"), SAMPLED) == stored
        assert engine.stats.cache_hits == 2

    other_model = FakeEngine(respond)
    with CachedEngine(other_model, path, model_id="another-model") as engine:
        engine.generate(chats("a"), SAMPLED)
    other_seed = FakeEngine(respond)
    with CachedEngine(other_seed, path, model_id="m") as engine:
        engine.generate(chats("a"), GenerationSettings(temperature=1.0, seed=4))
    assert len(other_model.calls) == 1 and len(other_seed.calls) == 1


def test_failed_call_stores_nothing_and_keeps_earlier_rows(tmp_path):
    path = tmp_path / "responses.sqlite"
    failing = {"on": False}

    def flaky(chat, settings, k):
        if failing["on"]:
            raise RuntimeError("out of memory")
        return respond(chat, settings, k)

    engine = CachedEngine(FakeEngine(flaky), path, model_id="m")
    engine.generate(chats("a"), GREEDY)
    failing["on"] = True
    with pytest.raises(RuntimeError):
        engine.generate(chats("b", "c"), GREEDY)
    assert count_responses(path) == 1


# Calls drawn from a small pool of chats, so that hits, misses and repeated copies all occur.
call_strategy = st.lists(st.lists(st.sampled_from("abc"), min_size=0, max_size=6), min_size=1, max_size=5)


@settings(max_examples=40, deadline=None)
@given(calls=call_strategy, sampled=st.booleans())
def test_cached_outputs_equal_uncached_outputs(tmp_path_factory, calls, sampled):
    gen = SAMPLED if sampled else GREEDY
    engine = CachedEngine(FakeEngine(respond), tmp_path_factory.mktemp("cache") / "r.sqlite", model_id="m")
    reference = FakeEngine(respond)
    for texts in calls:
        assert engine.generate(chats(*texts), gen) == reference.generate(chats(*texts), gen)
    total = sum(len(texts) for texts in calls)
    # Every position is either answered from disk or sent to the wrapped engine, never both.
    assert engine.stats.cache_hits + engine.stats.prompts == total
    engine.close()


def test_kill_during_writes_leaves_only_whole_calls(tmp_path):
    path = tmp_path / "responses.sqlite"
    writer = textwrap.dedent(
        f"""
        import itertools
        from metaspo_hf.models.base import GenerationSettings, make_chat
        from metaspo_hf.models.cache import CachedEngine
        from metaspo_hf.models.fake import FakeEngine
        engine = CachedEngine(FakeEngine(lambda chat, s, k: "x" * 200), {str(path)!r}, model_id="m")
        for call in itertools.count():
            engine.generate([make_chat(None, f"{{call}}-{{i}}") for i in range(50)], GenerationSettings())
            print(call, flush=True)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(5):  # let a few calls commit, then kill in the middle of the stream
            process.stdout.readline()
        time.sleep(0.01)
    finally:
        process.kill()
        process.wait()
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = count_responses(path)
    assert rows >= 5 * 50 and rows % 50 == 0, "a call's rows are committed all together or not at all"


def test_unreadable_cache_file_is_a_clear_error(tmp_path):
    path = tmp_path / "responses.sqlite"
    path.write_text("this is not a database, " * 100)
    with pytest.raises(MetaspoError, match="responses.sqlite"):
        CachedEngine(FakeEngine(respond), path, model_id="m")


def test_totals_after_a_resume_equal_an_uninterrupted_run(tmp_path):
    plan = [chats("a", "b"), chats("c", "c"), chats("a", "d", "e")]

    uninterrupted = CachedEngine(FakeEngine(respond), tmp_path / "whole.sqlite", model_id="m")
    expected = [uninterrupted.generate(call, SAMPLED) for call in plan]

    path = tmp_path / "resumed.sqlite"
    first = CachedEngine(FakeEngine(respond), path, model_id="m")
    first.generate(plan[0], SAMPLED)  # the process dies after its first call
    first.close()
    second = CachedEngine(FakeEngine(respond), path, model_id="m")
    assert [second.generate(call, SAMPLED) for call in plan] == expected

    whole, resumed = uninterrupted.total_stats, second.total_stats
    assert (resumed.calls, resumed.prompts, resumed.generated_tokens) == (
        whole.calls,
        whole.prompts,
        whole.generated_tokens,
    ), "a replayed call is not generated (nor counted) twice"
    assert resumed.cache_hits == whole.cache_hits + len(plan[0])
    assert second.stats.prompts == whole.prompts - len(plan[0]), "this process generated only the rest"


def test_two_roles_sharing_one_model_count_their_own_work(tmp_path):
    model = FakeEngine(respond)
    base = CachedEngine(model, tmp_path / "responses.sqlite", model_id="m")
    optimizer = CachedEngine(model, tmp_path / "responses.sqlite", model_id="m")
    base.generate(chats("a", "b", "c"), GREEDY)
    optimizer.generate(chats("x"), SAMPLED)
    assert (base.stats.prompts, optimizer.stats.prompts) == (3, 1)
    assert model.stats.prompts == 4
