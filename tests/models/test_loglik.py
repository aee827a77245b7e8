"""`scoring: loglik`: engine log-likelihoods against a plain forward pass, the scorer's choice, the recipe
key and the response cache."""

from __future__ import annotations

import pytest
import torch

from metaspo_hf.errors import MetaspoError
from metaspo_hf.evaluation.protocols import unseen_generalization
from metaspo_hf.models import loglik as loglik_module
from metaspo_hf.models.base import LM, GenerationSettings, make_chat
from metaspo_hf.models.cache import CachedEngine
from metaspo_hf.models.engine import HFEngine
from metaspo_hf.models.fake import FakeEngine
from metaspo_hf.models.prefix import common_prefix_len
from metaspo_hf.recipe import load_recipe
from metaspo_hf.scoring import LOGLIK_CONTINUATION, Scorer, Trial
from metaspo_hf.tasks.task import Example, Task

SYSTEMS = ["You are a helpful assistant.", "Think step by step and keep answers short. " * 3]
QUESTIONS = [
    "Which is larger, 7 or 12?\n\nOptions:\n(A) 7\n(B) 12",
    "Name a color.\n\nOptions:\n(A) red\n(B) the colour of a clear summer sky at noon\n(C) x",
    "hi",
    "Sort these words: pear apple fig. Which comes first?\n\nOptions:\n(A) apple\n(B) fig\n(C) pear",
]
# Continuations of different token lengths, including the option text and an empty one.
CONTINUATIONS = [
    "<answer>A</answer>",
    "<answer>B</answer>",
    "<answer>(B) the colour of a clear summer sky at noon</answer>",
    "C",
    "",
]


def plain_loglik(model, tokenizer, chat, continuation: str) -> float:
    """Reference: one unpadded full-sequence forward pass, log_softmax summed over the continuation."""
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    context = tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = tokenizer(continuation, add_special_tokens=False)["input_ids"] if continuation else []
    with torch.no_grad():
        logprobs = model(torch.tensor([context + tokens])).logits[0].float().log_softmax(-1)
    return sum(logprobs[len(context) + j - 1, token].item() for j, token in enumerate(tokens))


def requests_under_two_systems():
    return [(make_chat(system, question), continuation)
            for system in SYSTEMS for question in QUESTIONS for continuation in CONTINUATIONS]


@pytest.mark.parametrize("batch_size,prefix_reuse,max_scores", [
    (32, True, None),   # one chunk per system prompt: prefix read once, questions packed with their options
    (3, True, None),    # several chunks per group
    (32, True, 1),      # the score bound cuts every chunk to one row
    (4, False, None),   # no prefix reuse: each (chat, continuation) as a left-padded full sequence
])
def test_engine_loglikelihood_equals_a_plain_forward_pass(tiny_llama, tiny_tokenizer, monkeypatch,
                                                         batch_size, prefix_reuse, max_scores):
    if max_scores is not None:
        monkeypatch.setattr(loglik_module, "_MAX_SCORES", max_scores)
    requests = requests_under_two_systems()
    engine = HFEngine(tiny_llama, tiny_tokenizer, "tiny", batch_size=batch_size, prefix_reuse=prefix_reuse,
                      progress=False)
    got = engine.loglikelihood(requests)
    expected = [plain_loglik(tiny_llama, tiny_tokenizer, chat, cont) for chat, cont in requests]
    assert got == pytest.approx(expected, abs=1e-4)
    assert [g for g, (_, cont) in zip(got, requests, strict=True) if not cont] == [0.0] * 8
    # Option lengths really differ, and the choice among them is not trivial.
    assert len({round(v, 3) for v in got}) > len(requests) // 2
    assert engine.stats.scored_continuations == len(requests) and engine.stats.prompts == 0
    assert engine.stats.calls == 1 and engine.stats.generated_tokens == 0


