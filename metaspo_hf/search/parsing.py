"""Turning optimizer output into a usable prompt, or a reason why it is not one.

Small optimizer models misspell tags, forget to close them, wrap prompts in code fences or quotes,
add "Here is the improved prompt:" preambles, loop on one phrase, or answer with a refusal. The
policy (see docs/method.md):

- the prompt is read from ``<prompt>`` tags; misspelled or decorated tag names (``<promt>``,
  ``<improved_prompt>``, ``<Prompt>``) count, an unclosed tag runs to the next tag or the end;
  with several blocks the last usable one wins; with no tag at all the whole reply (minus other
  tagged blocks) is tried;
- fences, quotes, preamble lines and heading lines are stripped;
- empty, overlong, repetitive/garbled text, error messages and refusals are rejected;
- a user prompt always leaves with exactly one ``{question}`` slot: placeholder variants
  (``{{question}}``, ``{ Question }``, ``{input}``, ``{query}``...) are normalised, a missing slot is
  appended after the prompt, extra slots become "the question" (repair, not rejection: the
  prompt's wording is still a useful candidate, and the score decides whether it is kept);
- a system prompt must not contain the slot: it becomes "the question";
- a user prompt must not echo the request that asked for it ("Write a clear, general prompt that fixes
  the problem in the given input/output pairs. {question}", "that line is appended automatically"): the
  scored model would read our instructions to the optimizer as its task; nor may it keep placeholders
  other than the slot (``{premise}``): the question is inserted whole, and the rest would stay literal;
  nor may it be a bare slot with a word or two ("and {question}"): that instructs nobody; nor may it ask
  the assistant to write a question or code instead of answering;
- a prompt must not keep markup tags other than the answer tags (``<template>``): the assistant reads them
  literally;
- a prompt must not quote the questions it was written from (a run of ``COPIED_WORDS`` words): a
  system prompt must be general, and small optimizers paste a failed question into system and user
  prompts verbatim; for a user prompt, wording that the task's questions share (its instructions)
  may be quoted (``ignore``);
- a reply that answers us ("Understood. Please provide the task...") is not a prompt, and neither is
  a system prompt that speaks to the user ("I am a helpful assistant. Please provide a task...");
- a sentence of a prompt that mentions the reply's token limit (which only the optimizer is told) is
  dropped, and the rest kept when at least ``MIN_WORDS_WITHOUT_BUDGET`` words remain (else refused);
- a reply that opens a prompt tag and stops mid-sentence without closing it was cut off by the token
  limit, and its prompt is incomplete (a closed tag, or a final full stop, says the writer finished).

Nothing here raises on any input string.
"""

from __future__ import annotations

import difflib
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from ..tasks.task import QUESTION_SLOT

PROMPT_TAG = "prompt"
ANALYSIS_TAG = "analysis"

