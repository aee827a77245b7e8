"""The search methods on scripted models: exact call counts, adoption, determinism, parse failures."""

from __future__ import annotations

import json

import pytest
from fakes import (
    base_lm,
    batch_sizes,
    candidate_id,
    is_analysis_request,
    make_task,
    optimizer_lm,
    question_index,
    turns,
)

from metaspo_hf.errors import MetaspoError
from metaspo_hf.evaluation import EvaluationConfig
from metaspo_hf.models.base import LM, GenerationSettings, make_chat
from metaspo_hf.models.fake import FakeEngine
from metaspo_hf.reference_files import reference_result
from metaspo_hf.scoring import Scorer, Trial
from metaspo_hf.search import SearchConfig, prompts, run_search


def half_right(system: str, user: str) -> bool:
    return question_index(user) % 2 == 0


def tasks_of(count: int, n_train: int):
    return [make_task(f"t{i}", n_train=n_train) for i in range(count)]


SETTINGS = [  # (tasks T, train questions N, user candidates m, system candidates n, top_k K, iterations)
    (2, 4, 2, 3, 2, 2),
    (3, 3, 3, 2, 3, 3),
]


@pytest.mark.parametrize("T,N,m,n,K,iters", SETTINGS)
def test_metaspo_makes_exactly_the_expected_calls(T, N, m, n, K, iters):
    base, optimizer = base_lm(half_right), optimizer_lm()
    # Racing off: these are the counts of scoring every candidate in full (one batch per step);
    # racing's own exact counts are pinned in test_search_racing.py.
    budget = SearchConfig(
        iterations=iters, system_candidates=n, user_candidates=m, top_k=K, train_size=N, racing=False
    )
    events = []
    result = run_search("metaspo", tasks_of(T, N), base, optimizer, budget, seed=1, on_event=events.append)

    def kept(i):  # user prompts kept per task after the inner step of iteration i
        return min(K, 1 + i * m)

    # Iteration 0 scores the initial prompts. Each iteration: T*m analyses + T*m rewrites, n + n for the
    # system; T*m user candidates on N questions, then n system candidates x every kept pair x N.
    inner_base = [T * m * N for i in range(1, iters + 1)]
    outer_base = [n * T * kept(i) * N for i in range(1, iters + 1)]
    assert [h["optimizer_calls"] for h in result.history] == [0] + [2 * T * m + 2 * n] * iters
    assert [h["base_generations"] for h in result.history] == [T * N] + [
        a + b for a, b in zip(inner_base, outer_base, strict=True)
    ]
    # The engines agree, and every step is one batch per phase.
    assert batch_sizes(optimizer) == [T * m, T * m, n, n] * iters
    assert batch_sizes(base) == [T * N] + [
        x for pair in zip(inner_base, outer_base, strict=True) for x in pair
    ]
    assert result.counts["optimizer_calls"] == optimizer.engine.stats.prompts
    assert result.counts["base_generations"] == base.engine.stats.prompts
    assert [(e["iteration"], e["step"]) for e in events] == [(0, "init")] + [
        (i, step) for i in range(1, iters + 1) for step in ("inner", "outer")
    ]
    assert {len(prompts) for prompts in result.user_prompts.values()} == {kept(iters)}


def adoption_run(seed: int = 1, racing: bool = True):
    """Outer step 1 proposes only BAD system prompts, outer step 2 one GOOD among plain ones."""
    written = []

    def system_text(h):
        written.append(h)
        return {1: "BAD idea", 2: "BAD idea", 3: "BAD idea", 5: "GOOD idea"}.get(
            len(written), "Plain idea"
        ) + f" {h}."

    def correct(system, user):
        return "GOOD" in system or ("BAD" not in system and half_right(system, user))

    budget = SearchConfig(
        iterations=2, system_candidates=3, user_candidates=1, top_k=2, train_size=4, racing=racing
    )
    return run_search(
        "metaspo", tasks_of(2, 4), base_lm(correct), optimizer_lm(system_text), budget, seed=seed
    )