def test_prefix_and_question_tokens_are_computed_once(tiny_llama, tiny_tokenizer):
    requests = requests_under_two_systems() * 2  # repeats are computed once
    packed = HFEngine(tiny_llama, tiny_tokenizer, "tiny", progress=False)
    plain = HFEngine(tiny_llama, tiny_tokenizer, "tiny", prefix_reuse=False, progress=False)
    assert packed.loglikelihood(requests) == pytest.approx(plain.loglikelihood(requests), abs=1e-4)
    assert packed.stats.scored_continuations == plain.stats.scored_continuations == len(requests) // 2
    # Each system prompt's prefix once, each question's own tokens once (not once per option), then the
    # options' tokens as a trie (the shared "<answer>" once).
    tokenized = [tiny_tokenizer(c, add_special_tokens=False)["input_ids"] for c in CONTINUATIONS]
    continuation_tokens = len({tuple(ids[: i + 1]) for ids in tokenized for i in range(len(ids))})
    assert continuation_tokens < sum(map(len, tokenized))
    expected = 0
    for system in SYSTEMS:
        contexts = [packed.encode(packed.render(make_chat(system, q))) for q in QUESTIONS]
        shared = common_prefix_len(contexts)
        expected += shared + sum(len(c) - shared + continuation_tokens for c in contexts)
    assert packed.stats.prefill_tokens == expected
    assert plain.stats.prefill_tokens > 2 * packed.stats.prefill_tokens


def test_each_user_prompt_that_fills_a_chunk_is_computed_once(tiny_llama, tiny_tokenizer):
    instructions = ["Read the question carefully, then weigh each option against the facts it states.",
                    "Read the question carefully, and answer with the single option that the text supports."]
    requests = [(make_chat(SYSTEMS[0], f"{instruction}\n\n{question}"), continuation)
                for instruction in instructions for question in QUESTIONS for continuation in CONTINUATIONS[:2]]
    clustered = HFEngine(tiny_llama, tiny_tokenizer, "tiny", batch_size=4, progress=False)
    got = clustered.loglikelihood(requests)
    assert got == pytest.approx([plain_loglik(tiny_llama, tiny_tokenizer, chat, cont) for chat, cont in requests],
                                abs=1e-4)
    # With chunks of 5 rows, the 4 questions of a user prompt are no cluster: one prefix, the system turn's.
    system_only = HFEngine(tiny_llama, tiny_tokenizer, "tiny", batch_size=5, progress=False)
    assert system_only.loglikelihood(requests) == pytest.approx(got, abs=1e-4)
    contexts = [clustered.encode(clustered.render(chat)) for chat, _ in requests[::2]]
    shared = common_prefix_len(contexts)  # the system turn and the instructions' first words
    gains = [common_prefix_len(contexts[start:start + 4]) - shared for start in (0, 4)]
    assert min(gains) > 10
    # Each question's context is shorter by its instruction's own tokens; the two cluster prefixes are
    # computed where the system turn's one was.
    assert system_only.stats.prefill_tokens - clustered.stats.prefill_tokens == \
        4 * sum(gains) - (sum(shared + gain for gain in gains) - shared)


def test_other_architecture_matches(tiny_tokenizer):
    from tiny import tiny_model

    model = tiny_model(tiny_tokenizer, "qwen2", seed=1)
    requests = requests_under_two_systems()[:12]
    engine = HFEngine(model, tiny_tokenizer, "tiny-qwen", batch_size=2, progress=False)
    expected = [plain_loglik(model, tiny_tokenizer, chat, cont) for chat, cont in requests]
    assert engine.loglikelihood(requests) == pytest.approx(expected, abs=1e-4)



@pytest.mark.parametrize("prefix_reuse", [True, False])
def test_out_of_memory_splits_the_chunk_and_keeps_results(tiny_llama, tiny_tokenizer, monkeypatch, prefix_reuse):
    requests = requests_under_two_systems()
    want = HFEngine(tiny_llama, tiny_tokenizer, "tiny", prefix_reuse=prefix_reuse, progress=False).loglikelihood(requests)
    engine = HFEngine(tiny_llama, tiny_tokenizer, "tiny", prefix_reuse=prefix_reuse, progress=False)
    real_forward = tiny_llama.forward

    def small_memory(*args, **kwargs):
        if kwargs["input_ids"].shape[0] > 2:  # pretend that more than two rows do not fit on the GPU
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(tiny_llama, "forward", small_memory)
    assert engine.loglikelihood(requests) == pytest.approx(want, abs=1e-5)
    assert engine.stats.oom_retries >= 2 and engine.stats.scored_continuations == len(requests)

