"""From a model response to a comparable answer, the same way for every prompt.

Two steps:

1. **Locate the answer segment.** The content of the last non-empty ``<answer>…</answer>`` tag. When
   the response has no complete tag, the lenient fallback applies: the text after a final unclosed
   ``<answer>`` (generation stopped before the closing tag), else the whole response.
2. **Parse the segment for the task's answer kind.** Inside a tag the *first* well-formed candidate
   wins: the model wrote what it meant there. In the whole-response fallback the *last* candidate
   wins: models reason first and conclude last. This gives small models consistent partial credit
   without ever depending on which user prompt produced the response.

Every parser returns a normalized answer string, or None when nothing usable is found; none raises
on any input string.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

LETTERS = string.ascii_uppercase

_TAG = re.compile(r"<\s*answer\s*>(.*?)<\s*/\s*answer\s*>", re.IGNORECASE | re.DOTALL)
_OPEN_TAG = re.compile(r"<\s*answer\s*>", re.IGNORECASE)


@dataclass(frozen=True)
class AnswerSegment:
    text: str
    # True when the text came from an <answer> tag (first candidate wins), False for the fallback.
    tagged: bool


def find_answer_segment(response: str) -> AnswerSegment:
    """The last non-empty <answer> tag's content, else the lenient fallback (see the module doc)."""
    contents = [match.strip() for match in _TAG.findall(response)]
    contents = [text for text in contents if text]
    if contents:
        return AnswerSegment(contents[-1], tagged=True)
    opens = list(_OPEN_TAG.finditer(response))
    if opens:
        tail = response[opens[-1].end():]
        # A stray closing fragment ("</ans") left by a stop string is not part of the answer.
        tail = re.split(r"<\s*/", tail, maxsplit=1)[0].strip()
        if tail:
            return AnswerSegment(tail, tagged=True)
    return AnswerSegment(response.strip(), tagged=False)