@pytest.mark.parametrize("racing", [False, True])
def test_the_best_system_candidate_is_adopted_only_when_it_beats_the_incumbent(racing):
    result = adoption_run(racing=racing)
    first, second = result.history[1], result.history[2]
    # With racing, the BAD candidates stop once they cannot beat 0.5, so none is scored in full and
    # there is no best candidate score to report; without it, their score 0.0 is.
    best_bad = None if racing else 0.0
    assert (first["adopted"], first["best_candidate_score"], first["incumbent_score"]) == (False, best_bad, 0.5)
    assert (second["adopted"], second["best_candidate_score"], second["incumbent_score"]) == (True, 1.0, 1.0)
    assert result.system_prompt.startswith("GOOD idea")
    # The kept user prompts are those the GOOD prompt was scored with; their nodes descend from the incumbent's.
    good_nodes = [n for n in result.nodes if n["system_prompt"] == result.system_prompt]
    assert sorted(n["user_prompt"] for n in good_nodes) == sorted(
        p for ps in result.user_prompts.values() for p in ps
    )
    by_id = {n["id"]: n for n in result.nodes}
    for node in good_nodes:
        parent = by_id[node["parent_id"]]
        assert (parent["user_prompt"], parent["task"], node["depth"]) == (
            node["user_prompt"],
            node["task"],
            parent["depth"] + 1,
        )
        assert parent["system_prompt"] == "You are a helpful assistant."


def test_the_add_edit_appends_one_instruction_to_the_current_system_prompt():
    def instruction(h):
        return "Give the final answer first." if h % 2 else "Answer in one word, then stop."

    def correct(system, user):  # only the prompt with the first instruction added helps
        return "final answer first" in system or half_right(system, user)

    optimizer = optimizer_lm(instruction)
    budget = SearchConfig(iterations=1, system_candidates=3, user_candidates=1, top_k=1, train_size=4,
                          racing=False, system_edit="add")
    result = run_search("metaspo", tasks_of(2, 4), base_lm(correct), optimizer, budget, seed=1)
    assert result.system_prompt == "You are a helpful assistant. Give the final answer first."
    candidates = {n["system_prompt"] for n in result.nodes if n["origin"] == "system"}
    assert candidates <= {"You are a helpful assistant. Give the final answer first.",
                          "You are a helpful assistant. Answer in one word, then stop."}
    # The outer step asked for an instruction to add, not for a new prompt.
    asked = [chat[-1]["content"] for chats, _ in optimizer.engine.calls for chat in chats
             if "# Current system prompt" in chat[-1]["content"]]
    assert asked and all("one instruction to add" in r and "Write a better system prompt" not in r for r in asked)


def test_system_focus_gives_each_candidate_its_own_kind_of_mistake_and_logs_which():
    foci = prompts.system_foci()

    def focus_in(request: str) -> str | None:
        named = [f for f in foci if f in request]
        assert len(named) <= 1
        return named[0] if named else None

    def respond(chat, settings, k):  # writes "Answer briefly." only when asked about the reply's length
        request = chat[-1]["content"]
        if is_analysis_request(request):
            return "<analysis>The replies run long.</analysis>"
        if "{question}" in request:
            return f"<prompt>Answer this ({candidate_id(chat, settings, k)}): {{question}}</prompt>"
        focus = focus_in(request)
        return f"<prompt>{'Answer briefly.' if focus and 'length of the reply' in focus else 'Be careful.'}</prompt>"

    def correct(system, user):
        return "Answer briefly." in system or half_right(system, user)

    events, outer_requests = [], {}
    for focus_on in (True, False):
        optimizer = LM(FakeEngine(respond), GenerationSettings(temperature=1.0, seed=7), role="optimizer")
        budget = SearchConfig(iterations=1, system_candidates=len(foci), user_candidates=1, top_k=1,
                              train_size=4, racing=False, system_focus=focus_on)
        result = run_search("metaspo", tasks_of(2, 4), base_lm(correct), optimizer, budget, seed=3,
                            on_event=events.append if focus_on else None)
        outer_requests[focus_on] = [chat[-1]["content"] for chats, _ in optimizer.engine.calls for chat in chats
                                    if "collected from several tasks" in chat[-1]["content"]
                                    or "# Current system prompt" in chat[-1]["content"]]
        assert (result.system_prompt == "Answer briefly.") is focus_on
    analyses = [r for r in outer_requests[True] if is_analysis_request(r)]
    rewrites = [r for r in outer_requests[True] if not is_analysis_request(r)]
    # As many candidates as foci: each kind of mistake once, the analysis and the rewrite of a candidate alike.
    assert sorted(map(focus_in, analyses)) == sorted(foci)
    assert [focus_in(r) for r in rewrites] == [focus_in(r) for r in analyses]
    assert all("Concentrate on one kind of mistake" not in r for r in outer_requests[False])
    proposals = [e for e in events if e.get("step") == "system_proposals"]
    assert len(proposals) == 1
    assert [p["focus"] for p in proposals[0]["proposals"]] == [focus_in(r) for r in rewrites]
    assert {p["system_prompt"] for p in proposals[0]["proposals"]} == {"Answer briefly.", "Be careful."}


