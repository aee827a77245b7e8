"""User-facing errors: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import difflib


class MetaspoError(Exception):
    """A problem with the user's input (recipe, data, prompt, command line), not a bug.

    The message names the file, key or value; ``hint`` says what to do about it.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None, key: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        # The recipe field at fault, when raised from a config dataclass; the message then starts
        # with that field's name, and the recipe loader prefixes the file and section path.
        self.key = key

    def one_line(self) -> str:
        text = self.message if not self.hint else f"{self.message} (hint: {self.hint})"
        return " ".join(text.split())


def did_you_mean(name: str, choices) -> str | None:
    """A hint naming the closest known choices to a mistyped ``name``, or None."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else None