def normalize_text(text: str) -> str:
    """Lower case, punctuation and the articles a/an/the removed, whitespace collapsed."""
    text = text.lower()
    text = "".join(" " if char in string.punctuation else char for char in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _pick(candidates: list[tuple[int, str]], tagged: bool) -> str | None:
    """First candidate by position inside a tag, last one in the whole-response fallback."""
    if not candidates:
        return None
    ordered = sorted(candidates, key=lambda item: item[0])
    return ordered[0][1] if tagged else ordered[-1][1]


# ---- numbers ------------------------------------------------------------------------------------

_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
          "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
WORD_VALUES = {word: value for value, word in enumerate(_UNITS)}
WORD_VALUES.update({word: 20 + 10 * index for index, word in enumerate(_TENS)})

# Digits with optional thousands separators and decimals, not glued to letters ("3rd", "x2", "10am").
_DIGITS = r"(?<![\w.])[-+\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\w)(?!\.\d)"
# Number words from zero to ninety-nine ("twenty-one", "twenty one").
_WORDS = (r"\b(?:(?:" + "|".join(_TENS) + r")(?:[\s-](?:" + "|".join(_UNITS[1:10]) + r"))?|"
          + "|".join(_UNITS) + r")\b")
_NUMBER = re.compile(f"{_DIGITS}|{_WORDS}", re.IGNORECASE)
# "one" after these words is a pronoun ("the red one"), not a count.
_PRONOUN_ONE = re.compile(r"\b(?:the|a|this|that|each|which|every|any|no|another|only)\s+$", re.IGNORECASE)


def number_value(token: str) -> float | None:
    """The value of one number token ("3", "-2.5", "1,000", "three", "twenty-one"), else None."""
    token = token.strip().lower().replace("\u2212", "-")
    if token in WORD_VALUES:
        return float(WORD_VALUES[token])
    parts = re.split(r"[\s-]+", token)
    if len(parts) == 2 and parts[0] in _TENS and parts[1] in _UNITS[1:10]:
        return float(WORD_VALUES[parts[0]] + WORD_VALUES[parts[1]])
    if re.fullmatch(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?", token):
        return float(token.replace(",", ""))
    return None


def number_candidates(text: str) -> list[tuple[int, float]]:
    """(position, value) of every number written in digits or words in ``text``."""
    found = []
    for match in _NUMBER.finditer(text):
        token = match.group(0)
        if token.lower() == "one" and _PRONOUN_ONE.search(text[: match.start()]):
            continue
        value = number_value(token)
        if value is not None:
            found.append((match.start(), value))
    return found


def parse_number(text: str) -> float | None:
    """The value of a gold answer such as "3", "three", "1,000" or "-2.5" (None when not a number)."""
    text = text.strip()
    value = number_value(text)
    if value is not None:
        return value
    found = number_candidates(text)
    # Only a lone number counts: "3 apples" is a number, "3 or 4" is not a number answer.
    return found[0][1] if len(found) == 1 else None


def format_number(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def extract_number(segment: AnswerSegment) -> str | None:
    values = [(position, format_number(value)) for position, value in number_candidates(segment.text)]
    return _pick(values, segment.tagged)


# ---- ratings 1–5 --------------------------------------------------------------------------------

# A rating with its optional scale, so that "3/5" and "4 out of 5 stars" are one candidate each.
_RATING = re.compile(
    r"(?<![\w.])(\d+(?:\.\d+)?|" + "|".join(_UNITS[1:6]) + r")(?!\w)(?!\.\d)"
    r"(?:\s*(?:/|out\s+of)\s*(?:5|five)(?!\w))?",
    re.IGNORECASE,
)


# The scale itself ("from 1 to 5", "1-5") is not a rating.
_SCALE = re.compile(r"(?<![\w.])(?:1|one)\s*(?:-|\u2013|to)\s*(?:5|five)(?!\w)", re.IGNORECASE)


def extract_rating(segment: AnswerSegment) -> str | None:
    text = _SCALE.sub(lambda match: " " * len(match.group(0)), segment.text)
    candidates = []
    for match in _RATING.finditer(text):
        value = number_value(match.group(1))
        if value is not None and value == int(value) and 1 <= value <= 5:
            candidates.append((match.start(), str(int(value))))
    return _pick(candidates, segment.tagged)


# ---- closed label sets --------------------------------------------------------------------------

def phrase_mentions(text: str, phrases: Sequence[tuple[str, str]]) -> list[tuple[int, str]]:
    """(position, value) of whole-phrase, case-insensitive mentions of (value, phrase) pairs. Longer
    phrases claim their text first, so "non-entailment" is never also read as "entailment"."""
    taken: list[tuple[int, int]] = []
    mentions = []
    for value, phrase in sorted(phrases, key=lambda item: len(item[1]), reverse=True):
        if not phrase:
            continue
        pattern = re.compile(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", re.IGNORECASE)
        for match in pattern.finditer(text):
            if any(match.start() < end and start < match.end() for start, end in taken):
                continue
            taken.append((match.start(), match.end()))
            mentions.append((match.start(), value))
    return mentions


def _strip_decoration(text: str) -> str:
    return text.strip().strip(" \t\n\"'`*.,;:!?").strip()


def extract_label(segment: AnswerSegment, labels: Sequence[str]) -> str | None:
    """One of ``labels`` (spelled as in ``labels``), matched case-insensitively as a whole phrase."""
    labels = [label for label in labels if label.strip()]
    # "b" answers the label "(b)": brackets around a whole answer are decoration too.
    bare = _strip_decoration(segment.text).strip("()[] ").lower()
    if segment.tagged:
        exact = [label for label in labels if label.strip().strip("()[] ").lower() == bare]
        if exact:
            return exact[0]
    return _pick(phrase_mentions(segment.text, [(label, label.strip()) for label in labels]), segment.tagged)


# ---- multiple choice ----------------------------------------------------------------------------

_BARE_LETTER = re.compile(r"[(\[]?\s*([A-Za-z])\s*[)\]]?[.:]?")
# Letters outside parentheses must be capitals: "answer is a dog" names no option.
_LEADING_LETTER = re.compile(r"(?i:(?:option|choice|answer)\s*[:\-]?\s*)?(?:\(([A-Za-z])\)|([A-Z])[).:\]](?=\s|$))")
_PAREN_LETTER = re.compile(r"\(([A-Za-z])\)")
_CUE_LETTER = re.compile(r"(?i:\b(?:answer|option|choice)\s*(?:is|would be|:)?\s*:?\s*)\(?([A-Z])\)?(?![\w'])")
_LINE_LETTER = re.compile(r"(?m)^\s*\(?([A-Z])[).:]\s")
_LONE_CAPITAL = re.compile(r"(?<![\w'])([A-Z])(?![\w'])")


def _valid_letters(options: Sequence[str]) -> str:
    # Without known options, up to ten letters (A-J) are accepted.
    return LETTERS[: len(options)] if options else LETTERS[:10]


def _option_mentions(text: str, options: Sequence[str]) -> list[tuple[int, str]]:
    # Trailing punctuation is optional: "blue ball" mentions the option "blue ball.".
    return phrase_mentions(text, [(LETTERS[index], option.strip().rstrip(".!?;:,").strip())
                                  for index, option in enumerate(options[:26])])


def extract_choice(segment: AnswerSegment, options: Sequence[str]) -> str | None:
    """The chosen option letter: "(B)", "B", "B.", "option B", or the option's own text."""
    options = list(options)[: len(LETTERS)]
    valid = _valid_letters(options)
    text = segment.text.strip()
    normalized_options = [normalize_text(option) for option in options]
    # The whole segment is one option's text, or one letter: the same reading in both modes.
    if normalize_text(text) and normalize_text(text) in normalized_options:
        return LETTERS[normalized_options.index(normalize_text(text))]
    bare = _BARE_LETTER.fullmatch(text)
    if bare and bare.group(1).upper() in valid:
        return bare.group(1).upper()
    if segment.tagged:
        return _choice_in_tag(text, options, valid, normalized_options)
    return _choice_in_fallback(text, options, valid)


def _choice_in_tag(text: str, options: Sequence[str], valid: str, normalized_options: list[str]) -> str | None:
    leading = _LEADING_LETTER.match(text)
    if leading:
        letter = (leading.group(1) or leading.group(2)).upper()
        if letter in valid:
            return letter
    for pattern in (_PAREN_LETTER, _CUE_LETTER):
        for match in pattern.finditer(text):
            if match.group(1).upper() in valid:
                return match.group(1).upper()
    mentions = _option_mentions(text, options)
    if mentions:
        return min(mentions)[1]
    # A fragment of exactly one option ("black book" for "The black book is the leftmost.").
    fragment = normalize_text(text)
    if len(fragment) >= 3:
        holders = [index for index, option in enumerate(normalized_options) if f" {fragment} " in f" {option} "]
        if len(holders) == 1:
            return LETTERS[holders[0]]
    for match in _LONE_CAPITAL.finditer(text):
        letter = match.group(1)
        # "A" and "I" starting a sentence are words, not answers.
        if letter in ("A", "I") and re.match(r"\s+[a-z]", text[match.end():]):
            continue
        if letter in valid:
            return letter
    return None


def _choice_in_fallback(text: str, options: Sequence[str], valid: str) -> str | None:
    candidates = [(match.start(), match.group(1).upper())
                  for pattern in (_PAREN_LETTER, _CUE_LETTER)
                  for match in pattern.finditer(text)
                  if match.group(1).upper() in valid]
    candidates += [(match.start(), match.group(1)) for match in _LINE_LETTER.finditer(text) if match.group(1) in valid]
    candidates += _option_mentions(text, options)
    return _pick(candidates, tagged=False)


# ---- open answers -------------------------------------------------------------------------------

_ANSWER_CUE = re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:)\s*", re.IGNORECASE)


def extract_open(segment: AnswerSegment) -> str:
    """The answer text: the tag content, or in the fallback the text after the last "answer is/:" cue,
    else the last non-empty line."""
    if segment.tagged:
        return segment.text
    cues = list(_ANSWER_CUE.finditer(segment.text))
    if cues:
        tail = segment.text[cues[-1].end():].strip()
        if tail:
            return tail.splitlines()[0].strip()
    lines = [line.strip() for line in segment.text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