def test_an_added_instruction_that_repeats_the_current_prompt_is_appended_once():
    initial = "You are a helpful assistant."
    replies = {0: f"{initial} Give the final answer first.", 1: initial}  # the second adds nothing new
    sent = []
    optimizer = optimizer_lm(lambda h: sent.append(h % 2) or replies[h % 2])
    budget = SearchConfig(iterations=1, system_candidates=4, user_candidates=1, top_k=1, train_size=4,
                          racing=False, system_edit="add")
    result = run_search("metaspo", tasks_of(2, 4), base_lm(half_right), optimizer, budget, seed=1)
    candidates = {n["system_prompt"] for n in result.nodes if n["origin"] == "system"}
    assert candidates == {"You are a helpful assistant. Give the final answer first."}
    # Only the replies with something new became candidates (one node per task each); both kinds were sent.
    system_nodes = [n for n in result.nodes if n["origin"] == "system"]
    assert len(system_nodes) == 2 * sent[-4:].count(0) and set(sent[-4:]) == {0, 1}


def test_pool_sentences_are_tried_as_added_instructions_once_each_and_one_the_base_rewards_is_adopted():
    pool = prompts.component_pool()

    def correct(system, user):  # any pool sentence in the system prompt makes every answer right
        return any(sentence in system for sentence in pool) or half_right(system, user)

    events = []
    budget = SearchConfig(iterations=2, system_candidates=2, user_candidates=1, top_k=1, train_size=4,
                          racing=False, system_edit="add", system_components=3)
    result = run_search("metaspo", tasks_of(2, 4), base_lm(correct), optimizer_lm(), budget, seed=5,
                        on_event=events.append)
    steps = [e["proposals"] for e in events if e.get("step") == "system_proposals"]
    assert [[p["source"] for p in step] for step in steps] == [["optimizer"] * 2 + ["pool"] * 3] * 2
    pooled = [p["sentence"] for step in steps for p in step if p["source"] == "pool"]
    assert len(set(pooled)) == 6 and set(pooled) <= set(pool)
    # Step 1 adopts its first pool candidate (the optimizer's score half); in step 2 every candidate ties
    # with it, so it stays; each pool candidate is the current prompt plus its sentence.
    first = steps[0][2]["sentence"]
    assert result.system_prompt == f"You are a helpful assistant. {first}"
    assert [p["system_prompt"] for p in steps[1][2:]] == [f"{result.system_prompt} {p['sentence']}" for p in steps[1][2:]]


def test_pool_sentences_need_a_method_that_writes_from_failures():
    with pytest.raises(MetaspoError, match="system_components applies to metaspo and outer_only"):
        SearchConfig(method="sprig", system_components=2)
    with pytest.raises(MetaspoError, match="system_components must be >= 0"):
        SearchConfig(system_components=-1)


def test_an_unknown_system_edit_is_refused_with_a_suggestion():
    with pytest.raises(MetaspoError, match="system_edit must be one of rewrite, add") as error:
        SearchConfig(system_edit="rewite")
    assert "'rewrite'" in error.value.hint


