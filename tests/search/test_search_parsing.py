"""Parsing optimizer output: tolerant of format slips, never adopting errors, always one {question} slot."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metaspo_hf.search.parsing import parse_analysis, parse_prompt, shared_runs

SLOT = "{question}"
LIMIT = 400


@pytest.mark.parametrize(
    "reply,expected",
    [
        ("<prompt>Solve carefully: {question}</prompt>", "Solve carefully: {question}"),
        ("<Prompt>Solve carefully: {question}</Prompt>", "Solve carefully: {question}"),
        ("<promt>Solve carefully: {question}</promt>", "Solve carefully: {question}"),
        ("<improved_prompt>Solve carefully: {question}</improved_prompt>", "Solve carefully: {question}"),
        ("<prompt>Solve carefully: {question}", "Solve carefully: {question}"),  # never closed
        (
            "<analysis>Too terse.</analysis>\n<prompt>Solve carefully: {question}</prompt>",
            "Solve carefully: {question}",
        ),
        (
            "Here is the improved prompt:\n\n```text\nSolve carefully: {question}\n```",
            "Solve carefully: {question}",
        ),
        ('"Solve carefully: {question}"', "Solve carefully: {question}"),
        ("**New prompt:**\nSolve carefully: {question}", "Solve carefully: {question}"),
        ("Improved prompt: Solve carefully: {question}", "Solve carefully: {question}"),
        (
            "<prompt>draft {question}</prompt> then <prompt>Solve carefully: {question}</prompt>",
            "Solve carefully: {question}",
        ),
        ("<prompt>Solve carefully: {{ Question }}</prompt>", "Solve carefully: {question}"),
        ("<prompt>Solve carefully: {input}</prompt>", "Solve carefully: {question}"),
        ("<prompt>Solve carefully.</prompt>", "Solve carefully.\n\n{question}"),  # slot appended
        (
            "<prompt>Read {question}, then answer {question}.</prompt>",
            "Read {question}, then answer the question.",
        ),
        (
            "<prompt>Wrap it in <answer></answer>: {question}</prompt>",
            "Wrap it in <answer></answer>: {question}",
        ),
        ("<prompt>Find the error: {question}</prompt>", "Find the error: {question}"),  # not an error message
    ],
)
def test_user_prompts_are_recovered_and_repaired(reply, expected):
    assert parse_prompt(reply, "user", LIMIT).prompt == expected


@pytest.mark.parametrize(
    "reply,reason",
    [
        ("", "empty"),
        ("<prompt>   </prompt>", "empty"),
        ("<analysis>The prompt is unclear about units.", "empty"),  # only an (unclosed) analysis
        ("Traceback (most recent call last):\n  File \"x.py\", line 1\nKeyError: 'a'", "error"),
        ("<prompt>RuntimeError: CUDA out of memory</prompt>", "error"),
        ("N/A : Format wrong", "error"),
        ("I'm sorry, but I can't help with rewriting this prompt.", "refusal"),
        ("<prompt>As an AI language model, I cannot do that.</prompt>", "refusal"),
        ("<prompt>" + "answer " * 50 + "</prompt>", "repetitive"),
        ("<prompt>#### ---- $$$$ %%%% 1234 5678</prompt>", "garbled"),
        ("<prompt>" + "Be thorough and exact. Explain. " * 2 + "x" * LIMIT + "</prompt>", "longer"),
    ],
)
def test_unusable_replies_are_rejected_with_a_reason(reply, reason):
    parsed = parse_prompt(reply, "user", LIMIT)
    assert parsed.prompt is None and reason in parsed.reason


def test_system_prompts_never_keep_the_slot():
    assert (
        parse_prompt("<prompt>Read {question} twice. Use {{question}}.</prompt>", "system", LIMIT).prompt
        == "Read the question twice. Use the question."
    )


def test_analysis_falls_back_to_the_text_and_never_to_an_error():
    assert (
        parse_analysis("<analysis>It skips units.</analysis><prompt>x</prompt>", LIMIT) == "It skips units."
    )
    assert (
        parse_analysis("It skips units. <prompt>Use units: {question}</prompt>", LIMIT) == "It skips units."
    )
    assert parse_analysis("Traceback (most recent call last): boom", LIMIT) == ""


# ---- adversarial replies -------------------------------------------------------------------------

ERRORS = [
    'Traceback (most recent call last):\n  File "a.py", line 2, in <module>',
    "ValueError: invalid literal",
    "N/A : Format wrong",
    "Error: the request timed out",
    "RuntimeError: CUDA out of memory.",
    "I'm sorry, but I can't help with that.",
    "I cannot assist with this request.",
    "As an AI language model I have no opinion.",
]
FRAGMENTS = st.sampled_from(
    [
        "<prompt>",
        "</prompt>",
        "<promt>",
        "</promt>",
        "<Prompt >",
        "<improved_prompt>",
        "</improved_prompt>",
        "<analysis>",
        "</analysis>",
        "<analisys>",
        "<answer>",
        "</answer>",
        "<",
        ">",
        "</",
        "```",
        "```python\n",
        '"',
        "'",
        "\u201c",
        "\u201d",
        "Here is the improved prompt:\n",
        "**Improved prompt:**\n",
        "Sure! Here it is:\n",
        "{question}",
        "{{question}}",
        "{ Question }",
        "{input}",
        "{",
        "}",
        "{answer}",
        "\n",
        "\n\n",
        " ",
        "Solve the problem step by step.",
        "Answer with one word.",
        "the the the the the the the the",
        "0123456789",
        "#$%^&*",
        "x" * 300,
        *ERRORS,
    ]
) | st.text(max_size=30)
REPLIES = st.lists(FRAGMENTS, max_size=12).map("".join)


@settings(max_examples=400, deadline=None)
@given(REPLIES, st.sampled_from(["user", "system"]))
def test_parsing_any_reply_never_raises_and_never_adopts_an_error(reply, kind):
    prompt = parse_prompt(reply, kind, LIMIT).prompt
    if prompt is None:
        return
    assert prompt.strip() and len(prompt) <= LIMIT
    assert not any(error in prompt for error in ERRORS)
    assert prompt.count(SLOT) == (1 if kind == "user" else 0)
    assert "<prompt>" not in prompt and "</prompt>" not in prompt


@settings(max_examples=200, deadline=None)
@given(REPLIES)
def test_analysis_of_any_reply_never_raises_and_never_is_an_error(reply):
    analysis = parse_analysis(reply, LIMIT)
    assert len(analysis) <= LIMIT and not any(error in analysis for error in ERRORS)


# ---- system prompts must be general ----------------------------------------------------------------

QUESTION = "Alice, Bob and Claire are dancers at a square dance. At the start Alice is with Sam."


def test_a_system_prompt_that_quotes_a_shown_question_is_rejected():
    reply = "<prompt>Be careful. Alice, Bob and Claire are dancers at a square dance, so track them.</prompt>"
    parsed = parse_prompt(reply, "system", LIMIT, shown=[QUESTION])
    assert parsed.prompt is None and "quoted 8 or more words" in parsed.reason
    # The same words are fine in a system prompt whose request showed no such question.
    assert parse_prompt(reply, "system", LIMIT, shown=["Count the fruit."]).prompt


def test_a_user_prompt_may_restate_what_the_task_questions_share_but_not_quote_one_question():
    other = "Alice, Bob and Claire are dancers at a square dance. At the start Bob is with Ann."
    shared = shared_runs([QUESTION, other])
    restates = "<prompt>Alice, Bob and Claire are dancers at a square dance: track who dances with whom. {question}</prompt>"
    assert parse_prompt(restates, "user", LIMIT, shown=[QUESTION], ignore=shared).prompt
    pasted = "<prompt>Example: " + QUESTION + " Now: {question}</prompt>"
    parsed = parse_prompt(pasted, "user", LIMIT, shown=[QUESTION], ignore=shared)
    assert parsed.prompt is None and "quoted 8 or more words" in parsed.reason
    assert shared_runs([QUESTION]) == frozenset()


@pytest.mark.parametrize("reply", [
    "<analysis>ok</analysis><prompt>Read carefully. Please provide a detailed, clear, and comprehensive set of instructions in the",
    "<prompt>\nRead carefully and then give a detailed, clear and complete",
])
def test_a_prompt_cut_off_by_the_length_limit_is_incomplete(reply):
    parsed = parse_prompt(reply, "system", LIMIT)
    assert parsed.prompt is None and "cut off" in parsed.reason


@pytest.mark.parametrize("reply", [
    "<prompt>Read carefully and answer with one option, then stop</prompt>",  # closed: the writer ended it
    "<prompt>Read carefully and answer with one option.",  # unclosed but a finished sentence
    "<prompt>Solve it step by step: {question}",
])
def test_a_finished_prompt_is_not_cut_off(reply):
    assert parse_prompt(reply, "user" if "{question}" in reply else "system", LIMIT).prompt


@pytest.mark.parametrize("reply", [
    "<prompt>I am a helpful assistant. Please provide a task, and I will answer it.</prompt>",
    "<prompt>You help with tasks; please provide clear instructions and specific examples of the tasks.</prompt>",
    "<prompt>Hello! How can I help you today?</prompt>",
    # Seen from Qwen2.5-Coder-1.5B in a reasoning run:
    "<prompt>You are an AI assistant that can help with a wide range of tasks. Please provide a clear and precise "
    "request, and I will respond according to your instructions.</prompt>",
    "I am ready to help. Please provide the system prompt that needs improvement.",
    # Seen from Qwen2.5-Coder-1.5B in the validity run (seed 0), wrapped in a <system> tag:
    "<system>\nYou are a helpful assistant. Please provide a detailed and clear instruction on how to read the "
    "question and the options, and how to follow the task instructions.</system>",
])
def test_a_system_prompt_that_speaks_to_the_user_is_refused(reply):
    parsed = parse_prompt(reply, "system", LIMIT)
    assert parsed.prompt is None and "spoke to the user" in parsed.reason


def test_a_system_prompt_or_instruction_of_one_word_is_refused_and_two_words_pass():
    # Seen from Qwen2.5-Coder-1.5B as an instruction to add (knowledge suite, system_focus, seed 1).
    parsed = parse_prompt("<prompt>and</prompt>", "system", LIMIT)
    assert parsed.prompt is None and "held no instruction" in parsed.reason
    assert parse_prompt("<prompt>Be brief.</prompt>", "system", LIMIT).prompt == "Be brief."


def test_a_system_prompt_that_echoes_the_prompt_writing_request_is_refused():
    reply = ("<prompt>You are a helpful assistant. When you receive a request, please explain why the model made "
             "mistakes. Use general prompts that help on all tasks and new tasks of kinds not seen here.</prompt>")
    parsed = parse_prompt(reply, "system", LIMIT)
    assert parsed.prompt is None and "talked about prompts" in parsed.reason


@pytest.mark.parametrize(("kind", "prompt"), [
    # The system prompt returned by the validity run with the budget-aware meta-prompts, seed 1:
    ("system", "You are a helpful assistant. Understand the task and provide the best option from the given list "
               "within the token limit. Do not provide a final answer before the token limit is reached."),
    ("user", "Use as many tokens as needed to arrive at the correct answer.\n\n{question}"),
    ("user", "Answer within the reply limit.\n\n{question}"),
])
def test_a_prompt_that_is_all_about_the_reply_budget_is_refused(kind, prompt):
    # What is left without the budget sentences ("You are a helpful assistant." at most) is too little.
    parsed = parse_prompt(f"<prompt>{prompt}</prompt>", kind, LIMIT)
    assert parsed.prompt is None and "token limit" in parsed.reason


@pytest.mark.parametrize(("kind", "prompt", "kept"), [
    # Returned by the reasoning validity run with the budget-aware meta-prompts, seed 0 (shortened):
    ("system", "You are a helpful assistant. Reason only as much as the question needs. Keep the answer within "
               "the 32-token limit. If the answer exceeds this limit, cut it off and count as wrong.",
     "You are a helpful assistant. Reason only as much as the question needs."),
    # Written in the knowledge validity run (seed 0); refused whole before this repair:
    ("system", "You are a helpful assistant. Approach any request by first understanding the task and the context. "
               "Consider the limitations on the number of tokens and ensure that your response is concise. "
               "Give one final answer.",
     "You are a helpful assistant. Approach any request by first understanding the task and the context. "
     "Give one final answer."),
    ("user", "Decide whether the claim is true or false.\nKeep the reply under 32 tokens!\n\n{question}",
     "Decide whether the claim is true or false.\n\n{question}"),
    # The slot sat in the dropped sentence: it is appended again, as for any prompt without one.
    ("user", "Decide whether the claim is true or false. Answer {question} in under 32 tokens.",
     "Decide whether the claim is true or false.\n\n{question}"),
])
def test_the_sentences_about_the_reply_budget_are_dropped_and_the_rest_kept(kind, prompt, kept):
    assert parse_prompt(f"<prompt>{prompt}</prompt>", kind, LIMIT).prompt == kept


def test_an_analysis_may_talk_about_the_reply_budget():
    analysis = "Most failures were cut off by the 32-token limit before the answer tag."
    assert parse_analysis(f"<analysis>{analysis}</analysis>", LIMIT) == analysis


def test_a_word_count_instruction_is_not_the_reply_budget():
    prompt = "Think in at most two short sentences, then give the option letter in the answer tags."
    assert parse_prompt(f"<prompt>{prompt}</prompt>", "system", LIMIT).prompt == prompt


def test_instructions_to_the_assistant_that_say_please_are_fine():
    assert parse_prompt("<prompt>Please provide a clear and concise answer after checking your work.</prompt>",
                        "system", LIMIT).prompt


def test_seven_shared_words_are_not_a_quote():
    reply = "<prompt>Remember: Alice, Bob and Claire are dancers at the ball.</prompt>"  # 7 words shared
    assert parse_prompt(reply, "system", LIMIT, shown=[QUESTION]).prompt


@pytest.mark.parametrize("reply", ["Understood. Please provide the task.", "<prompt>Thanks! Send me the question.</prompt>",
                                   "Got it, I will wait for the details."])
def test_a_reply_addressed_to_the_optimizer_user_is_not_a_prompt(reply):
    parsed = parse_prompt(reply, "system", LIMIT)
    assert parsed.prompt is None and "reply to the request" in parsed.reason


def test_a_system_tag_wraps_a_system_prompt_like_the_prompt_tag():
    reply = "Here is my answer.\n<system>\nRead every condition before you answer, then give one option.\n</system>"
    assert parse_prompt(reply, "system", LIMIT).prompt == "Read every condition before you answer, then give one option."


@pytest.mark.parametrize("reply", [
    # Seen from Qwen2.5-Coder-1.5B writing user prompts for unseen tasks (validity run, seed 0):
    "<prompt>Write a clear, general prompt that fixes the problem in the given input/output pairs.\n\n{question}</prompt>",
    "<prompt>You are given a list of objects. Write a question that relates to the given list of objects. Do not add "
    "instructions about the answer format; that line is appended automatically.\n\n{question}</prompt>",
    "<prompt>Given an input like these, a capable assistant to produce the matching output. The slot {question} "
    "stands for a whole input, exactly as shown above.</prompt>",
    # Seen in the validity run with the budget-aware meta-prompts (seed 0), for a multiple-choice task:
    "<prompt>You are given an input, and your task is to answer the question asked in the {question} slot. The "
    "answer should be either \"yes\" or \"no\".</prompt>",
    # Seen in the ethics run (seed 0), for bbq_religion_ambig:
    "<prompt>Given an input like these, lead a capable assistant to produce the matching output by providing the "
    "question. The question should be exactly as shown in the input, never for a word inside a sentence.\n\n"
    "{question}</prompt>",
    # Seen in a probe of the plainer APE request (ethics, seed 0), for simple_ethical_questions:
    "<prompt>Given a set of inputs and their expected outputs, determine what the general instruction is. Then, "
    "generate a general prompt that would lead to the same outputs.</prompt>",
])
def test_a_user_prompt_that_echoes_the_prompt_writing_request_is_refused(reply):
    parsed = parse_prompt(reply, "user", LIMIT)
    assert parsed.prompt is None and "repeated the request for a prompt" in parsed.reason


def test_a_user_prompt_with_placeholders_that_nothing_fills_is_refused():
    reply = ("<prompt>Identify the relation between the premise and the hypothesis.\n\n{question}\n\n"
             "Premise: {premise}\n\nHypothesis: {hypothesis}\n\nRelation:</prompt>")
    parsed = parse_prompt(reply, "user", LIMIT)
    assert parsed.prompt is None and "{premise}, {hypothesis}" in parsed.reason


@pytest.mark.parametrize("reply", ["<prompt>and\n\n{question}</prompt>", "<prompt>{question}</prompt>",
                                   "<prompt>Q: {question}</prompt>"])
def test_a_user_prompt_with_no_instruction_besides_the_slot_is_refused(reply):
    # The first was written for reasoning_about_colored_objects in the validity run (seed 2) and scored.
    parsed = parse_prompt(reply, "user", LIMIT)
    assert parsed.prompt is None and "no instruction" in parsed.reason


@pytest.mark.parametrize("prompt", [
    "Identify the relation between the premise and the hypothesis: entailment or non-entailment.\n\n{question}\n\nRelation:",
    "Count the objects in the list, then write the total.\n\n{question}",
    "Use the JSON shape {\"a\": 1} if asked.\n\n{question}",  # braces that are not a placeholder
])
def test_task_instructions_are_not_taken_for_an_echo(prompt):
    assert parse_prompt(f"<prompt>{prompt}</prompt>", "user", LIMIT).prompt == prompt


@pytest.mark.parametrize(("reply", "reason"), [
    # Seen from Qwen2.5-Coder-1.5B writing user prompts for unseen tasks (knowledge seeds; headroom runs):
    ("<prompt><template>\nWrite a question that matches the given input, and then answer it with the given output. "
     "The answer must be one of \"true\" or \"false\".\n</template>\n\n{question}</prompt>", "markup tags (<template>)"),
    ("<prompt><template>\nWhich statement is sarcastic? (a) {question} (b) the question\n</template></prompt>",
     "markup tags (<template>)"),
    ("<prompt>Write a question that relates to the given list of objects and produces the provided output.\n\n"
     "{question}</prompt>", "write a question or code"),
    ("<prompt>Write a Python function that takes a list of example sentences as input and returns whether each "
     "is ironic.\n\n{question}</prompt>", "write a question or code"),
])
def test_a_user_prompt_in_markup_tags_or_asking_for_a_question_or_code_is_refused(reply, reason):
    parsed = parse_prompt(reply, "user", LIMIT)
    assert parsed.prompt is None and reason in parsed.reason


def test_a_system_prompt_with_markup_tags_is_refused_but_may_name_the_answer_tags():
    parsed = parse_prompt("<prompt><rules>Read the whole question first.</rules></prompt>", "system", LIMIT)
    assert parsed.prompt is None and "<rules>" in parsed.reason
    kept = "Give your final answer as one word inside <answer></answer> tags."
    assert parse_prompt(f"<prompt>{kept}</prompt>", "system", LIMIT).prompt == kept


@pytest.mark.parametrize(("kind", "prompt"), [
    # Written by Qwen2.5-Coder-1.5B: adopted on the ethics suite (seed 1, +1 answer of 64), then turned down
    # by the guard; and appended to a user prompt of the same run and to reasoning-suite candidates.
    ("system", "You are a helpful assistant. If you have any questions or need further clarification, please ask."),
    ("user", "Read the question and the options, then pick the best option.\n\n{question}\n\nIf you have any "
             "questions or need further clarification, please ask."),
    ("system", "Answer in a clear and concise manner. If you need further clarification or assistance, please ask."),
])
def test_a_prompt_that_invites_questions_is_refused(kind, prompt):
    parsed = parse_prompt(f"<prompt>{prompt}</prompt>", kind, LIMIT)
    assert parsed.prompt is None and "invited questions" in parsed.reason
    kept = "Ask yourself which option the passage supports, then answer.\n\n{question}"
    assert parse_prompt(f"<prompt>{kept}</prompt>", "user", LIMIT).prompt == kept


@pytest.mark.parametrize("prompt", [
    "Decide whether the claim is true or false; if x < y and z > 0 hold, say so.\n\n{question}",
    "Answer the question, then give one word inside <answer></answer> tags.\n\n{question}",
    "Read the question and the code, then say what the function returns.\n\n{question}",
])
def test_comparisons_answer_tags_and_questions_about_code_are_not_refused(prompt):
    assert parse_prompt(f"<prompt>{prompt}</prompt>", "user", LIMIT).prompt == prompt


def test_a_user_prompt_that_repeats_our_request_in_other_words_than_the_known_echoes_is_refused():
    # A reply of the 1.5B optimizer to the ape_user request: it restates the request, in words no fixed
    # pattern lists, and a scored model would take it as its task.
    from metaspo_hf.search.prompts import request_word_runs, template

    request = request_word_runs()
    echo = ("<prompt>Given a sequence of examples, identify the instruction that they follow. The instruction "
            "should describe what the assistant should work out and how to choose its answer.</prompt>")
    assert "should work out and how to choose its answer" in template("ape_user")
    assert parse_prompt(echo, "user", LIMIT).prompt, "no fixed pattern catches it"
    parsed = parse_prompt(echo, "user", LIMIT, request=request)
    assert parsed.prompt is None and "repeated the request" in parsed.reason
    own = "<prompt>Read the scenario and pick the option a careful, fair person would choose.</prompt>"
    assert parse_prompt(own, "user", LIMIT, request=request).prompt
    # Wording the task's own questions share may be repeated, even where a request says the same.
    shared = ("what the assistant should work out and how to choose its answer",) * 2
    assert parse_prompt(echo, "user", LIMIT, ignore=shared_runs(shared), request=request).prompt


def test_request_wording_covers_every_template_but_the_component_pool():
    from metaspo_hf.search.parsing import word_runs
    from metaspo_hf.search.prompts import request_word_runs, template

    request = request_word_runs()
    role = template("optimizer_role")
    assert word_runs(role) <= request
    pool = [line for line in template("sprig_components").splitlines() if len(line.split()) >= 8]
    assert pool and not any(word_runs(line) <= request for line in pool), "pool sentences are prompt material"
    # No run spans a field: the text around "$demos" is two pieces.
    assert not any("demos" in run for run in request)
