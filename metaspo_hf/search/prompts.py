"""The optimizer's requests: meta-prompt templates (``templates/*.txt``) filled with failures or demos.

Every request is a chat with the same optimizer system turn, so the engine shares its KV cache.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from string import Template

from ..models.base import Chat, make_chat
from ..scoring import WrongExample
from ..tasks.task import Example
from .parsing import word_runs

# Long questions and rambling responses are cut so that many failures fit in a small model's context.
MAX_QUESTION_CHARS = 1500
MAX_RESPONSE_CHARS = 800
ANSWER_CLOSE = "</answer>"


@cache
def template(name: str) -> str:
    return (
        resources.files(__package__).joinpath("templates", f"{name}.txt").read_text(encoding="utf-8").strip()
    )


# Templates whose sentences are meant to end up in prompts: the SPRIG component pool.
_PROMPT_MATERIAL = {"sprig_components"}


@cache
def request_word_runs() -> frozenset[tuple[str, ...]]:
    """Word runs of our own request wording (every template's text between its fields): a user prompt that
    repeats one hands our instructions to the scored model as its task (parsing.parse_prompt)."""
    names = [path.name.removesuffix(".txt") for path in resources.files(__package__).joinpath("templates").iterdir()
             if path.name.endswith(".txt")]
    pieces = [piece for name in names if name not in _PROMPT_MATERIAL
              for piece in re.split(r"\$\{?\w+\}?", template(name))]
    return frozenset(run for piece in pieces for run in word_runs(piece))


def _request(name: str, **fields: str) -> Chat:
    return make_chat(template("optimizer_role"), Template(template(name)).substitute(fields))


def _reply_limit(tokens: int) -> dict[str, str]:
    """The base model's reply budget, as the requests that show its failures state it: a small optimizer
    otherwise asks for long reasoning, which the limit cuts off before the answer."""
    words = max(1, round(tokens * 0.75))  # ~0.75 words per token
    return {"reply_limit": Template(template("reply_limit")).substitute(tokens=tokens, words=words)}


def user_analysis(system_prompt: str, user_prompt: str, wrong: list[WrongExample], reply_limit: int) -> Chat:
    return _request(
        "user_analysis",
        **_reply_limit(reply_limit),
        system_prompt=_or_none(system_prompt),
        user_prompt=user_prompt,
        failures=format_failures(wrong),
    )


def user_rewrite(
    system_prompt: str, user_prompt: str, wrong: list[WrongExample], analysis: str, reply_limit: int
) -> Chat:
    return _request(
        "user_rewrite",
        **_reply_limit(reply_limit),
        system_prompt=_or_none(system_prompt),
        user_prompt=user_prompt,
        failures=format_failures(wrong),
        analysis=analysis or "(no analysis available)",
    )


def system_analysis(
    system_prompt: str, wrong: list[tuple[str, WrongExample]], reply_limit: int, focus: str | None = None
) -> Chat:
    return _request(
        "system_analysis",
        **_reply_limit(reply_limit),
        **_focus(focus),
        system_prompt=_or_none(system_prompt),
        failures=format_task_failures(wrong),
    )


def system_rewrite(
    system_prompt: str, analysis: str, reply_limit: int, edit: str = "rewrite", focus: str | None = None
) -> Chat:
    """The request for a new system prompt ("rewrite") or for one instruction to append to it ("add")."""
    return _request(
        "system_rewrite" if edit == "rewrite" else "system_add",
        **_reply_limit(reply_limit),
        **_focus(focus),
        system_prompt=_or_none(system_prompt),
        analysis=analysis or "(no analysis available)",
    )


def system_foci() -> list[str]:
    """The kinds of mistake a system-prompt candidate can be asked to concentrate on (``search.system_focus``)."""
    return template("system_focus").splitlines()


@cache
def component_pool() -> tuple[str, ...]:
    """The SPRIG-style pool of system-prompt sentences (``sprig`` and ``search.system_components``)."""
    lines = template("sprig_components").splitlines()
    return tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def _focus(focus: str | None) -> dict[str, str]:
    """The sentence that narrows a request to one kind of mistake, closing its paragraph; none without a focus."""
    return {"focus": "" if focus is None else " " + Template(template("focus_note")).substitute(focus=focus)}


def ape_user(demos: list[Example]) -> Chat:
    return _request("ape_user", demos=format_demos(demos))


def ape_system(demos: list[Example]) -> Chat:
    return _request("ape_system", demos=format_demos(demos))


def ape_resample(user_prompt: str) -> Chat:
    return _request("ape_resample", user_prompt=user_prompt)


def sprig_rephrase(component: str) -> Chat:
    return _request("sprig_rephrase", component=component)


def with_format_reminder(chat: Chat, reason: str, kind: str) -> Chat:
    """The same request, with a note on why the last reply was unusable (for a re-ask)."""
    what = "user prompt template" if kind == "user" else "system prompt"
    note = Template(template("format_reminder")).substitute(reason=reason, what=what)
    *head, last = chat
    return [*head, {**last, "content": f"{last['content']}\n\n{note}"}]


def format_failures(wrong: list[WrongExample]) -> str:
    if not wrong:
        return "(none: every training question was answered correctly)"
    return "\n\n".join(
        f"## Wrong answer {i}\nQuestion:\n{_cut(w.question, MAX_QUESTION_CHARS)}\n"
        f"Model's response{_unanswered(w.response)}:\n{_cut(w.response, MAX_RESPONSE_CHARS)}\n"
        f"Correct answer: {_gold(w.answers)}"
        for i, w in enumerate(wrong, 1)
    )


def format_task_failures(wrong: list[tuple[str, WrongExample]]) -> str:
    """Failures from several tasks; each shows the full user message, since user prompts differ by task."""
    if not wrong:
        return "(none: every training question was answered correctly)"
    return "\n\n".join(
        f"## Wrong answer {i} (task: {task})\nUser message:\n{_cut(w.user_text, MAX_QUESTION_CHARS)}\n"
        f"Model's response{_unanswered(w.response)}:\n{_cut(w.response, MAX_RESPONSE_CHARS)}\n"
        f"Correct answer: {_gold(w.answers)}"
        for i, (task, w) in enumerate(wrong, 1)
    )


def format_demos(demos: list[Example]) -> str:
    return "\n\n".join(
        f"Input:\n{_cut(ex.question, MAX_QUESTION_CHARS)}\nOutput:\n{_gold(ex.answers)}" for ex in demos
    )


def _unanswered(response: str) -> str:
    """A note for a response that never closed an answer tag: cut off by the reply limit, or the format
    ignored. The optimizer sees the cause and not only a wrong answer."""
    return "" if ANSWER_CLOSE in response.lower() else " (it ended without an <answer> tag)"


def _gold(answers: tuple[str, ...]) -> str:
    return " or ".join(answers)


def _or_none(system_prompt: str) -> str:
    return system_prompt or "(no system prompt)"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + " [...]"