def test_same_seed_gives_the_same_result_and_another_seed_does_not():
    first, again, other = adoption_run(seed=3), adoption_run(seed=3), adoption_run(seed=4)
    assert first.to_dict() == again.to_dict()
    assert first.nodes != other.nodes


def test_result_serializes_in_the_reference_shape():
    result = adoption_run(racing=False)
    reference = json.loads(json.dumps(reference_result(result.system_prompt, result.nodes)))
    assert reference["optimized_system_prompt"] == result.system_prompt
    # Per update (start, inner 1, outer 1, inner 2, outer 2), per task, the kept nodes best first.
    start, inner1, outer1, inner2, outer2 = reference["nodes"]
    assert [[n["depth"] for n in nodes] for nodes in start] == [[0], [0]]
    assert [[n["task"] for n in nodes] for nodes in inner1] == [["t0", "t0"], ["t1", "t1"]]
    assert outer1 == inner1  # only BAD candidates: nothing adopted
    assert {n["system_prompt"] for nodes in inner2 for n in nodes} == {"You are a helpful assistant."}
    assert {n["system_prompt"] for nodes in outer2 for n in nodes} == {result.system_prompt}
    assert all(n["eval_metric"] == 1.0 for nodes in outer2 for n in nodes)
    assert set(start[0][0]) == {"id", "task", "system_prompt", "instruction", "parent_id", "depth", "eval_metric",
                                "test_metric"}


def test_outer_only_spends_the_same_optimizer_calls_on_system_prompts_only():
    T, N, m, n, K, iters = SETTINGS[0]
    budget = SearchConfig(iterations=iters, system_candidates=n, user_candidates=m, top_k=K, train_size=N)
    tasks = tasks_of(T, N)
    bilevel = run_search("metaspo", tasks, base_lm(half_right), optimizer_lm(), budget, seed=1)
    optimizer = optimizer_lm()
    outer = run_search("outer_only", tasks, base_lm(half_right), optimizer, budget, seed=1)
    assert [h["optimizer_calls"] for h in outer.history] == [h["optimizer_calls"] for h in bilevel.history]
    assert batch_sizes(optimizer) == [n + T * m, n + T * m] * iters
    assert outer.user_prompts == {t.name: [t.initial_prompt] for t in tasks}


def test_metaspo_ape_writes_candidates_from_demos_in_one_batch_per_loop():
    T, N, m, n, K, iters = SETTINGS[1]
    optimizer = optimizer_lm()
    budget = SearchConfig(
        iterations=iters,
        system_candidates=n,
        user_candidates=m,
        top_k=K,
        train_size=N,
        ape_demos=2,
        ape_demos_per_task=1,
    )
    result = run_search("metaspo_ape", tasks_of(T, N), base_lm(half_right), optimizer, budget, seed=1)
    assert batch_sizes(optimizer) == [T * m, n] * iters  # no analysis turn
    requests = [turns(chat)[1] for chats, _ in optimizer.engine.calls for chat in chats]
    assert all("Input:" in r and "Output:" in r and "wrong" not in r.lower() for r in requests)
    assert [h["optimizer_calls"] for h in result.history] == [0] + [T * m + n] * iters


def beam_sizes(iterations: int, m: int, K: int) -> list[int]:
    """Prompts in each task's beam at the start of each iteration: 1, then min(K, b + b*m)."""
    sizes = [1]
    for _ in range(iterations - 1):
        sizes.append(min(K, sizes[-1] * (1 + m)))
    return sizes


def test_protegi_expands_every_beam_prompt_with_a_fixed_system_prompt():
    T, N, m, K, iters = 2, 4, 2, 3, 3
    optimizer = optimizer_lm()
    budget = SearchConfig(iterations=iters, user_candidates=m, top_k=K, train_size=N)
    result = run_search("protegi", tasks_of(T, N), base_lm(half_right), optimizer, budget, seed=1)
    parents = beam_sizes(iters, m, K)
    assert batch_sizes(optimizer) == [x for b in parents for x in (T * b * m, T * b * m)]
    assert [h["base_generations"] for h in result.history] == [T * N] + [T * b * m * N for b in parents]
    assert {n["system_prompt"] for n in result.nodes} == {budget.initial_system_prompt}
    assert result.system_prompt == budget.initial_system_prompt


