"""The labels of the system prompts a run compares, and the fixed ones among them.

A label is either a fixed baseline prompt (``BASELINE_SYSTEM_PROMPTS``: none, default, cot, service) or
the name of a search method that writes a system prompt (``search.system_prompt_methods()``: metaspo,
outer_only, sprig, ...); a run's own prompt is labelled by its method (``result["main_label"]``), or by
the name of a system-prompt file given with ``--system-prompt``; a searched prompt that the validation
guard turned down, when the recipe asks for it to be scored, is ``turned_down_label(method)``.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import MetaspoError, did_you_mean
from ..search import system_prompt_methods

SERVICE_SYSTEM_PROMPT = """\
You are the virtual assistant of a technology company, available to customers and staff around the \
clock. Your job is to understand what each person needs and to help them reach a correct, useful result \
as quickly as possible.

Before you answer, make sure you understand the request. If it contains several questions, address each \
of them. If important information is missing and you cannot reasonably assume it, say what is missing; \
otherwise state the assumption you made and continue. Base your answers on the information in the \
conversation and on well-established knowledge, and never invent facts, figures, sources or product \
details.

Write in a friendly, professional tone. Be concise: lead with the answer, then give the explanation or \
the steps that support it. Use numbered steps for procedures and short lists where they make an answer \
easier to scan. Match the language and the level of detail of the person you are helping, and follow any \
format they ask for.

Protect people's privacy and safety. Do not ask for or repeat passwords, payment details or other \
sensitive personal data. Decline requests that could cause harm, explain briefly why, and suggest a safe \
alternative when there is one. When a request is outside what you can do, say so plainly and point to \
where help can be found.

Before you finish, check that your answer is accurate, complete and consistent with what was asked."""

# The fixed system prompts every meta-learned one is compared with (labels as in the run folder).
BASELINE_SYSTEM_PROMPTS: dict[str, str] = {
    "none": "",
    "default": "You are a helpful assistant.",
    "cot": "Let's think step by step.",
    "service": SERVICE_SYSTEM_PROMPT,
}


# The order of the paper's tables: the fixed baselines, the searched baselines, then MetaSPO; other labels
# (system prompt files, other methods) follow in the order they appear.
TABLE_ORDER = (*BASELINE_SYSTEM_PROMPTS, "outer_only", "sprig", "metaspo")


def turned_down_label(method: str) -> str:
    """The label of the searched prompt that ``method``'s validation guard turned down
    (``evaluation.score_turned_down``): its run returns the initial prompt under the method's own label."""
    return f"{method}_turned_down"


def ordered_labels(labels: Iterable[str]) -> list[str]:
    """``labels`` without repeats, in ``TABLE_ORDER``, then the others in the order they appear."""
    seen = list(dict.fromkeys(labels))
    return [label for label in TABLE_ORDER if label in seen] + [label for label in seen if label not in TABLE_ORDER]


def known_labels() -> list[str]:
    """Every label a recipe may name: the fixed prompts, then the methods that search a system prompt."""
    return [*BASELINE_SYSTEM_PROMPTS, *system_prompt_methods()]


def check_labels(key: str, labels) -> tuple[str, ...]:
    """The labels as a tuple, each a fixed baseline prompt or a method that searches a system prompt."""
    if isinstance(labels, str) or not all(isinstance(label, str) for label in labels):
        raise MetaspoError(f"{key} must be a list of names, got {labels!r}")
    known = known_labels()
    for label in labels:
        if label not in known:
            raise MetaspoError(
                f"{key}: unknown system prompt {label!r}",
                hint=did_you_mean(label, known) or f"choose from {', '.join(known)}",
            )
    return tuple(labels)
