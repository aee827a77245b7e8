"""Files shared with the reference MetaSPO code, read and written in its formats.

- System prompt files (``--system-prompt``): plain text, the reference's prompt files
  (``{"prompt": ...}``: its ``prompts/default.json``, ``cot.json``, ``service.json``), or any result
  file that holds ``optimized_system_prompt`` (the reference's, our ``result.json`` and
  ``metaspo_result.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import MetaspoError

# The keys a JSON system prompt file may hold its prompt under, in the order they are looked for.
SYSTEM_PROMPT_KEYS = ("prompt", "optimized_system_prompt")


def read_system_prompt(path: str) -> str:
    """The system prompt in ``path``: the whole text of a plain file, or the value of the first of
    ``SYSTEM_PROMPT_KEYS`` in a JSON file. JSON without those keys is an error, never a prompt."""
    where = f"--system-prompt {path}"
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise MetaspoError(f"{where}: cannot read ({exc.strerror})") from None
    if not text:
        raise MetaspoError(f"{where}: the file is empty")
    content = _json_content(path, text, where)
    if content is None:
        return text
    key = next((key for key in SYSTEM_PROMPT_KEYS if isinstance(content, dict) and key in content), None)
    if key is None:
        found = f"keys {', '.join(map(repr, content))}" if isinstance(content, dict) and content else _kind(content)
        raise MetaspoError(f"{where}: a JSON system prompt file needs the key "
                           f"{' or '.join(map(repr, SYSTEM_PROMPT_KEYS))}, found {found}",
                           hint="or give the prompt as plain text in a .txt file")
    prompt = content[key]
    if not isinstance(prompt, str) or not prompt.strip():
        raise MetaspoError(f"{where}: {key!r} must be a non-empty string, got {prompt!r}")
    # The value as written: a prompt read back from a result file stays the prompt that was scored.
    return prompt


def _json_content(path: str, text: str, where: str):
    """The parsed content when the file is JSON (a .json name, or text that parses as an object or a
    list), else None. A .json file that does not parse is an error."""
    try:
        content = json.loads(text)
    except ValueError as exc:
        if Path(path).suffix.lower() == ".json":
            raise MetaspoError(f"{where}: not valid JSON ({exc})") from None
        return None
    if Path(path).suffix.lower() == ".json" or isinstance(content, (dict, list)):
        return content
    return None


def _kind(content) -> str:
    """How an error names a JSON value that is not an object with keys."""
    kinds = {dict: "an empty object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}
    return kinds.get(type(content), "a number")