def test_ape_writes_from_demos_first_then_paraphrases_the_beam():
    T, N, m, K, iters = 2, 4, 2, 2, 2
    optimizer = optimizer_lm()
    budget = SearchConfig(iterations=iters, user_candidates=m, top_k=K, train_size=N, ape_demos=3)
    result = run_search("ape", tasks_of(T, N), base_lm(half_right), optimizer, budget, seed=1)
    (first, _), (second, _) = optimizer.engine.calls
    assert len(first) == T * m and all(turns(c)[1].count("Input:") == 3 for c in first)
    # Iteration 2 paraphrases each of the K beam prompts of each task m times.
    earlier = [n["user_prompt"] for n in result.nodes if n["iteration"] <= 1]
    assert len(second) == T * K * m and all(any(p in turns(c)[1] for p in earlier) for c in second)
    assert all("Input:" not in turns(c)[1] for c in second)


def test_sprig_edits_pool_components_and_keeps_the_best_population():
    # Each rewarded pool sentence in the system prompt makes one more question come out right.
    rewarded = [c for c in prompts.component_pool() if "step" in c or "Check" in c or "mistake" in c]
    assert len(rewarded) >= 3

    def correct(system, user):
        return question_index(user) <= sum(c in system for c in rewarded)

    budget = SearchConfig(iterations=3, system_candidates=4, user_candidates=1, top_k=3, train_size=4)
    tasks = tasks_of(2, 4)
    runs = [run_search("sprig", tasks, base_lm(correct), optimizer_lm(), budget, seed=5) for _ in range(2)]
    result = runs[0]
    assert runs[0].to_dict() == runs[1].to_dict()
    scores = [h["incumbent_score"] for h in result.history]
    assert scores == sorted(scores) and scores[-1] > scores[0]  # the population never loses its best
    assert any(c in result.system_prompt for c in rewarded)
    assert result.user_prompts == {t.name: [t.initial_prompt] for t in tasks}
    # Every candidate is made of pool sentences, the initial prompt, or the optimizer's rephrasings.
    pieces = set(prompts.component_pool()) | {budget.initial_system_prompt}
    for node in result.nodes:
        rest = node["system_prompt"]
        for piece in sorted(pieces, key=len, reverse=True):
            rest = rest.replace(piece, "")
        assert rest.replace("Be careful and precise", "").strip(" ().0123456789") == ""


def garbage_optimizer(fixed_by_reminder: bool = False, failing_task: str | None = None) -> LM:
    """Analyses are fine; rewrites are tracebacks (unless re-asked, or unless for another task)."""

    def respond(chat, settings, k):
        request = turns(chat)[1]
        if is_analysis_request(request):
            return "<analysis>Too vague.</analysis>"
        reminded = "could not be used" in request
        fails = (failing_task is None or f"{failing_task} " in request) and not (
            fixed_by_reminder and reminded
        )
        if fails:
            return 'Traceback (most recent call last):\n  File "opt.py", line 3\nValueError: boom'
        return (
            f"<prompt>Fixed version {k}: {{question}}</prompt>"
            if "{question}" in request
            else f"<prompt>Fixed assistant rules {k}.</prompt>"
        )

    return LM(FakeEngine(respond), GenerationSettings(temperature=1.0), role="optimizer")


def test_unusable_rewrites_are_reasked_a_bounded_number_of_times_then_the_parent_is_kept():
    T, N, m, n, R, iters = 2, 4, 2, 3, 2, 2
    tasks = tasks_of(T, N)
    optimizer = garbage_optimizer()
    budget = SearchConfig(
        iterations=iters, system_candidates=n, user_candidates=m, train_size=N, max_parse_retries=R
    )
    result = run_search("metaspo", tasks, base_lm(half_right), optimizer, budget, seed=1)
    assert batch_sizes(optimizer) == ([T * m] * (2 + R) + [n] * (2 + R)) * iters
    assert [h["base_generations"] for h in result.history] == [T * N] + [0] * iters
    assert result.counts["parse_failures"] == (T * m + n) * iters
    assert result.counts["parse_retries"] == R * (T * m + n) * iters
    assert result.system_prompt == budget.initial_system_prompt
    assert result.user_prompts == {t.name: [t.initial_prompt] for t in tasks}
    assert len(result.nodes) == T and not any(
        "Traceback" in n["system_prompt"] + n["user_prompt"] for n in result.nodes
    )


