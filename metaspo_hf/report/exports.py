"""The deployable prompt: system_prompt.txt, an Ollama Modelfile snippet, a chat-template snippet and
the reference code's result file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..files import read_json, write_json_atomic, write_text_atomic
from ..models.base import make_chat
from ..reference_files import reference_result
from ..runs import RunDir

# Placeholder user turn in the exported chat snippet.
USER_PLACEHOLDER = "<your user prompt>"


def method_nodes(path: Path, method: str) -> Any:
    """The search nodes of the run's method: nodes.json maps each searched method to its nodes."""
    if not path.exists():
        return []
    nodes = read_json(path)
    return nodes.get(method, []) if isinstance(nodes, dict) else nodes


def write_exports(run: RunDir, result: dict, nodes: Any) -> None:
    """The optimized system prompt as plain text, Modelfile, chat messages and the reference's result file."""
    prompt = result["optimized_system_prompt"]
    write_text_atomic(run.file(RunDir.SYSTEM_PROMPT), prompt + "\n")
    write_text_atomic(
        run.file(RunDir.MODELFILE),
        f"# Ollama Modelfile snippet: the system prompt optimized for {result['model']}.\n"
        "# Add it below your FROM line.\n"
        f'SYSTEM """{prompt}"""\n',
    )
    write_json_atomic(
        run.file(RunDir.CHAT_SNIPPET), {"messages": make_chat(prompt, USER_PLACEHOLDER)}
    )
    write_json_atomic(run.file(RunDir.REFERENCE_RESULT), reference_result(prompt, nodes))