# A tag-like token: <name>, </name>, < name >, <improved_prompt>, <New Prompt>.
_TAG_TOKEN = re.compile(r"<\s*(/?)\s*([A-Za-z][A-Za-z0-9_ \-]{0,40}?)\s*/?\s*>")
_FENCE = re.compile(r"```[^\n`]*\n?(.*?)(?:```|$)", re.DOTALL)
_SLOT_VARIANT = re.compile(r"\{+\s*(?:question|questions|query|input|problem|text)\s*\}+", re.IGNORECASE)
# A line announcing the prompt ("Here is the improved prompt:", "Sure! A better version:").
_PREAMBLE = re.compile(
    r"^(?:(?:sure|certainly|okay|ok|of course|absolutely|great)\b.{0,100}"
    r"|.{0,100}\b(?:prompt|instruction|version|rewrite|rewritten|revised|improved|updated)\b.{0,60}):$",
    re.IGNORECASE,
)
# A bare heading line ("**Improved prompt**", "### New system prompt").
_HEADING = re.compile(
    r"^(?:the\s+)?(?:new|improved|revised|updated|rewritten|final|optimi[sz]ed|better|proposed)?\s*"
    r"(?:system\s+|user\s+)?(?:prompt|instruction)s?\s*:?$",
    re.IGNORECASE,
)
# A label in front of the prompt on its first line ("Improved prompt: Solve ...").
_LEAD_LABEL = re.compile(
    r"^[*_#\s]*(?:the\s+|my\s+)?(?:new|improved|revised|updated|rewritten|final|optimi[sz]ed|better|proposed)\s+"
    r"(?:system\s+|user\s+)?(?:prompt|instruction)\s*[*_]*:[*_]*\s*",
    re.IGNORECASE,
)
# Error output: tracebacks, "ValueError:"/"Error:" labels (capitalised, so that "find the error: ..."
# stays a valid prompt), a reply that opens with "Error", CUDA/HTTP failures, the paper code's format error.
_ERROR = re.compile(
    r"Traceback \(most recent call last\)|(?-i:(?:Error|Exception|ERROR)\s*:)|\A\s*(?:error|exception)\b"
    r"|\A\s*N/?A\b|out of memory|format wrong|internal server error",
    re.IGNORECASE,
)
_REFUSAL = re.compile(
    r"\A\s*(?:I'?m sorry|I am sorry|sorry\b|I cannot|I can'?t|I can not|I am unable|I'?m unable|I won'?t"
    r"|I will not|As an AI|Unfortunately)"
    r"|I (?:cannot|can'?t|am unable to|'m unable to) (?:help|assist|comply|provide|fulfil)"
    r"|I'?m sorry, but|as an AI (?:language )?model",
    re.IGNORECASE,
)
# A reply addressed to us instead of a prompt (small optimizers answer the meta-prompt like a chat).
_ACKNOWLEDGEMENT = re.compile(r"\A\s*(?:understood|got it|noted|i understand|thank you|thanks)\b", re.IGNORECASE)
# A system prompt that addresses the user instead of instructing the assistant: it introduces itself
# or asks for the task ("I am a helpful assistant. Please provide a task, and I will answer it").
_SPEAKS_TO_USER = re.compile(
    r"\A\s*(?:I am|I'm) (?:a|an|your|ready)\b|how (?:can|may) I (?:help|assist)|feel free to ask"
    r"|\bI (?:will|can|'ll) (?:respond|answer|approach|help|assist|do my best)\b"
    r"|please (?:provide|give|share|send|specify|tell)(?: me| us)?(?: \w+){0,4}? "
    r"(?:tasks?|questions?|instructions?|examples?|requests?|details?|input|context|prompt)\b",
    re.IGNORECASE,
)
# An invitation to ask for clarification ("If you have any questions or need further clarification, please
# ask."): a scored reply cannot use it, and the 1.5B optimizer appended it to system and user prompts alike.
_INVITES_QUESTIONS = re.compile(
    r"\bif you have any (?:other |more |further )?(?:questions|concerns)\b"
    r"|\b(?:need|want) (?:any )?(?:further|more) clarification\b|\bplease (?:ask|let me know)\b"
    r"|\bdon'?t hesitate to ask\b",
    re.IGNORECASE,
)
_INVITES_QUESTIONS_REASON = ("it invited questions or requests for clarification, which a scored answer cannot "
                             "use (tell the assistant how to answer from what it is given)")
