"""Multiple-choice options: one display format for every source, stable shuffling, parsing them back.

Every source lists options the same way under the question, ``(A) text`` per line, so a prompt
optimized on one task reads options the same way on every other task.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence

from .extract import LETTERS, number_value


def format_choice_question(stem: str, options: Sequence[str]) -> str:
    lines = [f"({LETTERS[index]}) {option}" for index, option in enumerate(options)]
    return f"{stem.rstrip()}\n\nOptions:\n" + "\n".join(lines)


def stable_shuffle(options: Sequence[str], correct: Sequence[str], key: str) -> tuple[list[str], list[str]]:
    """Options in an order fixed by ``key`` (not by the run's seed, so a question reads the same in every
    run), and the letters of the correct ones. Sources often list the correct option first."""
    order = list(range(len(options)))
    random.Random(hashlib.sha256(key.encode("utf-8")).hexdigest()).shuffle(order)
    shuffled = [options[index] for index in order]
    letters = [LETTERS[position] for position, index in enumerate(order) if options[index] in correct]
    return shuffled, letters


def merge_number_options(options: Sequence[str], correct: Sequence[str]) -> tuple[list[str], list[str]]:
    """One option per number: "2" and "two" listed side by side (as in some BIG-bench tasks) become "2"."""
    groups: dict[tuple, list[str]] = {}
    for option in options:
        value = number_value(option)
        groups.setdefault(("number", value) if value is not None else ("text", option), []).append(option)
    kept, kept_correct = [], []
    for members in groups.values():
        # Digits read better than words.
        shown = next((member for member in members if re.fullmatch(r"[-+\d.,\s]+", member)), members[0])
        kept.append(shown)
        if any(member in correct for member in members):
            kept_correct.append(shown)
    return kept, kept_correct


_PAREN_MARKER = re.compile(r"\(([A-Z])\)\s*")
_LINE_MARKER = re.compile(r"(?m)^[ \t]*\(?([A-Z])[.):][ \t]+(.*\S)[ \t]*$")


def parse_options(question: str) -> tuple[str, ...]:
    """Option texts listed in a question as "(A) x (B) y", or one per line as "A. x" / "A) x" / "A: x".

    The markers must run A, B, C, ... (at least two); otherwise the question lists no options.
    """
    markers = list(_PAREN_MARKER.finditer(question))
    start = next((index for index, match in enumerate(markers) if match.group(1) == "A"), None)
    if start is not None:
        run = [markers[start]]
        for match in markers[start + 1:]:
            if match.group(1) == LETTERS[len(run)]:
                run.append(match)
        if len(run) >= 2:
            ends = [match.start() for match in run[1:]] + [len(question)]
            texts = [question[match.end():end].strip() for match, end in zip(run, ends, strict=True)]
            # The last option runs to the end of its line only.
            texts[-1] = texts[-1].splitlines()[0].strip() if texts[-1] else ""
            return tuple(texts)
    lines = list(_LINE_MARKER.finditer(question))
    run_texts: list[str] = []
    for match in lines:
        if match.group(1) == LETTERS[len(run_texts)]:
            run_texts.append(match.group(2).strip())
        elif match.group(1) == "A":
            run_texts = [match.group(2).strip()]
    return tuple(run_texts) if len(run_texts) >= 2 else ()


def gold_letters(answer: str, options: Sequence[str]) -> str | None:
    """The letter a gold answer names: "B", "(B)", "b)" or the text of option B; None if unclear."""
    text = answer.strip()
    marker = re.fullmatch(r"\(?\s*([A-Za-z])\s*\)?[.:]?", text)
    if marker and (not options or marker.group(1).upper() in LETTERS[: len(options)]):
        return marker.group(1).upper()
    lowered = [option.strip().lower() for option in options]
    if text.lower() in lowered:
        return LETTERS[lowered.index(text.lower())]
    return None