def test_a_reask_with_the_format_reminder_can_recover_the_candidate():
    T, N, m, n = 2, 4, 2, 3
    optimizer = garbage_optimizer(fixed_by_reminder=True)
    budget = SearchConfig(iterations=1, system_candidates=n, user_candidates=m, top_k=3, train_size=N)
    result = run_search("metaspo", tasks_of(T, N), base_lm(half_right), optimizer, budget, seed=1)
    assert batch_sizes(optimizer) == [T * m, T * m, T * m, n, n, n]  # analysis, write, one re-ask each
    assert (result.counts["parse_retries"], result.counts["parse_failures"]) == (T * m + n, 0)
    assert all(
        len(prompts) == 3 and prompts[1].startswith("Fixed") for prompts in result.user_prompts.values()
    )


def test_only_the_failed_rows_are_reasked():
    T, N, m, R = 2, 4, 3, 1
    optimizer = garbage_optimizer(failing_task="t0")
    budget = SearchConfig(iterations=1, user_candidates=m, top_k=4, train_size=N, max_parse_retries=R)
    result = run_search("protegi", tasks_of(T, N), base_lm(half_right), optimizer, budget, seed=1)
    assert batch_sizes(optimizer) == [T * m, T * m, m]
    assert len(result.user_prompts["t0"]) == 1 and len(result.user_prompts["t1"]) == 1 + m


def test_zero_retries_means_no_reask():
    optimizer = garbage_optimizer()
    budget = SearchConfig(iterations=1, user_candidates=2, train_size=4, max_parse_retries=0)
    run_search("protegi", tasks_of(1, 4), base_lm(half_right), optimizer, budget, seed=1)
    assert batch_sizes(optimizer) == [2, 2]


def test_unknown_method_names_the_closest_ones():
    with pytest.raises(MetaspoError) as error:
        run_search("metapso", tasks_of(1, 2), base_lm(half_right), optimizer_lm(), SearchConfig(), seed=0)
    assert "metapso" in error.value.message and "'metaspo'" in error.value.hint


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("iterations", 0, "search.iterations must be >= 1, got 0"),
        ("top_k", True, "search.top_k must be an integer, got True"),
        ("max_parse_retries", -1, "search.max_parse_retries must be >= 0, got -1"),
        ("method", "sprigg", "search.method: unknown search method 'sprigg'"),
    ],
)
def test_search_budget_names_the_bad_key(field, value, message):
    with pytest.raises(MetaspoError, match=message.replace("(", r"\(")):
        SearchConfig(**{field: value})


def test_eval_budget_checks_labels():
    assert EvaluationConfig(compare=["none", "sprig"]).compare == ("none", "sprig")
    with pytest.raises(MetaspoError) as error:
        EvaluationConfig(compare=("none", "servise"))
    assert "evaluation.compare" in error.value.message and "'service'" in error.value.hint
    with pytest.raises(MetaspoError, match="evaluation.beam must be >= 1"):
        EvaluationConfig(beam=0)


def test_tasks_must_be_distinct_and_have_training_questions():
    with pytest.raises(MetaspoError, match="listed twice"):
        run_search(
            "metaspo",
            [make_task("a"), make_task("a")],
            base_lm(half_right),
            optimizer_lm(),
            SearchConfig(),
            0,
        )
    with pytest.raises(MetaspoError, match="no training examples"):
        run_search(
            "metaspo", [make_task("a", n_train=0)], base_lm(half_right), optimizer_lm(), SearchConfig(), 0
        )