# A system prompt that talks about the prompt-writing job instead of doing the assistant's: it echoes
# the meta-prompt ("explain why the model made mistakes", "help on new tasks of kinds not seen here").
_ECHOES_REQUEST = re.compile(
    r"\b(?:system|user) prompts?\b|\bthe model (?:made|makes|got)\b|tasks of kinds not seen",
    re.IGNORECASE,
)
# A user prompt that repeats the prompt-writing request instead of instructing the assistant on the task
# (seen from a 1.5B optimizer: it turns the request itself into the template).
_USER_ECHOES_REQUEST = re.compile(
    r"\b(?:write|generate|create) (?:a|an|the)\b[^.\n]{0,40}\b(?:prompt|instruction)s?\b|\binput[/ -]output pairs?\b"
    r"|\binputs? and (?:their |the )?(?:expected |corresponding |matching )?outputs?\b"
    r"|\bline is appended\b|\bslot\b|\bprompt template\b|\bfix(?:es)? the problem\b|\bcapable assistant\b"
    r"|\bmatching output\b",
    re.IGNORECASE,
)
# A sentence that passes on the reply budget the optimizer was told: the assistant never sees it, and a 1.5B
# optimizer turned it into orders such as "Do not provide a final answer before the token limit is reached".
_MENTIONS_REPLY_LIMIT = re.compile(r"\btokens?\b|\b(?:reply|response|length|this|that|the) limit\b", re.IGNORECASE)
# What must be left of a prompt once its budget sentences are dropped ("You are a helpful assistant." is not).
MIN_WORDS_WITHOUT_BUDGET = 6
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# A user prompt that asks the assistant to produce something other than the answer: a question for the shown
# output, or code (seen from the 1.5B optimizer on unseen tasks: "Write a question that matches the given
# input, and then answer it", "Write a Python function that takes a list of example sentences").
_USER_ASKS_FOR_OTHER_WORK = re.compile(
    r"\b(?:write|create|generate) (?:a|an|the)\b[^.\n]{0,20}?\b(?:questions?|functions?|programs?|scripts?|code)\b",
    re.IGNORECASE,
)
# A markup tag left in a prompt (our own tags are stripped before this is read): the 1.5B optimizer wrapped
# user prompts in <template>...</template>, which the scored model then read literally. Answer tags may
# stay: a prompt may ask for them. Spaces are not allowed in the name, so "if x < y and z > 0" is no tag.
_MARKUP_TAG = re.compile(r"<\s*/?\s*([A-Za-z][A-Za-z0-9_\-]*)\s*/?\s*>")
_ANSWER_TAG_NAME = "answer"  # what every answer-format line asks for (tasks/extract.py reads it)
# A placeholder left in a user prompt after the slot was normalised ("{premise}", "{options}").
_STRAY_PLACEHOLDER = re.compile(r"\{\s*[A-Za-z_][A-Za-z0-9_ ]{0,30}\s*\}")
# Words a prompt needs (besides the slot) to instruct anyone ("Solve carefully:"); the 1.5B optimizer once
# left "and\n\n{question}" as a whole user prompt, and "and" as an instruction to add to a system prompt.
MIN_INSTRUCTION_WORDS = 2
# How a finished prompt ends: punctuation, a closing bracket or quote, or the slot.
_FINISHED = re.compile(r"""(?:[.!?:;)\]}"'\u2019\u201d\u2026*`>]|\{question\})\s*\Z""")
# A prompt sharing this many consecutive words with a question shown to the optimizer quotes it.
COPIED_WORDS = 8
_QUOTES = (('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"), ("`", "`"))


@dataclass(frozen=True)
class Parsed:
    prompt: str | None  # None: nothing usable
    reason: str | None = None  # why nothing was usable


def parse_prompt(text: str, kind: str, max_chars: int, shown: Sequence[str] = (),
                 ignore: frozenset[tuple[str, ...]] = frozenset(),
                 request: frozenset[tuple[str, ...]] = frozenset()) -> Parsed:
    """The prompt in an optimizer reply; ``kind`` is "user" (needs the slot) or "system"; ``shown``: the
    questions the request showed (the prompt must not quote them); ``ignore``: word runs that may be
    quoted all the same (``shared_runs`` of the task's questions); ``request``: word runs of our own
    request wording, which a user prompt must not repeat."""
    blocks = tagged_blocks(text, PROMPT_TAG) or [_without_tagged_blocks(text)]
    cut_off = _cut_off(text)
    reasons = []
    for position, block in enumerate(reversed(blocks)):  # the last block is usually the final answer
        cleaned = clean(block)
        if not cleaned:
            reasons.append("it was empty")
            continue
        prompt = fix_slot(cleaned) if kind == "user" else _SLOT_VARIANT.sub("the question", cleaned)
        unfinished = position == 0 and cut_off and not _FINISHED.search(cleaned)
        reason = (reject_reason(prompt, max_chars)
                  or ("it was cut off mid-sentence (it reached the length limit); write a shorter prompt"
                      if unfinished else None))
        if reason is None:
            prompt = _without_budget_sentences(prompt)
            if prompt is not None and kind == "user":
                prompt = fix_slot(prompt)  # the slot may have sat in a dropped sentence
            reason = _BUDGET_REASON if prompt is None else (
                _quoted_reason(prompt, shown, ignore)
                or (_user_address_reason(prompt) if kind == "system"
                    else _user_prompt_reason(prompt) or _echo_reason(prompt, request, ignore)))
        if reason is None:
            return Parsed(prompt)
        reasons.append(reason)
    return Parsed(None, reasons[0] if reasons else "it was empty")


def _cut_off(text: str) -> bool:
    """Whether the reply was stopped inside a prompt by the token limit: it opened a prompt tag and never
    closed it. (A reply with no tag at all gives no such sign, and is taken whole, as before.)"""
    tokens = [m for m in _TAG_TOKEN.finditer(text) if tag_family(m.group(2)) == PROMPT_TAG]
    return bool(tokens) and not tokens[-1].group(1)


def _user_address_reason(prompt: str) -> str | None:
    if _word_count(prompt) < MIN_INSTRUCTION_WORDS:
        return "it held no instruction (write at least one sentence telling the assistant what to do)"
    if reason := _markup_reason(prompt):
        return reason
    if _SPEAKS_TO_USER.search(prompt):
        return ("it spoke to the user instead of instructing the assistant (write instructions addressed to "
                "the assistant, in the second person)")
    if _INVITES_QUESTIONS.search(prompt):
        return _INVITES_QUESTIONS_REASON
    if _ECHOES_REQUEST.search(prompt):
        return ("it talked about prompts and the model's mistakes instead of telling the assistant how to "
                "handle a request")
    return None


_USER_ECHO_REASON = ("it repeated the request for a prompt instead of telling the assistant how to do the task "
                     "(write the task instruction itself)")


def _user_prompt_reason(prompt: str) -> str | None:
    if _word_count(prompt) < MIN_INSTRUCTION_WORDS:
        return (f"it held no instruction besides {QUESTION_SLOT} (say what the assistant should do with the "
                "question)")
    if _USER_ECHOES_REQUEST.search(prompt):
        return _USER_ECHO_REASON
    if reason := _markup_reason(prompt):
        return reason
    if _INVITES_QUESTIONS.search(prompt):
        return _INVITES_QUESTIONS_REASON
    if _USER_ASKS_FOR_OTHER_WORK.search(prompt):
        return ("it asked the assistant to write a question or code instead of answering the input (tell the "
                "assistant how to find the answer to the question it is given)")
    stray = [m.group(0) for m in _STRAY_PLACEHOLDER.finditer(prompt.replace(QUESTION_SLOT, ""))]
    if stray:
        return (f"it had placeholders other than {QUESTION_SLOT} ({', '.join(stray)}): the whole input goes in "
                f"{QUESTION_SLOT}, and nothing fills the others")
    return None


def _markup_reason(prompt: str) -> str | None:
    tags = sorted({m.group(1) for m in _MARKUP_TAG.finditer(prompt) if m.group(1).lower() != _ANSWER_TAG_NAME})
    if tags:
        return (f"it kept markup tags ({', '.join(f'<{tag}>' for tag in tags)}) that the assistant would read "
                "literally (write the prompt as plain text)")
    return None


def parse_analysis(text: str, max_chars: int) -> str:
    """The analysis in an optimizer reply, or "" when there is nothing usable (it only feeds a rewrite)."""
    blocks = tagged_blocks(text, ANALYSIS_TAG) or [_without_tagged_blocks(text)]
    for block in reversed(blocks):
        cleaned = clean(block)[:max_chars]
        if cleaned and reject_reason(cleaned, max_chars) is None:
            return cleaned
    return ""


def tag_family(name: str) -> str | None:
    """Which of our tags a (possibly misspelled or decorated) tag name stands for."""
    letters = re.sub(r"[^a-z]", "", name.lower())
    for tag in (ANALYSIS_TAG, PROMPT_TAG):
        if letters.endswith(tag) or difflib.SequenceMatcher(None, letters, tag).ratio() >= 0.75:
            return tag
    # <instruction>, <new_instruction>: what other prompt optimizers call the prompt; <system>: what a
    # small optimizer wraps a system prompt in.
    return PROMPT_TAG if letters.endswith("instruction") or letters == "system" else None


def tagged_blocks(text: str, tag: str) -> list[str]:
    """The contents of every ``tag`` block; an unclosed block runs to the next known tag or the end."""
    tokens = [(m, tag_family(m.group(2))) for m in _TAG_TOKEN.finditer(text)]
    tokens = [(m, family) for m, family in tokens if family]
    blocks = []
    for i, (match, family) in enumerate(tokens):
        if family == tag and not match.group(1):
            end = tokens[i + 1][0].start() if i + 1 < len(tokens) else len(text)
            blocks.append(text[match.end() : end])
    return blocks


def _without_tagged_blocks(text: str) -> str:
    """The reply with every block of a known tag cut out, closed or not.

    Used only when the tag asked for is absent, so what goes is some other block (e.g. an analysis).
    """
    pieces, open_family, start = [], None, 0
    for match in _TAG_TOKEN.finditer(text):
        family, closing = tag_family(match.group(2)), bool(match.group(1))
        if family and open_family is None and not closing:
            pieces.append(text[start : match.start()])
            open_family = family
        elif family and family == open_family and closing:
            open_family, start = None, match.end()
    if open_family is None:
        pieces.append(text[start:])
    return "".join(pieces)


def clean(text: str) -> str:
    """Strip code fences, stray tags, preamble and heading lines, labels, and wrapping quotes."""
    fenced = [block for block in _FENCE.findall(text) if block.strip()]
    if fenced:
        text = max(fenced, key=len)
    text = _TAG_TOKEN.sub(lambda m: "" if tag_family(m.group(2)) else m.group(0), text)
    lines = text.strip().splitlines()
    while lines and (not lines[0].strip() or _is_preamble(lines[0])):
        lines.pop(0)
    text = _LEAD_LABEL.sub("", "\n".join(lines).strip(), count=1)
    for _ in range(2):  # quotes may be nested once: "'...'"
        text = _unquote(text.strip())
    return text.strip()


def _is_preamble(line: str) -> bool:
    bare = line.strip().strip("*#_ ").strip()
    return QUESTION_SLOT not in bare and bool(_HEADING.match(bare) or _PREAMBLE.match(bare))


def _unquote(text: str) -> str:
    """The text without quotes around all of it (only when no other such quote is inside)."""
    for opening, closing in _QUOTES:
        inner = text[1:-1]
        if (
            len(text) >= 2
            and text[0] == opening
            and text[-1] == closing
            and opening not in inner
            and closing not in inner
        ):
            return inner
    return text


def fix_slot(prompt: str) -> str:
    """The prompt with exactly one ``{question}`` slot (see the module docstring)."""
    prompt = _SLOT_VARIANT.sub(QUESTION_SLOT, prompt)
    if QUESTION_SLOT not in prompt:
        return f"{prompt}\n\n{QUESTION_SLOT}"
    first, rest = prompt.split(QUESTION_SLOT, 1)
    return first + QUESTION_SLOT + rest.replace(QUESTION_SLOT, "the question")


def reject_reason(prompt: str, max_chars: int) -> str | None:
    """Why ``prompt`` cannot be used as a prompt, or None when it can."""
    if not prompt.strip():
        return "it was empty"
    if len(prompt) > max_chars:
        return f"it was longer than {max_chars} characters"
    if _ERROR.search(prompt):
        return "it looked like an error message"
    if _REFUSAL.search(prompt):
        return "it was a refusal"
    if _ACKNOWLEDGEMENT.match(prompt):
        return "it was a reply to the request, not a prompt"
    if _is_garbled(prompt):
        return "it was repetitive or garbled"
    return None


_BUDGET_REASON = ("it was about the reply's token limit, which the assistant is never told (ask for reasoning only "
                  "as long as the question needs instead)")


def _without_budget_sentences(prompt: str) -> str | None:
    """Prompts only (an analysis may, and should, talk about the budget it was told): the prompt without its
    sentences that mention the reply limit (repair, as for the slot: the rest is often a usable instruction),
    or None when too little is left besides the slot."""
    if not _MENTIONS_REPLY_LIMIT.search(prompt):
        return prompt
    lines = [" ".join(sentence for sentence in _SENTENCE_END.split(line) if not _MENTIONS_REPLY_LIMIT.search(sentence))
             for line in prompt.splitlines()]
    kept = re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in lines)).strip()
    return kept if _word_count(kept) >= MIN_WORDS_WITHOUT_BUDGET else None


