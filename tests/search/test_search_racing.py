"""Racing (search.racing): candidates are scored in rounds and stop once they cannot change the outcome.

The rule is exact: racing on or off, a search selects the same prompts, writes the same optimizer
requests and gives every fully scored node the same score; it only generates less."""

from __future__ import annotations

import dataclasses
import re

import pytest
from fakes import TagTask, base_lm, batch_sizes, make_task, optimizer_lm, question_index, turns

from metaspo_hf.models.base import LM, GenerationSettings, stable_hash
from metaspo_hf.models.fake import FakeEngine
from metaspo_hf.search import SearchConfig, run_search
from metaspo_hf.search.candidates import Beam, Node
from metaspo_hf.search.racing import cannot_be_adopted, cannot_enter_beams, failures_first


class PartialTask(TagTask):
    """Exact answers score 1, "part" answers a fraction: means are not multiples of 1/N."""

    def score(self, response: str, example) -> float:
        found = re.findall(r"<answer>(.*?)</answer>", response, re.S)
        answer = found[-1].strip() if found else ""
        return 1.0 if answer == example.answers[0] else 0.3 if answer == "part" else 0.0


def partial_task(name: str, n_train: int) -> PartialTask:
    plain = make_task(name, n_train=n_train)
    return PartialTask(**{f.name: getattr(plain, f.name) for f in dataclasses.fields(plain)})


def random_base(seed: int, levels: int, partial: bool) -> LM:
    """A greedy base model whose answers are a fixed pseudo-random function of (seed, system, user).

    Each prompt pair gets a skill among ``levels`` values, so candidates often tie one another and
    the incumbent (the case the tie rules must get right)."""

    def respond(chat, settings, k):
        system, user = turns(chat)
        gold = re.search(r"\[([^\]]+)\]", user).group(1)
        prompt = re.sub(r"question \d+ \[[^\]]+\]", "", user)
        skill = stable_hash(seed, "skill", system, prompt) % levels / max(levels - 1, 1)
        draw = stable_hash(seed, "draw", system, user) % 1000 / 1000
        if draw < skill:
            return f"<answer>{gold}</answer>"
        return "<answer>part</answer>" if partial and draw < skill + 0.2 else "<answer>wrong</answer>"

    return LM(FakeEngine(respond), GenerationSettings(temperature=0.0), role="base")


def pooled_optimizer(pool: int) -> LM:
    """Candidates drawn from a small pool, so repeats of earlier prompts happen too."""
    return optimizer_lm(system_text=lambda h: f"Be careful ({h % pool}).",
                        user_text=lambda h: f"Think it through ({h % pool}): {{question}}")


def search(seed: int, racing: bool, rounds: int, method: str, T: int, N: int, m: int, n: int, K: int,
           iters: int, partial: bool):
    base, optimizer = random_base(seed, levels=4, partial=partial), pooled_optimizer(pool=5)
    tasks = [partial_task(f"t{i}", N) if partial else make_task(f"t{i}", n_train=N) for i in range(T)]
    budget = SearchConfig(method=method, iterations=iters, system_candidates=n, user_candidates=m, top_k=K,
                          train_size=N, racing=racing, racing_rounds=rounds)
    return run_search(method, tasks, base, optimizer, budget, seed=seed), base, optimizer