def test_scorer_uses_one_batch_and_generates_each_distinct_greedy_chat_once():
    task = make_task("t", n_train=4)
    base = base_lm(half_right)
    scorer = Scorer(base)
    trials = [
        Trial("", task.initial_prompt, task, task.train),
        Trial("", task.initial_prompt, task, task.train[:2]),
        Trial("Be exact.", task.initial_prompt, task, task.train),
    ]
    plain, prefix, with_system = scorer(trials)
    assert batch_sizes(base) == [8] and scorer.generations == 8
    assert [c[0]["role"] for c in base.engine.calls[0][0]] == ["user"] * 4 + [
        "system"
    ] * 4  # "" = no system turn
    assert (plain.mean, plain.scores, prefix.mean) == (0.5, [1.0, 0.0, 1.0, 0.0], 0.5)
    assert [w.index for w in plain.wrong] == [1, 3] and plain.wrong[0].answers == ("t-train-1",)
    assert plain.wrong[0].user_text == task.render(task.initial_prompt, task.train[1])
    assert with_system.responses == plain.responses and scorer([]) == [] and scorer.batches == 1


def test_scorer_gives_each_copy_its_own_sample_when_the_base_samples():
    base = LM(
        FakeEngine(lambda chat, s, k: f"<answer>{k}</answer>"), GenerationSettings(temperature=0.7), "base"
    )
    task = make_task("t", n_train=1)
    Scorer(base)([Trial("", task.initial_prompt, task, task.train)] * 3)
    assert (
        batch_sizes(base) == [3]
        and base.engine.calls[0][0] == [make_chat("", task.render(task.initial_prompt, task.train[0]))] * 3
    )


def test_a_system_prompt_quoting_its_failures_is_reasked_with_the_reason():
    from metaspo_hf.search.writer import PromptWriter

    question = "On the desk you see a red pen, a blue cup and a green book in a row."
    seen = []

    def respond(chat, settings, k):
        request = turns(chat)[1]
        seen.append(request)
        if "could not be used" in request:
            return "<prompt>Read every detail of the request before answering.</prompt>"
        return f"<prompt>Remember that {question}</prompt>"

    writer = PromptWriter(LM(FakeEngine(respond), GenerationSettings(temperature=1.0), role="optimizer"),
                          seed=0, namespace="test", max_parse_retries=1, max_prompt_chars=400)
    chat = make_chat("role", "Write a system prompt.")
    assert writer.prompts([chat, chat], "system", 1, shown=[[question], []]) == [
        "Read every detail of the request before answering.", f"Remember that {question}"]
    assert writer.retries == 1 and "quoted 8 or more words of an example question" in seen[-1]


def test_failure_requests_state_the_reply_limit_and_mark_answers_that_never_came():
    """A small optimizer asks for long reasoning unless it knows the reply budget; a response with no
    answer tag (cut off by that budget, or the format ignored) is marked as such, a wrong answer is not."""
    def respond(chat, settings, k):
        system, user = turns(chat)
        return "<answer>wrong</answer>" if question_index(user) % 2 else "Let me think about this step by"

    base = LM(FakeEngine(respond), GenerationSettings(temperature=0.0, max_new_tokens=24), role="base")
    optimizer = optimizer_lm()
    budget = SearchConfig(iterations=1, user_candidates=1, system_candidates=1, top_k=1, train_size=4)
    run_search("metaspo", tasks_of(2, 4), base, optimizer, budget, seed=1)
    requests = [turns(chat)[1] for chats, _ in optimizer.engine.calls for chat in chats]
    failing = [r for r in requests if "## Wrong answer" in r]
    # All but the system rewrite (which works from the analysis) show failures.
    assert len(failing) == len(requests) - 1 == 5
    for request in requests:
        assert "limited to 24 tokens (about 18 words)" in request and "must not mention it or tokens" in request
    for request in failing:
        blocks = request.split("## Wrong answer")[1:]
        cut = [b for b in blocks if "Let me think" in b]
        tagged = [b for b in blocks if "<answer>wrong</answer>" in b]
        assert cut and tagged
        assert all("(it ended without an <answer> tag)" in b for b in cut)
        assert not any("without an <answer> tag" in b for b in tagged)