def _word_count(prompt: str) -> int:
    """Words of a prompt besides the slot."""
    return len(re.findall(r"[A-Za-z]+", prompt.replace(QUESTION_SLOT, "")))


def _quoted_reason(prompt: str, shown: Sequence[str], ignore: frozenset[tuple[str, ...]]) -> str | None:
    """Why a prompt is tied to particular questions: it quotes one of the ``shown`` ones."""
    runs = word_runs(prompt) - ignore
    if any(runs & word_runs(text) for text in shown):
        return f"it quoted {COPIED_WORDS} or more words of an example question (a prompt must fit every question)"
    return None


def _echo_reason(prompt: str, request: frozenset[tuple[str, ...]], ignore: frozenset[tuple[str, ...]]) -> str | None:
    """A user prompt that repeats a run of our request's words (however the request is worded) hands our
    instructions to the scored model as its task."""
    return _USER_ECHO_REASON if (word_runs(prompt) - ignore) & request else None


def shared_runs(questions: Sequence[str]) -> frozenset[tuple[str, ...]]:
    """Word runs found in at least two of ``questions``: a task's own instructions, not one question."""
    seen: dict[tuple[str, ...], int] = {}
    for text in questions:
        for run in word_runs(text):
            seen[run] = seen.get(run, 0) + 1
    return frozenset(run for run, count in seen.items() if count >= 2)


def word_runs(text: str) -> set[tuple[str, ...]]:
    """Every run of ``COPIED_WORDS`` consecutive words of ``text``, lowercased."""
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i : i + COPIED_WORDS]) for i in range(len(words) - COPIED_WORDS + 1)}


def _is_garbled(text: str) -> bool:
    body = text.replace(QUESTION_SLOT, " ")
    visible = [c for c in body if not c.isspace()]
    if visible and sum(c.isalpha() for c in visible) < 0.4 * len(visible):
        return True  # mostly symbols or digits
    data = body.encode()
    if len(data) >= 200 and len(zlib.compress(data)) < 0.15 * len(data):
        return True  # one phrase looping: English prose compresses to about half, loops to a few percent
    words = body.lower().split()
    if len(words) >= 8 and len(set(words)) < 0.25 * len(words):
        return True
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    return len(lines) >= 4 and len(set(lines)) <= len(lines) // 2