# ---- the scorer ---------------------------------------------------------------------------------------

def choice_task(name: str, n: int) -> Task:
    examples = [Example(f"{name} question {i}\n\nOptions:\n(A) x\n(B) y\n(C) z", ("ABC"[i % 3],), ("x", "y", "z"))
                for i in range(n)]
    return Task(name, "test", examples, examples, "Pick one.\n\n{question}", "choice")


def number_task(name: str, n: int) -> Task:
    examples = [Example(f"{name} sum {i}", (str(i),)) for i in range(n)]
    return Task(name, "test", examples, examples, "Compute.\n\n{question}", "number")


def favourite(chat, continuation: str) -> float:
    """Fake likelihood: option B for questions 0 and 1, C otherwise."""
    question = int(chat[-1]["content"].split("question ")[1].split("\n")[0])
    return 0.0 if continuation == LOGLIK_CONTINUATION.format(letter="B" if question < 2 else "C") else -1.0


def test_scorer_picks_the_likeliest_option_and_generates_the_rest():
    engine = FakeEngine(lambda chat, s, k: "<answer>3</answer>", loglik=favourite)
    base = LM(engine, GenerationSettings(max_new_tokens=8, stop=("</answer>",)), scoring="loglik")
    choice, numbers = choice_task("mc", 4), number_task("num", 4)
    scorer = Scorer(base)
    mc, num, mc_again = scorer([Trial("Be exact.", choice.initial_prompt, choice, choice.train),
                                Trial("Be exact.", numbers.initial_prompt, numbers, numbers.train),
                                Trial("Be exact.", choice.initial_prompt, choice, choice.train[:2])])
    # Gold letters are A, B, C, A; the picks B, B, C, C.
    assert mc.responses == ["<answer>(B) y</answer>", "<answer>(B) y</answer>", "<answer>(C) z</answer>",
                            "<answer>(C) z</answer>"]
    assert mc.scores == [0.0, 1.0, 1.0, 0.0] and mc.mean == 0.5 and mc_again.scores == [0.0, 1.0]
    # What the optimizer is shown for a wrong answer: the chosen option, tagged as the answer format asks.
    assert [(w.index, w.response, w.answers) for w in mc.wrong] == [
        (0, "<answer>(B) y</answer>", ("A",)), (3, "<answer>(C) z</answer>", ("A",))]
    assert num.scores == [0.0, 0.0, 0.0, 1.0]
    # One generation batch with only the non-multiple-choice chats; one loglik call with each distinct
    # multiple-choice chat's three options.
    assert [len(chats) for chats, _ in engine.calls] == [4]
    assert all("sum" in chat[-1]["content"] for chat in engine.calls[0][0])
    assert len(engine.loglik_calls) == 1 and len(engine.loglik_calls[0]) == 4 * 3
    assert [cont for _, cont in engine.loglik_calls[0][:3]] == ["(A)", "(B)", "(C)"]
    assert (scorer.generations, scorer.batches, scorer.loglik_questions, scorer.loglik_batches) == (4, 1, 4, 1)
    assert base.usage.continuations == 12 and base.usage.chats == 4


def test_scorer_generates_everything_by_default():
    engine = FakeEngine(lambda chat, s, k: "<answer>A</answer>", loglik=favourite)
    base = LM(engine, GenerationSettings(max_new_tokens=8))
    task = choice_task("mc", 3)
    (score,) = Scorer(base)([Trial("", task.initial_prompt, task, task.train)])
    assert score.scores == [1.0, 0.0, 0.0] and engine.loglik_calls == [] and len(engine.calls) == 1
    # An explicit mode wins over the LM's.
    (score,) = Scorer(base, scoring="loglik")([Trial("", task.initial_prompt, task, task.train)])
    assert score.responses[0] == "<answer>(B) y</answer>" and len(engine.calls) == 1
    with pytest.raises(ValueError):
        Scorer(base, scoring="logprob")


