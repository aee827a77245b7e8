"""Files shared with the reference MetaSPO code, read and written in its formats.

- System prompt files (``--system-prompt``): plain text, the reference's prompt files
  (``{"prompt": ...}``: its ``prompts/default.json``, ``cot.json``, ``service.json``), or any result
  file that holds ``optimized_system_prompt`` (the reference's, our ``result.json`` and
  ``metaspo_result.json``).
- Fixed user prompts for unseen generalization (``evaluation.user_prompts_dir``): the reference's
  ``prompts/unseen_generalization_user_prompts/`` folder holds ``up_for_unseen_gen_<task>.json`` per
  unseen task, a JSON list of user prompts with a ``{question}`` slot. Its protocol scores the first
  ``num_test_up`` (10) of them; ours the first ``evaluation.user_prompts_per_task``. A task's file is
  looked for under its own name, then under the reference's name for it (``REFERENCE_TASK_NAMES``).
- The result file (``metaspo_result.json`` in a run folder): ``{"optimized_system_prompt": ...,
  "nodes": [...]}``, where ``nodes`` holds one list per update of the search (the start, then each
  inner and each outer step), of one list per task, of the nodes kept after that update, best first,
  in the reference's record keys. Our own, richer node records stay in ``nodes.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .errors import MetaspoError
from .tasks.task import QUESTION_SLOT, Task

# The keys a JSON system prompt file may hold its prompt under, in the order they are looked for.
SYSTEM_PROMPT_KEYS = ("prompt", "optimized_system_prompt")
# The reference's value for a metric it did not compute: we never score meta-training tasks on their
# test split, so every node's test_metric is this.
NOT_EVALUATED = -1
USER_PROMPTS_FILE = "up_for_unseen_gen_{task}.json"
# Our unseen tasks whose user prompt files the reference names differently.
REFERENCE_TASK_NAMES = {
    "epistemic_reasoning": "epistemic",
    "reasoning_about_colored_objects": "reasoning_colored_objects",
    "anthropic_harmless": "harmless",
}


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


def read_fixed_user_prompts(folder: str, tasks: Sequence[Task], count: int) -> dict[str, list[str]]:
    """Task name -> the first ``count`` user prompts of its file in ``folder`` (module doc)."""
    root = Path(folder)
    if not root.is_dir():
        raise MetaspoError(f"evaluation.user_prompts_dir {folder}: no such folder",
                           hint="the reference code keeps them in prompts/unseen_generalization_user_prompts/")
    return {task.name: _user_prompts(_user_prompts_file(root, task.name), count) for task in tasks}


def _user_prompts_file(root: Path, task: str) -> Path:
    names = list(dict.fromkeys([task, REFERENCE_TASK_NAMES.get(task, task)]))
    paths = [root / USER_PROMPTS_FILE.format(task=name) for name in names]
    found = next((path for path in paths if path.is_file()), None)
    if found is None:
        raise MetaspoError(f"evaluation.user_prompts_dir {root}: no user prompts for unseen task {task!r} "
                           f"(looked for {' and '.join(path.name for path in paths)})")
    return found


def _user_prompts(path: Path, count: int) -> list[str]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MetaspoError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise MetaspoError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(content, list) or not content or not all(isinstance(p, str) for p in content):
        raise MetaspoError(f"{path}: expected a non-empty JSON list of user prompts")
    prompts = content[:count]
    for index, prompt in enumerate(prompts):
        if QUESTION_SLOT not in prompt:
            raise MetaspoError(f"{path}: user prompt [{index}] has no {QUESTION_SLOT} slot: {prompt[:60]!r}")
    return prompts


def reference_result(system_prompt: str, nodes: list[dict]) -> dict:
    """The reference code's result file from our node records (``nodes.json``; module doc). Records
    without ``kept_in`` (run folders made before it existed) are left out."""
    kept = [node for node in nodes if node.get("kept_in")]
    tasks = list(dict.fromkeys(node["task"] for node in kept))
    updates = 1 + max((update for node in kept for update in node["kept_in"]), default=-1)
    nested = [
        [[_reference_node(node) for node in _best_first(kept, task, update)] for task in tasks]
        for update in range(updates)
    ]
    return {"optimized_system_prompt": system_prompt, "nodes": nested}


def _best_first(nodes: list[dict], task: str, update: int) -> list[dict]:
    chosen = [node for node in nodes if node["task"] == task and update in node["kept_in"]]
    # The order of our beams: higher score first, then the older node.
    return sorted(chosen, key=lambda node: (-node["train_score"], node["id"]))


def _reference_node(node: dict) -> dict:
    return {
        "id": node["id"],
        "task": node["task"],
        "system_prompt": node["system_prompt"],
        "instruction": node["user_prompt"],
        "parent_id": node["parent_id"],
        "depth": node["depth"],
        "eval_metric": node["train_score"],
        "test_metric": NOT_EVALUATED,
    }