CASES = [  # (method, T, N, m, n, K, iterations, rounds, partial credit)
    ("metaspo", 2, 4, 2, 3, 2, 2, 3, False),
    ("metaspo", 3, 3, 1, 4, 1, 2, 2, True),
    ("metaspo", 2, 6, 3, 2, 3, 3, 6, True),
    ("metaspo", 1, 5, 2, 5, 1, 2, 8, False),  # more rounds than questions
    ("metaspo", 2, 4, 2, 3, 2, 1, 1, False),  # one round: only the check before scoring
    # Two questions, one per round, many candidates: ties between candidates that get there in
    # different orders (one known early, one late) are common, for system and for user candidates.
    ("metaspo", 1, 2, 1, 6, 1, 2, 2, False),
    ("metaspo", 2, 2, 6, 1, 2, 2, 2, False),
    ("outer_only", 2, 4, 1, 2, 2, 2, 3, True),
    ("metaspo_ape", 2, 5, 2, 3, 2, 2, 3, False),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_racing_selects_what_full_scoring_selects_on_many_seeded_runs(case):
    method, T, N, m, n, K, iters, rounds, partial = case
    saved = 0
    for seed in range(25):
        full, full_base, full_opt = search(seed, False, rounds, method, T, N, m, n, K, iters, partial)
        raced, raced_base, raced_opt = search(seed, True, rounds, method, T, N, m, n, K, iters, partial)
        assert (raced.system_prompt, raced.user_prompts) == (full.system_prompt, full.user_prompts)
        for key in ("iteration", "incumbent_score", "adopted", "optimizer_calls"):
            assert [h[key] for h in raced.history] == [h[key] for h in full.history]
        # The optimizer saw the same failures, so it was asked exactly the same things.
        assert raced_opt.engine.calls == full_opt.engine.calls
        # Nodes scored in full have their full-scoring score and failures; stopped ones have none.
        assert len(raced.nodes) == len(full.nodes)
        for r, f in zip(raced.nodes, full.nodes, strict=True):
            if r["stopped_after"] is None:
                assert (r["train_score"], r["wrong_indices"]) == (f["train_score"], f["wrong_indices"])
            else:
                assert r["train_score"] is None and 0 <= r["stopped_after"] < N
        # A reported best candidate is a fully scored one: exact when adopted, never above the truth.
        for r, f in zip(raced.history, full.history, strict=True):
            if r["adopted"]:
                assert r["best_candidate_score"] == f["best_candidate_score"]
            elif r["best_candidate_score"] is not None:
                assert r["best_candidate_score"] <= f["best_candidate_score"]
        # Fewer (never more) generations, and the skipped ones are accounted for.
        made = raced.counts["base_generations"]
        assert made <= full.counts["base_generations"] == full_base.engine.stats.prompts
        assert made == raced_base.engine.stats.prompts
        assert made + raced.counts["racing_skipped"] >= full.counts["base_generations"]
        assert full.counts["racing_skipped"] == 0
        saved += full.counts["base_generations"] - made
    assert saved > 0


def test_racing_pins_its_exact_calls_on_the_adoption_scenario():
    """The scenario of test_search.adoption_run, racing with 3 rounds; every node's questions are
    ordered [1, 3, 0, 2] (its parent's failures, the odd questions, first).

    Iteration 1: 2 user candidates enter beams of width 2 that hold one node, so they are scored in
    full (rounds of 2, 2, 4). The 3 BAD system candidates x 4 kept pairs fail questions 1 and 3, so
    after two rounds their upper bound is 0.5, not above the incumbent's 0.5: 24 generated, 24 skipped.
    Iteration 2: each user candidate fails 1 and 3; two beam nodes of 0.5 then rank ahead of it (ties
    keep the older), so it stops after 2 of 4. Of the system candidates (Plain, GOOD, Plain), both
    Plain ones reach 0.5 after two rounds and stop; GOOD is scored in full and adopted."""
    from test_search import adoption_run

    raced, full = adoption_run(racing=True), adoption_run(racing=False)
    assert [h["base_generations"] for h in raced.history] == [8, 2 * 4 + 12 * 2, 2 * 2 + 12 * 2 + 4 * 2]
    assert [h["racing_skipped"] for h in raced.history] == [0, 12 * 2, 2 * 2 + 8 * 2]
    assert [h["base_generations"] for h in full.history] == [8, 8 + 48, 8 + 48]
    assert raced.counts["base_batches"] == 1 + (3 + 2) + (2 + 3)  # one batch per round that had work
    assert (raced.system_prompt, raced.user_prompts) == (full.system_prompt, full.user_prompts)


def test_every_round_is_one_base_batch():
    tasks = [make_task(f"t{i}", n_train=6) for i in range(2)]

    def correct(system, user):
        return question_index(user) < (4 if "careful" in system else 3)

    base = base_lm(correct)
    budget = SearchConfig(iterations=1, system_candidates=3, user_candidates=2, top_k=1, train_size=6,
                          racing_rounds=3)
    run_search("metaspo", tasks, base, optimizer_lm(), budget, seed=1)
    # init; inner: 4 candidates x 2 questions per round, stopped after round 2 (they fail 3, 4 and 5,
    # so cannot beat 0.5 strictly); outer: 3 candidates x 2 tasks x 2 questions per round (4/6 > 0.5).
    assert batch_sizes(base) == [12, 8, 8, 12, 12, 12]


def test_a_perfect_incumbent_stops_every_candidate_before_it_is_scored():
    tasks = [make_task(f"t{i}", n_train=4) for i in range(2)]
    base = base_lm(lambda system, user: True)
    budget = SearchConfig(iterations=2, system_candidates=3, user_candidates=2, top_k=1, train_size=4)
    result = run_search("metaspo", tasks, base, optimizer_lm(), budget, seed=1)
    assert batch_sizes(base) == [8]
    # Per iteration: 2 tasks x 2 user candidates x 4, then 3 system candidates x 2 kept pairs x 4.
    assert [h["racing_skipped"] for h in result.history] == [0, 16 + 24, 16 + 24]
    assert [h["best_candidate_score"] for h in result.history] == [None, None, None]
    assert all(n["stopped_after"] == 0 for n in result.nodes[2:])


def node(i: int, task: str = "t", score: float | None = None) -> Node:
    return Node(i, task, "", "p{question}", None, 0, 0, "test", train_score=score)


def test_tie_rules_for_system_candidates():
    groups = [range(0, 1), range(1, 2), range(2, 3)]
    rule = cannot_be_adopted(groups, incumbent=0.5)
    # Adoption needs strictly more than the incumbent: an upper bound of exactly 0.5 is out.
    assert list(rule([0.0, 0.0, 0.0], [0.5, 0.75, 1.0])) == [0]
    # Equal scores: the earlier candidate wins, so a later one whose best equals an earlier one's worst
    # is out, but an earlier one is not put out by a later equal.
    assert list(rule([0.75, 0.0, 0.0], [1.0, 0.75, 0.9])) == [1]
    assert list(rule([0.0, 0.75, 0.0], [0.75, 1.0, 0.6])) == [2]
    assert list(rule([0.0, 0.8, 0.0], [0.75, 1.0, 0.6])) == [0, 2]


def test_tie_rules_for_user_candidates():
    beam = Beam(2, [node(0, score=0.5), node(1, score=0.25)])
    new = [node(2), node(3), node(4, task="other")]
    rule = cannot_enter_beams({"t": beam, "other": Beam(1, [node(5, "other", 0.5)])}, new)
    # Beam nodes come first among equals: an upper bound equal to the second beam node is not enough.
    assert list(rule([0.0, 0.0, 0.0], [0.25, 1.0, 0.5])) == [0, 2]
    assert list(rule([0.0, 0.0, 0.0], [0.3, 1.0, 0.6])) == []
    # Candidate 3 surely above candidate 2, with the 0.5 beam node: 2 is out.
    assert list(rule([0.0, 0.6, 0.0], [0.5, 1.0, 0.6])) == [0]
    # Between candidates, the earlier one wins a tie: a later equal does not put 2 out, but 2 puts 3 out.
    assert list(rule([0.0, 0.5, 0.0], [0.5, 1.0, 0.6])) == []
    assert list(rule([0.5, 0.0, 0.0], [1.0, 0.5, 0.6])) == [1]


def test_questions_are_raced_in_order_of_the_parents_failures():
    parent = Node(0, "t", "", "p", None, 0, 0, "initial", train_score=0.5)
    task = make_task("t", n_train=5)
    from metaspo_hf.scoring import Scorer, Trial

    scored = Scorer(base_lm(lambda s, u: question_index(u) % 2 == 0))([Trial("", task.initial_prompt, task,
                                                                         task.train)])[0]
    parent.wrong = scored.wrong
    assert failures_first(node(1), parent, 5) == [1, 3, 0, 2, 4]
    assert failures_first(node(1), None, 3) == [0, 1, 2]


def test_racing_is_off_for_a_sampled_base_model():
    base = LM(FakeEngine(lambda chat, s, k: "<answer>wrong</answer>"), GenerationSettings(temperature=0.7), "base")
    budget = SearchConfig(iterations=1, system_candidates=2, user_candidates=1, top_k=1, train_size=4)
    result = run_search("metaspo", [make_task("t", n_train=4)], base, optimizer_lm(), budget, seed=1)
    assert batch_sizes(base) == [4, 4, 8] and result.counts["racing_skipped"] == 0


def test_racing_settings_are_checked():
    from metaspo_hf.errors import MetaspoError

    with pytest.raises(MetaspoError, match="search.racing must be true or false"):
        SearchConfig(racing="yes")
    with pytest.raises(MetaspoError, match="search.racing_rounds must be >= 1"):
        SearchConfig(racing_rounds=0)