def test_ties_go_to_the_earlier_letter_and_the_protocol_scores_the_same_way():
    engine = FakeEngine(lambda chat, s, k: "<answer>A</answer>", loglik=lambda chat, cont: -2.0)
    base = LM(engine, GenerationSettings(max_new_tokens=8), scoring="loglik")
    task = choice_task("mc", 3)
    results = unseen_generalization([task], {"none": "", "default": "Be exact."}, {"mc": [task.initial_prompt]}, base)
    assert results["mc"]["none"]["mean"] == pytest.approx(1 / 3) and engine.calls == []
    assert len(engine.loglik_calls) == 1 and len(engine.loglik_calls[0]) == 2 * 3 * 3


def test_engine_scorer_end_to_end_on_the_tiny_model(tiny_llama, tiny_tokenizer):
    engine = HFEngine(tiny_llama, tiny_tokenizer, "tiny", progress=False)
    base = LM(engine, GenerationSettings(max_new_tokens=4), scoring="loglik")
    task = choice_task("mc", 3)
    (score,) = Scorer(base)([Trial("Be exact.", task.initial_prompt, task, task.train)])
    for example, response in zip(task.train, score.responses, strict=True):
        chat = make_chat("Be exact.", task.render(task.initial_prompt, example))
        values = [plain_loglik(tiny_llama, tiny_tokenizer, chat, LOGLIK_CONTINUATION.format(letter=x)) for x in "ABC"]
        best = values.index(max(values))
        assert response == f"<answer>({'ABC'[best]}) {example.options[best]}</answer>"
    assert engine.stats.generated_tokens == 0 and engine.stats.scored_continuations == 9


# ---- recipe and cache ---------------------------------------------------------------------------------

