"""Answer extraction and scoring on realistic responses of small and large models, plus fuzzing."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metaspo_hf.tasks import Example, Task
from metaspo_hf.tasks.extract import AnswerSegment, extract_choice, find_answer_segment, parse_number
from metaspo_hf.tasks.metrics import score_response, token_f1


def make_task(kind, labels=(), metric=None):
    return Task(name="t", domain="d", train=[], test=[], initial_prompt="{question}", answer_kind=kind,
                labels=labels, meta={"metric": metric} if metric else {})


BOOKS = ("The black book is the leftmost.", "The orange book is the leftmost.", "The blue book is the leftmost.")


@pytest.mark.parametrize("response, expected", [
    ("<answer>B</answer>", 1),
    ("<answer>(B)</answer>", 1),
    ("<answer>(b)</answer>", 1),
    ("<answer> b. </answer>", 1),
    ("<ANSWER>B</ANSWER>", 1),
    ("< answer >B</ answer >", 1),
    ("<answer>B) The orange book is the leftmost.</answer>", 1),
    ("<answer>Option B</answer>", 1),
    ("<answer>The answer is (B).</answer>", 1),
    ("<answer>The orange book is the leftmost.</answer>", 1),
    ("<answer>The orange book is the leftmost</answer>", 1),
    ("<answer>the orange book</answer>", 1),
    ("First guess <answer>A</answer>, but checking again: <answer>B</answer>", 1),
    ("<answer>B</answer> as required, inside <answer></answer> tags.", 1),
    ("Let me think. The orange book is right of the black one, so the answer is (B).", 1),
    ("(A) cannot be, since the black book is to its left. (B) fits every statement.", 1),
    ("The black book is not leftmost.\nFinal answer: B", 1),
    ("B", 1),
    ("<answer>B", 1),
    ("<answer>A</answer>", 0),
    ("<answer>D</answer>", 0),
    ("<answer>I am not sure</answer>", 0),
    ("I cannot tell which book is where.", 0),
    ("", 0),
])
def test_choice_responses(response, expected):
    example = Example(question="q", answers=("B",), options=BOOKS)
    assert score_response(make_task("choice"), response, example) == expected


def test_choice_article_a_is_not_option_a():
    # "A blue book" names option C by its text; the article is not the letter A.
    example = Example(question="q", answers=("C",), options=BOOKS)
    assert score_response(make_task("choice"), "<answer>A blue book</answer>", example) == 1
    assert extract_choice(AnswerSegment("A, since the black one is first", tagged=True), BOOKS) == "A"


def test_choice_with_several_gold_letters_and_numeric_options():
    example = Example(question="q", answers=("C",), options=("0", "1", "2", "3"))
    task = make_task("choice")
    assert score_response(task, "<answer>2</answer>", example) == 1
    assert score_response(task, "<answer>C</answer>", example) == 1
    assert score_response(task, "<answer>3</answer>", example) == 0


@pytest.mark.parametrize("response, expected", [
    ("<answer>non-entailment</answer>", 1),
    ("<answer>Non-entailment.</answer>", 1),
    ("<answer>**non-entailment**</answer>", 1),
    ("<answer>It is non-entailment, not entailment</answer>", 1),
    ("The premise does not give entailment here.\nRelation: non-entailment", 1),
    ("<answer>entailment</answer>", 0),
    ("<answer>nonentailment</answer>", 0),
    ("I think this is entailment.", 0),
])
def test_label_responses(response, expected):
    task = make_task("label", labels=("entailment", "non-entailment"))
    assert score_response(task, response, Example("q", ("non-entailment",))) == expected


@pytest.mark.parametrize("response, expected", [
    ("<answer>Yes</answer>", 1),
    ("<answer>YES.</answer>", 1),
    ("No, wait. On reflection: yes.", 1),
    ("<answer>yesterday</answer>", 0),
    ("<answer>no</answer>", 0),
])
def test_yes_no_labels(response, expected):
    task = make_task("label", labels=("yes", "no"))
    assert score_response(task, response, Example("q", ("yes",))) == expected


@pytest.mark.parametrize("response, expected", [
    ("<answer>3</answer>", 1),
    ("<answer>three</answer>", 1),
    ("<answer>Three</answer>", 1),
    ("<answer>There are 3 fruits.</answer>", 1),
    ("<answer>3.0</answer>", 1),
    ("I count 1, 2, 3. So 3 items in total.", 1),
    ("A pear and two apples make three", 1),
    ("<answer>4</answer>", 0),
    ("<answer>the blue one</answer>", 0),
    ("<answer>3rd</answer>", 0),
    ("no idea", 0),
])
def test_number_responses(response, expected):
    assert score_response(make_task("number"), response, Example("q", ("three", "3"))) == expected


@pytest.mark.parametrize("response, gold", [
    ("<answer>1000</answer>", "1,000"),
    ("<answer>1,000</answer>", "1000"),
    ("<answer>twenty-one</answer>", "21"),
    ("<answer>twenty one</answer>", "21"),
    ("<answer>-2.5</answer>", "-2.5"),
    ("<answer>$12</answer>", "12"),
])
def test_number_forms(response, gold):
    assert score_response(make_task("number"), response, Example("q", (gold,))) == 1


def test_parse_number_needs_a_lone_number():
    assert parse_number("3 apples") == 3
    assert parse_number("forty-two") == 42
    assert parse_number("3 or 4") is None
    assert parse_number("inf") is None and parse_number("nan") is None


@pytest.mark.parametrize("response, expected", [
    ("<answer>4</answer>", 1),
    ("<answer>4 stars</answer>", 1),
    ("<answer>4/5</answer>", 1),
    ("<answer>four</answer>", 1),
    ("<answer>4.0</answer>", 1),
    ("On a scale of 1 to 5, I would give it a 4.", 1),
    ("Rating (1-5): I'd say 4 out of 5.", 1),
    ("<answer>5</answer>", 0),
    ("<answer>10</answer>", 0),
    ("<answer>4.5</answer>", 0),
    ("The customer liked it.", 0),
])
def test_rating_responses(response, expected):
    assert score_response(make_task("rating"), response, Example("q", ("4",))) == expected


@pytest.mark.parametrize("metric, response, expected", [
    (None, "<answer>Paris</answer>", 1),
    (None, "<answer>The capital is Paris.</answer>", 1),
    (None, "<answer>paris, france</answer>", 1),
    (None, "<answer>Parisian</answer>", 0),
    (None, "Thinking about capitals.\nThe answer is Paris.", 1),
    (None, "Thinking about capitals.\nLyon", 0),
    ("exact", "<answer>The capital is Paris.</answer>", 0),
    ("exact", "<answer>the Paris</answer>", 1),
    ("f1", "<answer>Paris France</answer>", 1),
    ("f1", "<answer>Paris is nice</answer>", 0.5),
])
def test_open_responses(metric, response, expected):
    task = make_task("open", metric=metric)
    assert score_response(task, response, Example("q", ("Paris", "Paris, France"))) == pytest.approx(expected)


def test_token_f1_is_graded():
    assert token_f1("the big red barn", "red barn") == pytest.approx(0.8)
    assert token_f1("", "red barn") == 0


def test_segment_prefers_last_non_empty_tag_and_falls_back():
    assert find_answer_segment("<answer>A</answer> then <answer> </answer>") == AnswerSegment("A", True)
    assert find_answer_segment("<answer>\nmulti\nline\n</answer>") == AnswerSegment("multi\nline", True)
    assert find_answer_segment("reasoning <answer>C</ans") == AnswerSegment("C", True)
    assert find_answer_segment("no tags at all ") == AnswerSegment("no tags at all", False)


PIECES = st.sampled_from(["<answer>", "</answer>", "< answer >", "(A)", "B", "b)", "yes", "No", "3", "three",
                          "twenty-", "4/5", "-", ".", ",", " ", "\n", "option", "the answer is", "1,0", "İ", "ß"])
RESPONSES = st.one_of(st.text(), st.lists(st.one_of(PIECES, st.text(max_size=5)), max_size=30).map("".join))


@settings(max_examples=300, deadline=None)
@given(response=RESPONSES, options=st.lists(st.text(max_size=12), max_size=8),
       labels=st.lists(st.text(max_size=10), max_size=5), gold=st.text(max_size=8))
def test_fuzz_scoring_never_raises(response, options, labels, gold):
    for kind in ("choice", "label", "number", "rating", "open"):
        task = make_task(kind, labels=tuple(labels))
        score = score_response(task, response, Example("q", (gold, "A"), tuple(options)))
        assert 0.0 <= score <= 1.0
    for metric in ("exact", "f1"):
        assert 0.0 <= score_response(make_task("open", metric=metric), response, Example("q", (gold,))) <= 1.0


def test_bracketed_labels_accept_the_bare_letter():
    task = make_task("label", labels=("(a)", "(b)"))
    for response in ("<answer>b</answer>", "<answer>(b)</answer>", "<answer>(B)</answer>", "Statement (b) is sarcastic"):
        assert score_response(task, response, Example("q", ("(b)",))) == 1
    assert score_response(task, "<answer>a</answer>", Example("q", ("(b)",))) == 0