def test_recipe_scoring_key_is_validated(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("inherit: {}\nscoring: loglik\n".format(load_recipe("smollm2-135m-cpu").path))
    recipe = load_recipe(str(path))
    default = load_recipe("smollm2-135m-cpu")
    assert recipe.scoring == "loglik" and default.scoring == "generate"
    assert recipe.fingerprint() != default.fingerprint()
    assert load_recipe("smollm2-135m-cpu", ["scoring=loglik"]).fingerprint() == recipe.fingerprint()
    with pytest.raises(MetaspoError) as err:
        load_recipe("smollm2-135m-cpu", ["scoring=logllik"])
    line = err.value.one_line()
    assert "scoring must be one of 'generate', 'loglik', got 'logllik'" in line
    assert "did you mean 'loglik'" in line and "smollm2-135m-cpu.yaml" in line
    with pytest.raises(MetaspoError, match="scoring must be str"):
        load_recipe("smollm2-135m-cpu", ["scoring=1"])


def test_pipeline_base_lm_carries_the_scoring(monkeypatch):
    from metaspo_hf import pipeline

    fake = FakeEngine(lambda chat, s, k: "")
    monkeypatch.setattr(pipeline, "load_engines", lambda *args, **kwargs: (fake, fake))
    base, optimizer, _ = pipeline.load_lms(load_recipe("smollm2-135m-cpu", ["scoring=loglik"]))
    assert (base.scoring, optimizer.scoring) == ("loglik", "generate")
    from metaspo_hf.tasks import Suite

    event = pipeline._scoring_event(load_recipe("smollm2-135m-cpu", ["scoring=loglik"]),
                                    Suite("s", [choice_task("mc", 2)], [number_task("num", 2)]))
    assert (event["loglik_tasks"], event["generated_tasks"]) == (["mc"], ["num"])
    assert "fall back to generation: num" in pipeline._describe(event)


def test_cached_engine_replays_logliks(tmp_path):
    inner = FakeEngine(lambda chat, s, k: "")
    requests = [(make_chat("Be brief.", q), f"<answer>{x}</answer>") for q in ("a", "b") for x in "AB"]
    with CachedEngine(inner, tmp_path / "c.sqlite") as cache:
        first = cache.loglikelihood(requests + requests[:1])
        assert first[:4] == inner.loglikelihood(requests) and first[4] == first[0]
        assert len(inner.loglik_calls[0]) == 4  # the repeat was sent once
        assert cache.loglikelihood(requests[::-1]) == first[:4][::-1]
        assert len(inner.loglik_calls) == 2 and cache.stats.cache_hits == 4
        # Only misses reach the engine; generations are cached apart.
        cache.loglikelihood([*requests, (requests[0][0], "C")])
        assert inner.loglik_calls[-1] == [(requests[0][0], "C")]
        assert cache.generate([requests[0][0]], GenerationSettings()) == [""]
    with CachedEngine(FakeEngine(lambda chat, s, k: "", loglik=lambda c, x: 1.0), tmp_path / "c.sqlite",
                      model_id=inner.name) as reopened:
        assert reopened.loglikelihood(requests) == first[:4]  # replayed from disk, not recomputed
        assert reopened.engine.loglik_calls == []
        assert reopened.total_stats.scored_continuations == 5
    with CachedEngine(FakeEngine(lambda chat, s, k: "", loglik=lambda c, x: 1.0), tmp_path / "c.sqlite",
                      model_id="other") as other:
        assert other.loglikelihood(requests[:1]) == [1.0]


def test_bench_section_on_the_tiny_model(tiny_llama, tiny_tokenizer):
    from metaspo_hf.bench import loglik as bench_loglik

    tasks = [choice_task("mc", 3), choice_task("other", 2)]
    figures = bench_loglik.run(tiny_llama, tiny_tokenizer, bench_loglik.Workload(questions=3), tasks=tasks)
    assert figures["generate"]["questions"] == figures["loglik"]["questions"] == 5
    assert figures["loglik"]["generated_tokens"] == 0 and figures["loglik"]["scored_continuations"] == 15
    assert figures["generate"]["generated_tokens"] > 0 and figures["speedup"] > 0
    assert set(figures["per_task"]) == {"mc", "other"} and set(bench_loglik.VARIANTS) < set(figures["variants"])
    # The variant with the scorer's continuation (summed) is what the scorer does.
    (same,) = [figures["variants"][name] for name, (template, normalize) in bench_loglik.VARIANTS.items()
               if template == LOGLIK_CONTINUATION and normalize == "sum"]
    assert (same["accuracy"], same["agreement"]) == (figures["loglik"]["accuracy"], figures["agreement"])
    text = "\n".join(bench_loglik.lines(figures))
    assert "loglik speedup" in text and "paren_letter_text_mean" in text


def test_a_run_scores_multiple_choice_tasks_by_loglik(tmp_path, monkeypatch, tiny_model_dir):
    import json

    from fixtures.fake_bigbench import write_fake_bigbench

    from metaspo_hf import pipeline

    monkeypatch.setenv("METASPO_BIGBENCH_ARCHIVE", str(write_fake_bigbench(tmp_path / "archive")))
    monkeypatch.setenv("METASPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"""
model: {{name_or_path: "{tiny_model_dir}", batch_size: 8}}
scoring: loglik
search: {{train_size: 3, test_size: 3}}
evaluation: {{user_prompts_per_task: 1, compare: [none, default]}}
generation:
  base: {{max_new_tokens: 6, stop: ["</answer>"]}}
  optimizer: {{max_new_tokens: 12}}
""")
    run_dir = pipeline.run(str(recipe), [], phases=("evaluate",), output_dir=str(tmp_path / "run"))
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    (scoring,) = [e for e in events if e["event"] == "scoring"]
    assert "reasoning_about_colored_objects" in scoring["loglik_tasks"]
    assert {"object_counting", "epistemic_reasoning"} <= set(scoring["generated_tasks"])
    result = json.loads((run_dir / "result.json").read_text())
    assert set(result["scores"]["reasoning_about_colored_objects"]) == {"none", "default"}
    assert result["costs"]["scored_continuations"] > 0 and result["costs"]["base_generations"] > 0
